"""Tasks with verifiable answers: the ``Problem`` record, the ``Task`` interface and the registry.

    from thinkforge.tasks import get_task
    task = get_task("mul", digits_a=3, digits_b=2)
    train = task.problems(1000, split="train", seed=0)
    task.score(train[0], "30883")      # 1.0 or 0.0 (reasoning-gym tasks may give partial credit)

Names: built-in generators (``add``, ``mul``, ``arith``, ``syllogism``), ``reasoning-gym:<name>`` for
any reasoning-gym dataset, and a path ending in ``.jsonl`` / ``.parquet`` for a file of problems.

Splits never overlap, by construction: a problem belongs to the held-out ``test`` split exactly when a
hash of its question falls in the first ``TEST_SHARE`` of the hash range, so the same question can
never appear in both, whatever the seeds.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Callable

TEST_SHARE = 0.1
SPLITS = ("train", "test")
WAIT_LINE = "wait, that step is wrong"  # what a primed cold-start trace says after a deliberately wrong step
MAX_MISSES = 20_000  # consecutive candidates that add nothing before a generator counts as exhausted


@dataclass
class Problem:
    """One question with a checkable answer. ``steps`` is the gold trace, one string per step."""

    id: str
    question: str
    answer: str
    steps: list[str] | None = None
    meta: dict = field(default_factory=dict)


def hash_fraction(text: str, salt: bytes = b"") -> float:
    """A stable number in [0, 1) from the text (BLAKE2b); another ``salt`` gives an independent split."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, person=salt).digest(), "big") / 2**64


def split_of(question: str) -> str:
    """'test' or 'train', a pure function of the question text."""
    return "test" if hash_fraction(question) < TEST_SHARE else "train"


class Task:
    """A source of problems. Subclasses implement :meth:`candidates` (and may override :meth:`score`)."""

    name = "task"
    has_gold_steps = False
    step_delimiter = "\n"

    def candidates(self, seed: int):
        """An endless (or finite) iterator of problems, deterministic for a seed."""
        raise NotImplementedError

    def problems(self, n: int, split: str = "train", seed: int = 0) -> list[Problem]:
        """``n`` distinct problems of ``split``; raises if the source has fewer."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        out, seen, misses = [], set(), 0
        for p in self.candidates(seed):
            if p.question in seen or split_of(p.question) != split:
                misses += 1
                if misses > MAX_MISSES:  # a small problem space: stop rather than loop for ever
                    break
                continue
            misses = 0
            seen.add(p.question)
            out.append(p)
            if len(out) == n:
                return out
        raise ValueError(f"task {self.name!r} has only {len(out)} distinct {split} problems, {n} were asked for")

    def extract(self, completion: str) -> str | None:
        """The answer a completion gives (a task whose answers are not short strings overrides this)."""
        from thinkforge.verify import extract_answer

        return extract_answer(completion)

    def score(self, problem: Problem, answer: str | None) -> float:
        """Score an extracted answer against the gold one, in [0, 1]."""
        from thinkforge.verify import is_equivalent

        return float(answer is not None and is_equivalent(answer, problem.answer))

    def check_step(self, problem: Problem, index: int, step: str) -> bool:
        """Whether ``step`` is a correct ``index``-th step for ``problem`` (tasks with gold steps only)."""
        raise NotImplementedError(f"task {self.name!r} has no step checker")

    def gold_match(self, problem: Problem, line: str) -> int | None:
        """The first index j at which ``check_step`` accepts ``line`` as gold step j (a fact of the gold
        solution, wherever it stands), else None."""
        return next((j for j in range(len(problem.steps or [])) if self.check_step(problem, j, line)), None)

    def thinking_lines(self, completion: str) -> list[str]:
        """The non-empty, stripped lines of a completion's thinking, split at ``step_delimiter``."""
        from thinkforge.format import parse_completion

        return [x.strip() for x in (parse_completion(completion).thinking or "").split(self.step_delimiter) if x.strip()]

    def check_line(self, problem: Problem, index: int) -> str:
        """A line that re-checks gold step ``index`` by recomputing it another way; ``check_step`` accepts it
        as that step (tasks that can write primed cold-start traces)."""
        raise NotImplementedError(f"task {self.name!r} cannot write a check of a step")

    def wrong_line(self, problem: Problem, index: int, rng) -> list[str]:
        """A plausible wrong version of gold step ``index`` (which ``check_step`` rejects at every index), then
        its check as in :meth:`check_line`, which now disagrees with the step and so exposes the error."""
        raise NotImplementedError(f"task {self.name!r} cannot write a wrong step")

    def cold_start_steps(self, problem: Problem, check_share: float = 0.0, fix_share: float = 0.0) -> list[str]:
        """The SFT trace of a problem: its gold steps, where a share ``check_share`` of the traces re-checks one
        step right after it (:meth:`check_line`) and a share ``fix_share`` first writes one step wrong and its
        check, which disagrees (:meth:`wrong_line`), then ``WAIT_LINE``, then the step right (independent draws,
        so a trace may have both). So a check is seen to agree with a right step and to expose a wrong one.
        The choice is a pure function of the problem's id. Under the Error-Propagation / Error-Cessation judge
        (``train.reward_model.judge_labels``) every line is right except the wrong step and its check (built on
        it)."""
        steps = list(problem.steps or [])
        if check_share and type(self).check_line is Task.check_line or fix_share and type(self).wrong_line is Task.wrong_line:
            raise NotImplementedError(f"task {self.name!r} cannot write primed traces (no check_line / wrong_line)")
        if not (check_share or fix_share) or not steps:
            return steps
        import random

        rng = random.Random(f"cold-start-{problem.id}")
        check, fix = rng.random() < check_share, rng.random() < fix_share
        at_check, at_fix = rng.randrange(len(steps)), rng.randrange(len(steps))
        out = []
        for j, step in enumerate(steps):
            if fix and j == at_fix:
                out += [*self.wrong_line(problem, j, rng), WAIT_LINE]
            out.append(step)
            if check and j == at_check:
                out.append(self.check_line(problem, j))
        return out

    def gold_utility(self, problem: Problem, completion: str) -> float:
        """The *gold preference*: how much a careful reader likes ``completion``, in [0, 1]; a higher value is
        preferred. The simulated labeller ranks by it and over-optimisation is measured against it.

        - Right beats wrong: a right answer scores ``1 - 0.05 * min(redundant, 10)`` (in [0.5, 1]), a wrong
          one at most 0.4.
        - Among right answers the reader prefers fewer *redundant* thinking steps: lines that state no
          fact of the gold solution, or restate one already stated (tasks with gold steps; else 0).
        - Among wrong answers the reader prefers the one whose first error comes later:
          ``0.4 * (thinking lines before the first wrong one) / (gold steps)``, capped at 0.4 (tasks with
          gold steps; else 0).

        A learned reward can be wrong about this in ways a policy can exploit (e.g. liking longer traces).
        """
        right = self.score(problem, self.extract(completion)) >= 1.0
        if not self.has_gold_steps or not problem.steps:
            return float(right)
        matched = [self.gold_match(problem, line) for line in self.thinking_lines(completion)]
        if right:
            redundant = sum(m is None for m in matched) + sum(
                m is not None and m in matched[:i] for i, m in enumerate(matched))
            return 1.0 - 0.05 * min(redundant, 10)
        first_wrong = next((i for i, m in enumerate(matched) if m is None), len(matched))
        return 0.4 * min(1.0, first_wrong / len(problem.steps))

    def sample_text(self, n: int = 200) -> list[str]:
        """Texts that show the task's alphabet (for building a character tokenizer)."""
        texts = []
        for p in itertools.islice(self.candidates(0), n):
            texts += [p.question, p.answer, *(p.steps or [])]
        return texts


REGISTRY: dict[str, Callable[..., Task]] = {}


def register(name: str):
    def deco(factory):
        REGISTRY[name] = factory
        return factory

    return deco


def get_task(name: str, **options) -> Task:
    """A task by name (see the module docstring); ``options`` are the generator's knobs."""
    if name.startswith("reasoning-gym:"):
        from thinkforge.tasks.gym import GymTask

        return GymTask(name.split(":", 1)[1], **options)
    if name.endswith((".jsonl", ".parquet")):
        from thinkforge.tasks.files import FileTask

        return FileTask(name, **options)
    if name not in REGISTRY:
        raise KeyError(
            f"unknown task {name!r}: choose one of {sorted(REGISTRY)}, 'reasoning-gym:<name>', or a .jsonl/.parquet file"
        )
    try:
        return REGISTRY[name](**options)
    except TypeError as e:
        raise ValueError(f"bad option for task {name!r}: {e}") from None


from thinkforge.tasks import builtin, code, mixed  # noqa: E402,F401  (fills REGISTRY)
