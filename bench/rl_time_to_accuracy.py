"""RL time-to-accuracy: thinkforge GRPO vs TRL's GRPOTrainer from the same SFT model, same wall-clock budget.

    .venv/bin/pip install -e '.[bench]'
    make demo                                   # once: trains runs/demo/sft-cot/model (the start)
    .venv/bin/python bench/rl_time_to_accuracy.py [--budget 240] [--start runs/demo/sft-cot/model]

Both sides start from the demo's chain-of-thought SFT model and train on 3-digit x 2-digit multiplication
with the same settings: P = 8 problems x G = 16 samples per step, temperature 1, at most 96 new tokens, the
demo's rewards (accuracy 1.0 + format 0.1, computed by the same ``thinkforge.rewards.compute_rewards`` on
the same completion text — TRL's reward function decodes ``completion_ids`` itself, since TRL hands reward
functions text with the special tokens, ``<think>`` and ``<answer>`` among them, stripped), the DAPO loss,
group-scaled advantages, beta = 0, one optimizer step per roll-out batch, AdamW (betas 0.9/0.95, no weight
decay), constant learning rate 6e-5 without warm-up, gradient clipping at 1.0, fp32. thinkforge's dynamic
sampling is off (``--dynamic-sampling`` turns it on), so the two run the same algorithm; thinkforge skips
the forward and backward of completions whose advantage is 0 (the same update; ``--compute-zero-advantage``
computes them, as TRL does).

Each side trains until its training clock (the sum of its step times: generation, rewards, forward,
backward, optimizer; not evaluation or checkpointing) passes ``--budget`` seconds. Every ``--every`` steps
the policy is snapshotted with its clock reading; afterwards every snapshot is evaluated by the same
evaluator: greedy accuracy (max 128 new tokens, thinkforge's engine) on the same ``--eval-problems``
held-out problems. thinkforge's snapshots come from running ``train_grpo`` in segments of ``--every`` steps
with ``resume`` (which continues exactly); TRL's from a callback.

The two sides run one after the other (``--order``: which first), so run it on an idle machine, or twice
with the order swapped: a busy neighbour during one side skews its clock.

speedup = the training seconds TRL needs to reach its final accuracy / the seconds thinkforge needs to
reach the same accuracy (its first snapshot at or above it); plateau_speedup the same with the mean of TRL's
last three snapshots as the target (one snapshot carries ±2.8 points of standard error); step_rate the ratio
of optimizer steps per training second. Prints both curves, writes them to ``--plot`` (PNG) and ends with:
RESULT rl_tta thinkforge_s=… trl_s=… speedup=… thinkforge_final=… trl_final=… plateau_speedup=… step_rate=…
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from scratch import scratch  # noqa: E402  (bench/scratch.py: removed when the run exits)

from thinkforge.format import ChatFormat
from thinkforge.generation import Engine, SamplingParams
from thinkforge.models import load_model
from thinkforge.rewards import compute_rewards
from thinkforge.sampling import sample_and_grade
from thinkforge.tasks import Problem, get_task

P, G, NEW, LR = 8, 16, 96, 6e-5
REWARDS = {"accuracy": 1.0, "format": 0.1}
TASK_OPTIONS = {"digits_a": 3, "digits_b": 2}


def evaluate(start: str, state: dict | None, problems: list[Problem], task) -> float:
    """Greedy accuracy of the start model with ``state`` loaded (None: the start model itself)."""
    model, tok = load_model(start, device="cpu")
    if state is not None:
        model.load_state_dict(state)
    graded = sample_and_grade(Engine(model.eval(), tok), task, problems, SamplingParams(temperature=0, max_new_tokens=128))
    return sum(g.correct[0] for g in graded) / len(graded)


def run_thinkforge(start: str, budget: float, every: int, dynamic: bool, seed: int,
                   skip: bool = True) -> list[tuple[int, float, dict]]:
    """(step, training seconds, state dict) snapshots, one per segment of ``every`` steps."""
    from thinkforge.train.grpo import GRPOConfig, train_grpo

    out = Path(scratch()) / "run"
    snaps, steps, clock = [], 0, 0.0
    while clock < budget:
        steps += every
        run = train_grpo(GRPOConfig(
            model=start, task="mul", task_options=TASK_OPTIONS, out=str(out), steps=steps, prompts_per_step=P,
            group_size=G, max_new_tokens=NEW, temperature=1.0, lr=LR, warmup=0, loss="dapo", beta=0.0,
            rewards=REWARDS, scale_rewards="group", dynamic_sampling=dynamic, save_every=every, seed=seed,
            resume=steps > every, overwrite=steps == every, trace_groups=0, skip_zero_advantage=skip))
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        clock = sum(r["step_time"] for r in rows)
        model, _ = load_model(str(run / "model"), device="cpu")
        snaps.append((steps, clock, {k: v.clone() for k, v in model.state_dict().items()}))
        zero = sum(r["frac_reward_zero_std"] for r in rows) / len(rows)
        print(f"  thinkforge step {steps:4d}  {clock:6.1f} s  ({clock / len(rows):.2f} s/step; groups whose rewards "
              f"are all equal: {zero:.0%})", flush=True)
    return snaps


def run_trl(start: str, budget: float, every: int, seed: int) -> list[tuple[int, float, dict]]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from thinkforge.train.losses import LOSSES

    task = get_task("mul", **TASK_OPTIONS)
    model, tok = load_model(start, device="cpu")
    chat = ChatFormat.of(tok)
    problems = task.problems(5000, "train", seed=seed)
    by_question = {p.question: p for p in problems}

    def reward(prompts, completions, completion_ids, question, **_):
        texts = [tok.decode(ids).split(chat.end)[0] for ids in completion_ids]  # the engine's Completion.text
        return compute_rewards(texts, [by_question[q] for q in question], task, REWARDS,
                               lengths=[len(ids) for ids in completion_ids]).total

    class Clock(TrainerCallback):
        def __init__(self):
            self.clock, self.snaps = 0.0, []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            self.clock += time.perf_counter() - self.t
            if state.global_step % every == 0:
                self.snaps.append((state.global_step, self.clock, {k: v.detach().clone() for k, v in model.state_dict().items()}))
                print(f"  TRL        step {state.global_step:4d}  {self.clock:6.1f} s", flush=True)
                if self.clock >= budget:
                    control.should_training_stop = True

    ds = Dataset.from_list([{"prompt": chat.prompt(p.question), "question": p.question} for p in problems])
    _, eps_high = LOSSES["dapo"].bounds()
    args = GRPOConfig(
        output_dir=scratch(), per_device_train_batch_size=P * G, num_generations=G, max_completion_length=NEW,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=eps_high,
        scale_rewards="group", num_iterations=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, max_steps=10**6, report_to=[], logging_steps=10**6,
        save_strategy="no", disable_tqdm=True, seed=seed, dataloader_num_workers=0)
    clock = Clock()
    GRPOTrainer(model=start, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                callbacks=[clock]).train()
    return clock.snaps


def time_to(curve: list[tuple[float, float]], target: float) -> float:
    """The first training time at which the curve reaches ``target`` (inf: never)."""
    return next((t for t, acc in curve if acc >= target - 1e-9), float("inf"))


def plot(curves: dict, path: str, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, curve in curves.items():
        ax.plot([t for t, _ in curve], [a * 100 for _, a in curve], marker="o", ms=3, label=name)
    ax.set_xlabel("training seconds (generation + update; 2 CPU cores)")
    ax.set_ylabel("greedy accuracy on held-out problems (%)")
    ax.set_title(f"GRPO from the same SFT model, {budget:.0f} s each")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--start", default="runs/demo/sft-cot/model")
    ap.add_argument("--budget", type=float, default=240.0, help="training seconds per side")
    ap.add_argument("--every", type=int, default=20, help="steps between snapshots")
    ap.add_argument("--eval-problems", type=int, default=300)
    ap.add_argument("--dynamic-sampling", action="store_true", help="thinkforge with DAPO's dynamic sampling")
    ap.add_argument("--compute-zero-advantage", action="store_true",
                    help="thinkforge computes every completion, as TRL does (default: none whose advantage is 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="docs/rl-tta.png")
    ap.add_argument("--order", default="trl-first", choices=["trl-first", "thinkforge-first"])
    args = ap.parse_args()
    if not (Path(args.start) / "config.json").exists():
        sys.exit(f"{args.start}: no model there; `make demo` trains it (or pass --start)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    task = get_task("mul", **TASK_OPTIONS)
    test = task.problems(args.eval_problems, "test", seed=args.seed)
    start_acc = evaluate(args.start, None, test, task)
    print(f"start model: greedy accuracy {start_acc:.3f} on {len(test)} held-out problems")
    snaps = {}
    sides = [("TRL", lambda: run_trl(args.start, args.budget, args.every, args.seed)),
             ("thinkforge", lambda: run_thinkforge(args.start, args.budget, args.every, args.dynamic_sampling, args.seed,
                                                         not args.compute_zero_advantage))]
    for name, run in sides if args.order == "trl-first" else sides[::-1]:
        print(f"{name}:")
        snaps[name] = run()
    snaps = {"TRL": snaps["TRL"], "thinkforge": snaps["thinkforge"]}
    curves = {}
    for name, rows in snaps.items():
        curves[name] = [(0.0, start_acc)] + [(clock, evaluate(args.start, state, test, task)) for _, clock, state in rows]
        steps = [0] + [s for s, _, _ in rows]
        print(f"{name}: " + "  ".join(f"step {s} {t:.0f}s {a:.3f}" for s, (t, a) in zip(steps, curves[name])))
    trl_final = curves["TRL"][-1][1]
    trl_s, tf_s = time_to(curves["TRL"], trl_final), time_to(curves["thinkforge"], trl_final)
    # The target is one snapshot (±2.8 points of standard error at 300 problems): a curve that
    # plateaus just under it never "reaches" it. Also: the mean of TRL's last three snapshots as the target.
    plateau = sum(a for _, a in curves["TRL"][-3:]) / len(curves["TRL"][-3:])
    trl_p, tf_p = time_to(curves["TRL"], plateau), time_to(curves["thinkforge"], plateau)
    rate = {name: (len(rows) * args.every) / rows[-1][1] for name, rows in snaps.items()}  # steps per training second
    plot(curves, args.plot, args.budget)
    print(f"plot: {args.plot}")
    print(f"steps per second: thinkforge {rate['thinkforge']:.2f}, TRL {rate['TRL']:.2f} "
          f"({rate['thinkforge'] / rate['TRL']:.2f}x); TRL's plateau (mean of its last 3 snapshots) {plateau:.3f}: "
          f"TRL reached it at {trl_p:.0f} s, thinkforge at {tf_p:.0f} s")
    print(f"RESULT rl_tta thinkforge_s={tf_s:.0f} trl_s={trl_s:.0f} speedup={trl_s / tf_s:.2f} "
          f"thinkforge_final={curves['thinkforge'][-1][1]:.3f} trl_final={trl_final:.3f} "
          f"plateau_speedup={trl_p / tf_p:.2f} step_rate={rate['thinkforge'] / rate['TRL']:.2f}")


if __name__ == "__main__":
    main()
