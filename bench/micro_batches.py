"""GRPO micro-batches by rows vs by a token budget, on the demo's own roll-outs: positions computed and time.

    make demo                                   # once: trains runs/demo/sft-cot/model
    .venv/bin/python bench/micro_batches.py [--model runs/demo/sft-cot/model] [--batches 6] [--rows 32] [--spread]

The roll-outs are what the demo's GRPO stage trains on: P = 8 problems × G = 16 samples of the CoT model,
temperature 1, at most 96 new tokens (completions vary in length). Each roll-out batch is trained on three
ways, each a forward and backward of the same loss (DAPO) over all 128 rows, gradients accumulated:
- ``whole``: one pass, every row padded to the batch's longest;
- ``rows``: ``--micro-batch-size R`` (parts of R rows in batch order, each padded to its longest row);
- ``tokens``: ``--micro-batch-tokens`` = R × the batch's mean needed length (the same mean part size in
  tokens): rows packed longest first, each part cut to its longest row.
It reports the padded positions each computes (exact, no timing noise) and the median seconds of the
passes (sides alternated per batch), and checks that the three accumulate the same gradient.

The demo's completions are all ~51 tokens, so there is little padding to save. ``--spread`` keeps the
model and the loss but gives the 128 rows the lengths of a reasoning model's roll-outs instead: completion
lengths drawn from a log-normal (median 150 tokens, σ = 0.8, cut to [8, 900]; seeded), random tokens,
old log-probs equal to the model's own (ratio 1), advantages ±1.
Ends with: RESULT micro_batches rows_positions=… tokens_positions=… rows_s=… tokens_s=… speedup=…
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from thinkforge.models import load_model
from thinkforge.tasks import get_task
from thinkforge.train.grpo import GRPOConfig, RolloutSource, make_loss_fn, needed_lengths, part_rows


def passes(model, batch: dict, cfg: GRPOConfig) -> tuple[float, int, dict]:
    """Seconds, padded positions computed, and the accumulated gradient of one roll-out batch under ``cfg``."""
    mask = batch["mask"]
    parts = part_rows(mask, cfg, 0, 1)  # what the trainer's loss makes of them
    need = needed_lengths(mask)
    positions = sum(len(rows) * int(need[rows].max()) for rows in parts)
    loss_fn = make_loss_fn(cfg)
    model.zero_grad()
    t = time.perf_counter()
    for k in range(len(parts)):
        loss, _ = loss_fn(model, {"rollouts": batch, "part": k, "parts": len(parts)})
        loss.backward()
    seconds = time.perf_counter() - t
    return seconds, positions, {name: p.grad.clone() for name, p in model.named_parameters()}


def spread_batch(model, seed: int, rows: int = 128, prompt: int = 30) -> dict:
    """A roll-out batch of random tokens whose completion lengths spread as a reasoning model's do."""
    from thinkforge.models import token_logprobs

    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(rows, generator=g) * 0.8 + torch.log(torch.tensor(150.0))).clamp(8, 900).long()
    width = prompt + int(lengths.max())
    ids = torch.randint(4, model.config.vocab_size, (rows, width), generator=g)
    mask = torch.zeros(rows, width - 1)
    for i, n in enumerate(lengths.tolist()):
        mask[i, prompt - 1 : prompt - 1 + n] = 1
        ids[i, prompt + n :] = 0  # padding
    with torch.no_grad():
        old = token_logprobs(model, ids, 1.0)[0] * mask
    adv = torch.where(torch.rand(rows, generator=g) < 0.5, -1.0, 1.0)
    return {"ids": ids, "mask": mask, "old_logp": old, "adv": adv, "stats": {}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/demo/sft-cot/model")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--rows", type=int, default=32, help="rows per part of the row-count side")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spread", action="store_true", help="synthetic roll-outs with reasoning-model length spread")
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").exists():
        sys.exit(f"{args.model}: no model there; `make demo` trains it (or pass --model)")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu")
    task = get_task("mul", digits_a=3, digits_b=2)
    base = dict(model=args.model, task="mul", task_options={"digits_a": 3, "digits_b": 2}, out="unused",
                prompts_per_step=8, group_size=16, max_new_tokens=96, loss="dapo", dynamic_sampling=False, trace_groups=0)
    source = RolloutSource(GRPOConfig(**base), model, tok, task, task.problems(5000, "train", seed=0), "cpu")
    state = {"epoch": 0, "cursor": 0, "batches": 0}
    times, positions = {"whole": [], "rows": [], "tokens": []}, {"whole": 0, "rows": 0, "tokens": 0}
    for b in range(args.batches + 1):  # the first batch warms up
        with torch.no_grad():
            batch = spread_batch(model, b) if args.spread else source.collect(state).__dict__
        budget = round(args.rows * float(needed_lengths(batch["mask"]).float().mean()))
        cfgs = {"whole": GRPOConfig(**base), "rows": GRPOConfig(**base, micro_batch_size=args.rows),
                "tokens": GRPOConfig(**base, micro_batch_tokens=budget)}
        grads = {}
        for name in (list(cfgs) if b % 2 else list(cfgs)[::-1]):
            s, pos, grads[name] = passes(model, batch, cfgs[name])
            if b:
                times[name].append(s)
                positions[name] += pos
        for name in ("rows", "tokens"):
            err = max((grads[name][k] - grads["whole"][k]).abs().max().item() for k in grads["whole"])
            assert err < 1e-5, f"{name}: gradient differs from the whole batch's by {err:.1e}"
    med = {k: statistics.median(v) for k, v in times.items()}
    kind = "synthetic (--spread)" if args.spread else "the demo's"
    print(f"model {args.model}; {args.batches} {kind} roll-out batches of 8 x 16 rows (DAPO loss), {args.threads} threads; "
          f"rows side: parts of {args.rows} rows; tokens side: {args.rows} x the batch's mean needed length")
    for name in times:
        print(f"{name:<7} positions computed {positions[name]:>9,}   median {med[name]:.3f} s per batch")
    print("gradients: rows and tokens equal the whole batch's (max difference < 1e-5)")
    print(f"RESULT micro_batches rows_positions={positions['rows']} tokens_positions={positions['tokens']} "
          f"rows_s={med['rows']:.3f} tokens_s={med['tokens']:.3f} speedup={med['rows'] / med['tokens']:.2f}")


if __name__ == "__main__":
    main()
