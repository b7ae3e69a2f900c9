"""Reward models at inference: a score per reasoning step (PRM) or per completion (ORM).

    rm = RewardModel.load("runs/prm/model")
    steps = rm.score(["347*89"], ["<think>\\n743*9=3213\\n...</think>\\n<answer>30883</answer>"])
    aggregate(steps[0], "min")      # one number per completion: min | prod | last

A completion is cut into **steps** by :func:`split_steps`: every line of the thinking block (the
task's step delimiter, a newline for every built-in task) is one step, and everything from
``</think>`` to the end is one last *answer step*, whose label is the outcome. A completion without
thinking is a single answer step, so ``last`` aggregation reads like an ORM and ``min`` like a
process verifier (Lightman et al. 2023: a solution is as good as its worst step).

A reward model is an ordinary HF token-classification checkpoint (``AutoModelForTokenClassification``,
one logit per token) whose ``config.json`` also records ``thinkforge_rm = {"kind", "step_delimiter"}`` (and for a
preference RM its ``pooling``; with ``pooling = "logprob"`` the checkpoint is a causal LM, its likelihood the reward).
A PRM is read at the last token of each step (the delimiter that ends it); an ORM (Cobbe et al. 2021)
is trained on every completion token and read at the last one. Scores are probabilities, sigmoid of the
logit.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from thinkforge import format as fmt

RM_KINDS = ("prm", "orm", "preference")  # preference: a Bradley-Terry scalar (a logit, not a probability)
POOLINGS = ("last", "sum", "logprob")  # how a preference RM reads one reward off its model (preference_rewards)
AGGREGATES = {
    "min": min,
    "prod": math.prod,
    "last": lambda scores: scores[-1],
}


def aggregate(scores: list[float], how: str = "min") -> float:
    """One number for a completion from its step scores; a completion with no step scores 0.

    >>> aggregate([0.9, 0.5, 0.8], "min"), aggregate([0.5, 0.5], "prod"), aggregate([0.9, 0.2], "last")
    (0.5, 0.25, 0.2)
    """
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {sorted(AGGREGATES)}, got {how!r}")
    return float(AGGREGATES[how](scores)) if scores else 0.0


def split_steps(completion: str, delimiter: str = "\n") -> tuple[str, list[str]]:
    """``(head, steps)`` with ``head + "".join(steps) == completion`` (the completion cut, not rewritten).

    ``head`` is everything up to and including ``<think>`` and the delimiter after it; each thinking step
    keeps its delimiter; the text from ``</think>`` on is the last step. Blank lines join the step before.
    Where the thinking ends is ``format.parse_completion``'s decision (see :func:`answer_steps`).

    >>> split_steps("<think>\\n3+4=7\\n7*2=14\\n</think>\\n<answer>14</answer>")
    ('<think>\\n', ['3+4=7\\n', '7*2=14\\n', '</think>\\n<answer>14</answer>'])
    >>> split_steps("<answer>14</answer>")
    ('', ['<answer>14</answer>'])
    """
    head, steps, _ = answer_steps(completion, delimiter)
    return head, steps


def answer_steps(completion: str, delimiter: str = "\n") -> tuple[str, list[str], list[bool]]:
    """:func:`split_steps` plus, per step, whether it is the answer step (the text after the thinking,
    or the whole completion when it has no think block)."""
    completion = completion.split(fmt.IM_END)[0]
    parsed = fmt.parse_completion(completion)
    if parsed.thinking is None:
        return "", [completion] if completion else [], [True] if completion else []
    head_end = parsed.thinking_start
    if completion.startswith(delimiter, head_end):
        head_end += len(delimiter)
    close = len(completion) if parsed.truncated_thinking else parsed.answer_start - len(fmt.THINK_CLOSE)
    head, thinking, answer = completion[:head_end], completion[head_end:close], completion[close:]
    pieces = thinking.split(delimiter)
    steps: list[str] = []
    for k, piece in enumerate(pieces):
        text = piece + (delimiter if k < len(pieces) - 1 else "")  # the last piece has no delimiter after it
        if not text:
            continue
        if not piece.strip() and steps:  # a blank line belongs to the step before it
            steps[-1] += text
        elif not piece.strip():  # blank lines before the first step belong to the head
            head += text
        else:
            steps.append(text)
    kinds = [False] * len(steps)
    if answer:
        steps.append(answer)
        kinds.append(True)
    return head, steps, kinds


def step_text(step: str) -> str:
    """A step without its delimiter and surrounding blanks (what a step checker reads)."""
    return step.strip()


def encode(tok, prompt: str, completion: str, delimiter: str = "\n") -> tuple[list[int], list[int], int]:
    """``(ids, step_ends, completion_start)``: prompt and completion token ids, the index of the last
    token of every step, and where the completion starts. Pieces are tokenized one by one, so a step
    boundary is always a token boundary, identically in training and scoring."""
    head, steps = split_steps(completion, delimiter)
    enc = lambda s: tok.encode(s, add_special_tokens=False) if s else []  # noqa: E731
    ids = enc(prompt)
    start = len(ids)
    ids += enc(head)
    ends = []
    for s in steps:
        piece = enc(s)
        if piece:
            ids += piece
            ends.append(len(ids) - 1)
    return ids, ends, start


def preference_ids(tok, prompt: str, completion: str) -> tuple[list[int], int]:
    """What a preference reward model reads, ``(ids, completion_start)``: prompt and completion (as
    :func:`encode` cuts them) followed by the end-of-turn token (TRL's RewardTrainer appends EOS the same way)."""
    ids, _, start = encode(tok, prompt, completion)
    return ids + tok.encode(fmt.ChatFormat.of(tok).end, add_special_tokens=False), start


def preference_rewards(model, ids: torch.Tensor, lengths: list[int], starts: list[int], pooling: str) -> torch.Tensor:
    """(S,) preference rewards of right-padded rows ``ids`` (S, T), differentiable; ``starts``: where each
    completion begins, ``lengths``: each row's length with the end-of-turn token.

    ``last``: the scalar head's logit at the appended end-of-turn token (InstructGPT, TRL). ``sum``: the
    scalar head's logits summed over the completion's tokens and the end token, so a flaw is scored where it
    is written instead of having to reach the last position through attention. ``logprob``: no new head —
    the sum of the log-probabilities the language model gives the completion's tokens and the end token
    (log π(completion | prompt), the quantity a DPO policy's implicit reward is built from), trained by the
    same Bradley-Terry loss; the language model's next-token prediction, which already tells a likely digit
    from an unlikely one, is kept instead of being replaced by a fresh head."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "logprob":
        from thinkforge.models import token_logprobs

        values, shift = token_logprobs(model, ids, 1.0)[0], 1  # (S, T-1): position t scores token t+1
    else:
        values, shift = model(input_ids=ids).logits[..., 0].float(), 0  # (S, T)
        if pooling == "last":
            return values[torch.arange(len(lengths)), torch.tensor(lengths) - 1]
    cols = torch.arange(values.shape[1])
    mask = (cols >= torch.tensor(starts)[:, None] - shift) & (cols < torch.tensor(lengths)[:, None] - shift)
    return (values * mask.to(values.device, values.dtype)).sum(1)


def pad_rows(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


class RewardModel:
    """A loaded PRM, ORM or preference RM. ``score`` is all that search needs; any object with ``kind`` and ``score``
    works in its place (the tests use scripted ones)."""

    def __init__(self, model, tok, kind: str = "prm", delimiter: str = "\n", batch_rows: int = 64,
                 pooling: str = "last"):
        if kind not in RM_KINDS:
            raise ValueError(f"reward model kind must be one of {RM_KINDS}, got {kind!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"reward model pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model, self.tok, self.kind, self.delimiter, self.batch_rows = model, tok, kind, delimiter, batch_rows
        self.pooling = pooling
        self.tokens_read = 0  # every token the model has read: the compute search spends on scoring

    @classmethod
    def load(cls, path: str, device: str = "auto") -> "RewardModel":
        from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

        from thinkforge.models import ModelLoadError, resolve_device

        p = Path(path)
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a reward model folder (no config.json)")
        try:
            meta = json.loads((p / "config.json").read_text()).get("thinkforge_rm")
        except (OSError, ValueError, AttributeError) as e:
            raise ModelLoadError(f"{path}/config.json: not a JSON object ({e})") from None
        if not isinstance(meta, dict) or meta.get("kind") not in RM_KINDS:
            raise ModelLoadError(f"{path}: not a thinkforge reward model (config.json has no thinkforge_rm kind); "
                                 "train one with `thinkforge train rm`")
        if meta.get("pooling", "last") not in POOLINGS:
            raise ModelLoadError(f"{path}: config.json thinkforge_rm.pooling is {meta['pooling']!r}, expected one of {POOLINGS}")
        lm = meta.get("pooling") == "logprob"  # a causal LM whose likelihood is the reward; else a one-logit head
        try:
            model = (AutoModelForCausalLM if lm else AutoModelForTokenClassification).from_pretrained(str(p))
            tok = AutoTokenizer.from_pretrained(str(p))
        except (OSError, ValueError) as e:
            kind = "causal-LM" if lm else "token-classification"
            raise ModelLoadError(f"{path}: cannot load a {kind} reward model ({e})") from None
        if not lm and model.config.num_labels != 1:
            raise ModelLoadError(f"{path}: not a thinkforge reward model (its head has {model.config.num_labels} labels, "
                                 "expected 1); train one with `thinkforge train rm`")
        return cls(model.to(resolve_device(device)).eval(), tok, meta["kind"], meta.get("step_delimiter", "\n"),
                   pooling=meta.get("pooling", "last"))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) logits of right-padded rows (causal attention: padding never reaches a real token)."""
        return self.model(input_ids=ids).logits[..., 0]

    @torch.no_grad()
    def score(self, prompts: list, completions: list[str]) -> list[list[float]]:
        """Per completion: its step scores (PRM), ``[outcome probability]`` (ORM) or ``[reward]`` (preference: the
        Bradley-Terry reward, :func:`preference_rewards`). ``prompts`` are questions
        (``str`` or ``Problem``, rendered with the chat template) or already rendered prompt texts."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if self.kind == "preference":
            encoded = [(ids, [], start) for ids, start in (preference_ids(self.tok, _prompt_text(p, self.tok), c)
                                                           for p, c in zip(prompts, completions))]
        else:
            encoded = [encode(self.tok, _prompt_text(p, self.tok), c, self.delimiter) for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        out: list[list[float]] = []
        for i in range(0, len(encoded), self.batch_rows):
            chunk = encoded[i : i + self.batch_rows]
            ids = pad_rows([e[0] for e in chunk], self.tok.pad_token_id or 0).to(device)
            self.tokens_read += sum(len(e[0]) for e in chunk)
            if self.kind == "preference":
                rewards = preference_rewards(self.model, ids, [len(e[0]) for e in chunk], [e[2] for e in chunk], self.pooling)
                out += [[float(r)] for r in rewards.cpu()]
                continue
            logits = self.logits(ids).float().cpu()
            probs = torch.sigmoid(logits)
            for row, (seq, ends, start) in enumerate(chunk):
                if self.kind == "orm":
                    out.append([float(probs[row, len(seq) - 1])] if len(seq) > start else [])
                else:
                    out.append([float(probs[row, e]) for e in ends])
        return out


def _prompt_text(p, tok) -> str:
    chat = fmt.ChatFormat.of(tok)
    return chat.as_prompt(p) if isinstance(p, str) else chat.prompt(p.question)


def step_metrics(scores: list[list[float]], labels: list[list[float]], threshold: float = 0.5) -> dict:
    """Step-level detection of **wrong** steps (label < 0.5) by score < threshold: precision, recall, F1,
    plus accuracy over all steps and F1 of the correct class. Lists are per completion, step by step."""
    tp = fp = fn = tn = 0
    for s_row, l_row in zip(scores, labels, strict=True):
        if len(s_row) != len(l_row):
            raise ValueError(f"{len(s_row)} step scores but {len(l_row)} labels for one completion")
        for s, lab in zip(s_row, l_row):
            wrong, flagged = lab < 0.5, s < threshold
            tp += wrong and flagged
            fp += flagged and not wrong
            fn += wrong and not flagged
            tn += not wrong and not flagged
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    good_p = tn / (tn + fn) if tn + fn else 0.0
    good_r = tn / (tn + fp) if tn + fp else 0.0
    f1 = lambda p, r: 2 * p * r / (p + r) if p + r else 0.0  # noqa: E731
    n = tp + fp + fn + tn
    return {"precision": prec, "recall": rec, "f1": f1(prec, rec), "f1_correct": f1(good_p, good_r),
            "accuracy": (tp + tn) / n if n else 0.0, "steps": n, "wrong_steps": tp + fn}


def ranking_accuracy(groups: list, scores: list[float], outcomes: list[float]) -> dict:
    """What best-of-N needs from a reward model: among pairs of one right and one wrong completion of the
    same problem (``groups`` says which problem), the share the score ranks right above wrong (ties count
    half; 0.5 = no better than chance)."""
    by: dict = {}
    for g, s, o in zip(groups, scores, outcomes, strict=True):
        by.setdefault(g, []).append((s, o >= 0.5))
    wins = pairs = 0.0
    for items in by.values():
        for s_right, ok in items:
            if ok:
                for s_wrong, ok2 in items:
                    if not ok2:
                        pairs += 1
                        wins += 1.0 if s_right > s_wrong else 0.5 if s_right == s_wrong else 0.0
    return {"accuracy": wins / pairs if pairs else 0.0, "pairs": int(pairs)}
