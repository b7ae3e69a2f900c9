"""A generative verifier: it reads a problem and a candidate answer, writes its own check as tokens, then a
verdict; the probability of "yes" is the candidate's score (Zhang et al. 2024, "Generative Verifiers";
Cobbe et al. 2021's verifier with the check written out).

    v = GenerativeVerifier(model, tok)
    v.score(problems, ["30883", "30893"])      # [0.97, 0.02]: P(yes) after the verifier's own check

Why: a discriminative head must check a product in one forward pass, which a tiny network cannot do
(the PRM/ORM/Bradley-Terry heads here rank a right completion above a wrong one of the same problem
about half the time). Written out, the check is the computation the policy already knows how to do.

The format (``verification_prompt`` / ``verification_target``): the prompt is the question and the
candidate, ``347*89=30883?``; the target is the gold trace, the answer it computes on its own line, the
candidate copied under it, then the verdict: ``<think>\\n…steps…\\n30883\\n30883\\n</think>\\n<answer>yes</answer>``. A verdict is read at the
first token after ``<answer>``: P(yes) = p("y") / (p("y") + p("n")). The check depends only on the
problem and the candidate answer, so it is computed once per distinct answer (``tokens_generated``
counts what it cost).
"""
from __future__ import annotations

import torch

from thinkforge import format as fmt
from thinkforge.generation import Engine, SamplingParams
from thinkforge.tasks import Problem


def verification_prompt(problem: Problem, candidate: str) -> str:
    """The question the verifier is asked (a user message; the model's chat template renders it)."""
    return f"{problem.question}={candidate}?"


def verification_target(problem: Problem, candidate: str, candidate_correct: bool) -> str:
    """The check the verifier learns to write: the gold trace, the answer it computes, the candidate copied
    below it (so the verdict compares two adjacent lines), then the verdict."""
    thinking = "\n".join([*(problem.steps or []), problem.answer, candidate])
    return fmt.render_completion("yes" if candidate_correct else "no", thinking)


MODES = ("verdict", "answer")


class GenerativeVerifier:
    """``mode``: ``verdict`` scores P(yes) at the verdict; ``answer`` scores how likely the verifier, after
    its own check, writes the *candidate* as the answer it computed (the geometric mean of the candidate's
    token probabilities at that line) — a score that needs no learned comparison of two strings."""

    def __init__(self, model, tok, max_new_tokens: int = 128, batch_rows: int = 128, mode: str = "verdict"):
        if mode not in MODES:
            raise ValueError(f"verifier mode must be one of {MODES}, got {mode!r}")
        self.model, self.tok, self.max_new_tokens, self.batch_rows = model, tok, max_new_tokens, batch_rows
        self.mode = mode
        self.engine = Engine(model, tok)
        self.yes, self.no = (tok.encode(c, add_special_tokens=False)[0] for c in ("y", "n"))
        self.tokens_generated = 0
        self._cache: dict[tuple[str, str], float] = {}

    @torch.no_grad()
    def score(self, problems: list[Problem], answers: list[str | None]) -> list[float]:
        """P(yes) per (problem, candidate answer); 0.0 for a missing answer."""
        todo = sorted({(p.question, a) for p, a in zip(problems, answers) if a is not None} - set(self._cache))
        by_q = {p.question: p for p in problems}
        for i in range(0, len(todo), self.batch_rows):
            chunk = todo[i : i + self.batch_rows]
            prompts = [self.engine.chat.prompt(verification_prompt(by_q[q], a)) for q, a in chunk]
            outs = self.engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=self.max_new_tokens))
            self.tokens_generated += sum(len(o.ids) for o in outs)
            for (q, a), prompt, o in zip(chunk, prompts, outs):
                self._cache[(q, a)] = (self._p_yes(prompt, o.text) if self.mode == "verdict"
                                       else self._p_answer(prompt, o.text, a))
        return [0.0 if a is None else self._cache[(p.question, a)] for p, a in zip(problems, answers)]

    def _p_answer(self, prompt: str, check: str, candidate: str) -> float:
        """Geometric-mean probability of the candidate written as the computed-answer line of the check
        (the line after the last step); 0 if the check never closes its thinking."""
        thinking = check.split(fmt.THINK_CLOSE, 1)[0] if fmt.THINK_CLOSE in check else None
        lines = (thinking or "").rstrip("\n").split("\n")
        if thinking is None or len(lines) < 3:  # <think>, the steps, the computed answer, the copy
            return 0.0
        head = prompt + "\n".join(lines[:-2]) + "\n"
        prefix = self.tok.encode(head, add_special_tokens=False)
        target = self.tok.encode(candidate + "\n", add_special_tokens=False)
        ids = torch.tensor([prefix + target], device=next(self.model.parameters()).device)
        logp = torch.log_softmax(self.model(input_ids=ids).logits[0, len(prefix) - 1 : -1].float(), -1)
        return float(logp.gather(-1, ids[0, len(prefix):, None]).mean().exp())

    def _p_yes(self, prompt: str, check: str) -> float:
        """P(yes) at the verdict that follows the verifier's own check (0 if it never reaches a verdict)."""
        if fmt.ANSWER_OPEN not in check:
            return 0.0
        text = prompt + check.split(fmt.ANSWER_OPEN, 1)[0] + fmt.ANSWER_OPEN
        ids = torch.tensor([self.tok.encode(text, add_special_tokens=False)], device=next(self.model.parameters()).device)
        logits = self.model(input_ids=ids).logits[0, -1].float()
        pair = torch.softmax(logits[[self.yes, self.no]], dim=0)
        return float(pair[0])
