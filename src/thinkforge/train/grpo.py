"""GRPO and its variants: RL with verifiable rewards (DeepSeekMath, DeepSeek-R1).

    thinkforge train grpo --model runs/demo/sft-cot/model --task mul --out runs/mul-grpo --steps 100

Per roll-out batch: draw P problems, sample G completions each with the engine (old-policy logprobs
come with them), score them with the rewards, compute group advantages, then take ``mu`` optimizer
steps on that batch with the chosen loss (``losses.LOSSES``) and an optional k3 KL to the frozen
starting model (``beta``), optionally importance-weighted (``kl_bias_correction``).

Where this departs from the papers, on purpose:
- Dynamic sampling (DAPO) keys on the *verifier's accuracy*, not on the shaped reward: a group whose
  completions are all right or all wrong is dropped even if format or length rewards differ inside
  it (filtering on the total reward keeps groups that teach only formatting). With ``resample`` the
  trainer draws more problems, up to ``max_resample`` extra rounds, to refill the batch.
- Forced tokens (thinking-budget ``</think>``) are never trained on: the engine's mask excludes them.
- ``mask_truncated`` (DAPO's overlong filtering) drops completions that hit ``max_new_tokens``.
- With ``beta`` 0, completions whose advantage is 0 (a group whose rewards are all equal) get no forward
  or backward: they add exactly nothing to any variant's loss or gradient (:func:`live_rows`), so the
  update is the same; ``entropy`` is then the mean over the completions computed.

Metrics per step use TRL's names (``reward``, ``reward_std``, ``rewards/<fn>/mean``,
``frac_reward_zero_std``, ``completions/mean_length``, ``completions/clipped_ratio``, ``kl``,
``entropy``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``,
``step_time``) plus ``accuracy``, ``thinking_length``, ``reflection_share`` (completions saying
"wait", "check" or "let me") and the reward audit: ``audit/verifier_timeouts``,
``audit/verifier_errors`` (this step's counts) and ``audit/format_only_share`` (share of completions
rewarded for format while wrong).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkforge.config import ConfigError, check, option, save_config
from thinkforge.generation import Engine, SamplingParams
from thinkforge.models import base_only, is_lora, is_sharded, load_model, resolve_device, token_logprobs
from thinkforge.rewards import RM_PREFIX, RM_SCOPES, compute_rewards
from thinkforge.sampling import Graded, trace_rows
from thinkforge.tasks import get_task
from thinkforge.train.loop import (
    EpochStream,
    LoopSettings,
    ModelOptions,
    autocast_dtype,
    distributed,
    load_checkpoint,
    load_sharded,
    load_trainee,
    run_training,
    start_run,
    trim_jsonl,
)
from thinkforge.train.losses import LOSSES, group_advantages, k3_kl, shard_weight
from thinkforge.verify import STATS

REFLECTION = re.compile(r"\b(wait|check|let me)\b", re.IGNORECASE)


@dataclass
class GRPOConfig(ModelOptions):
    model: str = option("runs/demo/sft-cot/model", "starting policy: a model folder or hub id")
    task: str = option("mul", "task name or .jsonl/.parquet file")
    task_options: dict = option({}, "the task's knobs")
    out: str = option("runs/grpo", "run folder")
    rewards: dict = option({"accuracy": 1.0, "format": 0.1}, "reward weights by name, rm:<folder> (a learned reward "
                                                               "model) or dotted path (see rewards)")
    rm_scope: str = option("all", "what an rm:<folder> reward reads: all (thinking + answer) or answer")
    rm_scopes: dict = option({}, "per learned reward, its own scope: {\"rm:<folder>\" = \"answer\"} (overrides rm_scope)")
    reward_families: dict = option({}, "with a mixed task: reward name -> families it scores, e.g. {accuracy = "
                                       "[\"reasoning\"]} (DeepSeek-R1's last stage); unlisted rewards score every prompt")
    loss: str = option("dapo", f"loss variant: {', '.join(LOSSES)}")
    prompts_per_step: int = option(8, "P: problems per roll-out batch")
    group_size: int = option(8, "G: completions per problem (>= 2: advantages are relative to the group)")
    max_new_tokens: int = option(128, "completion length cap")
    temperature: float = option(1.0, "sampling temperature of the roll-outs (also used in the ratio)")
    thinking_budget: int | None = option(None, "cap on thinking tokens (forced </think>, never trained on)")
    steps: int = option(100, "optimizer steps (roll-out batches = steps / mu)")
    mu: int = option(1, "optimizer steps per roll-out batch (PPO epochs); > 1 makes the clip matter")
    lr: float = option(1e-4, "peak learning rate")
    warmup: int = option(5, "linear warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay on matrices")
    grad_clip: float = option(1.0, "clip the global gradient norm")
    epsilon: float | None = option(None, "clip range below 1 (ε_low); default: the loss's own (0.2; GSPO 3e-4)")
    epsilon_high: float | None = option(None, "clip range above 1; default: the loss's own (0.2; DAPO clip-higher "
                                        "0.28; GSPO 4e-4)")
    beta: float = option(0.0, "weight of the k3 KL to the starting model (0 = no reference forward)")
    kl_bias_correction: bool = option(False, "weight the KL by π_θ/π_old (DeepSeek-V3.2; TRL's use_bias_correction_kl)")
    scale_rewards: str = option("group", "advantage scaling: group (GRPO), batch or none (Dr. GRPO)")
    dynamic_sampling: bool = option(True, "drop groups whose accuracy has zero variance (DAPO)")
    skip_zero_advantage: bool = option(True, "with beta 0, no forward or backward for completions whose advantage "
                                             "is 0: the same update, less compute (entropy is then logged over "
                                             "the completions computed); false computes every completion")
    resample: bool = option(True, "refill dropped groups with new problems")
    max_resample: int = option(3, "extra sampling rounds per batch when resampling")
    mask_truncated: bool = option(False, "exclude completions that hit max_new_tokens from the loss")
    micro_batch_size: int = option(0, "rows per forward/backward (0: a process's whole roll-out batch at once); "
                                      "the update is the same, only peak memory changes")
    micro_batch_tokens: int = option(0, "instead of a row count, a token budget per forward/backward: a process's "
                                        "rows, longest first, are packed into parts of at most this many "
                                        "(rows x the part's longest row) tokens; a longer row is a part alone. "
                                        "Same update (0: off)")
    train_problems: int = option(5000, "distinct training problems")
    trace_groups: int = option(2, "groups of each roll-out batch saved to traces.jsonl (for thinkforge ui; 0: none)")
    async_rollouts: bool = option(False, "one-step-off: a second process samples the next batch while this one "
                                         "trains (train.async_rollouts); one process, full model")
    rollout_lag: int = option(1, "with async_rollouts: 1 = sample batch k+1 with the weights before batch k's "
                                 "update; 0 = no overlap (the same results as synchronous GRPO)")
    rollout_threads: int = option(1, "with async_rollouts: torch CPU threads of the sampling process")

    def __post_init__(self):
        super().__post_init__()
        check(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        check(self.rm_scope in RM_SCOPES, f"rm_scope must be one of {RM_SCOPES}, got {self.rm_scope!r}")
        check(self.group_size >= 2, f"group_size must be >= 2 (GRPO's advantage is relative to the group), got {self.group_size}")
        for name in ("prompts_per_step", "max_new_tokens", "steps", "mu", "train_problems"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.micro_batch_size >= 0, f"micro_batch_size must be >= 0 (0: no micro-batches), got {self.micro_batch_size}")
        check(self.micro_batch_tokens >= 0, f"micro_batch_tokens must be >= 0 (0: off), got {self.micro_batch_tokens}")
        check(not (self.micro_batch_size and self.micro_batch_tokens),
              "give micro_batch_size (rows) or micro_batch_tokens (a token budget), not both")
        check(self.scale_rewards in ("group", "batch", "none"), f"scale_rewards must be group, batch or none, got {self.scale_rewards!r}")
        check(self.temperature > 0, f"temperature must be > 0 for RL roll-outs, got {self.temperature}")
        check(self.lr > 0 and self.beta >= 0, "need lr > 0 and beta >= 0")
        check(all(e is None or 0 < e < 1 for e in (self.epsilon, self.epsilon_high)),
              "epsilon and epsilon_high must be in (0, 1)")
        check(bool(self.rewards), "rewards must name at least one reward")
        for name, scope in self.rm_scopes.items():
            check(name in self.rewards and name.startswith(RM_PREFIX),
                  f"rm_scopes: {name!r} is not an rm:<folder> reward of rewards ({sorted(self.rewards)})")
            check(scope in RM_SCOPES, f"rm_scopes[{name!r}] must be one of {RM_SCOPES}, got {scope!r}")
        for name, fams in self.reward_families.items():
            check(name in self.rewards or name == "accuracy",
                  f"reward_families: {name!r} is not a reward of rewards ({sorted(self.rewards)})")
            check(isinstance(fams, list) and all(isinstance(f, str) for f in fams),
                  f"reward_families[{name!r}] must be a list of family names, got {fams!r}")
        check(self.rollout_lag in (0, 1), f"rollout_lag must be 0 or 1, got {self.rollout_lag}")
        check(self.rollout_threads >= 1, f"rollout_threads must be >= 1, got {self.rollout_threads}")
        if self.async_rollouts:
            check(self.lora_r == 0 and not self.fsdp, "async_rollouts needs a full model: not with LoRA (lora_r) or fsdp")


@dataclass
class Rollouts:
    """One scored batch, as tensors aligned on next-token targets (position t predicts ids[t + 1])."""

    ids: torch.Tensor  # (N, L) prompt + completion, right-padded
    mask: torch.Tensor  # (N, L-1) 1.0 where the target is a sampled completion token
    old_logp: torch.Tensor  # (N, L-1)
    adv: torch.Tensor  # (N,)
    stats: dict


def rollout_tensors(comps, pad: int, mask_truncated: bool, device):
    """Right-padded ids, the sampled-token mask and the engine's logprobs, aligned on targets."""
    L = max(len(c.prompt_ids) + len(c.ids) for c in comps)
    N = len(comps)
    ids = torch.full((N, L), pad, dtype=torch.long)
    mask = torch.zeros((N, L - 1))
    old = torch.zeros((N, L - 1))
    for i, c in enumerate(comps):
        p, n = len(c.prompt_ids), len(c.ids)
        ids[i, : p + n] = torch.tensor(c.prompt_ids + c.ids)
        if not (mask_truncated and c.finish_reason == "length"):
            mask[i, p - 1 : p - 1 + n] = torch.tensor(c.mask, dtype=torch.float)
        old[i, p - 1 : p - 1 + n] = torch.tensor(c.logprobs)
    return ids.to(device), mask.to(device), old.to(device)


class RolloutSource:
    """Draws problems from a seeded, resumable stream and turns them into scored roll-out batches.

    Under torchrun every process draws the same problems; each samples and scores every world-th one
    (its rank first) and the scored groups are gathered, in order, on every process, so dynamic
    sampling, advantages and statistics are global and identical everywhere. Each problem's samples
    come from its own seed (the engine's per-prompt streams), so the roll-outs do not depend on the
    number of processes."""

    def __init__(self, cfg: GRPOConfig, model, tok, task, problems, device):
        self.cfg, self.model, self.tok, self.task = cfg, model, tok, task
        self.problems, self.device = problems, device
        self.engine = Engine(model, tok)
        self.stream = EpochStream(problems, cfg.seed)
        self.rank, self.world = distributed()
        self.trace_path: Path | None = None  # set by train_grpo: run/traces.jsonl

    def _draw(self, state: dict, n: int) -> list:
        return [self.stream.next(state) for _ in range(n)]

    def _sample(self, problems, seeds: list[int]):
        cfg = self.cfg
        params = SamplingParams(n=cfg.group_size, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                thinking_budget=cfg.thinking_budget, seed=seeds)
        comps = self.engine.generate([self.engine.chat.prompt(p.question) for p in problems], params)
        probs = [p for p in problems for _ in range(cfg.group_size)]
        r = compute_rewards([c.text for c in comps], probs, self.task, cfg.rewards, lengths=[len(c.ids) for c in comps],
                            rm_scope=cfg.rm_scope, options={n: {"scope": s} for n, s in cfg.rm_scopes.items()},
                            families=cfg.reward_families or None)
        return comps, probs, r

    def _groups(self, problems: list, round_seed: int) -> tuple[list, dict]:
        """Every problem's scored group ``(completions, problems, rewards, accuracies, components)``, in
        order, and the verifier's timeouts and errors while scoring, summed over the processes."""
        G, before = self.cfg.group_size, dict(STATS)
        mine = list(range(self.rank, len(problems), self.world))
        groups = []
        if mine or is_sharded(self.model):  # (a sharded model's generate is collective: every process calls it)
            comps, probs, r = self._sample([problems[j] for j in mine], [round_seed * 1_000_003 + j for j in mine])
            for k in range(len(mine)):
                sl = slice(k * G, (k + 1) * G)
                groups.append((comps[sl], probs[sl], r.total[sl], r.accuracy[sl], {n: v[sl] for n, v in r.components.items()}))
        audit = {k: STATS[k] - before.get(k, 0) for k in ("timeouts", "errors")}
        if self.world == 1:
            return groups, audit
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, (mine, groups, audit))
        ordered = {j: g for idx, gs, _ in parts for j, g in zip(idx, gs)}
        return [ordered[j] for j in range(len(problems))], {k: sum(a[k] for _, _, a in parts) for k in audit}

    def collect(self, state: dict) -> Rollouts:
        cfg, G = self.cfg, self.cfg.group_size
        t0 = time.perf_counter()
        kept, dropped, rounds, all_groups = [], 0, 0, []
        audit = {"timeouts": 0, "errors": 0}
        while len(kept) < cfg.prompts_per_step and rounds <= (cfg.max_resample if cfg.resample else 0):
            need = cfg.prompts_per_step - len(kept)
            groups, counts = self._groups(self._draw(state, need), cfg.seed * 7919 + state["batches"] * 31 + rounds)
            rounds += 1
            audit = {k: audit[k] + counts[k] for k in audit}
            for group in groups:
                all_groups.append(group)
                if cfg.dynamic_sampling and len(set(group[3])) == 1:
                    dropped += 1
                    continue
                kept.append(group)
        if self.trace_path is not None and self.rank == 0 and cfg.trace_groups:
            self._trace(all_groups[: cfg.trace_groups], state["batches"])
        state["batches"] += 1
        stats = self._stats(all_groups, dropped, audit)
        proxies = [n for n in cfg.rewards if n.startswith(RM_PREFIX)]
        if proxies:  # a learned reward: its value beside the gold one on the same completions
            comps = [c for g in all_groups for c in g[0]]
            gold = sum(self.task.gold_utility(p, c.text) for g in all_groups for c, p in zip(g[0], g[1])) / len(comps)
            stats.update(record_overopt(state, stats[f"rewards/{proxies[0]}/mean"], gold, cfg.mu, self.rank))
        stats["sampling_rounds"] = rounds
        stats["gen_time"] = time.perf_counter() - t0
        if not kept:  # every group had zero variance: nothing to learn from this batch
            return Rollouts(None, None, None, None, stats)
        comps = [c for g in kept for c in g[0]]
        rewards = torch.tensor([x for g in kept for x in g[2]])
        adv = group_advantages(rewards, G, cfg.scale_rewards).to(self.device)
        ids, mask, old = rollout_tensors(comps, self.tok.pad_token_id, cfg.mask_truncated, self.device)
        return Rollouts(ids, mask, old, adv, stats)

    def _trace(self, groups, batch: int) -> None:
        """Append these groups' completions to traces.jsonl (``sampling.trace_rows`` plus the reward and its
        parts); ``batch`` is the roll-out batch's index."""
        graded = [Graded(g[1][0], list(g[0]), [self.task.extract(c.text) for c in g[0]], [a >= 1.0 for a in g[3]])
                  for g in groups]
        rows = trace_rows(graded, batch=batch)
        parts = [(r, {n: v[i] for n, v in g[4].items()}) for g in groups for i, r in enumerate(g[2])]
        with self.trace_path.open("a") as f:
            for row, (total, components) in zip(rows, parts):
                f.write(json.dumps({**row, "reward": total, "rewards": components}) + "\n")

    def _stats(self, groups, dropped: int, audit: dict) -> dict:
        comps = [c for g in groups for c in g[0]]
        total = torch.tensor([x for g in groups for x in g[2]])
        acc = [x for g in groups for x in g[3]]
        grouped = total.view(-1, self.cfg.group_size)
        s = {
            "reward": float(total.mean()),
            "reward_std": float(grouped.std(1).mean()),
            "frac_reward_zero_std": float((grouped.std(1) == 0).float().mean()),
            "accuracy": sum(acc) / len(acc),
            "groups_dropped": dropped,
            "completions/mean_length": sum(len(c.ids) for c in comps) / len(comps),
            "completions/clipped_ratio": sum(c.finish_reason == "length" for c in comps) / len(comps),
            "thinking_length": sum(c.thinking_tokens for c in comps) / len(comps),
            "reflection_share": sum(bool(REFLECTION.search(c.text)) for c in comps) / len(comps),
            "audit/verifier_timeouts": audit["timeouts"],
            "audit/verifier_errors": audit["errors"],
        }
        for name in groups[0][4]:
            s[f"rewards/{name}/mean"] = sum(x for g in groups for x in g[4][name]) / len(comps)
        if "format" in groups[0][4]:
            fmt_ok = [x for g in groups for x in g[4]["format"]]
            s["audit/format_only_share"] = sum(f > 0 and a < 1 for f, a in zip(fmt_ok, acc)) / len(comps)
        return s

    def __call__(self, state: dict) -> list[dict]:
        """The loop's ``next_batch``: a new roll-out batch every ``mu`` optimizer steps."""
        ro = next_rollouts(state, self.cfg.mu, lambda: self.collect(state).__dict__)
        seen = 0 if ro["ids"] is None else int(ro["ids"].numel())
        live = None if ro["ids"] is None else live_rows(ro, self.cfg)
        if not live:
            parts = 1
        elif self.cfg.micro_batch_tokens:  # the most parts any process has: every one makes as many passes
            parts = max(len(p) for p in token_parts(ro["mask"], self.world, self.cfg.micro_batch_tokens, live))
        else:
            parts = len(part_rows(ro["mask"], self.cfg, self.rank, self.world, live))
        # n_tokens 1 in all: the loop divides by their sum (1), each part's loss already carries its share
        return [{"rollouts": ro, "part": k, "parts": parts, "n_tokens": int(k == 0), "seen_tokens": seen * (k == 0)}
                for k in range(parts)]


def needed_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Per row of a roll-out batch, the ids it needs for its loss: up to the target of its last sampled
    (mask 1) token. Positions after it add nothing to any loss or statistic (the model is causal and the mask
    is 0 there), so a part cut to its longest row's need gives the same values as the whole width. (N,)"""
    has = mask > 0
    last = (mask.shape[1] - 1) - has.flip(1).float().argmax(1)  # the last target index with mask 1
    return torch.where(has.any(1), last + 2, torch.full_like(last, 2))


def live_rows(ro: dict, cfg: GRPOConfig) -> list[int]:
    """The rows of a roll-out batch that the trainer computes: with ``beta`` 0 (and ``skip_zero_advantage``),
    only those whose advantage is not 0. Every loss variant is a clipped ratio times the advantage, so a row
    with advantage 0 adds exactly nothing to the loss or its gradient (its tokens still count in the
    normaliser, through ``losses.shard_weight``): skipping its forward and backward gives the same update.
    With a KL term every row counts."""
    adv = ro["adv"]
    if cfg.beta > 0 or not cfg.skip_zero_advantage:
        return list(range(adv.shape[0]))
    return torch.nonzero(adv != 0)[:, 0].tolist()


def part_rows(mask: torch.Tensor, cfg: GRPOConfig, rank: int, world: int,
              live: list[int] | None = None) -> list[list[int]]:
    """This process's rows of a roll-out batch (the ``live`` rows — default all — rank, rank + world, …), one
    list per forward/backward pass: packed by ``micro_batch_tokens`` (:func:`token_parts`), or
    ``micro_batch_size`` rows split into equal passes, or all in one."""
    if cfg.micro_batch_tokens:
        return token_parts(mask, world, cfg.micro_batch_tokens, live)[rank]
    mine = list(range(mask.shape[0]) if live is None else live)[rank::world]
    m = cfg.micro_batch_size
    parts = max(1, -(-len(mine) // m)) if m else 1
    size = -(-len(mine) // parts)
    return [mine[k * size : (k + 1) * size] for k in range(parts)]


def token_parts(mask: torch.Tensor, world: int, budget: int, live: list[int] | None = None) -> list[list[list[int]]]:
    """Per process (the ``live`` rows — default all — rank, rank + world, …), its rows packed into parts by
    need (:func:`needed_lengths`), longest first: a part takes rows while (its rows × its first, longest,
    row's need) ≤ ``budget``; a row needing more than the budget is a part of its own. Row indices ascending
    within a part."""
    need = needed_lengths(mask).tolist()
    rows = list(range(len(need)) if live is None else live)
    out = []
    for rank in range(world):
        parts: list[list[int]] = []
        for i in sorted(rows[rank::world], key=lambda i: (-need[i], i)):
            if parts and (len(parts[-1]) + 1) * need[parts[-1][0]] <= budget:
                parts[-1].append(i)
            else:
                parts.append([i])
        out.append([sorted(p) for p in parts])
    return out


def next_rollouts(state: dict, mu: int, collect) -> dict:
    """The roll-out batch of this optimizer step: ``collect()`` makes a new one every ``mu`` steps; between
    passes it stays in the loop's (checkpointed) state, so a resumed run trains on the same roll-outs."""
    state.setdefault("batches", 0)
    state.setdefault("pass", 0)
    if state["pass"] == 0 or "rollouts" not in state:
        state["rollouts"] = collect()
    state["pass"] = (state["pass"] + 1) % mu
    return state["rollouts"] if state["pass"] else state.pop("rollouts")


def record_overopt(state: dict, proxy: float, gold: float, mu: int, rank: int) -> dict:
    """The ``overopt/*`` statistics of one roll-out batch against a learned reward; the history lives in
    the (checkpointed) state, so resume is exact; warns once, with the step, when :func:`overoptimising`."""
    history = state.setdefault("overopt", [])
    history.append((proxy, gold))
    warning = overoptimising(history)
    if warning and not state.get("overopt_warned") and rank == 0:
        state["overopt_warned"] = True
        print(f"warning: step {(state['batches'] - 1) * mu}: the learned reward keeps rising while the gold score "
              "falls (over-optimisation / reward hacking): see overopt/* in metrics.jsonl", file=sys.stderr)
    return {"overopt/proxy": proxy, "overopt/gold": gold, "overopt/warning": float(warning)}


def overoptimising(history: list[tuple[float, float]], window: int = 5, drop: float = 0.02) -> bool:
    """Reward hacking in progress: over the last ``window`` roll-out batches the proxy (learned) reward rose
    while the gold score fell by more than ``drop``, each compared with the ``window`` batches before
    (Gao et al. 2022: the proxy keeps rising after the gold score has peaked).

    >>> overoptimising([(0.1, 0.5)] * 5 + [(0.3, 0.4)] * 5), overoptimising([(0.1, 0.5)] * 5 + [(0.3, 0.6)] * 5)
    (True, False)
    """
    if len(history) < 2 * window:
        return False
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    before, now = history[-2 * window : -window], history[-window:]
    return mean([p for p, _ in now]) > mean([p for p, _ in before]) and \
        mean([g for _, g in now]) < mean([g for _, g in before]) - drop


ROW_STATS = ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def make_loss_fn(cfg: GRPOConfig, ref_model=None):
    """The loop's ``loss_fn``. Under torchrun each process takes every world-th row of the (global) batch and
    weights its loss by the rows' share of the loss's normaliser (``losses.shard_weight``): the gradients
    summed over processes are those of the whole batch. The reference's logprobs (``beta > 0``) are
    computed for the process's own rows, once per roll-out batch."""
    variant = LOSSES[cfg.loss]
    eps = dict(eps_low=cfg.epsilon, eps_high=cfg.epsilon_high)  # None: the variant's own bound
    rank, world = distributed()
    ref_cache: dict = {}  # the roll-out batch (its ids tensor) and its reference logprobs, for mu > 1

    def loss_fn(model, mb: dict):
        ro = mb["rollouts"]
        stats = dict(ro["stats"])
        if ro["ids"] is None:  # every group was dropped: the loop makes no update this step
            return None, stats
        part, parts = mb.get("part", 0), mb.get("parts", 1)
        live = live_rows(ro, cfg)
        if not live:  # every advantage 0 and no KL: nothing to learn, on any process (no update, as for no rows)
            return None, {**stats, **dict.fromkeys(ROW_STATS, 0.0)}
        mine = part_rows(ro["mask"], cfg, rank, world, live)
        rows = torch.tensor(mine[part] if part < len(mine) else [], dtype=torch.long)
        ids, mask, old, adv = ro["ids"][rows], ro["mask"][rows], ro["old_logp"][rows], ro["adv"][rows]
        if len(rows):  # cut to the longest need of these rows (the rest is padding or masked: same values)
            width = int(needed_lengths(mask).max())
            ids, mask, old = ids[:, :width], mask[:, : width - 1], old[:, : width - 1]
        empty = ids.shape[0] == 0  # fewer kept completions than processes: this rank adds 0 to every mean
        zeros = {**stats, **dict.fromkeys(ROW_STATS + (("kl",) if cfg.beta > 0 else ()), 0.0)}
        if empty and not is_sharded(model):
            return None, zeros
        if empty:  # FSDP's forwards and backward are collective: the same passes on a stand-in row, weighted 0
            ids, mask, old, adv = ro["ids"][:1], ro["mask"][:1], ro["old_logp"][:1], ro["adv"][:1]
        logp, entropy = token_logprobs(model, ids, cfg.temperature, with_entropy=True)
        loss = variant.loss(logp, old, adv, mask, max_len=cfg.max_new_tokens, **eps)
        if cfg.beta > 0:
            if ref_cache.get("ids") is not ro["ids"]:  # a new roll-out batch: the reference's logprobs, per part
                ref_cache.clear()
                ref_cache["ids"] = ro["ids"]
            if part not in ref_cache:  # no reference model given: the policy's base, its LoRA adapter off
                with torch.no_grad(), (base_only(model) if ref_model is None else contextlib.nullcontext()):
                    ref_cache[part] = token_logprobs(ref_model or model, ids, cfg.temperature)[0]
            ratio = variant.ratio(logp, old, mask) if cfg.kl_bias_correction else None
            kl = variant.reduce(k3_kl(logp, ref_cache[part], ratio), mask, cfg.max_new_tokens)
            loss = loss + cfg.beta * kl
            stats["kl"] = float(kl.detach())
        # These rows' share of the batch loss's normaliser (1.0 for a whole batch on one process): the
        # weighted losses of all parts on all processes sum to the loss of the whole batch.
        weight = shard_weight(variant, ro["mask"], rows)
        loss = loss * weight
        if "kl" in stats:  # the loop averages over parts and ranks: this makes the average the batch's KL
            stats["kl"] *= weight * world * parts
        n = ro["mask"].sum().clamp(min=1) / (world * parts)  # token means over the batch once averaged
        n_live = ro["mask"][live].sum().clamp(min=1) / (world * parts)  # (entropy: over the rows computed)
        low_clip, high_clip = variant.clip_fractions(logp, old, adv, mask, **eps)
        stats.update({  # ROW_STATS
            "entropy": float((entropy * mask).sum() / n_live),
            "clip_ratio/low_mean": float(low_clip.sum() / n),
            "clip_ratio/high_mean": float(high_clip.sum() / n),
            "clip_ratio/region_mean": float((low_clip + high_clip).sum() / n),
        })
        return (0.0 * loss, zeros) if empty else (loss, stats)

    return loss_fn


def check_families(reward_families: dict, task) -> None:
    """Every family a reward is limited to exists in the (mixed) task."""
    if not reward_families:
        return
    known = getattr(task, "families", None)
    if known is None:
        raise ConfigError(f"reward_families needs a mixed task (task = \"mixed\"), not {task.name!r}")
    for name, fams in reward_families.items():
        unknown = sorted(set(fams) - set(known))
        if unknown:
            raise ConfigError(f"reward_families[{name!r}]: unknown famil{'y' if len(unknown) == 1 else 'ies'} "
                              f"{unknown}; the task's are {known}")


def train_grpo(cfg: GRPOConfig) -> Path:
    """Run GRPO as configured; returns the run folder (final model in ``run/model``)."""
    run = start_run(cfg.out, cfg)
    device = resolve_device(cfg.device)
    task = get_task(cfg.task, **cfg.task_options)
    check_families(cfg.reward_families, task)
    problems = task.problems(cfg.train_problems, "train", seed=cfg.seed)
    model, tok = load_trainee(cfg, cfg.model, run, device)
    ref = None
    if cfg.beta > 0 and not is_lora(model):  # the reference is the starting model, also on resume
        if is_sharded(model):  # (a sharded model cannot be copied: the reference is sharded too, loaded the same way)
            ref = load_sharded(cfg.model, device, dataclasses.replace(cfg, gradient_checkpointing=False))[0]
        elif cfg.resume:
            ref = load_model(cfg.model, device=str(device), dtype=torch.float32)[0]
        else:
            ref = copy.deepcopy(model)
        ref.requires_grad_(False).eval()  # (with LoRA: the same model with its adapter off, no copy)
    save_config(cfg, run / "config.toml")
    settings = LoopSettings(cfg.steps, cfg.lr, cfg.warmup, 1.0, cfg.weight_decay, cfg.grad_clip, cfg.save_every, cfg.seed)
    source = RolloutSource(cfg, model, tok, task, problems, device)
    source.trace_path = run / "traces.jsonl"
    if distributed()[0] == 0:  # a resumed run samples again from its checkpoint's batch: drop later traces
        keep = load_checkpoint(run)["data"].get("batches", 0) if cfg.resume else 0
        trim_jsonl(source.trace_path, lambda row: row.get("batch", 0) < keep)
    collector = None
    if cfg.async_rollouts:
        if distributed()[1] > 1:
            raise ConfigError("async_rollouts runs in one process: not under torchrun")
        from thinkforge.train.async_rollouts import AsyncCollector

        collector = AsyncCollector(cfg, model, run, settings, device)
        source.collect = collector.collect  # the sampler process makes every batch
    try:
        run_training(model, tok, run, settings, source, make_loss_fn(cfg, ref), report_to=cfg.report_to,
                     resume=cfg.resume, merge=cfg.merge, amp=autocast_dtype(cfg.dtype, device),
                     describe=lambda m: f"reward {m.get('reward', 0):.2f} acc {m.get('accuracy', 0):.2f}")
    finally:
        if collector is not None:
            collector.close()
    return run


def train_measured(cfg: GRPOConfig, every: int, path: Path, measure, report=None) -> list[dict]:
    """GRPO for ``cfg.steps`` steps in segments of ``every``, with ``measure(model, tok) -> dict`` of the starting
    model and of the model after each segment, kept as a JSON list of ``{"step", **measured}`` in ``path``
    (written atomically after each). A rerun continues after the last measured segment, the run resuming
    exactly from that segment's checkpoint; ``report(point)`` is called on each new point. ``cfg.resume``,
    ``overwrite`` and ``save_every`` are set here."""
    from thinkforge.config import write_json

    points = json.loads(path.read_text()) if path.is_file() else []
    if not points:
        model, tok = load_model(cfg.model, device="cpu")
        points.append({"step": 0, **measure(model.eval(), tok)})
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, points)
    for steps in range(points[-1]["step"] + every, cfg.steps + 1, every):
        run = train_grpo(dataclasses.replace(cfg, steps=steps, save_every=every, resume=steps > every,
                                             overwrite=steps == every))
        model, tok = load_model(str(run / "model"), device="cpu")
        points.append({"step": steps, **measure(model.eval(), tok)})
        write_json(path, points)
        if report:
            report(points[-1])
    return points
