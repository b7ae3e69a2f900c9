"""Kill SFT or GRPO with SIGKILL at random moments, resume, and check nothing was lost or changed.

    .venv/bin/python bench/crash_resume.py [--trials 10] [--trainer sft|grpo]

Reference: one uninterrupted run. Each trial: start the same run in a subprocess, SIGKILL it after a
random delay (a checkpoint is written every step, so many kills land during a write), check that the
checkpoint folder is absent or complete and loadable (never half-written), then ``--resume`` (repeating
the kill while the run is unfinished) until it completes, and compare ``metrics.jsonl`` with the
reference: same losses, same rewards, same roll-outs (timing columns excluded).
Ends with: RESULT crash_resume trials=… identical=… kills=… kills_during_write=… broken_checkpoints=…
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMING = {"step_time", "tokens_per_s", "gen_time"}


def command(trainer: str, out: Path, model: str | None, resume: bool) -> list[str]:
    common = ["--out", str(out), "--save-every", "1", "--threads", "1"]
    if trainer == "sft":
        args = ["train", "sft", "--task", "add", "--task-options", "digits=2", "--size", "micro", "--steps", "12",
                "--batch-size", "16", "--max-len", "64", "--train-problems", "300", "--warmup", "2"]
    else:
        args = ["train", "grpo", "--model", model, "--task", "add", "--task-options", "digits=2", "--steps", "6",
                "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "24", "--train-problems", "50",
                "--dynamic-sampling", "false", "--rewards", "accuracy=1.0,format=0.5", "--lr", "1e-3", "--warmup", "1"]
    return [*args, *common, *(["--resume"] if resume else ["--overwrite"])]


def start(args: list[str]):
    """``python -m thinkforge <args>`` in a new process, output discarded (the default launcher)."""
    return subprocess.Popen([sys.executable, "-m", "thinkforge", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def checkpoint_ok(out: Path) -> bool:
    """Absent, or complete: config, weights, tokenizer and trainer state all load."""
    ck = out / "checkpoint"
    if not ck.exists():
        return True
    try:
        import torch

        from thinkforge.models import load_model

        load_model(str(ck), device="cpu")
        return "step" in torch.load(ck / "trainer_state.pt", weights_only=False)
    except Exception as e:  # reported: a broken checkpoint is the failure this script looks for
        print(f"  broken checkpoint: {e!r}")
        return False


def finished(out: Path) -> bool:
    return (out / "model" / "config.json").exists()


def run_trials(trainer: str, trials: int, seed: int = 0, model: str | None = None, launch=start,
               max_kills: int | None = None) -> dict:
    """``launch(args)``: starts ``thinkforge <args>`` and returns a ``subprocess.Popen``-like handle (``wait``,
    ``kill``, ``returncode``); the test suite's forks a preloaded process, so a kill does not land during
    the interpreter's start-up (seconds of imports) most of the time. ``max_kills``: per trial, after which
    the run is left to finish (bounds the time; None = kill until it finishes within a draw)."""
    base = Path(tempfile.mkdtemp(prefix="crash-"))
    try:  # the trials' run folders are removed afterwards: the test suite calls this on every run
        return _trials(trainer, trials, seed, model, base, launch, max_kills)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _trials(trainer: str, trials: int, seed: int, model: str | None, base: Path, launch, max_kills) -> dict:
    rng = random.Random(seed)
    ref = base / "reference"
    t = time.perf_counter()
    args = command(trainer, ref, model, False)
    if launch(args).wait() != 0:
        raise RuntimeError(f"the reference run failed: thinkforge {' '.join(args)}")
    full_time = time.perf_counter() - t
    expected = metrics(ref)
    stats = {"trials": trials, "identical": 0, "kills": 0, "kills_during_write": 0, "broken_checkpoints": 0}
    for i in range(trials):
        out = base / f"trial{i}"
        resume, kills = False, 0
        while not finished(out):
            proc = launch(command(trainer, out, model, resume))
            delay = rng.uniform(0.3, 1.0) * full_time if max_kills is None or kills < max_kills else None
            try:
                code = proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                stats["kills"] += 1
                kills += 1
                if out.exists() and any(p.name.startswith(".checkpoint.") for p in out.iterdir()):  # mid-write
                    stats["kills_during_write"] += 1
                stats["broken_checkpoints"] += not checkpoint_ok(out)
            except BaseException:  # (^C or a test's timeout: leave no trainer running)
                proc.kill()
                raise
            else:
                if code != 0:
                    raise RuntimeError(f"trial {i}: the run failed on its own: thinkforge "
                                       f"{' '.join(command(trainer, out, model, resume))}")
            resume = (out / "checkpoint").exists()
        stats["identical"] += metrics(out) == expected
        print(f"  trial {i}: identical={metrics(out) == expected} kills so far={stats['kills']}", flush=True)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--trainer", choices=["sft", "grpo"], default="sft")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, scratch = None, Path(tempfile.mkdtemp(prefix="crash-start-"))
    try:
        if args.trainer == "grpo":  # a small SFT model to start RL from
            start_args = command("sft", scratch / "start", None, False)
            if start(start_args).wait() != 0:
                raise RuntimeError(f"the starting SFT run failed: thinkforge {' '.join(start_args)}")
            model = str(scratch / "start" / "model")
        s = run_trials(args.trainer, args.trials, args.seed, model)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"RESULT crash_resume trainer={args.trainer} trials={s['trials']} identical={s['identical']} "
          f"kills={s['kills']} kills_during_write={s['kills_during_write']} broken_checkpoints={s['broken_checkpoints']}")


if __name__ == "__main__":
    main()
