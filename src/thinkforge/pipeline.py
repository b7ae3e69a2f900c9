"""Recipes run stage by stage. The first one is the demo: does thinking help at equal compute?

    thinkforge demo            # ~5 minutes on 2 CPU cores
    thinkforge demo --quick    # < 1 minute, for tests

Two models with the same architecture, the same training problems and the same number of training
tokens (so the same compute) are trained on 3-digit × 2-digit multiplication: one on direct answers,
one on chain-of-thought traces (partial products, digits least-significant first). Direct examples
are shorter, so at equal steps the direct model gets proportionally more rows per step
(``batch_size × mean CoT length / mean direct length``): it sees more problems, never fewer tokens.
Both are evaluated on held-out problems (greedy, sampled pass@1 over k samples, pass@k, maj@k with 95%
bootstrap intervals), and a paired bootstrap tests CoT against direct on the same problems.
Writes ``<out>/results.json``, ``<out>/report.md``, ``loss.png`` and ``accuracy.png``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkforge.config import check, option
from thinkforge.evaluate import evaluate_model, format_rows
from thinkforge.metrics import paired_bootstrap
from thinkforge.models import load_model
from thinkforge.tasks import get_task


@dataclass
class DemoConfig:
    out: str = option("runs/demo", "output folder")
    quick: bool = option(False, "a < 1 minute version (fewer steps and problems) for tests")
    task: str = option("mul", "task with gold traces")
    task_options: dict = option({"digits_a": 3, "digits_b": 2}, "the task's knobs")
    size: str = option("small", "tiny model size (same for both models)")
    steps: int = option(450, "SFT steps per model (quick: 40)")
    batch_size: int = option(64, "rows per step of the CoT model (the direct model gets the same tokens)")
    max_len: int = option(128, "longest example in tokens")
    lr: float = option(2e-3, "peak learning rate")
    min_lr_ratio: float = option(1.0, "final lr share: 1.0 = constant after warm-up (measured: 23% vs 12% greedy CoT with decay to 0.1)")
    eval_problems: int = option(300, "held-out problems (quick: 40)")
    samples: int = option(8, "samples per problem for pass@1, pass@k and maj@k (quick: 4)")
    seed: int = option(0, "seed")
    threads: int = option(2, "torch CPU threads")

    def __post_init__(self):
        if self.quick:
            self.steps, self.eval_problems, self.samples = min(self.steps, 40), min(self.eval_problems, 40), 4
        check(self.steps >= 1 and self.eval_problems >= 1 and self.samples >= 1,
              "steps, eval_problems and samples must be >= 1")


def _mean_length(task, trace: str, seed: int, n: int = 400) -> float:
    """Mean tokens (prompt + completion) of a training example with this trace."""
    from thinkforge import format as fmt
    from thinkforge.models import char_tokenizer
    from thinkforge.train.sft import completion_text

    tok = char_tokenizer(task.sample_text())
    probs = task.problems(n, "train", seed)
    return sum(len(tok.encode(fmt.render_prompt(p.question) + completion_text(p, trace))) for p in probs) / n


def _train_stats(run: Path, seconds: float) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"steps": len(rows), "supervised_tokens": sum(r["tokens"] for r in rows),
            "seen_tokens": sum(r["seen_tokens"] for r in rows), "seconds": seconds}


def run_demo(cfg: DemoConfig) -> dict:
    from thinkforge.report import write_report
    from thinkforge.train.sft import SFTConfig, train_sft

    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task, **cfg.task_options)
    test = task.problems(cfg.eval_problems, "test", seed=cfg.seed)
    rows, models, train, per_problem = [], {}, {}, {}
    lengths = {trace: _mean_length(task, trace, cfg.seed) for trace in ("direct", "cot")}
    for trace in ("direct", "cot"):
        stage = f"sft-{trace}"
        t0 = time.perf_counter()
        run = train_sft(SFTConfig(
            task=cfg.task, task_options=cfg.task_options, trace=trace, size=cfg.size, out=str(out / stage),
            steps=cfg.steps, batch_size=round(cfg.batch_size * lengths["cot"] / lengths[trace]), packing=False,
            max_len=cfg.max_len, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed, save_every=cfg.steps, overwrite=True,
            warmup=min(20, cfg.steps // 5),
        ))
        train[stage] = _train_stats(run, time.perf_counter() - t0)
        models[stage] = str(run / "model")
        model, tok = load_model(models[stage], device="cpu")
        with torch.no_grad():
            stage_rows, per_problem[stage] = evaluate_model(model, tok, task, test, stage, samples=cfg.samples,
                                        max_new_tokens=128, seed=cfg.seed)
        rows += stage_rows
        print(format_rows(stage_rows), flush=True)
    c = paired_bootstrap(per_problem["sft-direct"]["greedy"], per_problem["sft-cot"]["greedy"], seed=cfg.seed)
    comparisons = [{"a": "sft-direct", "b": "sft-cot", "metric": "greedy pass@1", **c}]
    results = {
        "task": f"{cfg.task} {cfg.task_options}",
        "rows": rows,
        "models": models,
        "train": train,
        "comparisons": comparisons,
        "seconds": time.perf_counter() - start,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    results["summary"] = _summary(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(out, results, {s: out / s for s in models})
    return results


def _summary(results: dict) -> str:
    get = {(r["stage"], r["method"], r["metric"]): r for r in results["rows"]}
    d, c = get[("sft-direct", "greedy", "pass@1")], get[("sft-cot", "greedy", "pass@1")]
    t = results["train"]
    return (f"Same model size, same compute ({t['sft-direct']['seen_tokens']:,} vs {t['sft-cot']['seen_tokens']:,} "
            f"training tokens): "
            f"greedy accuracy {d['value'] * 100:.1f}% with direct answers vs {c['value'] * 100:.1f}% with "
            f"chain-of-thought traces, on {d['n']} held-out problems; the whole run took {results['seconds']:.0f} s.")
