"""Every reasoning-gym dataset as a thinkforge task: ``reasoning-gym:<name>`` (config knobs as options).

Scoring uses the dataset's own ``score_answer`` on the *extracted* answer: given the raw completion,
reasoning-gym would give partial credit ``len(gold)/len(text)`` to any text that merely contains the gold
answer. Some datasets (propositional_logic, graph_color, rush_hour, …) have no single gold answer
(``answer`` is None); for them ``Problem.answer`` is empty and only ``score`` can judge.
"""
from __future__ import annotations

from thinkforge.tasks import Problem, Task

_SIZE = 1_000_000  # items are generated lazily from (seed, index): a large size costs nothing


def gym_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(n for n in DATASETS if n != "composite")


class GymTask(Task):
    def __init__(self, dataset: str, **config):
        import reasoning_gym
        from reasoning_gym.factory import DATASETS

        if dataset not in DATASETS:
            raise KeyError(f"unknown reasoning-gym dataset {dataset!r}; `thinkforge tasks list` shows them")
        self.dataset, self.config, self.name = dataset, config, f"reasoning-gym:{dataset}"
        try:
            self._scorer = reasoning_gym.create_dataset(dataset, size=1, seed=0, **config)
        except TypeError as e:
            raise ValueError(f"bad option for {self.name}: {e}") from None

    def candidates(self, seed: int):
        import reasoning_gym

        ds = reasoning_gym.create_dataset(self.dataset, size=_SIZE, seed=seed, **self.config)
        for i in range(_SIZE):
            e = ds[i]
            gold = "" if e["answer"] is None else str(e["answer"])
            yield Problem(f"{self.dataset}-{seed}-{i}", e["question"], gold, None, {"entry": e})

    def score(self, problem: Problem, answer: str | None) -> float:
        if answer is None:
            return 0.0
        return float(self._scorer.score_answer(answer=answer, entry=problem.meta["entry"]))
