"""PPO with a value model: the classic RLHF recipe (Ziegler et al. 2019; Stiennon et al. 2020; InstructGPT).

    thinkforge train ppo --model runs/rlhf/sft/model --rewards '{"rm:runs/rlhf/rm/model" = 1.0}' --out runs/ppo
    thinkforge train ppo --model runs/demo/sft-cot/model --rewards '{"accuracy" = 1.0}' --adaptive-kl true

Each roll-out batch: ``prompts_per_step`` prompts × ``samples`` completions from the engine (old
log-probs come with them); the frozen reference (the starting policy) and the value model read them;
the sequence's score (the weighted rewards, e.g. a learned reward model) lands on its last token and
every token pays −β·(log π_old − log π_ref) (``losses.kl_penalised_rewards``); GAE (γ, λ) turns those
per-token rewards and the old values into advantages and returns (``losses.gae``), advantages are
whitened over the batch; then ``mu`` optimizer steps on the batch minimise the clipped policy loss plus
``value_coef`` × the clipped value loss (``losses.ppo_policy_loss``, ``losses.clipped_value_loss``).
With ``adaptive_kl`` the coefficient follows Ziegler et al.'s controller towards ``kl_target`` nats per
sequence (``losses.adaptive_kl_coef``).

The value model is a separate network (InstructGPT initialises it from the reward model; here from
``value_model``, default the policy's weights) under a one-logit token head: ``V(s_t)`` is its output at
the position that predicts token t. Policy and value are trained by one optimizer as one module
(:class:`ActorCritic`): the run folder's ``model/`` is the policy (an ordinary HF checkpoint) and
``model/value/`` the value model. Under torchrun every process samples the same seeded roll-outs
and trains its share of the rows with its loss weighted by its share of the tokens (correct, with the
sampling repeated on every process).

Logged: ``score`` (the reward before the KL term), ``kl`` (mean per-sequence log-ratio to the
reference), ``kl_coef``, ``policy_loss``, ``value_loss``, ``clipfrac``, ``vf_clipfrac``, ``returns``,
``accuracy``, ``gold`` (the task's gold preference of the samples) and, against a learned reward,
``overopt/proxy`` and ``overopt/gold`` with the same warning as GRPO.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkforge.config import check, option, save_config
from thinkforge.generation import Engine, SamplingParams
from thinkforge.models import load_model, resolve_device, token_logprobs
from thinkforge.rewards import RM_PREFIX, RM_SCOPES, compute_rewards
from thinkforge.tasks import get_task
from thinkforge.train.grpo import next_rollouts, record_overopt, rollout_tensors
from thinkforge.train.loop import EpochStream, LoopSettings, RunOptions, distributed, run_training, start_run
from thinkforge.train.losses import adaptive_kl_coef, clipped_value_loss, gae, kl_penalised_rewards, ppo_policy_loss


@dataclass
class PPOConfig(RunOptions):
    model: str = option("runs/demo/sft-cot/model", "starting policy (also the frozen reference)")
    value_model: str | None = option(None, "value model start (a policy or reward-model folder; default: the policy)")
    task: str = option("mul", "task name or .jsonl/.parquet file")
    task_options: dict = option({}, "the task's knobs")
    rewards: dict = option({"accuracy": 1.0}, "reward weights by name or rm:<folder> (see rewards); their sum is the score")
    rm_scope: str = option("all", "what an rm:<folder> reward reads: all (thinking + answer) or answer")
    out: str = option("runs/ppo", "run folder")
    steps: int = option(100, "optimizer steps (roll-out batches = steps / mu)")
    mu: int = option(2, "optimizer steps per roll-out batch (PPO epochs)")
    prompts_per_step: int = option(16, "prompts per roll-out batch")
    samples: int = option(2, "completions per prompt")
    max_new_tokens: int = option(96, "completion length cap")
    temperature: float = option(1.0, "sampling temperature")
    lr: float = option(2e-5, "peak learning rate (policy and value)")
    warmup: int = option(5, "linear warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay on matrices")
    grad_clip: float = option(1.0, "clip the global gradient norm")
    epsilon: float = option(0.2, "policy clip range")
    micro_batch_size: int = option(0, "rows per forward/backward (0: a process's whole roll-out batch); the update "
                                      "is the same")
    value_clip: float = option(0.2, "value clip range around the old values")
    value_coef: float = option(0.5, "weight of the value loss")
    kl_coef: float = option(0.05, "β of the per-token KL penalty in the reward (initial value with adaptive_kl)")
    adaptive_kl: bool = option(False, "adapt β towards kl_target (Ziegler et al. 2019)")
    kl_target: float = option(6.0, "target KL per sequence in nats for adaptive_kl")
    kl_horizon: int = option(10000, "horizon of the adaptive controller, in sequences")
    gamma: float = option(1.0, "discount γ of GAE")
    lam: float = option(0.95, "λ of GAE")
    train_problems: int = option(5000, "training-split problems to draw prompts from")

    def __post_init__(self):
        super().__post_init__()
        for name in ("steps", "mu", "prompts_per_step", "samples", "max_new_tokens", "train_problems", "kl_horizon"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.lr > 0 and self.temperature > 0 and self.kl_coef >= 0 and self.kl_target > 0,
              "need lr > 0, temperature > 0, kl_coef >= 0 and kl_target > 0")
        check(0 < self.epsilon < 1 and self.value_clip > 0 and self.value_coef >= 0, "need 0 < epsilon < 1, "
              "value_clip > 0 and value_coef >= 0")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]")
        check(self.micro_batch_size >= 0, f"micro_batch_size must be >= 0, got {self.micro_batch_size}")
        check(self.rm_scope in RM_SCOPES, f"rm_scope must be one of {RM_SCOPES}, got {self.rm_scope!r}")


class ActorCritic(torch.nn.Module):
    """The policy and the value model as one module, so one optimizer and one checkpoint hold both."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value

    def get_input_embeddings(self):
        return self.policy.get_input_embeddings()

    def save_pretrained(self, path, **kw):
        self.policy.save_pretrained(path, **kw)
        self.value.save_pretrained(Path(path) / "value", **kw)

    def values(self, ids: torch.Tensor) -> torch.Tensor:
        """V at every position that predicts the next token, aligned with ``token_logprobs``. (N, L-1)"""
        return self.value(input_ids=ids).logits[:, :-1, 0].float()


def load_value(path: str, device, seed: int):
    from thinkforge.train.reward_model import _backbone

    torch.manual_seed(seed)  # the fresh value head's weights
    return _backbone(path, device, dropout=0.0)[0]


class PPOSource:
    """Seeded, resumable roll-out batches with old log-probs, reference log-probs, values, advantages."""

    def __init__(self, cfg: PPOConfig, ac: ActorCritic, ref, tok, task, problems, device):
        self.cfg, self.ac, self.ref, self.tok, self.task, self.device = cfg, ac, ref, tok, task, device
        self.engine = Engine(ac.policy, tok)
        self.stream = EpochStream(problems, cfg.seed)

    @torch.no_grad()
    def collect(self, state: dict) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        problems = [self.stream.next(state) for _ in range(cfg.prompts_per_step)]
        seeds = [cfg.seed * 1_000_003 + state["batches"] * 7919 + j for j in range(len(problems))]
        params = SamplingParams(n=cfg.samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=seeds)
        comps = self.engine.generate([self.engine.chat.prompt(p.question) for p in problems], params)
        probs = [p for p in problems for _ in range(cfg.samples)]
        r = compute_rewards([c.text for c in comps], probs, self.task, cfg.rewards,
                            lengths=[len(c.ids) for c in comps], rm_scope=cfg.rm_scope)
        ids, mask, old = rollout_tensors(comps, self.tok.pad_token_id, False, self.device)
        span = torch.zeros_like(mask)  # every completion position, forced tokens included (the GAE chain)
        for i, c in enumerate(comps):
            span[i, len(c.prompt_ids) - 1 : len(c.prompt_ids) - 1 + len(c.ids)] = 1.0
        ref_logp = token_logprobs(self.ref, ids, cfg.temperature)[0]
        values = self.ac.values(ids) * span
        coef = state.get("kl_coef", cfg.kl_coef)
        scores = torch.tensor(r.total, device=self.device)
        rewards = kl_penalised_rewards(scores, old, ref_logp, span, coef)
        adv, returns = gae(rewards, values, span, cfg.gamma, cfg.lam)
        sel = mask > 0
        adv = torch.where(sel, (adv - adv[sel].mean()) / (adv[sel].std() + 1e-8), torch.zeros_like(adv))
        kl = float(((old - ref_logp) * span).sum(1).mean())
        if cfg.adaptive_kl:
            state["kl_coef"] = adaptive_kl_coef(coef, kl, cfg.kl_target, cfg.kl_horizon, len(comps))
        state["batches"] += 1
        stats = {"score": float(scores.mean()), "kl": kl, "kl_coef": coef, "returns": float(returns[sel].mean()),
                 "accuracy": sum(r.accuracy) / len(comps),
                 "gold": sum(self.task.gold_utility(p, c.text) for p, c in zip(probs, comps)) / len(comps),
                 "completions/mean_length": sum(len(c.ids) for c in comps) / len(comps), "gen_time": time.perf_counter() - t0}
        proxies = [n for n in cfg.rewards if n.startswith(RM_PREFIX)]
        if proxies:
            stats.update(record_overopt(state, sum(r.components[proxies[0]]) / len(comps), stats["gold"], cfg.mu,
                                        distributed()[0]))
        return {"ids": ids, "mask": mask, "old_logp": old, "old_values": values, "adv": adv, "returns": returns,
                "stats": stats}

    def __call__(self, state: dict) -> list[dict]:
        """The loop's ``next_batch``: a new roll-out batch every ``mu`` optimizer steps (kept in the state,
        so a checkpoint taken between passes resumes on the same roll-outs)."""
        ro = next_rollouts(state, self.cfg.mu, lambda: self.collect(state))
        rank, world = distributed()
        mine, m = len(range(rank, ro["ids"].shape[0], world)), self.cfg.micro_batch_size
        parts = max(1, -(-mine // m)) if m else 1
        return [{"rollouts": ro, "part": k, "parts": parts, "n_tokens": int(k == 0),
                 "seen_tokens": int(ro["ids"].numel()) * (k == 0)} for k in range(parts)]


def make_loss_fn(cfg: PPOConfig):
    rank, world = distributed()

    def loss_fn(ac: ActorCritic, mb: dict):
        ro = mb["rollouts"]
        part, parts = mb.get("part", 0), mb.get("parts", 1)
        mine = list(range(rank, ro["ids"].shape[0], world))
        size = -(-len(mine) // parts)
        rows = torch.tensor(mine[part * size : (part + 1) * size], dtype=torch.long)
        ids, mask = ro["ids"][rows], ro["mask"][rows]
        if ids.shape[0] == 0:
            return None, dict(ro["stats"])
        logp, _ = token_logprobs(ac.policy, ids, cfg.temperature)
        values = ac.values(ids)
        pl = ppo_policy_loss(logp, ro["old_logp"][rows], ro["adv"][rows], mask, cfg.epsilon)
        vl = clipped_value_loss(values, ro["old_values"][rows], ro["returns"][rows], mask, cfg.value_clip)
        loss = pl + cfg.value_coef * vl
        # Both losses are token means: these rows weigh their share of the batch's tokens (1.0 for the whole
        # batch on one process); the logged means are scaled so the loop's averages over parts are the batch's.
        share = float(mask.sum() / ro["mask"].sum().clamp(min=1)) if world > 1 or parts > 1 else 1.0
        loss = loss * share
        scale = share * parts * world if parts > 1 else 1.0
        with torch.no_grad():
            ratio = torch.exp(logp - ro["old_logp"][rows])
            n = mask.sum().clamp(min=1)
            clipfrac = float((((ratio - 1).abs() > cfg.epsilon).float() * mask).sum() / n)
            vf_clip = float((((values - ro["old_values"][rows]).abs() > cfg.value_clip).float() * mask).sum() / n)
        return loss, {**ro["stats"], "policy_loss": float(pl.detach()) * scale, "value_loss": float(vl.detach()) * scale,
                      "clipfrac": clipfrac * scale, "vf_clipfrac": vf_clip * scale}

    return loss_fn


def train_ppo(cfg: PPOConfig) -> Path:
    """Run PPO as configured; the policy is saved in ``run/model`` (its value model in ``run/model/value``)."""
    from transformers import AutoModelForTokenClassification

    run = start_run(cfg.out, cfg)
    device = resolve_device(cfg.device)
    task = get_task(cfg.task, **cfg.task_options)
    problems = task.problems(cfg.train_problems, "train", seed=cfg.seed)
    if cfg.resume:
        policy, tok = load_model(str(run / "checkpoint"), device=str(device))
        value = AutoModelForTokenClassification.from_pretrained(str(run / "checkpoint" / "value")).to(device)
        ref = load_model(cfg.model, device=str(device))[0]
    else:
        policy, tok = load_model(cfg.model, device=str(device))
        value = load_value(cfg.value_model or cfg.model, device, cfg.seed)
        ref = copy.deepcopy(policy)
    ref.requires_grad_(False).eval()
    if os.environ.get("RANK", "0") == "0":
        save_config(cfg, run / "config.toml")
    ac = ActorCritic(policy, value)
    settings = LoopSettings(cfg.steps, cfg.lr, cfg.warmup, 1.0, cfg.weight_decay, cfg.grad_clip, cfg.save_every, cfg.seed)
    run_training(ac, tok, run, settings, PPOSource(cfg, ac, ref, tok, task, problems, device), make_loss_fn(cfg),
                 report_to=cfg.report_to, resume=cfg.resume, describe=lambda m: f"score {m.get('score', 0):.2f} kl {m.get('kl', 0):.2f}")
    return run
