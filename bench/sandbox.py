"""Programs per second through the code sandbox: the OS boundary (bubblewrap) against the Python-level
layer alone (the sandbox before the OS boundary, now only behind ``--unsafe-sandbox``), alternating.

    .venv/bin/python bench/sandbox.py [--programs 40] [--rounds 3]

Each program is a correct solution of the ``code`` task run with its unit tests (a real reward call).
Ends with: RESULT sandbox bwrap_per_s=… python_only_per_s=… overhead_ms=…
"""
from __future__ import annotations

import argparse
import statistics
import time

from thinkforge.sandbox import os_boundary, run_python
from thinkforge.tasks import get_task
from thinkforge.tasks.code import extract_program


def rate(jobs: list[tuple[str, str]], unsafe: bool) -> float:
    start = time.perf_counter()
    for program, tests in jobs:
        r = run_python(program, tests, unsafe=unsafe)
        assert r.passed, r
    return len(jobs) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ok, why = os_boundary()
    assert ok, why
    task = get_task("code")
    problems = list(task.candidates(0))
    jobs = [(extract_program(p.answer), "\n".join(p.meta["tests"]))
            for p in (problems * (args.programs // len(problems) + 1))[: args.programs]]
    rates: dict[str, list[float]] = {"bwrap": [], "python_only": []}
    for r in range(args.rounds):
        for side in (("bwrap", "python_only") if r % 2 == 0 else ("python_only", "bwrap")):
            rates[side].append(rate(jobs, unsafe=side == "python_only"))
            print(f"round {r} {side}: {rates[side][-1]:.1f} programs/s", flush=True)
    b, p = statistics.median(rates["bwrap"]), statistics.median(rates["python_only"])
    print(f"RESULT sandbox bwrap_per_s={b:.1f} python_only_per_s={p:.1f} overhead_ms={1000 * (1 / b - 1 / p):.1f}")


if __name__ == "__main__":
    main()
