"""Train a generative verifier (``thinkforge.verifier``) and measure it where best-of-N needs it.

    thinkforge train verifier --policy runs/rlhf/sft/model --task mul --out runs/gv

Data: the policy samples ``samples`` completions for each of ``problems`` training problems; every
distinct extracted answer, plus the gold answer, becomes a verification example (prompt
``question=answer?``, target: the gold trace, the answer it computes, then ``yes`` or ``no``). The
verifier starts from the policy's weights (it already computes the trace) and is trained by SFT on
these rows (``train sft --data``), with its checkpoints and exact resume.

The 'no' rows are subsampled to as many as the 'yes' rows.

``eval.json``, for each scoring mode of the verifier (``verdict``: P(yes); ``answer``: how likely its
check writes the candidate as the computed answer): on ``eval_problems`` held-out problems, the policy draws 2 × ``n`` samples; over the
first ``n`` of them, the *ranking accuracy* (a right completion scored above a wrong one of the same
problem; ties half), best-of-``n`` by the verifier's P(yes) against maj@``n`` and maj@2``n``, each with
its 95% interval and the tokens it spent per problem (policy samples, plus the verifier's checks for
best-of-n), so the comparison is at equal generated tokens.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from thinkforge.config import ConfigError, check, option, save_config
from thinkforge.generation import Engine, SamplingParams
from thinkforge.metrics import ci_record, maj_correct
from thinkforge.models import load_model
from thinkforge.sampling import sample_and_grade
from thinkforge.scorers import ranking_accuracy
from thinkforge.tasks import get_task
from thinkforge.tasks.files import write_jsonl
from thinkforge.train.loop import RunOptions, start_run
from thinkforge.train.sft import SFTConfig, train_sft
from thinkforge.verifier import MODES, GenerativeVerifier, verification_prompt, verification_target


@dataclass
class VerifierConfig(RunOptions):
    policy: str = option("runs/demo/sft-cot/model", "the policy whose answers are verified (and the verifier's start)")
    task: str = option("mul", "a task with gold steps")
    task_options: dict = option({}, "the task's knobs")
    problems: int = option(3000, "training problems whose sampled answers make the verification examples")
    samples: int = option(4, "policy samples per training problem")
    temperature: float = option(1.0, "sampling temperature of the policy")
    max_new_tokens: int = option(128, "completion cap of the policy and of the verifier's check")
    out: str = option("runs/verifier", "run folder")
    steps: int = option(400, "SFT steps")
    batch_size: int = option(64, "rows per step")
    lr: float = option(1e-3, "peak learning rate (constant after warm-up)")
    max_len: int = option(192, "tokens per row")
    eval_problems: int = option(300, "held-out problems for eval.json (0 = skip)")
    n: int = option(16, "candidates per problem for best-of-n (maj@n and maj@2n are the baselines)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("problems", "samples", "max_new_tokens", "steps", "batch_size", "max_len", "n"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.eval_problems >= 0 and self.temperature > 0 and self.lr > 0, "need eval_problems >= 0, "
              "temperature > 0, lr > 0")


def verification_rows(graded, seed: int = 0) -> list[dict]:
    """One row per distinct sampled answer of each problem, plus the gold answer (always a 'yes'); then as
    many 'no' rows as 'yes' rows (a seeded subset), so the verdict cannot lean on a prior."""
    rows = []
    for g in graded:
        seen = {}
        for a, ok in zip(g.answers, g.correct):
            if a is not None and a.strip():
                seen.setdefault(a.strip(), ok)
        seen.setdefault(g.problem.answer, True)
        for a, ok in seen.items():
            rows.append({"prompt": verification_prompt(g.problem, a), "completion": verification_target(g.problem, a, ok),
                         "problem_id": g.problem.id, "label": "yes" if ok else "no"})
    yes = [r for r in rows if r["label"] == "yes"]
    no = [r for r in rows if r["label"] == "no"]
    random.Random(seed).shuffle(no)
    keep = {id(r) for r in yes + no[: len(yes)]}
    return [r for r in rows if id(r) in keep]


def train_verifier(cfg: VerifierConfig) -> Path:
    task = get_task(cfg.task, **cfg.task_options)
    if not task.has_gold_steps:
        raise ConfigError(f"task {cfg.task!r} has no gold steps: a generative verifier here learns to write the gold trace")
    run = start_run(cfg.out, replace(cfg, resume=False))  # the checkpoint lives in run/sft (the SFT run checks it)
    if os.environ.get("RANK", "0") == "0":
        save_config(cfg, run / "config.toml")
    data = run / "verification.jsonl"
    if not (cfg.resume and data.is_file()):  # a resumed run trains on the rows it started with
        policy, tok = load_model(cfg.policy, device=cfg.device)
        params = SamplingParams(n=cfg.samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        with torch.no_grad():
            graded = sample_and_grade(Engine(policy, tok), task, task.problems(cfg.problems, "train", seed=cfg.seed), params)
        write_jsonl(verification_rows(graded, cfg.seed), data)
    train_sft(SFTConfig(data=str(data), model=cfg.policy, out=str(run / "sft"), steps=cfg.steps, batch_size=cfg.batch_size,
                        lr=cfg.lr, min_lr_ratio=1.0, max_len=cfg.max_len, seed=cfg.seed, save_every=cfg.save_every,
                        resume=cfg.resume, overwrite=not cfg.resume, device=cfg.device, threads=cfg.threads))
    if cfg.eval_problems and os.environ.get("RANK", "0") == "0":
        report = evaluate_verifier(cfg, task, str(run / "sft" / "model"))
        (run / "eval.json").write_text(json.dumps(report, indent=2))
    return run


def evaluate_verifier(cfg: VerifierConfig, task, verifier_path: str) -> dict:
    problems = task.problems(cfg.eval_problems, "test", seed=cfg.seed)
    policy, tok = load_model(cfg.policy, device=cfg.device)
    params = SamplingParams(n=2 * cfg.n, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 1)
    with torch.no_grad():
        graded = sample_and_grade(Engine(policy, tok), task, problems, params)
    vmodel, vtok = load_model(verifier_path, device=cfg.device)
    report = {"problems": len(problems), "n": cfg.n}
    for mode in MODES:
        report[mode] = _best_of_n(cfg, graded, GenerativeVerifier(vmodel.eval(), vtok, cfg.max_new_tokens, mode=mode))
    return report


def _best_of_n(cfg: VerifierConfig, graded, verifier: GenerativeVerifier) -> dict:
    groups, scores, outcomes, bon, maj, maj2, one = [], [], [], [], [], [], []
    policy_tokens, verifier_tokens = [], []
    for g in graded:
        n = cfg.n
        before = verifier.tokens_generated
        s = verifier.score([g.problem] * n, g.answers[:n])
        verifier_tokens.append(verifier.tokens_generated - before)
        policy_tokens.append(sum(len(c.ids) for c in g.completions[:n]))
        groups += [g.problem.id] * n
        scores += s
        outcomes += [float(x) for x in g.correct[:n]]
        bon.append(float(g.correct[max(range(n), key=lambda i: s[i])]))
        maj.append(float(maj_correct(g.answers[:n], g.correct[:n])))
        maj2.append(float(maj_correct(g.answers, g.correct)))
        one.append(sum(g.correct[:n]) / n)
    ci = lambda v: ci_record(v, cfg.seed)  # noqa: E731
    per_problem = lambda v: sum(v) / len(v)  # noqa: E731
    sample_tokens = per_problem(policy_tokens) / cfg.n
    return {"ranking": ranking_accuracy(groups, scores, outcomes),
            "methods": {
                f"bon-gv@{cfg.n}": {**ci(bon), "tokens": per_problem(policy_tokens) + per_problem(verifier_tokens)},
                f"maj@{cfg.n}": {**ci(maj), "tokens": per_problem(policy_tokens)},
                f"maj@{2 * cfg.n}": {**ci(maj2), "tokens": 2 * per_problem(policy_tokens)},
                "sample": {**ci(one), "tokens": sample_tokens}},
            "verifier_tokens_per_problem": per_problem(verifier_tokens)}
