"""Memory per process of SFT: a full copy per process (1 process; DDP-style, 2 processes) vs FSDP2 (2 processes),
and full fine-tuning vs LoRA (1 process, memory and seconds per step).

    .venv/bin/python bench/fsdp_memory.py [--hidden 1024 --layers 8 --vocab 32000]

The model: a random-init Llama (hidden 1024, 8 layers, MLP 2,816, vocab 32,000, tied embeddings: ~135M
parameters, fp32), saved as an HF folder; 5 SFT steps on 2-digit addition (batch 8, max_len 64), gloo on
CPU, 1 thread per process. Each process reports its peak resident set (ru_maxrss) at the end. Weights,
gradients and AdamW's two moments take 16 bytes per parameter in a full copy; FSDP2 keeps 1/N of each
per process (plus one layer's gathered weights at a time); its checkpoints are written in shards, nothing
gathered (rank 0, which joins the weight files one tensor at a time, is reported apart from the others).
FSDP2 runs with 2 and 4 processes (4 processes of 1 thread on 2 cores: slow, but memory is what counts). LoRA (r=16 on every linear layer but
the head) keeps gradients and AdamW moments only for the adapters; its seconds per step (median of steps
2–5, run alone, on an idle machine) are compared with the full fine-tuning run's.
Ends with: RESULT fsdp_memory single_mb=… ddp_mb=… fsdp_rank0_mb=… fsdp_rank1_mb=… fsdp4_max_mb=… lora_mb=… full_s=… lora_s=…
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def build(folder: Path, a) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from thinkforge.models import char_tokenizer, save_model

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, tie_word_embeddings=True,
                      max_position_embeddings=1024, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    save_model(LlamaForCausalLM(cfg), tok, folder)


def inner(args: list[str]) -> None:
    """One process of a run: train, then report this process's peak memory."""
    from thinkforge.cli import main

    main(args)
    rank = os.environ.get("RANK", "0")
    out = Path(args[args.index("--out") + 1])
    times = [json.loads(x)["step_time"] for x in (out / "metrics.jsonl").read_text().splitlines()[1:]]
    print(f"PEAK rank={rank} mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} "
          f"s={statistics.median(times) if times else 0:.3f}", flush=True)


def launch(n: int, args: list[str]) -> dict[int, float]:
    if n == 1:
        cmd = [sys.executable, __file__, "--inner", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
               "--master-port", str(port), __file__, "--inner", *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    peaks = {}
    for line in p.stdout.splitlines():
        if line.startswith("PEAK "):
            fields = dict(x.split("=") for x in line[5:].split())
            peaks[int(fields["rank"])] = float(fields["mb"])
            peaks["s"] = float(fields["s"])
    return peaks


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--inner":
        inner(sys.argv[2:])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        measure(tmp, a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(tmp: Path, a) -> None:
    build(tmp / "start", a)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tmp / "start")
    h, L, V, I = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    n_params = V * h + L * (4 * h * h + 3 * h * I + 2 * h) + h
    print(f"model: hidden {h}, {L} layers, vocab {V}: {n_params / 1e6:.0f}M parameters "
          f"({16 * n_params / 2**20:.0f} MB of weights, gradients and AdamW moments in a full copy)")
    base = ["train", "sft", "--model", str(tmp / "start"), "--task", "add", "--task-options", "digits=2", "--steps", "5",
            "--batch-size", "8", "--max-len", "64", "--train-problems", "100", "--warmup", "1", "--threads", "1",
            "--packing", "false", "--save-every", "5"]
    full = launch(1, [*base, "--out", str(tmp / "single")])
    lora = launch(1, [*base, "--out", str(tmp / "lora"), "--lora-r", "16", "--lora-alpha", "32"])
    single = full[0]
    ddp = launch(2, [*base, "--out", str(tmp / "ddp")])
    fsdp = launch(2, [*base, "--out", str(tmp / "fsdp"), "--fsdp", "true"])
    fsdp4 = launch(4, [*base, "--out", str(tmp / "fsdp4"), "--fsdp", "true"])
    print(f"  1 process (full copy)        peak {single:>7.0f} MB")
    print(f"  2 processes, full copy each  peak {ddp[0]:>7.0f} MB (rank 0), {ddp[1]:.0f} MB (rank 1)")
    print(f"  2 processes, FSDP2           peak {fsdp[0]:>7.0f} MB (rank 0), {fsdp[1]:.0f} MB (rank 1)")
    print(f"  4 processes, FSDP2           peak {fsdp4[0]:>7.0f} MB (rank 0), "
          f"{', '.join(f'{fsdp4[r]:.0f}' for r in (1, 2, 3))} MB (ranks 1-3)")
    print(f"  1 process, LoRA r=16         peak {lora[0]:>7.0f} MB; {lora['s']:.2f} s/step against {full['s']:.2f} "
          f"for full fine-tuning")
    print(f"RESULT fsdp_memory single_mb={single:.0f} ddp_mb={max(ddp[0], ddp[1]):.0f} fsdp_rank0_mb={fsdp[0]:.0f} "
          f"fsdp_rank1_mb={fsdp[1]:.0f} fsdp4_max_mb={max(fsdp4[r] for r in range(4)):.0f} lora_mb={lora[0]:.0f} full_s={full['s']:.2f} lora_s={lora['s']:.2f}")


if __name__ == "__main__":
    main()
