"""Does RL amplify self-checking and lengthen thinking? A primed cold start against an unprimed control.

    thinkforge aha --out runs/aha            # ~30 min at one thread here

DeepSeek-R1 reports reflection ("Wait, …") and longer responses emerging through RL from the accuracy
reward alone; Gandhi et al. (2025, "Cognitive Behaviors that Enable Self-Improving Reasoners") find RL
amplifies verification and backtracking only when the starting model already shows them sometimes.
This runs that comparison at micro scale:

1. Two cold-start SFT models with the same architecture, seed, steps, batch, packed row length (so the
   same training tokens) and training problems. The *primed* one's traces (``Task.cold_start_steps``)
   re-check one step another way in ``check_share`` of them (``check 16-9-0=7`` after ``7+9+0=16``) and,
   in ``fix_share`` of them, write one step wrong, its check (which disagrees), ``wait, that step is
   wrong`` and the step right. The *control* trains on the plain gold traces.
2. GRPO from each with the accuracy reward only (no format or length term, no KL), the same P × G,
   learning rate, steps and seed: equal compute.
3. Before RL and every ``rl_every`` steps, on the same held-out problems of mixed operand sizes
   (``digits`` a list): greedy accuracy, sampled accuracy (``eval_samples`` at T = 1), the share of samples
   that check a step and that say "wait", thinking tokens, and thinking lines beyond the gold trace's —
   each with a 95% bootstrap interval over problems, overall and per operand size.
4. Paired bootstrap over the same problems: primed − control at the end of RL, and each arm's end − start.

Writes ``<out>/results.json`` (every point, per-problem values for the paired tests) and ``<out>/aha.png``
(both arms' curves). Finished parts are kept (``sft-<arm>/``, ``rl-<arm>/points.json``); the same command
after an interruption continues, a GRPO segment resuming exactly from its checkpoint; another config in
the same ``--out`` needs ``--overwrite``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from thinkforge.config import ConfigError, check, claim_folder, option, write_json
from thinkforge.metrics import ci_record, paired_bootstrap
from thinkforge.models import keeps_torch_threads

ARMS = ("primed", "control")
CHECK = re.compile(r"^\W*check\b", re.IGNORECASE)
WAIT = re.compile(r"^\W*wait\b", re.IGNORECASE)


@dataclass
class AhaConfig:
    task: str = option("add", "task that can write primed traces (Task.check_line / wrong_line): add")
    task_options: dict = option({"digits": [2, 3, 4, 5], "terms": 2}, "the task's knobs; a list of digits mixes "
                                                                       "problem sizes (difficulty)")
    out: str = option("runs/aha", "output folder")
    check_share: float = option(0.1, "primed arm: share of cold-start traces that re-check a step")
    fix_share: float = option(0.1, "primed arm: share of cold-start traces with a wrong step, its check, 'wait' "
                                    "and the fix")
    size: str = option("small", "tiny model size of both arms")
    sft_steps: int = option(400, "cold-start SFT steps of each arm (batch 64, lr 2e-3, packed rows)")
    sft_problems: int = option(20000, "distinct cold-start training problems (the same for both arms)")
    max_len: int = option(192, "packed SFT row length in tokens (the same for both arms)")
    rl_steps: int = option(80, "GRPO steps of each arm")
    rl_every: int = option(10, "GRPO steps between measured checkpoints")
    rl_lr: float = option(5e-5, "GRPO learning rate (constant after 5 warm-up steps)")
    prompts_per_step: int = option(8, "GRPO problems per step")
    group_size: int = option(8, "GRPO samples per problem")
    eval_problems: int = option(200, "held-out problems at each checkpoint (the same for both arms)")
    eval_samples: int = option(4, "samples per problem at T = 1 at each checkpoint")
    max_new_tokens: int = option(160, "completion length cap everywhere")
    seed: int = option(0, "seed of every part")
    threads: int = option(0, "torch CPU threads (0 = torch's default)")
    overwrite: bool = option(False, "start afresh even if --out holds a run of another config")

    def __post_init__(self):
        check(0 <= self.check_share <= 1 and 0 <= self.fix_share <= 1 and self.check_share + self.fix_share > 0,
              f"check_share and fix_share must be in [0, 1] and not both 0 (the primed arm would equal the control), "
              f"got {self.check_share} and {self.fix_share}")
        check(self.rl_every >= 1 and self.rl_steps >= self.rl_every and self.rl_steps % self.rl_every == 0,
              f"rl_steps must be a positive multiple of rl_every, got rl_steps={self.rl_steps}, rl_every={self.rl_every}")
        for name in ("sft_steps", "sft_problems", "max_len", "prompts_per_step", "eval_problems", "eval_samples",
                     "max_new_tokens"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.group_size >= 2 and self.rl_lr > 0, "need group_size >= 2 and rl_lr > 0")


# ---- what a completion does -------------------------------------------------------------------------------

def behaviour(task, problem, text: str) -> dict:
    """Lines of a completion's thinking: checks (``check …``), waits (``wait …``), lines beyond the gold trace,
    and whether the first wrong step (a line that is no check, no wait and no step of the gold solution) is
    followed at once by a check or a wait (``caught``; None when no step is wrong).

    >>> from thinkforge.tasks import get_task
    >>> add = get_task("add", digits=1)
    >>> p = add.problems(1)[0]; p.question, p.steps
    ('5+6', ['5+6+0=11'])
    >>> behaviour(add, p, "<think>\\n5+6+0=12\\ncheck 12-6-0=6\\nwait, that step is wrong\\n5+6+0=11\\n</think>")
    {'checks': 1, 'waits': 1, 'extra_lines': 3, 'caught': True}
    >>> behaviour(add, p, "<think>\\n5+6+0=12\\n</think>")["caught"], behaviour(add, p, "<think>\\n5+6+0=11\\n</think>")["caught"]
    (False, None)
    """
    lines = task.thinking_lines(text)
    kinds = ["check" if CHECK.match(x) else "wait" if WAIT.match(x) else
             "step" if task.gold_match(problem, x) is not None else "wrong" for x in lines]
    first = kinds.index("wrong") if "wrong" in kinds else None
    return {"checks": kinds.count("check"), "waits": kinds.count("wait"), "extra_lines": len(lines) - len(problem.steps or []),
            "caught": None if first is None else first + 1 < len(kinds) and kinds[first + 1] in ("check", "wait")}


def measure(engine, task, problems, cfg: AhaConfig) -> dict:
    """Per-problem values (for paired tests) and their summaries, overall and per operand size."""
    from thinkforge.generation import SamplingParams
    from thinkforge.sampling import sample_and_grade

    with torch.no_grad():
        greedy = sample_and_grade(engine, task, problems, SamplingParams(temperature=0, max_new_tokens=cfg.max_new_tokens))
        sampled = sample_and_grade(engine, task, problems, SamplingParams(
            n=cfg.eval_samples, temperature=1.0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 1))
    per = {"greedy_accuracy": [float(g.correct[0]) for g in greedy],
           "greedy_tokens": [float(g.completions[0].thinking_tokens) for g in greedy],
           "sampled_accuracy": [float(np.mean(g.correct)) for g in sampled],
           "tokens": [float(np.mean([c.thinking_tokens for c in g.completions])) for g in sampled]}
    acts = [[behaviour(task, g.problem, c.text) for c in g.completions] for g in sampled]
    per["check_share"] = [float(np.mean([a["checks"] > 0 for a in row])) for row in acts]
    per["wait_share"] = [float(np.mean([a["waits"] > 0 for a in row])) for row in acts]
    per["extra_lines"] = [float(np.mean([a["extra_lines"] for a in row])) for row in acts]
    samples = [(ok, a) for g, row in zip(sampled, acts) for ok, a in zip(g.correct, row)]  # pooled over problems
    pooled = lambda xs: {"n": len(xs), "share": float(np.mean(xs)) if xs else None}  # noqa: E731
    point = {"per_problem": per, **{k: ci_record(v) for k, v in per.items()},
             "waits_then_right": pooled([ok for ok, a in samples if a["waits"]]),
             "errors_caught": pooled([a["caught"] for _, a in samples if a["caught"] is not None]),
             "right_with_check": pooled([ok for ok, a in samples if a["checks"]]),
             "right_without_check": pooled([ok for ok, a in samples if not a["checks"]])}
    sizes = [p.meta.get("digits") for p in problems]
    if len(set(sizes)) > 1:
        point["by_size"] = {str(s): {k: float(np.mean([v[i] for i in range(len(v)) if sizes[i] == s]))
                                     for k, v in per.items()} for s in sorted(set(sizes))}
    return point


# ---- the parts ------------------------------------------------------------------------------------------

def _cold_start(cfg: AhaConfig, out: Path, arm: str) -> str:
    from thinkforge.train.sft import cold_start

    primed = arm == "primed"
    return cold_start(out / f"sft-{arm}", cfg.task, cfg.task_options, cfg.sft_steps, cfg.seed, cfg.threads,
                      size=cfg.size, max_len=cfg.max_len, train_problems=cfg.sft_problems,
                      check_share=cfg.check_share if primed else 0.0, fix_share=cfg.fix_share if primed else 0.0)


def _rl(cfg: AhaConfig, out: Path, arm: str, policy: str, task, problems) -> list[dict]:
    from thinkforge.generation import Engine
    from thinkforge.train.grpo import GRPOConfig, train_measured

    def report(p):
        print(f"  {arm} step {p['step']:4d}: greedy {p['greedy_accuracy']['mean']:.1%}  sampled "
              f"{p['sampled_accuracy']['mean']:.1%}  checks {p['check_share']['mean']:.1%}  waits "
              f"{p['wait_share']['mean']:.1%}  thinking {p['tokens']['mean']:.1f} tokens", flush=True)

    grpo = GRPOConfig(model=policy, task=cfg.task, task_options=cfg.task_options, out=str(out / f"rl-{arm}" / "run"),
                      rewards={"accuracy": 1.0}, steps=cfg.rl_steps, prompts_per_step=cfg.prompts_per_step,
                      group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, lr=cfg.rl_lr, warmup=5, beta=0.0,
                      dynamic_sampling=False, seed=cfg.seed, trace_groups=0, threads=cfg.threads)
    return train_measured(grpo, cfg.rl_every, out / f"rl-{arm}" / "points.json",
                          lambda model, tok: measure(Engine(model, tok), task, problems, cfg), report)


COMPARED = ("greedy_accuracy", "sampled_accuracy", "check_share", "wait_share", "tokens", "extra_lines")


def _paired(a: dict, b: dict) -> dict:
    """b − a per quantity, paired over the same problems."""
    return {k: paired_bootstrap(a["per_problem"][k], b["per_problem"][k]) for k in COMPARED}


@keeps_torch_threads
def run_aha(cfg: AhaConfig) -> dict:
    from thinkforge.tasks import get_task

    try:
        task = get_task(cfg.task, **cfg.task_options)
        probe = task.problems(1, "train", seed=cfg.seed)[0]
        task.cold_start_steps(probe, 1.0, 1.0)
    except NotImplementedError as e:
        raise ConfigError(f"{e}: the primed arm needs a task that writes checks and wrong steps, e.g. add") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = claim_folder(cfg, Path(cfg.out), "a self-checking run")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    problems = task.problems(cfg.eval_problems, "test", seed=cfg.seed)
    results = {"task": f"{cfg.task} {cfg.task_options}", "check_share": cfg.check_share, "fix_share": cfg.fix_share,
               "arms": {}}
    for arm in ARMS:
        results["arms"][arm] = _rl(cfg, out, arm, _cold_start(cfg, out, arm), task, problems)
    first = {arm: results["arms"][arm][0] for arm in ARMS}
    last = {arm: results["arms"][arm][-1] for arm in ARMS}
    results["paired"] = {"primed_minus_control_end": _paired(last["control"], last["primed"]),
                         "primed_minus_control_start": _paired(first["control"], first["primed"]),
                         **{f"{arm}_end_minus_start": _paired(first[arm], last[arm]) for arm in ARMS}}
    write_json(out / "results.json", results)
    _plot(results, out / "aha.png")
    return results


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    panels = [("accuracy", [("greedy_accuracy", "greedy", "o-"), ("sampled_accuracy", "sampled T=1", "s--")]),
              ("share of samples", [("check_share", "with a check", "o-"), ("wait_share", "with a wait", "s--")]),
              ("thinking tokens per sample", [("tokens", "sampled", "o-"), ("greedy_tokens", "greedy", "s--")])]
    for ax, (ylabel, series) in zip(axes, panels):
        for colour, arm in zip(("C0", "C1"), ARMS):
            pts = results["arms"][arm]
            steps = [p["step"] for p in pts]
            for key, label, style in series:
                ax.plot(steps, [p[key]["mean"] for p in pts], style, color=colour, label=f"{arm}, {label}")
                ax.fill_between(steps, [p[key]["ci_low"] for p in pts], [p[key]["ci_high"] for p in pts],
                                color=colour, alpha=0.12)
        ax.set_xlabel("GRPO step (accuracy reward only)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[3]
    for colour, arm in zip(("C0", "C1"), ARMS):
        pts = results["arms"][arm]
        if "by_size" not in pts[0]:
            continue
        sizes = list(pts[0]["by_size"])
        for p, style, when in ((pts[0], "o--", "before RL"), (pts[-1], "o-", "after RL")):
            ax.plot([int(s) for s in sizes], [p["by_size"][s]["extra_lines"] for s in sizes], style, color=colour,
                    label=f"{arm}, {when}")
    ax.set_xlabel("operand digits (problem size)")
    ax.set_ylabel("thinking lines beyond the gold trace (sampled)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"primed cold start vs control, then GRPO on accuracy: {results['task']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(results: dict) -> str:
    lines = [f"self-checking under RL on {results['task']}: primed cold start (checks in {results['check_share']:.0%}, "
             f"wrong-step fixes in {results['fix_share']:.0%} of traces) vs an unprimed control"]
    head = f"  {'step':>5} {'greedy':>7} {'sampled':>8} {'checks':>7} {'waits':>6} {'tokens':>7} {'extra':>6}"
    for arm in ARMS:
        lines += [f"\n{arm}:", head]
        for p in results["arms"][arm]:
            lines.append(f"  {p['step']:>5} {p['greedy_accuracy']['mean']:>7.1%} {p['sampled_accuracy']['mean']:>8.1%} "
                         f"{p['check_share']['mean']:>7.1%} {p['wait_share']['mean']:>6.1%} {p['tokens']['mean']:>7.1f} "
                         f"{p['extra_lines']['mean']:>6.2f}")
        first, last = results["arms"][arm][0], results["arms"][arm][-1]
        share = lambda d: "n/a" if d["share"] is None else f"{d['share']:.1%} of {d['n']}"  # noqa: E731
        for p, when in ((first, "before RL"), (last, "after RL")):
            lines.append(f"  {when}: samples with a check right {share(p['right_with_check'])}, without "
                         f"{share(p['right_without_check'])}; first wrong step followed by a check or wait "
                         f"{share(p['errors_caught'])}; samples with a wait right {share(p['waits_then_right'])}")
        if "by_size" in first:
            lines.append("  by operand size (sampled thinking tokens / extra lines / accuracy), before -> after RL:")
            for s in first["by_size"]:
                a, b = first["by_size"][s], last["by_size"][s]
                lines.append(f"    {s} digits: {a['tokens']:.1f} -> {b['tokens']:.1f} tokens, {a['extra_lines']:.2f} -> "
                             f"{b['extra_lines']:.2f} extra lines, {a['sampled_accuracy']:.1%} -> {b['sampled_accuracy']:.1%}")
    lines.append("\npaired over the same problems (difference, 95% CI):")
    for name, comp in results["paired"].items():
        lines.append(f"  {name}: " + "; ".join(f"{k} {d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                                              for k, d in comp.items()))
    return "\n".join(lines)
