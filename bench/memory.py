"""Peak memory of one GRPO step at the shape of Qwen2.5-0.5B: thinkforge vs TRL's GRPOTrainer, on CPU.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/memory.py [--prompts 4 --group 8 --new 128] [--layers 24] [--checkpointing]

The model: a random-init Qwen2 with Qwen2.5-0.5B's config (vocab 151,936, hidden 896, 24 layers, 14 heads,
2 KV heads, MLP 4,864, tied embeddings: 494M parameters), fp32, with a word-level tokenizer that covers
every id and thinkforge's ChatML template. Each side runs in its own process (so one side's peak cannot
hide in the other's) and makes one optimizer step on P prompts × G completions × up to ``--new`` tokens:
temperature 1, β = 0 (no reference model), loss "dapo", the whole roll-out batch in one forward/backward
(TRL: per_device_train_batch_size = P × G; thinkforge: micro_batch_size 0), bf16 off and gradient
checkpointing off on both sides (``--checkpointing``: on for both, TRL's own default), 2 threads. Memory is the process's peak resident set (ru_maxrss), read
after the step; the static part (weights, gradients, AdamW's two moments: 16 bytes per parameter ≈ 7.9 GB)
is the same on both sides, so the difference is what the step itself allocates — above all the
(rows × length × vocabulary) float32 logits TRL materialises, and thinkforge never does. A random model
almost never writes the end-of-turn token, so both sides generate ~``--new`` tokens per row; each prints
the tokens it trained on. ``--micro-batch-size M`` adds a thinkforge run in passes of M rows. Not a speed
comparison (see ``bench/grpo_vs_trl.py``): memory does not depend on what else the machine runs, time does.
A side whose resident memory passes ``--cap-mb`` (default 20,000: the machine has 24 GB) is stopped and
reported as ``>cap``. Every reward is 0 (both sides still compute every row: thinkforge with
``skip_zero_advantage`` off).
Ends with: RESULT memory thinkforge_mb=… trl_mb=… ratio=… (ratio = thinkforge / TRL; ``<x`` when TRL passed the cap)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, rope_theta=1_000_000.0)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(folder: Path, layers: int) -> None:
    """The random model and its tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from thinkforge import format as fmt
    from thinkforge.models import save_model

    vocab = {t: i for i, t in enumerate(fmt.SPECIAL_TOKENS)}
    for ch in "0123456789+-*=() \nabcdefghijklmnopqrstuvwxyzWhatis?":
        vocab.setdefault(ch, len(vocab))
    while len(vocab) < QWEN25_05B["vocab_size"]:
        vocab[f"⟨{len(vocab)}⟩"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token=fmt.UNK))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.add_special_tokens(fmt.SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=fmt.IM_END, pad_token=fmt.PAD, unk_token=fmt.UNK)
    tok.chat_template = fmt.CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": layers}, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    save_model(Qwen2ForCausalLM(cfg), tok, folder)


def side_thinkforge(model: str, a) -> dict:
    from thinkforge.train.grpo import GRPOConfig, train_grpo

    out = Path(tempfile.mkdtemp()) / "run"
    train_grpo(GRPOConfig(model=model, task="add", task_options={"digits": 2}, out=str(out), steps=1,
                          prompts_per_step=a.prompts, group_size=a.group, max_new_tokens=a.new, beta=0.0, loss="dapo",
                          dynamic_sampling=False, lr=1e-6, save_every=10**6, train_problems=a.prompts, warmup=0,
                          micro_batch_size=a.micro, threads=a.threads, gradient_checkpointing=a.checkpointing,
                          skip_zero_advantage=False))  # (every reward is 0 here: compute every row, as TRL does)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    shutil.rmtree(out.parent, ignore_errors=True)  # the final model and checkpoint: ~7 GB at this shape
    return {"tokens": round(row["completions/mean_length"] * a.prompts * a.group)}


def side_trl(model: str, a) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from thinkforge import format as fmt
    from thinkforge.tasks import get_task

    tok = AutoTokenizer.from_pretrained(model)
    problems = get_task("add", digits=2).problems(a.prompts, "train", seed=0)
    ds = Dataset.from_list([{"prompt": fmt.render_prompt(p.question)} for p in problems])
    seen = {}

    class Count(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.update(logs or {})

    args = GRPOConfig(output_dir=(scratch := tempfile.mkdtemp()), per_device_train_batch_size=a.prompts * a.group,
                      num_generations=a.group, max_completion_length=a.new, beta=0.0, bf16=False, fp16=False,
                      gradient_checkpointing=a.checkpointing, use_cpu=True, learning_rate=1e-6, max_steps=1, report_to=[],
                      logging_steps=1, save_strategy="no", temperature=1.0, loss_type="dapo", disable_tqdm=True,
                      seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=ds, processing_class=tok, callbacks=[Count()])
    trainer.train()
    shutil.rmtree(scratch, ignore_errors=True)
    return {"tokens": round(seen.get("completions/mean_length", 0.0) * a.prompts * a.group)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro", type=int, default=0, help="thinkforge's micro_batch_size (0: the whole batch)")
    ap.add_argument("--micro-batch-size", type=int, default=0, help="also run thinkforge in passes of this many rows")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--cap-mb", type=int, default=20000,
                    help="stop a side whose resident memory passes this (the machine's RAM is 24 GB): reported as >cap")
    ap.add_argument("--side", choices=["thinkforge", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:  # one side, in this process
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(a.threads)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        got = (side_thinkforge if a.side == "thinkforge" else side_trl)(a.model, a)
        print("SIDE " + json.dumps({**got, "peak_mb": peak_mb()}))
        return
    folder = Path(tempfile.mkdtemp()) / "qwen25-05b-shape"
    build(folder, a.layers)
    try:
        run_sides(folder, a)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def run_sides(folder: Path, a) -> None:
    shape = (f"P={a.prompts} x G={a.group} x {a.new} new tokens, {a.layers} layers, vocab {QWEN25_05B['vocab_size']}, "
             f"gradient checkpointing {'on' if a.checkpointing else 'off'}")
    print(f"one GRPO step, {shape}; each side in its own process")
    runs = [("thinkforge", 0), ("trl", 0)] + ([("thinkforge", a.micro_batch_size)] if a.micro_batch_size else [])
    res = {}
    for side, micro in runs:
        cmd = [sys.executable, __file__, "--side", side, "--model", str(folder), "--prompts", str(a.prompts),
               "--group", str(a.group), "--new", str(a.new), "--threads", str(a.threads), "--micro", str(micro)]
        cmd += ["--checkpointing"] if a.checkpointing else []
        code, out, err, over = watched(cmd, a.cap_mb)
        label = side + (f" (micro-batches of {micro})" if micro else "")
        if over:
            res[(side, micro)] = {"peak_mb": float("inf")}
            print(f"  {label:<34} stopped: resident memory passed {a.cap_mb} MB")
            continue
        line = next((x for x in out.splitlines() if x.startswith("SIDE ")), None)
        if code != 0 or line is None:
            sys.exit(f"{side} failed (exit {code}):\n{err[-3000:]}")
        got = json.loads(line[5:])
        res[(side, micro)] = got
        print(f"  {label:<34} peak RSS {got['peak_mb']:>8.0f} MB   {got['tokens']} completion tokens")
    tf, trl = res[("thinkforge", 0)]["peak_mb"], res[("trl", 0)]["peak_mb"]
    extra = f" thinkforge_micro_mb={res[('thinkforge', a.micro_batch_size)]['peak_mb']:.0f}" if a.micro_batch_size else ""
    mb = lambda x: f">{a.cap_mb}" if x == float("inf") else f"{x:.0f}"  # noqa: E731
    ratio = (f"<{tf / a.cap_mb:.2f}" if trl == float("inf") and tf != float("inf") else
             "unknown" if trl == float("inf") else f"{tf / trl:.2f}")
    print(f"RESULT memory thinkforge_mb={mb(tf)} trl_mb={mb(trl)} ratio={ratio}{extra}")


def watched(cmd: list[str], cap_mb: int) -> tuple[int, str, str, bool]:
    """Run ``cmd``; stop it if its resident memory passes ``cap_mb`` (read from /proc every 0.2 s), before the
    kernel's out-of-memory killer picks a process. (exit code, stdout, stderr, whether it was stopped)."""
    import time

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        over = False
        while p.poll() is None:
            try:
                rss = next(int(x.split()[1]) for x in open(f"/proc/{p.pid}/status") if x.startswith("VmRSS:")) / 1024
            except (OSError, StopIteration):
                rss = 0
            if rss > cap_mb:
                over = True
                p.kill()
                p.wait()
                break
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        return p.returncode, out.read(), err.read(), over


if __name__ == "__main__":
    main()
