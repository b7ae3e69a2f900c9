"""Reward over-optimisation, measured: how far a policy can be pushed against a learned reward before the
gold preference falls (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model Overoptimization").

    thinkforge overopt --out runs/overopt                    # ~20 min on 2 CPU cores
    thinkforge overopt --policy runs/my-sft/model --task add --task-options digits=5,terms=2

1. A start policy (``--policy``, or cold-start SFT on the task's CoT traces for ``sft_steps``).
2. The simulated labeller (``thinkforge preferences``) ranks ``k`` samples for each of ``max(data_sizes)``
   training prompts by the task's gold preference (``Task.gold_utility``) with label noise; one proxy
   Bradley-Terry reward model is trained on the first ``n`` prompts' rows for every ``n`` in ``data_sizes``
   (same steps and batch for each, so a smaller set is seen more times).
3. **Best-of-n** against each proxy, n = 1, 2, 4, … ``bon_n``: ``bon_n`` samples per held-out problem, and
   the expected gold and proxy score of the proxy's pick among n of them — the unbiased estimator over all
   n-subsets of the samples (Nakano et al. 2021, Gao et al.), with ``KL_bon = log n − (n − 1)/n``.
4. **RL** against each proxy: GRPO with the proxy as its only reward and no KL term, in segments of
   ``rl_every`` steps; after each, on held-out problems, samples of the policy give the gold score, the
   proxy score and KL(π ‖ π_start) (Σ over sampled tokens of log π − log π_start, averaged over samples).
5. Gao et al.'s functional forms fitted by least squares to the gold score's change against
   d = √KL: best-of-n ``d (α − β d)`` and RL ``d (α − β log d)``, and their peaks (d* = α / 2β and
   exp(α/β − 1)).

Writes ``<out>/results.json`` (every point with its 95% interval, the fits, the RMs' eval) and
``<out>/overopt.png`` (gold and proxy score against √KL, per proxy size, best-of-n and RL). Proxy scores are
in units of the proxy's own standard deviation over the start policy's samples (a Bradley-Terry reward has no
scale), relative to the start. Where this departs from Gao et al.: the gold "reward model" is an exact
function of the trace rather than a 6B RM, the proxies are the policy's size (not 3M–3B), and the RL runs
use GRPO (group-relative advantages), not PPO.

Each finished part is kept (``sft/``, ``preferences.jsonl``, ``rm-<n>/``, ``bon_scores.npz``, ``rl-<n>/points.json``),
so the same command after an interruption continues from the parts that finished, and a GRPO segment resumes
exactly from its checkpoint; a different config in the same ``--out`` needs ``--overwrite``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from thinkforge.config import ConfigError, check, claim_folder, option, write_json
from thinkforge.metrics import ci_record
from thinkforge.models import keeps_torch_threads


@dataclass
class OveroptConfig:
    task: str = option("add", "task with a gold preference (Task.gold_utility), e.g. add, mul, arith")
    task_options: dict = option({"digits": 5, "terms": 2}, "the task's knobs (the default is add's: give them "
                                                           "anew with another --task, e.g. --task-options ''")
    out: str = option("runs/overopt", "output folder")
    policy: str | None = option(None, "start policy; default: cold-start SFT on the task's CoT traces (sft_steps)")
    sft_steps: int = option(400, "SFT steps when no --policy is given (a small model, batch 64, lr 2e-3)")
    data_sizes: list[int] = option([150, 1500], "training prompts each proxy RM learns from (>= 1 size, increasing)")
    k: int = option(4, "completions ranked per prompt by the simulated labeller")
    noise: float = option(0.25, "labeller noise: chance of swapping each adjacent pair of the gold order")
    rm_steps: int = option(400, "optimizer steps of every proxy RM")
    rm_batch_size: int = option(16, "rankings per proxy-RM step")
    rm_lr: float = option(1e-3, "proxy-RM learning rate")
    rm_pooling: str = option("last", "proxy-RM form (train rm --pooling): last / sum (a scalar head) or logprob "
                                     "(the model's own likelihood)")
    bon_problems: int = option(100, "held-out problems of the best-of-n curve")
    bon_n: int = option(256, "samples per problem (a power of 2); n runs over 1, 2, 3, 4, 6, 8, 12, … up to it")
    rl_steps: int = option(80, "GRPO steps against each proxy")
    rl_every: int = option(8, "GRPO steps between measured checkpoints")
    rl_lr: float = option(2e-5, "GRPO learning rate (constant after 5 warm-up steps)")
    prompts_per_step: int = option(8, "GRPO problems per step")
    group_size: int = option(8, "GRPO samples per problem")
    eval_problems: int = option(100, "held-out problems at each RL checkpoint")
    eval_samples: int = option(4, "samples per problem at each RL checkpoint (gold, proxy and KL are their means)")
    max_new_tokens: int = option(96, "completion length cap everywhere")
    seed: int = option(0, "seed of every part")
    threads: int = option(0, "torch CPU threads (0 = torch's default)")
    overwrite: bool = option(False, "start afresh even if --out holds a run of another config")

    def __post_init__(self):
        sizes = self.data_sizes
        check(bool(sizes) and all(isinstance(n, int) and n >= 1 for n in sizes) and sizes == sorted(set(sizes)),
              f"data_sizes must be increasing integers >= 1, got {sizes!r}")
        check(self.bon_n >= 2 and self.bon_n & (self.bon_n - 1) == 0, f"bon_n must be a power of 2 >= 2, got {self.bon_n}")
        check(self.rl_every >= 1 and self.rl_steps >= self.rl_every and self.rl_steps % self.rl_every == 0,
              f"rl_steps must be a positive multiple of rl_every, got rl_steps={self.rl_steps}, rl_every={self.rl_every}")
        for name in ("sft_steps", "k", "rm_steps", "rm_batch_size", "bon_problems", "prompts_per_step",
                     "eval_problems", "eval_samples", "max_new_tokens"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.k >= 2 and self.group_size >= 2, "k and group_size must be >= 2")
        check(0 <= self.noise <= 1 and self.rm_lr > 0 and self.rl_lr > 0, "need 0 <= noise <= 1 and positive learning rates")


# ---- the estimators ------------------------------------------------------------------------------------

def kl_bon(n: int) -> float:
    """KL of the best-of-n policy from the sampling policy (Stiennon et al. 2020; exact for distinct samples).

    >>> kl_bon(1), round(kl_bon(2), 4), round(kl_bon(256), 3)
    (0.0, 0.1931, 4.549)
    """
    return math.log(n) - (n - 1) / n


def bon_expectation(proxy, values, n: int) -> float:
    """E[value of the proxy's best among n samples drawn without replacement from these N]: the sample
    of proxy rank i (ascending, 1-based) is the pick of C(i−1, n−1) of the C(N, n) subsets.

    >>> round(bon_expectation([0.1, 0.9, 0.5], [1.0, 0.0, 4.0], 2), 9)  # {a,b}->b, {a,c}->c, {b,c}->b: (0+4+0)/3
    1.333333333
    """
    order = np.argsort(np.asarray(proxy, dtype=float), kind="stable")
    v = np.asarray(values, dtype=float)[order]
    N = len(v)
    if not 1 <= n <= N:
        raise ValueError(f"best-of-{n} needs 1 <= n <= {N} samples")
    i = np.arange(n, N + 1)  # ranks that can be the best of n
    logw = _lcomb(i - 1, n - 1) - _lcomb(np.array(N), n)
    return float(np.sum(np.exp(logw) * v[n - 1:]))


def _lcomb(a, b: int):
    """log C(a, b), elementwise over an integer array ``a``."""
    lg = np.vectorize(math.lgamma)
    return lg(a + 1.0) - math.lgamma(b + 1.0) - lg(a - b + 1.0)


FORMS = {
    # Gao et al. 2022, eq. 1-2: the gold score's change against d = sqrt(KL)
    "bon": (lambda d: np.stack([d, -d * d], 1), lambda a, b: max(a, 0.0) / (2 * b) if b > 0 else math.inf),
    "rl": (lambda d: np.stack([d, -d * np.log(np.maximum(d, 1e-12))], 1), lambda a, b: math.exp(a / b - 1) if b > 0 else math.inf),
}


def fit_form(kind: str, d, gain) -> dict:
    """Least-squares α, β of ``d (α − β d)`` (bon) or ``d (α − β log d)`` (rl) through the origin, the peak's
    d* and its predicted gain (a best-of-n fit with α ≤ 0 never rises: its peak is d* = 0).

    >>> f = fit_form("bon", [0.5, 1.0, 1.5, 2.0], [0.5 * (1 - 0.25 * 0.5), 1 - 0.25, 1.5 * (1 - 0.25 * 1.5), 2 * 0.5])
    >>> round(f["alpha"], 6), round(f["beta"], 6), round(f["peak_sqrt_kl"], 6)
    (1.0, 0.25, 2.0)
    """
    d, gain = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    features, peak = FORMS[kind]
    (alpha, beta), *_ = np.linalg.lstsq(features(d), gain, rcond=None)
    alpha, beta = float(alpha), float(beta)
    d_star = float(peak(alpha, beta))
    pred = float(features(np.array([d_star]))[0] @ [alpha, beta]) if math.isfinite(d_star) else None
    return {"form": "d(alpha - beta d)" if kind == "bon" else "d(alpha - beta log d)", "alpha": alpha,
            "beta": beta, "peak_sqrt_kl": d_star, "peak_gain": pred}


# ---- the parts -----------------------------------------------------------------------------------------

def _start_policy(cfg: OveroptConfig, out: Path) -> str:
    from thinkforge.train.sft import cold_start

    return cfg.policy or cold_start(out / "sft", cfg.task, cfg.task_options, cfg.sft_steps, cfg.seed, cfg.threads)


def _proxies(cfg: OveroptConfig, out: Path, policy: str, task) -> dict[int, Path]:
    """One preference file of max(data_sizes) prompts; a proxy RM per size on its first n prompts' rows."""
    from thinkforge.preferences import PreferencesConfig, run_preferences
    from thinkforge.train.reward_model import RMConfig, train_reward_model

    prefs = out / "preferences.jsonl"
    if not prefs.is_file():
        run_preferences(PreferencesConfig(model=policy, task=cfg.task, task_options=cfg.task_options,
                                          prompts=max(cfg.data_sizes), k=cfg.k, noise=cfg.noise,
                                          max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, out=str(prefs) + ".part"))
        os.replace(str(prefs) + ".part", prefs)
    rows = [json.loads(x) for x in prefs.read_text().splitlines() if x.strip()]
    # the labeller's problems are drawn in order, so the first n prompts of the training split are a prefix
    order = {p.question: i for i, p in enumerate(task.problems(max(cfg.data_sizes), "train", seed=cfg.seed))}
    rms = {}
    for n in cfg.data_sizes:
        run = out / f"rm-{n}"
        if not (run / "model" / "config.json").is_file():
            data = out / f"preferences-{n}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows if order[r["prompt"]] < n))
            train_reward_model(RMConfig(kind="preference", policy=policy, data=str(data), steps=cfg.rm_steps,
                                        batch_size=cfg.rm_batch_size, lr=cfg.rm_lr, pooling=cfg.rm_pooling,
                                        out=str(run), overwrite=True,
                                        save_every=cfg.rm_steps, seed=cfg.seed, threads=cfg.threads))
        rms[n] = run
    return rms


def _proxy_quality(out: Path, rms: dict[int, Path]) -> dict:
    """Every proxy on the same held-out rows: those of the whole preference file whose prompts no proxy trained
    on (the RM trainer's hash hold-out, which a prefix of the prompts shares)."""
    from thinkforge.preferences import read_preferences
    from thinkforge.scorers import RewardModel
    from thinkforge.train.preference_rm import evaluate_preference_rm, held_out
    from thinkforge.train.reward_model import RMConfig

    share = RMConfig.__dataclass_fields__["eval_share"].default
    test = [r for r in read_preferences(out / "preferences.jsonl") if held_out(r.prompt, share)]
    report = {}
    for size, rm in rms.items():
        ev = evaluate_preference_rm(RewardModel.load(str(rm / "model"), "cpu"), test)
        train = sum(not held_out(r.prompt, share) for r in read_preferences(out / f"preferences-{size}.jsonl"))
        report[str(size)] = {"train_rankings": train, **ev}
    return report


def _score(rm_path: Path, problems, texts: list[str]) -> np.ndarray:
    """The proxy's reward as GRPO's ``rm:<folder>`` reward computes it (the model loaded once per process)."""
    from thinkforge.rewards import reward_model_reward

    return np.array(reward_model_reward(str(rm_path / "model"))(texts, problems, scope="all"))


def bon_grid(n_max: int) -> list[int]:
    """n = 1, 2, 3, 4, 6, 8, 12, … up to ``n_max``: powers of 2 and 3 × powers of 2 (even steps of √KL_bon).

    >>> bon_grid(16)
    [1, 2, 3, 4, 6, 8, 12, 16]
    """
    return sorted({1} | {m * 2**j for m in (1, 3) for j in range(n_max.bit_length()) if m * 2**j <= n_max})


def _best_of_n(cfg: OveroptConfig, out: Path, policy: str, task, rms: dict[int, Path]) -> dict:
    """Sample ``bon_n`` completions per held-out problem once (their gold and proxy scores kept in
    ``bon_scores.npz``), then the best-of-n estimates for every n of :func:`bon_grid`."""
    scores = out / "bon_scores.npz"
    if not scores.is_file():
        from thinkforge.generation import Engine, SamplingParams
        from thinkforge.models import load_model
        from thinkforge.sampling import sample_and_grade

        problems = task.problems(cfg.bon_problems, "test", seed=cfg.seed)
        model, tok = load_model(policy, device="cpu")
        with torch.no_grad():
            graded = sample_and_grade(Engine(model.eval(), tok), task, problems,
                                      SamplingParams(n=cfg.bon_n, temperature=1.0, max_new_tokens=cfg.max_new_tokens,
                                                     seed=cfg.seed))
        texts = [c.text for g in graded for c in g.completions]
        flat = [g.problem for g in graded for _ in g.completions]
        shape = (len(graded), cfg.bon_n)
        arrays = {"gold": np.array([task.gold_utility(p, x) for p, x in zip(flat, texts)]).reshape(shape),
                  "length": np.array([len(c.ids) for g in graded for c in g.completions]).reshape(shape)}
        for size, rm in rms.items():
            arrays[f"proxy_{size}"] = _score(rm, flat, texts).reshape(shape)
        with open(str(scores) + ".part", "wb") as f:
            np.savez(f, **arrays)
        os.replace(str(scores) + ".part", scores)
    arrays = np.load(scores)
    gold, length = arrays["gold"], arrays["length"]
    ns = bon_grid(cfg.bon_n)
    result = {"problems": gold.shape[0], "samples": gold.shape[1], "n": ns, "kl": [kl_bon(n) for n in ns],
              "proxies": {}}
    for size in rms:
        proxy = arrays[f"proxy_{size}"]
        scale = float(proxy.std()) or 1.0
        z = (proxy - proxy.mean()) / scale
        per_n = {"gold": [], "proxy": [], "length": []}
        for n in ns:
            for key, values in (("gold", gold), ("proxy", z), ("length", length)):
                per_n[key].append(ci_record([bon_expectation(proxy[i], values[i], n) for i in range(len(gold))]))
        result["proxies"][str(size)] = {**per_n, "proxy_mean": float(proxy.mean()), "proxy_std": scale}
    return result


def _measure(model, start, tok, task, problems, cfg: OveroptConfig, rm: Path, scale: tuple[float, float]) -> dict:
    """Gold, proxy (standardised by the start policy's samples) and KL(π ‖ π_start) on samples of ``model``."""
    from thinkforge.generation import Engine, SamplingParams
    from thinkforge.models import token_logprobs
    from thinkforge.sampling import sample_and_grade
    from thinkforge.train.grpo import rollout_tensors

    with torch.no_grad():
        graded = sample_and_grade(Engine(model.eval(), tok), task, problems,
                                  SamplingParams(n=cfg.eval_samples, temperature=1.0,
                                                 max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 1))
        comps = [c for g in graded for c in g.completions]
        kl = []
        for i in range(0, len(comps), 64):
            ids, mask, logp = rollout_tensors(comps[i:i + 64], tok.pad_token_id, False, "cpu")  # (B, L), (B, L-1)
            ref = token_logprobs(start, ids, 1.0)[0]  # (B, L-1)
            kl += ((logp - ref) * mask).sum(1).tolist()
    flat_problems = [g.problem for g in graded for _ in g.completions]
    texts = [c.text for c in comps]
    per_problem = lambda xs: np.asarray(xs, dtype=float).reshape(len(graded), cfg.eval_samples).mean(1)  # noqa: E731
    gold = per_problem([task.gold_utility(p, t) for p, t in zip(flat_problems, texts)])
    proxy = per_problem((_score(rm, flat_problems, texts) - scale[0]) / scale[1])
    kl_mean = max(float(np.mean(kl)), 0.0)  # a sampled estimate can dip below 0 near the start
    return {"kl": kl_mean, "sqrt_kl": math.sqrt(kl_mean), "kl_ci": ci_record(per_problem(kl)), "gold": ci_record(gold),
            "proxy": ci_record(proxy), "accuracy": ci_record(per_problem([float(c) for g in graded for c in g.correct])),
            "length": ci_record(per_problem([len(c.ids) for c in comps]))}


def _rl(cfg: OveroptConfig, out: Path, policy: str, task, size: int, rm: Path, scale: tuple[float, float]) -> list[dict]:
    from thinkforge.models import load_model
    from thinkforge.train.grpo import GRPOConfig, train_measured

    problems = task.problems(cfg.eval_problems, "test", seed=cfg.seed)
    start, _ = load_model(policy, device="cpu")
    start.eval()

    def report(p):
        print(f"  rl-{size} step {p['step']:4d}: sqrt(KL) {p['sqrt_kl']:.2f}  gold {p['gold']['mean']:.3f}  "
              f"proxy {p['proxy']['mean']:+.2f}", flush=True)

    grpo = GRPOConfig(model=policy, task=cfg.task, task_options=cfg.task_options, out=str(out / f"rl-{size}" / "run"),
                      rewards={f"rm:{rm / 'model'}": 1.0}, steps=cfg.rl_steps, prompts_per_step=cfg.prompts_per_step,
                      group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, lr=cfg.rl_lr, warmup=5, beta=0.0,
                      dynamic_sampling=False, seed=cfg.seed, trace_groups=0, threads=cfg.threads)
    return train_measured(grpo, cfg.rl_every, out / f"rl-{size}" / "points.json",
                          lambda model, tok: _measure(model, start, tok, task, problems, cfg, rm, scale), report)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    bon = results["best_of_n"]
    for (ax, kind), title in zip(zip(axes, ("bon", "rl")), ("best-of-n", "RL (GRPO against the proxy)")):
        twin = ax.twinx()
        for c, size in zip(colours, results["data_sizes"]):
            key = str(size)
            if kind == "bon":
                d = np.sqrt(bon["kl"])
                gold = [g["mean"] for g in bon["proxies"][key]["gold"]]
                proxy = [g["mean"] for g in bon["proxies"][key]["proxy"]]
            else:
                pts = results["rl"][key]
                d = np.array([p["sqrt_kl"] for p in pts])
                gold = [p["gold"]["mean"] for p in pts]
                proxy = [p["proxy"]["mean"] for p in pts]
            ax.plot(d, gold, "o-", color=c, label=f"gold, proxy RM on {size} prompts")
            twin.plot(d, proxy, "s--", color=c, alpha=0.5, label=f"proxy ({size})")
            fit = results["fits"][kind][key]
            grid = np.linspace(0, max(d.max(), 1e-3), 100)
            features, _ = FORMS[kind]
            ax.plot(grid, gold[0] + features(grid) @ [fit["alpha"], fit["beta"]], ":", color=c, alpha=0.8)
        ax.set_xlabel("sqrt(KL(policy || start))  [nats^0.5]")
        ax.set_ylabel("gold preference score (solid; dotted: Gao et al. fit)")
        twin.set_ylabel("proxy RM score, start-policy std units (dashed)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(lines, [x.get_label() for x in lines], fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@keeps_torch_threads
def run_overopt(cfg: OveroptConfig) -> dict:
    from thinkforge.tasks import get_task

    out = Path(cfg.out)
    try:  # an unknown task or knob fails here, before any training
        task = get_task(cfg.task, **cfg.task_options)
    except ValueError as e:
        default = OveroptConfig.__dataclass_fields__["task_options"].default_factory()
        hint = f" (task_options defaults to add's {default}: pass --task-options for {cfg.task!r})" \
            if cfg.task_options == default and cfg.task != "add" else ""
        raise ConfigError(f"{e}{hint}") from None
    if not task.has_gold_steps:
        raise ConfigError(f"task {cfg.task!r} has no gold steps: its gold preference is correctness alone, "
                          "so a proxy RM has nothing beyond the verifier to be wrong about; use add, mul or arith")
    claim_folder(cfg, out, "an over-optimisation run")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy = _start_policy(cfg, out)
    rms = _proxies(cfg, out, policy, task)
    bon = _best_of_n(cfg, out, policy, task, rms)
    results = {"task": f"{cfg.task} {cfg.task_options}", "policy": policy, "data_sizes": cfg.data_sizes,
               "reward_models": _proxy_quality(out, rms), "best_of_n": bon, "rl": {}, "fits": {"bon": {}, "rl": {}}}
    for size, rm in rms.items():
        stats = bon["proxies"][str(size)]
        pts = _rl(cfg, out, policy, task, size, rm, (stats["proxy_mean"], stats["proxy_std"]))
        results["rl"][str(size)] = pts
        g_bon = [g["mean"] for g in stats["gold"]]
        results["fits"]["bon"][str(size)] = {**fit_form("bon", np.sqrt(bon["kl"]), np.array(g_bon) - g_bon[0]),
                                             "best_measured": _best(np.sqrt(bon["kl"]), g_bon)}
        d = np.array([p["sqrt_kl"] for p in pts])
        g_rl = [p["gold"]["mean"] for p in pts]
        results["fits"]["rl"][str(size)] = {**fit_form("rl", d, np.array(g_rl) - g_rl[0]), "best_measured": _best(d, g_rl)}
    write_json(out / "results.json", results)
    _plot(results, out / "overopt.png")
    return results


def _best(d, gold) -> dict:
    i = int(np.argmax(gold))
    return {"sqrt_kl": float(d[i]), "gold": float(gold[i]), "gain": float(gold[i] - gold[0])}


def summary(results: dict) -> str:
    """The report: each proxy's accuracy, then best-of-n and RL gold/proxy at their measured points and fits."""
    lines = [f"over-optimisation on {results['task']} from {results['policy']}"]
    for size, ev in results["reward_models"].items():
        if "accuracy" not in ev:
            lines.append(f"proxy RM on {size} prompts ({ev['train_rankings']} rankings): no held-out rankings")
            continue
        a, g = ev["accuracy"], ev.get("rm_agreement_with_gold") or {}
        lab = ev.get("labeller_agreement_with_gold") or {}
        lines.append(f"proxy RM on {size} prompts ({ev['train_rankings']} rankings): held-out accuracy "
                     f"{a['mean']:.1%} [{a['ci_low']:.1%}, {a['ci_high']:.1%}], agreement with gold "
                     f"{g.get('mean', float('nan')):.1%} (labeller {lab.get('mean', float('nan')):.1%})")
    bon = results["best_of_n"]
    for size in map(str, results["data_sizes"]):
        stats = bon["proxies"][size]
        lines.append(f"\nbest-of-n, proxy on {size} prompts ({bon['problems']} problems x {bon['samples']} samples):")
        lines.append(f"  {'n':>5} {'sqrt(KL)':>8} {'gold':>22} {'proxy (std)':>12} {'tokens':>7}")
        for n, kl, g, p, ln in zip(bon["n"], bon["kl"], stats["gold"], stats["proxy"], stats["length"]):
            lines.append(f"  {n:>5} {math.sqrt(kl):>8.2f} {g['mean']:>7.3f} [{g['ci_low']:.3f}, {g['ci_high']:.3f}] "
                         f"{p['mean']:>+12.2f} {ln['mean']:>7.1f}")
        lines.append(f"\nRL (GRPO on the proxy alone), proxy on {size} prompts:")
        lines.append(f"  {'step':>5} {'sqrt(KL)':>8} {'gold':>22} {'proxy (std)':>12} {'accuracy':>9} {'tokens':>7}")
        for p in results["rl"][size]:
            g = p["gold"]
            lines.append(f"  {p['step']:>5} {p['sqrt_kl']:>8.2f} {g['mean']:>7.3f} [{g['ci_low']:.3f}, {g['ci_high']:.3f}] "
                         f"{p['proxy']['mean']:>+12.2f} {p['accuracy']['mean']:>9.1%} {p['length']['mean']:>7.1f}")
    lines.append("\nGao et al. fits of the gold change against d = sqrt(KL) (peak d* and predicted gain; best measured):")
    for kind in ("bon", "rl"):
        for size, f in results["fits"][kind].items():
            b = f["best_measured"]
            lines.append(f"  {kind:<3} proxy {size:>5}: {f['form']}, alpha {f['alpha']:+.3f} beta {f['beta']:+.3f}, "
                         f"d* {f['peak_sqrt_kl']:.2f} (gain {f['peak_gain'] if f['peak_gain'] is None else round(f['peak_gain'], 3)}); "
                         f"measured best gold {b['gold']:.3f} at d {b['sqrt_kl']:.2f} ({b['gain']:+.3f})")
    return "\n".join(lines)
