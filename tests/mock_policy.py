"""A scripted policy for tests: the completion of each row is written by a Python function.

``plan(prompt_text, j)`` returns the text the j-th sample of a prompt will write; the backend emits it
token by token with one-hot logits (so any temperature reproduces it), then the end-of-turn token.
When the engine forces tokens (a thinking budget), the plan waits, and once ``</think>`` is forced it
goes on with what it planned to write after its own ``</think>``: a model that answers when told to.
"""
import torch

from thinkforge import format as fmt
from thinkforge.generation import Engine


class PlanBackend:
    def __init__(self, tok, plan):
        self.tok, self.plan = tok, plan
        self.end = tok.convert_tokens_to_ids(fmt.ChatFormat.of(tok).end)
        self.prompts = []  # every prompt text prefilled, in order

    def _logits(self):
        out = torch.full((len(self.rows), len(self.tok)), -30.0)
        for r, (planned, done) in enumerate(self.rows):
            out[r, planned[len(done)] if len(done) < len(planned) else self.end] = 0.0
        return out

    def prefill(self, prompt_ids, n, max_new):
        self.rows = []
        for ids in prompt_ids:
            text = self.tok.decode(ids)
            self.prompts.append(text)
            for j in range(n):
                self.rows.append((self.tok.encode(self.plan(text, j), add_special_tokens=False), []))
        return self._logits()

    def decode(self, tokens):
        close = self.tok.convert_tokens_to_ids(fmt.THINK_CLOSE)
        rows = []
        for (planned, done), t in zip(self.rows, tokens.tolist()):
            k, done = len(done), done + [t]
            if k < len(planned) and planned[k] != t:  # a token forced by the engine
                if t == close and close in planned:
                    planned = done + planned[planned.index(close) + 1 :]
                else:
                    planned = done + planned[k:]
            rows.append((planned, done))
        self.rows = rows
        return self._logits()

    def select(self, rows):
        self.rows = [self.rows[i] for i in rows]


def plan_engine(tok, plan):
    """(engine, backend): an Engine whose completions follow ``plan``."""
    backend = PlanBackend(tok, plan)
    model = torch.nn.Linear(1, 1)  # the engine only asks it for a device
    return Engine(model, tok, backend=lambda m: backend), backend


class TableRM:
    """A reward model with known scores: ``step_score(step_text)`` per step (PRM), or per completion (ORM)."""

    def __init__(self, step_score, kind="prm"):
        self.step_score, self.kind, self.calls, self.tokens_read = step_score, kind, [], 0

    def score(self, prompts, completions):
        from thinkforge.scorers import split_steps

        self.calls.append(list(completions))
        self.tokens_read += sum(len(c) for c in completions)
        if self.kind == "orm":
            return [[self.step_score(c)] for c in completions]
        return [[self.step_score(s.strip()) for s in split_steps(c)[1]] for c in completions]
