"""The demo's own GRPO roll-outs: thinkforge's engine vs HF ``model.generate``, same model, same batches, one run.

    make demo                                   # once: trains runs/demo/grpo/model
    .venv/bin/python bench/rollouts.py [--model runs/demo/grpo/model] [--rounds 9]

The workload is what a GRPO step of the demo samples: P = 8 held-out 3-digit x 2-digit problems in the
model's chat template, G = 16 samples each, temperature 1, stopping at the end of turn (or EOS), at most 96
new tokens (completions are ~51 tokens). Each round draws new problems and runs both sides on them, the
order alternating, so a busy neighbour hits both alike; medians are reported. The two sides sample
different tokens (different random streams), so the mean completion length of each is printed: the work
is the same when those agree. Checks first: greedy completions identical to HF generate, and the engine's
logprobs equal a full forward pass within 1e-4.
``--profile``: one more engine batch under torch's profiler; prints the time its matrix multiplies take (mm,
addmm, bmm, baddbmm: the projections and the KV-cache reads) and the speed-up over HF generate the engine
would have if it spent no time at all on anything else (the ceiling of any work on the rest of a decode
step, Python included).
Ends with: RESULT rollouts thinkforge_s=… hf_s=… speedup=… [gemm_s=… speedup_ceiling=…]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generation import logprob_error  # noqa: E402  (the engine-vs-full-forward check of bench/generation.py)

from thinkforge.generation import Engine, SamplingParams  # noqa: E402
from thinkforge.models import load_model  # noqa: E402
from thinkforge.tasks import get_task  # noqa: E402


def hf_batch(model, tok, prompts: list[str], n: int, max_new: int, stop_ids: list[int], greedy: bool = False):
    """HF generate on the same prompts, left-padded, each repeated n times; returns (tokens (B, L), lengths)."""
    enc = [tok.encode(p, add_special_tokens=False) for p in prompts]
    L = max(map(len, enc))
    ids = torch.tensor([[tok.pad_token_id] * (L - len(e)) + e for e in enc]).repeat_interleave(n, 0)
    mask = (ids != tok.pad_token_id).long()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=not greedy, temperature=None if greedy else 1.0,
                             top_k=None if greedy else 0, top_p=None if greedy else 1.0, max_new_tokens=max_new,
                             eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)
    new = out[:, L:]
    ends = [next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row)) for row in new.tolist()]
    return new, ends


def check(model, tok, engine, prompts, stop_ids) -> None:
    outs = engine.generate(prompts[:4], SamplingParams(temperature=0, max_new_tokens=96))
    ref, ends = hf_batch(model, tok, prompts[:4], 1, 96, stop_ids, greedy=True)
    for o, r, e in zip(outs, ref.tolist(), ends):
        assert o.ids == r[:e], "greedy completions differ from HF generate"
    err = logprob_error(model, engine, prompts[0], SamplingParams(temperature=1.0, max_new_tokens=96))
    print(f"checks: greedy identical to HF generate on 4 prompts; max logprob error {err:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/demo/grpo/model")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also the engine's share of time in matmuls")
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").exists():
        sys.exit(f"{args.model}: no model there; `make demo` trains it (or pass --model)")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu")
    model.eval()
    engine = Engine(model, tok)
    stop_ids = sorted(engine.eos_ids | {i for s in engine.stop_ids(SamplingParams()) for i in s})
    task = get_task("mul", digits_a=3, digits_b=2)
    problems = task.problems(args.prompts * (args.rounds + 2), "test", seed=1)
    batches = [[engine.chat.prompt(p.question) for p in problems[i : i + args.prompts]]
               for i in range(0, len(problems), args.prompts)]
    check(model, tok, engine, batches[0], stop_ids)

    times, lengths = {"thinkforge": [], "hf": []}, {"thinkforge": [], "hf": []}

    def run_tf(prompts, r):
        outs = engine.generate(prompts, SamplingParams(n=args.group, temperature=1.0, max_new_tokens=args.max_new,
                                                       seed=[r * 1000 + i for i in range(len(prompts))]))
        return [len(o.ids) for o in outs]

    def run_hf(prompts, r):
        torch.manual_seed(r)
        return hf_batch(model, tok, prompts, args.group, args.max_new, stop_ids)[1]

    run_tf(batches[1], 0), run_hf(batches[1], 0)  # warm-up
    for r in range(args.rounds):
        sides = [("thinkforge", run_tf), ("hf", run_hf)]
        for name, fn in sides if r % 2 == 0 else sides[::-1]:
            t = time.perf_counter()
            lens = fn(batches[r + 2], r)
            times[name].append(time.perf_counter() - t)
            lengths[name] += lens
    tf_s, hf_s = statistics.median(times["thinkforge"]), statistics.median(times["hf"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {model.config.model_type}, {n_params / 1e6:.2f}M parameters; P={args.prompts} x "
          f"G={args.group}, T=1, max {args.max_new} new tokens; {args.threads} threads; {args.rounds} alternating rounds")
    for name, s in (("thinkforge engine", tf_s), ("HF generate", hf_s)):
        key = "thinkforge" if name.startswith("thinkforge") else "hf"
        mean_len = statistics.mean(lengths[key])
        print(f"{name:<18} median {s * 1000:7.1f} ms per batch (min {min(times[key]) * 1000:.1f}); "
              f"mean completion {mean_len:.1f} tokens")
    extra = ""
    if args.profile:
        proj, attn = gemm_seconds(lambda: run_tf(batches[-1], args.rounds))
        gemm = proj[0] + attn[0]
        from sft import matmul_peak  # bench/sft.py: the best of repeated 1024² and 2048² matmuls here

        print(f"engine under the profiler: {gemm * 1000:.1f} ms of a batch in matmuls: projections (mm, addmm) "
              f"{proj[0] * 1000:.1f} ms at {proj[1] / proj[0] / 1e9:.0f} GFLOP/s (square matmuls here: "
              f"{matmul_peak([]) / 1e9:.0f}), attention (bmm, baddbmm) {attn[0] * 1000:.1f} ms; doing nothing else "
              f"it would be {hf_s / gemm:.2f}x HF generate")
        extra = f" gemm_s={gemm:.3f} speedup_ceiling={hf_s / gemm:.2f}"
    print(f"RESULT rollouts thinkforge_s={tf_s:.3f} hf_s={hf_s:.3f} speedup={hf_s / tf_s:.2f}{extra}")


def gemm_seconds(fn) -> tuple[tuple[float, float], tuple[float, float]]:
    """(seconds, floating-point operations) of one call of ``fn``'s projection matmuls (mm, addmm) and of its
    attention ones (bmm, baddbmm): the operators' self time (nothing counted twice), the profiler's FLOP count."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    ops = prof.key_averages()

    def total(names):
        chosen = [e for e in ops if e.key in names]
        return sum(e.self_cpu_time_total for e in chosen) / 1e6, sum(e.flops for e in chosen)

    return total(("aten::mm", "aten::addmm")), total(("aten::bmm", "aten::baddbmm"))


if __name__ == "__main__":
    main()
