"""Rejection sampling (DeepSeek-R1 §2.3.3): keep only verified-correct, well-formed traces for SFT.

    thinkforge sample --model runs/r1/reasoning-rl/model --task mul --problems 2000 --samples 4 \\
        --out runs/r1/rs.jsonl

For each training problem, sample ``samples`` completions (or, with ``method``, let a test-time
search method write one trace per problem, e.g. PRM beam search with ``--method prm-beam --prm
runs/prm/model``); keep those whose extracted answer the task scores 1.0 *and* whose format is well formed (``<think>…</think>`` then one answer), drop exact
duplicates within a problem, and keep at most ``keep_per_problem``. Rows are ``{"prompt",
"completion", "problem_id"}``, the input of ``thinkforge train sft --data``. The same function makes a
teacher's traces for distillation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from thinkforge import format as fmt
from thinkforge.config import check, option
from thinkforge.generation import Engine, SamplingParams
from thinkforge.sampling import sample_and_grade
from thinkforge.search import METHODS, Search, missing_reward_model, run_method
from thinkforge.tasks import get_task
from thinkforge.tasks.files import write_jsonl


@dataclass
class SampleConfig:
    model: str = option("runs/demo/sft-cot/model", "the model that writes the traces")
    task: str = option("mul", "task name or .jsonl/.parquet file")
    task_options: dict = option({}, "the task's knobs")
    problems: int = option(2000, "training-split problems to sample")
    samples: int = option(4, "completions per problem")
    keep_per_problem: int = option(1, "at most this many distinct correct traces per problem")
    temperature: float = option(1.0, "sampling temperature")
    max_new_tokens: int = option(256, "completion length cap")
    seed: int = option(1, "seed for the problems and the samples")
    method: str = option("sample", "sample, or a test-time method that writes one trace per problem (search.METHODS: "
                                   "prm-beam, prm-greedy, bon-prm, maj, ...)")
    n: int = option(16, "compute of the method: samples or candidates per step")
    prm: str | None = option(None, "PRM folder for the PRM-guided methods")
    batch_rows: int = option(256, "rows generated together")
    out: str = option("runs/rs.jsonl", "JSONL file to write")
    device: str = option("auto", "auto, cpu or cuda")

    def __post_init__(self):
        check(min(self.problems, self.samples, self.keep_per_problem, self.max_new_tokens) >= 1,
              "problems, samples, keep_per_problem and max_new_tokens must be >= 1")
        check(self.method in METHODS, f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        check(self.n >= 1 and self.batch_rows >= 1, "n and batch_rows must be >= 1")
        why = missing_reward_model(self.method, self.prm, None, orm_flag=False)
        check(why is None, why or "")


def rejection_sample(model, tok, task, problems, samples: int, keep_per_problem: int = 1, temperature: float = 1.0,
                     max_new_tokens: int = 256, seed: int = 1) -> tuple[list[dict], dict]:
    """Verified, well-formed, de-duplicated traces and the counts behind them."""
    params = SamplingParams(n=samples, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    with torch.no_grad():
        graded = sample_and_grade(engine := Engine(model, tok), task, problems, params)
    rows, stats = [], {"problems": len(problems), "samples": 0, "correct": 0, "well_formed_correct": 0, "kept": 0}
    for g in graded:
        seen = set()
        for c, ok in zip(g.completions, g.correct):
            stats["samples"] += 1
            stats["correct"] += ok
            if not ok or not fmt.parse_completion(c.text).well_formed:
                continue
            stats["well_formed_correct"] += 1
            if c.text in seen or len(seen) >= keep_per_problem:
                continue
            seen.add(c.text)
            rows.append(trace_row(g.problem, c.text, engine.chat))
    stats["kept"] = len(rows)
    stats["problems_covered"] = len({r["problem_id"] for r in rows})
    return rows, stats


def search_traces(model, tok, task, problems, cfg: SampleConfig) -> tuple[list[dict], dict]:
    """One trace per problem from a test-time method; kept when verified correct and well formed."""
    from thinkforge.scorers import RewardModel
    search = Search(Engine(model, tok), task, prm=RewardModel.load(cfg.prm, cfg.device) if cfg.prm else None,
                    temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                    batch_rows=cfg.batch_rows)
    with torch.no_grad():
        outcomes = run_method(cfg.method, search, problems, cfg.n)
    rows = [trace_row(p, o.text, search.engine.chat) for p, o in zip(problems, outcomes)
            if o.correct and fmt.parse_completion(o.text).well_formed]
    stats = {"problems": len(problems), "method": f"{cfg.method}@{cfg.n}", "samples": len(problems),
             "correct": sum(o.correct for o in outcomes), "well_formed_correct": len(rows), "kept": len(rows),
             "problems_covered": len(rows), "tokens_per_problem": sum(o.tokens for o in outcomes) / max(1, len(outcomes))}
    return rows, stats


def trace_row(problem, completion: str, chat: fmt.ChatFormat) -> dict:
    """One SFT row (``thinkforge train sft --data``) for a verified completion of ``problem``."""
    return {"prompt": chat.prompt(problem.question), "completion": completion + chat.end,
            "problem_id": problem.id}


def run_sample(cfg: SampleConfig) -> dict:
    from thinkforge.models import load_model

    model, tok = load_model(cfg.model, device=cfg.device)
    task = get_task(cfg.task, **cfg.task_options)
    problems = task.problems(cfg.problems, "train", seed=cfg.seed)
    if cfg.method != "sample":
        rows, stats = search_traces(model, tok, task, problems, cfg)
    else:
        rows, stats = rejection_sample(model, tok, task, problems, cfg.samples, cfg.keep_per_problem,
                                       cfg.temperature, cfg.max_new_tokens, cfg.seed)
    if not rows:
        raise ValueError(f"no verified trace among {stats['samples']} samples: nothing to write to {cfg.out}")
    write_jsonl(rows, cfg.out)
    return stats
