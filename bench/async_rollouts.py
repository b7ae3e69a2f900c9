"""One-step-off roll-outs vs synchronous GRPO: seconds per step on the demo's GRPO stage, same run otherwise.

    make demo                                   # once: trains runs/demo/sft-cot/model (the start)
    .venv/bin/python bench/async_rollouts.py [--steps 20] [--rounds 2]

The demo's GRPO settings (P = 8 x G = 16, at most 96 new tokens, DAPO loss with dynamic sampling, accuracy
+ format rewards, lr 6e-5) from its CoT SFT model, three ways on this machine's 2 cores:
- sync:       sampling then training in one process, 2 torch threads;
- async 1+1:  the trainer with 1 thread, the sampler process with 1 (``--async-rollouts``, lag 1);
- async 2+1:  the trainer with 2 threads, the sampler with 1 (3 threads on 2 cores).
Seconds per step = the median ``step_time`` over steps 2..N (the first step of a run samples
synchronously in every mode); the modes alternate round by round. Also printed: each mode's mean reward
over the run (lag changes what is learned, a little). Ends with:
RESULT async_rollouts sync_s=… async_s=… speedup=… async21_s=… speedup21=…
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from scratch import scratch  # noqa: E402  (bench/scratch.py: removed when the run exits)

from thinkforge.train.grpo import GRPOConfig, train_grpo

MODES = {"sync": dict(threads=2), "async 1+1": dict(threads=1, async_rollouts=True, rollout_threads=1),
         "async 2+1": dict(threads=2, async_rollouts=True, rollout_threads=1)}


def run(start: str, steps: int, **mode) -> tuple[list[float], float]:
    out = Path(scratch()) / "run"
    train_grpo(GRPOConfig(model=start, task="mul", task_options={"digits_a": 3, "digits_b": 2}, out=str(out),
                          steps=steps, prompts_per_step=8, group_size=16, max_new_tokens=96, lr=6e-5,
                          save_every=10**6, trace_groups=0, overwrite=True, **mode))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in rows[1:]], statistics.mean(r["reward"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--start", default="runs/demo/sft-cot/model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if not (Path(args.start) / "config.json").exists():
        sys.exit(f"{args.start}: no model there; `make demo` trains it (or pass --start)")
    times = {m: [] for m in MODES}
    rewards = {m: [] for m in MODES}
    for r in range(args.rounds):
        for name in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
            t, rew = run(args.start, args.steps, **MODES[name])
            times[name] += t
            rewards[name].append(rew)
            torch.set_num_threads(2)
    med = {m: statistics.median(t) for m, t in times.items()}
    for m in MODES:
        print(f"{m:<10} {med[m]:.3f} s/step (median of {len(times[m])})  mean reward {statistics.mean(rewards[m]):.3f}")
    print(f"RESULT async_rollouts sync_s={med['sync']:.3f} async_s={med['async 1+1']:.3f} "
          f"speedup={med['sync'] / med['async 1+1']:.2f} async21_s={med['async 2+1']:.3f} "
          f"speedup21={med['sync'] / med['async 2+1']:.2f}")


if __name__ == "__main__":
    main()
