"""Policy-gradient losses for RL with verifiable rewards, and the group advantage.

Every loss takes per-token tensors of one batch of roll-outs and returns a scalar to minimise:

    logp      (N, T)  log π_θ(o_t | q, o_<t) under the current policy (with gradient)
    old_logp  (N, T)  the same under the policy that sampled the roll-outs (no gradient)
    adv       (N,)    one advantage per completion
    mask      (N, T)  1 on completion tokens the model sampled (not prompt, padding or forced tokens)

| name | normalisation | ratio | source |
|---|---|---|---|
| ``grpo`` | mean over each sequence's tokens, then over sequences | per token | DeepSeekMath (Shao et al. 2024), eq. 3 |
| ``bnpo`` | sum over all tokens ÷ tokens in the batch | per token | TRL's "bnpo" (batch-normalised) |
| ``dr_grpo`` | sum over all tokens ÷ (sequences × max completion length), a constant | per token | Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") |
| ``dapo`` | sum over all tokens ÷ tokens in the batch, clip-higher (ε_low ≠ ε_high) | per token | DAPO (Yu et al. 2025), eq. 8 |
| ``gspo`` | mean over sequences | per sequence: exp(mean_t(logp − old_logp)) | GSPO (Zheng et al. 2025), eq. 7 |

All use PPO's clipped surrogate −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A). The KL penalty to a
reference policy uses the k3 estimator exp(ref − logp) − (ref − logp) − 1 (Schulman, "Approximating
KL divergence", 2020; DeepSeekMath eq. 4), normalised like the loss it is added to.

Each variant is one :class:`Variant` record in :data:`LOSSES`: its ratio, its normalisation, its
default clip bounds (ε_low, ε_high) and its source. Everything that depends on the variant — the loss,
the KL term's reduction, the clip-ratio statistics, a process's share under torchrun, the bounds a
config leaves unset — reads that record, so no caller branches on a loss name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Advantages of ``rewards`` (N,) laid out as consecutive groups of ``group_size`` completions.

    A = r − mean(group); divided by the group's std (``scale="group"``, GRPO), by the whole batch's std
    (``"batch"``, as Dr. GRPO and "REINFORCE++" suggest against the group-std bias), or not at all
    (``"none"``). A group whose rewards are all equal gets zero advantage.

    >>> group_advantages(torch.tensor([1., 0., 0., 0.]), 2, "none").tolist()
    [0.5, -0.5, 0.0, 0.0]
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"advantage scale must be group, batch or none, got {scale!r}")
    g = rewards.view(-1, group_size)  # (P, G)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        std = g.std(dim=1, keepdim=True)  # (P, 1); a zero-variance group stays at 0 whatever eps is
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    elif scale == "batch" and rewards.numel() > 1 and rewards.std() > 0:
        centred = centred / (rewards.std() + eps)
    return centred.reshape(-1)


def _clipped(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """Per-token (or per-sequence) PPO surrogate to minimise; ``adv`` broadcasts against ``ratio``."""
    return -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)


def token_ratio(logp, old_logp, mask):
    """π_θ/π_old per token. (N, T)"""
    return torch.exp(logp - old_logp)


def sequence_ratio(logp, old_logp, mask):
    """GSPO's ratio: the geometric mean of a sequence's token ratios, broadcast over its tokens. (N, 1)"""
    return torch.exp(((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp(min=1))[:, None]


def sequence_mean(values, mask, max_len=None):
    """Mean over each sequence's tokens, then over sequences (DeepSeekMath eq. 3)."""
    return ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def token_mean(values, mask, max_len=None):
    """Sum over all tokens ÷ tokens in the batch (long and short completions weigh per token)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def constant_norm(values, mask, max_len=None):
    """Sum over all tokens ÷ (sequences × max completion length), a constant (Dr. GRPO)."""
    return (values * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))


@dataclass(frozen=True)
class Variant:
    """One policy-gradient loss: how its ratio is taken, how it is normalised, its default clip bounds."""

    ratio: Callable  # (logp, old_logp, mask) -> (N, T) or (N, 1)
    reduce: Callable  # (values (N, T), mask, max_len) -> scalar
    eps_low: float
    eps_high: float
    shard_by: str  # "tokens" | "sequences": what ``reduce`` divides by, for a process's share of the batch
    source: str

    def bounds(self, eps_low: float | None = None, eps_high: float | None = None) -> tuple[float, float]:
        """The clip bounds: a config's value where it sets one, else this variant's own."""
        return (self.eps_low if eps_low is None else eps_low, self.eps_high if eps_high is None else eps_high)

    def loss(self, logp, old_logp, adv, mask, eps_low=None, eps_high=None, max_len=None):
        lo, hi = self.bounds(eps_low, eps_high)
        per_tok = _clipped(self.ratio(logp, old_logp, mask), adv[:, None], lo, hi) * mask  # (N, T)
        return self.reduce(per_tok, mask, max_len)

    def clip_fractions(self, logp, old_logp, adv, mask, eps_low=None, eps_high=None):
        """Per-token indicators (N, T) of the low and high clip being active, with the loss's own ratio
        and bounds (a sequence-level ratio marks all of its sequence's tokens)."""
        lo, hi = self.bounds(eps_low, eps_high)
        ratio = self.ratio(logp.detach(), old_logp, mask).expand_as(mask)
        low = ((ratio < 1 - lo) & (adv[:, None] < 0)).float() * mask
        high = ((ratio > 1 + hi) & (adv[:, None] > 0)).float() * mask
        return low, high


LOSSES: dict[str, Variant] = {
    "grpo": Variant(token_ratio, sequence_mean, 0.2, 0.2, "sequences", "DeepSeekMath (Shao et al. 2024), eq. 3"),
    "bnpo": Variant(token_ratio, token_mean, 0.2, 0.2, "tokens", 'TRL\'s "bnpo" (batch-normalised)'),
    "dr_grpo": Variant(token_ratio, constant_norm, 0.2, 0.2, "sequences", "Dr. GRPO (Liu et al. 2025)"),
    "dapo": Variant(token_ratio, token_mean, 0.2, 0.28, "tokens", "DAPO (Yu et al. 2025), eq. 8, clip-higher"),
    # GSPO's ε are ~1e-3 of PPO's because its ratio is a per-sequence geometric mean (paper §5.1).
    "gspo": Variant(sequence_ratio, sequence_mean, 3e-4, 4e-4, "sequences", "GSPO (Zheng et al. 2025), eq. 7"),
}


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref); ≥ 0, unbiased when the tokens come from π_θ.

    The roll-outs come from π_old, which differs from π_θ after the first of μ passes (or when the sampler
    is another engine): multiplying by the importance ratio π_θ/π_old (``ratio``, the variant's own)
    makes the estimate unbiased again (DeepSeek-V3.2 §3.1, "unbiased KL estimate"; TRL's
    ``use_bias_correction_kl``). The ratio keeps its gradient, as in both."""
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    return kl if ratio is None else kl * ratio


def shard_weight(variant: Variant, mask: torch.Tensor, rows: slice | torch.Tensor) -> float:
    """The weight of the loss of ``rows`` alone (one process's or one micro-batch's share of a batch) such
    that the weighted shard losses sum to the loss of the whole batch: the rows' share of what the loss
    divides by. ``mask`` is the whole batch's."""
    if variant.shard_by == "tokens":
        return float(mask[rows].sum() / mask.sum().clamp(min=1))
    return mask[rows].shape[0] / mask.shape[0]


# ---- losses from preferences ----------------------------------------------------------------------------

def bradley_terry_loss(r_better: torch.Tensor, r_worse: torch.Tensor, margin: torch.Tensor | float = 0.0):
    """−log σ(r_better − r_worse − margin) per pair: the reward model's loss (Bradley & Terry 1952;
    InstructGPT eq. 1; the margin as in Llama 2's reward model). (P,)"""
    return -torch.nn.functional.logsigmoid(r_better - r_worse - margin)


def dpo_sigmoid_loss(logratio_better: torch.Tensor, logratio_worse: torch.Tensor, beta: float):
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(β[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)]),
    with sequence log-probabilities summed over completion tokens. (P,)"""
    return -torch.nn.functional.logsigmoid(beta * (logratio_better - logratio_worse))


def ipo_loss(logratio_better: torch.Tensor, logratio_worse: torch.Tensor, beta: float):
    """IPO (Azar et al. 2023, eq. 17): (h − 1/(2β))², h the difference of log-ratios; log-probabilities are
    averaged over completion tokens (as TRL does), so β is on a per-token scale. (P,)"""
    return (logratio_better - logratio_worse - 1 / (2 * beta)) ** 2


# name -> (loss, whether sequence log-probabilities are token means rather than sums)
DPO_LOSSES: dict[str, tuple[Callable, bool]] = {"sigmoid": (dpo_sigmoid_loss, False), "ipo": (ipo_loss, True)}


# ---- PPO with a value model (InstructGPT; Stiennon et al. 2020; Ziegler et al. 2019) ----------------------

def kl_penalised_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, span: torch.Tensor,
                         beta: float) -> torch.Tensor:
    """Per-token rewards: −β (log π_old − log π_ref) on every completion token (the k1 KL estimate, summed
    over a sequence it is the sequence's log-ratio) plus the sequence's score on its last token. (N, T)

    >>> r = kl_penalised_rewards(torch.tensor([1.0]), torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -1.0, 0.0]]),
    ...                          torch.tensor([[1.0, 1.0, 0.0]]), 0.1)
    >>> [round(x, 4) for x in r[0].tolist()]
    [-0.05, 1.1, 0.0]
    """
    rewards = -beta * (logp - ref_logp) * span  # (N, T)
    last = (span.cumsum(1) == span.sum(1, keepdim=True)) & (span > 0)  # the last completion token of each row
    return rewards + last.float() * scores[:, None]


def gae(rewards: torch.Tensor, values: torch.Tensor, span: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over each row's completion tokens: δ_t = r_t +
    γ V_{t+1} − V_t (V = 0 after the last token), A_t = δ_t + γλ A_{t+1}; returns (advantages, returns = A + V),
    zero outside the span. (N, T) each."""
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        nxt = values[:, t + 1] * span[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        cont = span[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        running = (delta + gamma * lam * running * cont) * span[:, t]
        adv[:, t] = running
    return adv, (adv + values) * span


def ppo_policy_loss(logp, old_logp, adv, mask, eps: float = 0.2):
    """PPO's clipped surrogate with a per-token advantage, averaged over the batch's tokens (Schulman et al.
    2017, eq. 7). (N, T) inputs."""
    return token_mean(_clipped(token_ratio(logp, old_logp, mask), adv, eps, eps), mask)


def clipped_value_loss(values, old_values, returns, mask, eps: float = 0.2):
    """½ max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²), averaged over tokens: the value clipping of
    OpenAI's PPO baselines, used by InstructGPT / summarize-from-feedback. (N, T) inputs."""
    clipped = old_values + (values - old_values).clamp(-eps, eps)
    return token_mean(0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def adaptive_kl_coef(coef: float, observed_kl: float, target: float, horizon: int, batch: int) -> float:
    """Ziegler et al. 2019's proportional controller: β ← β (1 + clip(KL / target − 1, ±0.2) · batch / horizon).

    >>> round(adaptive_kl_coef(0.1, 12.0, 6.0, 10000, 1000), 4), round(adaptive_kl_coef(0.1, 3.0, 6.0, 10000, 1000), 4)
    (0.102, 0.098)
    """
    error = max(-0.2, min(0.2, observed_kl / target - 1))
    return coef * (1 + error * batch / horizon)
