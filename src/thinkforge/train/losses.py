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
"""
from __future__ import annotations

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


def _token_ratio(logp, old_logp):
    return torch.exp(logp - old_logp)  # (N, T)


def _sequence_ratio(logp, old_logp, mask):
    """GSPO's ratio: the geometric mean of a sequence's token ratios. (N,)"""
    return torch.exp(((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp(min=1))


def grpo_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.2, **_):
    per_tok = _clipped(_token_ratio(logp, old_logp), adv[:, None], eps_low, eps_high) * mask  # (N, T)
    return (per_tok.sum(1) / mask.sum(1).clamp(min=1)).mean()


def bnpo_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.2, **_):
    per_tok = _clipped(_token_ratio(logp, old_logp), adv[:, None], eps_low, eps_high) * mask
    return per_tok.sum() / mask.sum().clamp(min=1)


def dr_grpo_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.2, max_len: int | None = None, **_):
    per_tok = _clipped(_token_ratio(logp, old_logp), adv[:, None], eps_low, eps_high) * mask
    return per_tok.sum() / (mask.shape[0] * (max_len or mask.shape[1]))


def dapo_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.28, **_):
    return bnpo_loss(logp, old_logp, adv, mask, eps_low, eps_high)


def gspo_loss(logp, old_logp, adv, mask, eps_low=3e-4, eps_high=4e-4, **_):
    """Sequence-level ratio (the geometric mean of token ratios); GSPO's ε are ~1e-3 of PPO's."""
    return _clipped(_sequence_ratio(logp, old_logp, mask), adv, eps_low, eps_high).mean()


LOSSES: dict[str, Callable] = {
    "grpo": grpo_loss,
    "bnpo": bnpo_loss,
    "dr_grpo": dr_grpo_loss,
    "dapo": dapo_loss,
    "gspo": gspo_loss,
}


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref); ≥ 0, unbiased when the tokens come from π_θ.

    The roll-outs come from π_old, which differs from π_θ after the first of μ passes (or when the sampler
    is another engine): multiplying by the importance ratio π_θ/π_old (``ratio``, from
    ``importance_ratio``) makes the estimate unbiased again (DeepSeek-V3.2 §3.1, "unbiased KL estimate";
    TRL's ``use_bias_correction_kl``). The ratio keeps its gradient, as in both."""
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    return kl if ratio is None else kl * ratio


def importance_ratio(loss_name: str, logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """π_θ/π_old as the loss uses it: per token (N, T), or per sequence (N, 1) for GSPO."""
    if loss_name == "gspo":
        return _sequence_ratio(logp, old_logp, mask)[:, None]
    return _token_ratio(logp, old_logp)


def masked_mean_like(loss_name: str, values: torch.Tensor, mask: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token quantity (the KL term) the way ``loss_name`` reduces its surrogate."""
    if loss_name in ("grpo", "gspo"):
        return ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_name == "dr_grpo":
        return (values * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))
    return (values * mask).sum() / mask.sum().clamp(min=1)


def shard_weight(loss_name: str, mask: torch.Tensor, rows: slice) -> float:
    """The weight of the loss of ``rows`` alone (one process's share of a batch) such that the weighted
    shard losses sum to the loss of the whole batch: the rows' share of what the loss divides by, tokens
    for the token-normalised losses (bnpo, dapo), sequences for the others. ``mask`` is the whole batch's."""
    if loss_name in ("bnpo", "dapo"):
        return float(mask[rows].sum() / mask.sum().clamp(min=1))
    return mask[rows].shape[0] / mask.shape[0]
