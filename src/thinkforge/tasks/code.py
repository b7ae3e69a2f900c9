"""The ``code`` task: write a Python function; scored by running its unit tests in the sandbox.

The problems (``data/code_problems.json``) are small, written for thinkforge, each with a reference
solution and assert-statement tests. The answer is the program: the last fenced ```` ```python ````
block of the completion, else the text of its ``<answer>`` block. It runs only in
``thinkforge.sandbox`` (bubblewrap: an OS boundary, with an audit hook inside), never in this process; the score
is 1.0 when every test passes. Why a program failed (``timeout``, ``blocked``, ``memory``, …) is
counted in ``verify.STATS`` under ``sandbox/<reason>``, which the GRPO reward audit reports.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from thinkforge.tasks import Problem, Task, register
from thinkforge.verify import STATS

DATA = Path(__file__).parent / "data" / "code_problems.json"
_FENCE = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)


def extract_program(completion: str) -> str | None:
    """The last fenced code block, else the content of the last ``<answer>`` block."""
    blocks = _FENCE.findall(completion)
    if blocks:
        return blocks[-1]
    if "<answer>" in completion:
        return completion.rsplit("<answer>", 1)[1].split("</answer>", 1)[0]
    return None


@register("code")
class CodeTask(Task):
    """Small Python functions checked by unit tests run in a sandbox (no gold steps)."""

    def __init__(self, cpu_seconds: int = 2, wall_seconds: float = 5.0):
        self.name, self.cpu_seconds, self.wall_seconds = "code", cpu_seconds, wall_seconds
        self.rows = json.loads(DATA.read_text())

    def candidates(self, seed: int):
        import random

        order = list(range(len(self.rows)))
        random.Random(seed).shuffle(order)
        for i in order:
            r = self.rows[i]
            yield Problem(r["id"], r["question"], f"```python\n{r['solution']}\n```", None, {"tests": r["tests"]})

    def extract(self, completion: str) -> str | None:
        return extract_program(completion)

    def score(self, problem: Problem, answer: str | None) -> float:
        """``answer`` is the extracted program (or a whole completion, from which it is extracted)."""
        from thinkforge.sandbox import run_python

        program = None if answer is None else (extract_program(answer) or answer)
        if not program or not program.strip():
            STATS["sandbox/no_program"] += 1
            return 0.0
        result = run_python(program, "\n".join(problem.meta["tests"]), self.cpu_seconds, self.wall_seconds)
        STATS[f"sandbox/{result.reason}"] += 1
        return float(result.passed)
