"""thinkforge SFT vs TRL's SFTTrainer: same model, same batches, one run; tokens/s, ratio and MFU.

    .venv/bin/pip install -e '.[bench]'      # TRL, accelerate, datasets (bench only)
    .venv/bin/python bench/sft.py [--rounds 3] [--steps 8]

Model: random-init Qwen2 (hidden 256, 4 layers, 4 heads, intermediate 1024, ~100-token character
vocab, tied embeddings): ~4.2M parameters, fp32. Batch: 32 rows × 96 tokens, each row one
prompt → completion example of exactly 96 tokens (completion-only loss on both sides). TRL 1.x turns
on bf16 and gradient checkpointing by default; both are switched off (fp32 CPU).

The sides alternate, ``--steps`` optimizer steps each per round; a round's first step is warm-up and
is not timed. MFU = achieved model FLOP/s ÷ this machine's fp32 matmul peak measured here (the best of
repeated 1024² and 2048² matmuls and of the model's own GEMM shapes, measured before and between rounds; the
bench stops if any step beats it, i.e. if the MFU could exceed 1); model FLOPs per token = 6 × (matmul parameters) + 12 × layers × T × hidden
(PaLM, appendix B). Ends with: RESULT sft thinkforge_tok_s=… trl_tok_s=… ratio=… thinkforge_mfu=… trl_mfu=…
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from scratch import scratch  # noqa: E402  (bench/scratch.py: removed when the run exits)

from thinkforge.models import char_tokenizer

ROWS, T = 32, 96


def matmul_peak(shapes: list[tuple[int, int, int]], seconds: float = 0.3) -> float:
    """The best fp32 matmul FLOP/s measured here at the current thread count, over square 1024 and 2048
    matmuls and the model's own GEMM shapes (M x K @ K x N): each repeated for ``seconds``, best of 3
    trials. No training step can beat it, so an MFU above 1 means this peak is wrong (checked in main)."""
    best = 0.0
    for m, k, n in [(1024, 1024, 1024), (2048, 2048, 2048), *shapes]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        for _ in range(3):
            reps, t = 0, time.perf_counter()
            while time.perf_counter() - t < seconds:
                a @ b
                reps += 1
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t))
    return best


def gemm_shapes(model) -> list[tuple[int, int, int]]:
    """(M, K, N) of the model's linear layers at one step's token count (forward; the backward's are transposes)."""
    cfg = model.config
    H, I, M = cfg.hidden_size, cfg.intermediate_size, ROWS * T
    return [(M, H, H), (M, H, I), (M, I, H), (M, H, cfg.vocab_size)]


def build(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg)


def examples(tok, n: int) -> list[tuple[str, str]]:
    """prompt/completion pairs of exactly T tokens in total (a ~30-token prompt, the rest completion)."""
    from thinkforge import format as fmt
    from thinkforge.tasks import get_task

    out = []
    for p in get_task("arith", ops=6, max_num=30).problems(n * 2):
        prompt = fmt.render_prompt(p.question)
        body = "\n".join(p.steps) * 8  # one character = one token: cut to fill the row exactly
        completion = body[: T - len(tok.encode(prompt, add_special_tokens=False))]
        if len(tok.encode(prompt + completion, add_special_tokens=False)) == T:
            out.append((prompt, completion))
        if len(out) == n:
            return out
    raise RuntimeError("not enough examples")


def flops_per_token(model) -> float:
    cfg = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    matmul += model.get_output_embeddings().weight.numel()  # tied: the embedding is also the output matmul
    return 6 * matmul + 12 * cfg.num_hidden_layers * T * cfg.hidden_size


def run_thinkforge(tok, pairs, steps: int) -> list[float]:
    from thinkforge.train.loop import LoopSettings, make_optimizer
    from thinkforge.train.sft import Batcher, SFTConfig, encode_pairs, sft_loss

    model = build(tok).train()
    cfg = SFTConfig(batch_size=ROWS, max_len=T, packing=False)
    batcher = Batcher(encode_pairs(pairs, tok, T), cfg, tok.pad_token_id, "cpu")
    opt = make_optimizer(model, LoopSettings(steps, 1e-3, 0, 1.0, 0.0, 1.0, steps, 0))
    state, times = {}, []
    for _ in range(steps):
        t = time.perf_counter()
        mb = batcher(state)[0]
        opt.zero_grad(set_to_none=True)
        loss, _ = sft_loss(model, mb)
        (loss / mb["n_tokens"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t)
    return times[1:]


def run_trl(tok, pairs, steps: int) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    ds = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    args = TRLConfig(output_dir=scratch(), per_device_train_batch_size=ROWS, max_steps=steps,
                     learning_rate=1e-3, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                     report_to=[], logging_steps=10**6, save_strategy="no", max_length=T, packing=False,
                     dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=build(tok), args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
    trainer.train()
    return timer.times[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    tok = char_tokenizer()
    pairs = examples(tok, ROWS * (args.steps + 1))
    model = build(tok)
    fpt, shapes = flops_per_token(model), gemm_shapes(model)
    peak = matmul_peak(shapes)
    times = {"thinkforge": [], "trl": []}
    for r in range(args.rounds):
        order = [("thinkforge", run_thinkforge), ("trl", run_trl)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name] += fn(tok, pairs, args.steps)
        peak = max(peak, matmul_peak(shapes))  # measured between rounds too: the best the machine showed
    tf, trl = statistics.median(times["thinkforge"]), statistics.median(times["trl"])
    tokens = ROWS * T
    tf_tps, trl_tps = tokens / tf, tokens / trl
    fastest = tokens / min(times["thinkforge"] + times["trl"])
    if fastest * fpt > peak:  # the peak must bound every step, the fastest included
        raise SystemExit(f"the fastest step ran at {fastest * fpt / 1e9:.0f} GFLOP/s, above the measured peak "
                         f"{peak / 1e9:.0f}: the peak or the FLOP count is wrong; MFU would mean nothing")
    print(f"fp32 matmul peak here: {peak / 1e9:.0f} GFLOP/s; model FLOPs/token {fpt / 1e6:.1f} M; "
          f"{args.rounds} alternating rounds x {args.steps} steps (medians)")
    print(f"thinkforge SFT: {tf * 1000:6.0f} ms/step  {tf_tps:6.0f} tok/s  MFU {tf_tps * fpt / peak:.0%}")
    print(f"TRL SFTTrainer: {trl * 1000:6.0f} ms/step  {trl_tps:6.0f} tok/s  MFU {trl_tps * fpt / peak:.0%}")
    print(f"RESULT sft thinkforge_tok_s={tf_tps:.0f} trl_tok_s={trl_tps:.0f} ratio={trl / tf:.2f} "
          f"thinkforge_mfu={tf_tps * fpt / peak:.3f} trl_mfu={trl_tps * fpt / peak:.3f}")


if __name__ == "__main__":
    main()
