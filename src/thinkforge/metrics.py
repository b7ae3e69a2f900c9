"""Evaluation metrics over k samples per problem, with honest uncertainty.

- ``pass_at_k(n, c, k)``: the unbiased estimator of Chen et al. 2021 (Codex, eq. 1):
  1 - C(n-c, k) / C(n, k), computed as a stable product. pass@1 averaged over n samples is its k=1 case.
- ``majority_answer`` / maj@k (self-consistency, Wang et al. 2023; "cons@k" in DeepSeek-R1): the most
  frequent extracted answer among k samples, ties broken by first appearance; no answer never wins.
- ``bootstrap_ci``: percentile bootstrap over *problems* (samples of one problem are not independent).
- ``paired_bootstrap``: is B better than A on the same problems? Resamples problems jointly and
  reports the mean difference, its 95% interval and the share of resamples with B ≤ A.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from thinkforge.verify import as_number, normalize


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct.

    >>> pass_at_k(4, 1, 2)
    0.5
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def answer_key(answer: str | None) -> str | None:
    """A canonical form for voting: numbers by value (``1,000`` = ``1000.0``), other text normalised."""
    if answer is None:
        return None
    num = as_number(answer)
    return str(num) if num is not None else normalize(answer)


def majority_answer(answers: list[str | None]) -> int | None:
    """Index of a sample holding the majority answer (the first such sample), or None if none answered.

    >>> majority_answer(["3", "4", "4.0", "3", None])   # 3 and 4 tie at two votes; 3 came first
    0
    """
    keys = [answer_key(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == best)


def maj_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """Whether the majority answer is correct (its first sample's verdict)."""
    i = majority_answer(answers)
    return i is not None and bool(correct[i])


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of per-problem values, percentile bootstrap over problems."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(v.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def ci_record(values, seed: int = 0) -> dict:
    """:func:`bootstrap_ci` as the ``{"mean", "ci_low", "ci_high"}`` record that reports store.

    >>> ci_record([1.0, 1.0])
    {'mean': 1.0, 'ci_low': 1.0, 'ci_high': 1.0}
    """
    return dict(zip(("mean", "ci_low", "ci_high"), bootstrap_ci(values, seed=seed)))


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0) -> dict:
    """B minus A on the same problems: mean difference, 95% interval, and p = share of resamples with B ≤ A."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length non-empty arrays, got {a.shape} and {b.shape}")
    d = b - a
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    return {
        "diff": float(d.mean()),
        "ci_low": float(np.percentile(means, 2.5)),
        "ci_high": float(np.percentile(means, 97.5)),
        "p_value": float((means <= 0).mean()),
    }
