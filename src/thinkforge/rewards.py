"""Rule rewards: each takes a batch of completions (and their problems) and returns one float per sample.

    rewards = compute_rewards(completions, problems, task, {"accuracy": 1.0, "format": 0.2})
    rewards.total, rewards.components["format"], rewards.accuracy

| name | value | source |
|---|---|---|
| ``accuracy`` | the task's score of the extracted answer, in [0, 1] | DeepSeek-R1 §2.2.2 "accuracy rewards" |
| ``format`` | 1 if the completion is ``<think>…</think>`` then one answer, else 0 | DeepSeek-R1 "format rewards" |
| ``language`` | share of the words in the thinking written in the target script | DeepSeek-R1 §2.3.2 language consistency |
| ``length`` | 0 up to ``max_len - cache``, then linearly down to -1 at ``max_len`` and beyond (tokens) | DAPO "overlong reward shaping" |

A learned reward model is named ``rm:<folder>`` (``thinkforge train rm``: a preference RM gives its
Bradley–Terry reward, an ORM its probability of a right answer, a PRM its minimum step score). It is
loaded once and scores the batch in chunks. Its option ``scope`` chooses what it reads: ``all`` (the
thinking and the answer) or ``answer`` (only ``format.parse_completion``'s answer — helpfulness judged
on the final answer, as DeepSeek-R1's last stage does).

A user function is named by dotted path (``mypkg.rewards:brevity`` or ``mypkg.rewards.brevity``) and
has the same signature: ``fn(completions, problems, **context) -> list[float]``; ``context`` holds
``task`` and ``lengths`` (completion lengths in tokens, when known).

``Rewards.accuracy`` is always the raw correctness, whatever the weights: filters such as GRPO's dynamic
sampling must key on it, not on the shaped total.
"""
from __future__ import annotations

import importlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from thinkforge.format import IM_END, parse_completion
from thinkforge.tasks import Problem, Task
from thinkforge.verify import STATS

RewardFn = Callable[..., list[float]]


def accuracy(completions: list[str], problems: list[Problem], *, task: Task, **_) -> list[float]:
    """The task's score of each extracted answer; a scorer that raises counts as 0 (and in STATS['errors'])."""
    out = []
    for c, p in zip(completions, problems):
        try:
            out.append(float(task.score(p, task.extract(c))))
        except Exception:
            STATS["errors"] += 1
            out.append(0.0)
    return out


def format_reward(completions: list[str], problems=None, **_) -> list[float]:
    """1.0 for a well-formed think-then-answer completion.

    >>> format_reward(["<think>\\nx\\n</think>\\n<answer>1</answer>", "<answer>1</answer>"])
    [1.0, 0.0]
    """
    return [float(parse_completion(c).well_formed) for c in completions]


_SCRIPTS = {"latin": "LATIN", "cyrillic": "CYRILLIC", "greek": "GREEK", "cjk": "CJK", "arabic": "ARABIC"}


def _in_script(word: str, script: str) -> bool:
    return all(unicodedata.name(ch, "").startswith(script) for ch in word)


def language_consistency(completions: list[str], problems=None, *, script: str = "latin", **_) -> list[float]:
    """Share of the thinking's words written in ``script``; 1.0 when the thinking has no words.

    >>> language_consistency(["<think>\\nthe answer ist Привет\\n</think>"])
    [0.75]
    """
    if script not in _SCRIPTS:
        raise ValueError(f"language reward: script must be one of {sorted(_SCRIPTS)}, got {script!r}")
    out = []
    for c in completions:
        words = re.findall(r"[^\W\d_]+", parse_completion(c).thinking or "")
        out.append(sum(_in_script(w, _SCRIPTS[script]) for w in words) / len(words) if words else 1.0)
    return out


def overlong_penalty(completions, problems=None, *, lengths: list[int], max_len: int = 512, cache: int = 128, **_):
    """DAPO's soft overlong punishment on token lengths.

    >>> overlong_penalty(["a"] * 3, lengths=[100, 448, 512], max_len=512, cache=128)
    [0.0, -0.5, -1.0]
    """
    start = max_len - cache
    return [0.0 if n <= start else -min(1.0, (n - start) / cache) for n in lengths]


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy,
    "format": format_reward,
    "language": language_consistency,
    "length": overlong_penalty,
}


RM_PREFIX = "rm:"
RM_SCOPES = ("all", "answer")
_LOADED_RMS: dict[str, object] = {}


def reward_model_reward(path: str) -> RewardFn:
    """The reward of the learned reward model in folder ``path`` (loaded once per process)."""

    def score(completions: list[str], problems: list[Problem], *, scope: str = "all", **_) -> list[float]:
        from thinkforge.scorers import RewardModel, aggregate

        if scope not in RM_SCOPES:
            raise ValueError(f"reward {RM_PREFIX}{path}: scope must be one of {RM_SCOPES}, got {scope!r}")
        rm = _LOADED_RMS.get(path)
        if rm is None:
            rm = _LOADED_RMS[path] = RewardModel.load(path)
        texts = [parse_completion(c).answer if scope == "answer" else c.split(IM_END)[0] for c in completions]
        scores = rm.score(list(problems), texts)
        return [aggregate(x, "min") if rm.kind == "prm" else (x[0] if x else 0.0) for x in scores]

    return score


def get_reward(name: str) -> RewardFn:
    """A reward by registry name, ``rm:<folder>`` for a learned reward model, or dotted path to a user function."""
    if name in REWARDS:
        return REWARDS[name]
    if name.startswith(RM_PREFIX):
        path = name[len(RM_PREFIX):]
        if not (Path(path) / "config.json").is_file():
            raise KeyError(f"reward {name!r}: {path} is not a reward model folder (no config.json); "
                           "train one with `thinkforge train rm`")
        return reward_model_reward(path)
    module, _, attr = name.replace(":", ".").rpartition(".")
    if not module:
        raise KeyError(f"unknown reward {name!r}: choose one of {sorted(REWARDS)} or give 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"reward {name!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise KeyError(f"reward {name!r} is not a function")
    return fn


@dataclass
class Rewards:
    total: list[float]
    components: dict[str, list[float]]
    accuracy: list[float]


def compute_rewards(
    completions: list[str],
    problems: list[Problem],
    task: Task,
    weights: dict[str, float],
    lengths: list[int] | None = None,
    options: dict[str, dict] | None = None,
    rm_scope: str = "all",
    families: dict[str, list[str]] | None = None,
) -> Rewards:
    """The weighted sum of the named rewards, with every component kept for logging; ``rm_scope`` is the
    ``scope`` of every ``rm:<folder>`` reward (what the learned reward model reads) unless ``options`` gives
    that reward its own. ``families`` limits a reward to the problems of some families of a mixed task
    (``meta["family"]``): elsewhere it adds 0 to the total (its component is still computed and logged).

    >>> from thinkforge.tasks import Problem, get_task
    >>> ps = [Problem("a", "1+1", "2", meta={"family": "math"}), Problem("b", "hi", "2", meta={"family": "chat"})]
    >>> r = compute_rewards(["<answer>2</answer>"] * 2, ps, get_task("add"), {"accuracy": 1.0},
    ...                     families={"accuracy": ["math"]})
    >>> r.total, r.components["accuracy"]
    ([1.0, 0.0], [1.0, 1.0])
    """
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
    context = {"task": task, "lengths": lengths if lengths is not None else [len(c) for c in completions]}
    components = {}
    for name in dict(weights, accuracy=weights.get("accuracy", 0.0)):
        extra = {"scope": rm_scope, **(options or {}).get(name, {})} if name.startswith(RM_PREFIX) else (options or {}).get(name, {})
        values = [float(v) for v in get_reward(name)(completions, problems, **context, **extra)]
        if len(values) != len(completions):
            raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
        components[name] = values
    applies = {n: [families is None or n not in families or p.meta.get("family") in families[n] for p in problems]
               for n in components}
    total = [sum((weights.get(n, 0.0) * components[n][i] for n in components if applies[n][i]), 0.0)
             for i in range(len(completions))]
    return Rewards(total, components, components["accuracy"])
