"""Evaluation: sample a model on held-out problems and report pass@1, pass@k and maj@k with 95% CIs.

    thinkforge eval --model runs/demo/sft-cot/model --task mul --problems 300 --samples 8
    thinkforge eval --model runs/demo/grpo/model --method maj,bon-prm,prm-beam --n 1,2,4,8,16 --prm runs/prm/model
    thinkforge eval --model runs/demo/grpo/model --method budget --n 0,8,16,32,64

For each problem: one greedy completion and ``samples`` sampled ones (temperature ``temperature``).
Rows (the records ``results.json`` keeps):

| method | metric | meaning |
|---|---|---|
| greedy | pass@1 | share of problems whose greedy completion is correct |
| sample | pass@1 | mean over problems of the share of correct samples (pass@1 averaged over k) |
| sample | pass@k | unbiased pass@k (Chen et al. 2021) |
| maj@k | accuracy | majority vote over the k extracted answers is correct |

With ``--method`` the command sweeps test-time methods (``search.METHODS``) over the compute levels
``--n`` instead: one row per (method, n), ``method`` = ``maj@16``, ``bon-prm@16``, ``prm-beam@16``,
``budget=32`` …, ``metric`` = ``accuracy``, with ``tokens`` (policy tokens per problem) and
``rm_tokens`` (reward-model tokens per problem); ``--plot`` draws accuracy against tokens.

Intervals are 95% percentile bootstraps over problems. ``tokens`` is the mean number of generated
tokens per problem that the method spent (maj@k and pass@k: k samples); the sampled pass@1 row also
carries ``thinking_tokens``, the mean thinking length of one sample.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkforge import format as fmt
from thinkforge.config import check, option
from thinkforge.generation import Engine, SamplingParams
from thinkforge.metrics import bootstrap_ci, maj_correct, pass_at_k
from thinkforge.sampling import Graded, sample_and_grade, trace_rows
from thinkforge.tasks import Problem, Task, get_task


@dataclass
class EvalConfig:
    model: str = option("runs/demo/sft-cot/model", "model folder (or hub id) to evaluate")
    task: str = option("mul", "task name or .jsonl/.parquet file")
    task_options: dict = option({}, "the task's knobs, e.g. digits_a=3,digits_b=2")
    problems: int = option(200, "held-out (test split) problems")
    samples: int = option(8, "sampled completions per problem (k of pass@k and maj@k)")
    temperature: float = option(1.0, "sampling temperature of the sampled completions")
    top_p: float = option(1.0, "nucleus sampling threshold")
    max_new_tokens: int = option(256, "completion length cap")
    thinking_budget: int | None = option(None, "cap on thinking tokens (the engine then forces </think>)")
    seed: int = option(0, "seed for the problems and the samples")
    batch_rows: int = option(256, "rows generated together (memory vs speed)")
    method: list[str] = option([], "test-time methods to sweep (empty: the greedy / pass@k / maj@k table): "
                                   "greedy, sample, maj, bon-orm, bon-prm, wmaj, prm-greedy, prm-beam, budget, wait")
    n: list[int] = option([1, 2, 4, 8, 16], "compute levels of the sweep: samples (maj, bon-*, wmaj), candidates per "
                                            "step (prm-*), thinking tokens (budget), wait rounds (wait)")
    prm: str | None = option(None, "PRM folder (thinkforge train rm --kind prm) for bon-prm, wmaj, prm-*")
    orm: str | None = option(None, "ORM folder (thinkforge train rm --kind orm) for bon-orm, wmaj")
    aggregate: str = option("min", "step scores -> one score: min, prod or last")
    beam_width: int = option(4, "partial traces kept by prm-beam")
    prompt_style: str = option("chat", "chat, cot (zero-shot 'think step by step') or few-shot")
    shots: int = option(2, "solved examples in a few-shot prompt")
    plot: str | None = option(None, "draw accuracy vs tokens of the sweep into this PNG")
    out: str | None = option(None, "write the rows as JSON here, and every sample (with --method: every candidate a method chose "
                                         "among, with its reward-model scores) to <out>.traces.jsonl")
    device: str = option("auto", "auto, cpu or cuda")

    def __post_init__(self):
        check(self.problems >= 1 and self.samples >= 1 and self.max_new_tokens >= 1 and self.batch_rows >= 1,
              "problems, samples, max_new_tokens and batch_rows must be >= 1")
        from thinkforge.scorers import AGGREGATES
        from thinkforge.search import METHODS, PROMPT_STYLES, missing_reward_model

        unknown = [m for m in self.method if m not in METHODS]
        check(not unknown, f"unknown method(s) {unknown}: choose from {sorted(METHODS)}")
        check(all(k >= 0 for k in self.n) and bool(self.n), "n must be a non-empty list of numbers >= 0")
        check(all(k >= 1 for k in self.n) or set(self.method) <= {"budget", "greedy"},
              "n = 0 only makes sense for budget (answer without thinking)")
        check(self.aggregate in AGGREGATES, f"aggregate must be one of {sorted(AGGREGATES)}, got {self.aggregate!r}")
        check(self.prompt_style in PROMPT_STYLES, f"prompt_style must be one of {PROMPT_STYLES}")
        check(self.beam_width >= 1 and self.shots >= 0, "beam_width must be >= 1 and shots >= 0")
        for m in self.method:
            why = missing_reward_model(m, self.prm, self.orm)
            check(why is None, why or "")


def row(stage: str, method: str, metric: str, values, tokens: float, seed: int = 0, **extra) -> dict:
    mean, lo, hi = bootstrap_ci(values, seed=seed)
    return {"stage": stage, "method": method, "metric": metric, "value": mean, "ci_low": lo, "ci_high": hi,
            "n": len(values), "tokens": tokens, **extra}


def mean_tokens(graded: list[Graded]) -> float:
    return sum(len(c.ids) for g in graded for c in g.completions) / max(1, len(graded))


def evaluate_model(model, tok, task: Task, problems: list[Problem], stage: str, samples: int = 8,
                   temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
                   thinking_budget: int | None = None, seed: int = 0, batch_rows: int = 256,
                   traces: list | None = None) -> tuple[list[dict], dict]:
    """Greedy pass@1, sampled pass@1, pass@k and maj@k rows for one model (see the module table), and the
    per-problem values behind them (``{"greedy": [...], "sample": [...], "maj": [...]}``, for paired tests).
    ``traces``: a list that receives every completion's trace row (``sampling.trace_rows``)."""
    engine = Engine(model, tok)
    common = dict(max_new_tokens=max_new_tokens, thinking_budget=thinking_budget, seed=seed)
    greedy = sample_and_grade(engine, task, problems, SamplingParams(temperature=0, **common), batch_rows)
    sampled = sample_and_grade(engine, task, problems, SamplingParams(
        temperature=temperature, top_p=top_p, n=samples, **common), batch_rows)
    if traces is not None:
        traces += trace_rows(greedy, stage=stage, method="greedy") + trace_rows(sampled, stage=stage, method="sample")
    k = samples
    think = sum(c.thinking_tokens for g in sampled for c in g.completions) / max(1, len(sampled) * k)
    values = {
        "greedy": [float(g.correct[0]) for g in greedy],
        "sample": [sum(g.correct) / k for g in sampled],
        "pass": [pass_at_k(k, sum(g.correct), k) for g in sampled],
        "maj": [float(maj_correct(g.answers, g.correct)) for g in sampled],
    }
    rows = [
        row(stage, "greedy", "pass@1", values["greedy"], mean_tokens(greedy), seed),
        row(stage, "sample", "pass@1", values["sample"], mean_tokens(sampled) / k, seed, thinking_tokens=think),
        row(stage, "sample", f"pass@{k}", values["pass"], mean_tokens(sampled), seed),
        row(stage, f"maj@{k}", "accuracy", values["maj"], mean_tokens(sampled), seed),
    ]
    return rows, values


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of result rows."""
    lines = [f"{'stage':<14} {'method':<12} {'metric':<9} {'value':>6}  {'95% CI':<15} {'n':>5} {'tokens':>7} {'thinking':>8}"]
    for r in rows:
        ci = f"[{r['ci_low'] * 100:5.1f}, {r['ci_high'] * 100:5.1f}]"
        think = f"{r['thinking_tokens']:8.1f}" if "thinking_tokens" in r else ""
        lines.append(f"{r['stage']:<14} {r['method']:<12} {r['metric']:<9} {r['value'] * 100:5.1f}%  {ci:<15} "
                     f"{r['n']:>5} {r['tokens']:>7.1f} {think}".rstrip())
    return "\n".join(lines)


def sweep(search, problems: list[Problem], plan: list[tuple[str, list[int]]], stage: str, seed: int = 0,
          log=print, traces: list | None = None) -> list[dict]:
    """One accuracy row per (method, n) of ``plan`` (``search.METHODS`` names, each with its compute levels);
    greedy and sample run once whatever their levels say. The sample pool is drawn once, at the largest n
    any pool method asks for, and every smaller n reads its first samples. ``traces`` receives a trace row
    per candidate each method chose among (:func:`method_trace_rows`)."""
    from thinkforge.search import POOL_METHODS, run_method

    pooled = [n for m, ns in plan if m in POOL_METHODS for n in ns]
    if pooled:
        search.pool(problems, max(pooled))
    rows = []
    for m, ns in plan:
        for n in ([1] if m in ("greedy", "sample") else ns):
            outs = run_method(m, search, problems, n)
            label = m if m in ("greedy", "sample") else f"{m}={n}" if m in ("budget", "wait") else f"{m}@{n}"
            rows.append(row(stage, label, "accuracy", [float(o.correct) for o in outs],
                            sum(o.tokens for o in outs) / len(outs), seed, family=m, compute=n,
                            rm_tokens=sum(o.rm_tokens for o in outs) / len(outs)))
            if log:
                log(format_rows(rows[-1:]).splitlines()[-1])
            if traces is not None:
                traces += method_trace_rows(search, problems, outs, stage=stage, method=label)
    return rows


def method_trace_rows(search, problems: list[Problem], outcomes, **tags) -> list[dict]:
    """Trace rows of a test-time method: per problem, every candidate it chose among (a pool's samples, step
    search's finished traces), with ``chosen`` (the one it answered with) and, when a reward model scored
    them, ``orm`` (its score) and ``steps``: ``[{"text", "score"}]``, the PRM's score of each step of the
    completion as the PRM cut it (``scorers.split_steps``; the head before the first step is not scored).
    Other fields as ``sampling.trace_rows`` (``problem_id``, ``question``, ``gold``, ``sample``,
    ``completion``, ``thinking``, ``answer``, ``correct``, ``well_formed``, ``tokens``)."""
    from thinkforge.scorers import split_steps
    from thinkforge.search import Candidate

    delimiter = getattr(search.prm, "delimiter", search.task.step_delimiter)
    rows = []
    for p, o in zip(problems, outcomes):
        cands = o.candidates or [Candidate(o.text, o.answer, o.correct, o.tokens)]
        for k, c in enumerate(cands):
            parsed = fmt.parse_completion(c.text)
            r = {**tags, "problem_id": p.id, "question": p.question, "gold": p.answer, "sample": k, "completion": c.text,
                 "thinking": parsed.thinking, "answer": c.answer, "correct": bool(c.correct),
                 "well_formed": parsed.well_formed, "tokens": c.tokens, "chosen": k == o.chosen or not o.candidates}
            if "orm" in c.rm_scores and c.rm_scores["orm"]:
                r["orm"] = c.rm_scores["orm"][0]
            if "prm" in c.rm_scores:
                steps = split_steps(c.text, delimiter)[1]
                if len(c.rm_scores["prm"]) == len(steps):
                    r["steps"] = [{"text": t, "score": sc} for t, sc in zip(steps, c.rm_scores["prm"])]
            rows.append(r)
    return rows


def run_eval(cfg: EvalConfig) -> list[dict]:
    from thinkforge.models import load_model

    model, tok = load_model(cfg.model, device=cfg.device)
    task = get_task(cfg.task, **cfg.task_options)
    problems = task.problems(cfg.problems, "test", seed=cfg.seed)
    stage = Path(cfg.model).name if Path(cfg.model).name != "model" else Path(cfg.model).parent.name
    with torch.no_grad():
        if cfg.method:
            from thinkforge.scorers import RewardModel
            from thinkforge.search import Search

            search = Search(Engine(model, tok), task, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, aggregate=cfg.aggregate, beam_width=cfg.beam_width,
                            prompt_style=cfg.prompt_style, shots=cfg.shots, seed=cfg.seed, batch_rows=cfg.batch_rows,
                            prm=RewardModel.load(cfg.prm, cfg.device) if cfg.prm else None,
                            orm=RewardModel.load(cfg.orm, cfg.device) if cfg.orm else None)
            traces: list[dict] = []
            rows = sweep(search, problems, [(m, cfg.n) for m in cfg.method], stage, cfg.seed, log=None, traces=traces)
        else:
            traces = []
            rows, _ = evaluate_model(model, tok, task, problems, stage, cfg.samples, cfg.temperature,
                                     cfg.top_p, cfg.max_new_tokens, cfg.thinking_budget, cfg.seed, cfg.batch_rows,
                                     traces=traces)
    if cfg.out:
        from thinkforge.tasks.files import write_jsonl

        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps({"task": cfg.task, "model": cfg.model, "rows": rows}, indent=2))
        # every sample (or every candidate a method chose among), beside the results (sampling.trace_rows and
        # method_trace_rows document the fields)
        write_jsonl(traces, Path(cfg.out).with_suffix(".traces.jsonl"))
    return rows
