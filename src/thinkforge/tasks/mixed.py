"""Prompts of several tasks in one stream — DeepSeek-R1's last RL stage mixes reasoning prompts (scored by
rules) with general ones (scored by a preference reward model).

    task = "mixed"
    task_options = { parts = { reasoning = { task = "mul", digits_a = 3, digits_b = 2 },
                               general = { task = "add", digits = 5, terms = 2 } },
                     weights = { reasoning = 1, general = 1 } }

Each part is a *family*: a name, a task (with its knobs) and a share of the prompts (``weights``, equal by
default). A problem carries its family in ``meta["family"]``; scoring, step checks and the gold
preference are its own task's. A GRPO reward can be limited to some families (``reward_families``) and a
learned reward's scope set per reward (``rm_scopes``), as R1 scores helpfulness on the answer and
harmlessness on the whole response.
"""
from __future__ import annotations

import dataclasses
import random

from thinkforge.tasks import Problem, Task, get_task, register


@register("mixed")
class MixedTask(Task):
    """Several tasks' prompts interleaved by weight, each problem tagged with its family (R1's mixed RL stage)."""

    def __init__(self, parts: dict | None = None, weights: dict | None = None):
        if not parts or not isinstance(parts, dict):
            raise ValueError("mixed: parts must be a table {family = {task = name, <knobs>}} with at least one family")
        self.parts: dict[str, Task] = {}
        for family, spec in parts.items():
            if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
                raise ValueError(f"mixed: parts.{family} must be a table with a task name, e.g. {{task = \"mul\"}}")
            if spec["task"] == "mixed":
                raise ValueError(f"mixed: parts.{family} cannot itself be mixed")
            options = {k: v for k, v in spec.items() if k != "task"}
            self.parts[family] = get_task(spec["task"], **options)
            if type(self.parts[family]).extract is not Task.extract:
                raise ValueError(f"mixed: parts.{family} ({spec['task']}) reads answers its own way; "
                                 "a mixed task needs parts that share the standard answer extraction")
        weights = weights or {}
        unknown = set(weights) - set(self.parts)
        if unknown:
            raise ValueError(f"mixed: weights name unknown famil{'y' if len(unknown) == 1 else 'ies'} {sorted(unknown)}; "
                             f"families are {sorted(self.parts)}")
        self.weights = {f: float(weights.get(f, 1.0)) for f in self.parts}
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"mixed: weights must be >= 0 with a positive sum, got {self.weights}")
        delimiters = {t.step_delimiter for t in self.parts.values()}
        if len(delimiters) > 1:
            raise ValueError(f"mixed: the parts split steps differently ({sorted(map(repr, delimiters))})")
        self.step_delimiter = delimiters.pop()
        self.has_gold_steps = all(t.has_gold_steps for t in self.parts.values())
        self.name = "mixed(" + ",".join(f"{f}={t.name}" for f, t in self.parts.items()) + ")"

    @property
    def families(self) -> list[str]:
        return list(self.parts)

    def candidates(self, seed: int):
        streams = {f: t.candidates(seed) for f, t in self.parts.items()}
        rng = random.Random(f"mixed-{seed}")
        names, weights = list(self.weights), list(self.weights.values())
        while True:
            family = rng.choices(names, weights)[0]
            p = next(streams[family], None)
            if p is None:  # a finite part ran out: the rest continue
                names, weights = [n for n in names if n != family], [w for n, w in zip(names, weights) if n != family]
                if not names or sum(weights) <= 0:
                    return
                continue
            yield dataclasses.replace(p, meta={**p.meta, "family": family})

    def task_of(self, problem: Problem) -> Task:
        family = problem.meta.get("family")
        if family not in self.parts:
            raise ValueError(f"problem {problem.id!r} has no family of this mixed task (families: {self.families})")
        return self.parts[family]

    def score(self, problem: Problem, answer: str | None) -> float:
        return self.task_of(problem).score(problem, answer)

    def check_step(self, problem: Problem, index: int, step: str) -> bool:
        return self.task_of(problem).check_step(problem, index, step)

    def gold_utility(self, problem: Problem, completion: str) -> float:
        return self.task_of(problem).gold_utility(problem, completion)

    def sample_text(self, n: int = 200) -> list[str]:
        return [x for t in self.parts.values() for x in t.sample_text(n)]
