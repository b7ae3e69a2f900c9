"""Hostile programs: each is contained, scored as a failure with a reason, and the caller keeps running."""
import os
import time

import pytest

from thinkforge.sandbox import run_python

REPO_FILE = os.path.abspath(__file__)


def test_a_correct_program_passes_and_a_wrong_one_fails():
    ok = run_python("def add(a, b):\n    return a + b\nprint('hi')", "assert add(2, 3) == 5")
    assert (ok.passed, ok.reason, ok.stdout) == (True, "ok", "hi\n")
    bad = run_python("def add(a, b):\n    return a - b", "assert add(2, 3) == 5, 'add(2, 3)'")
    assert (bad.passed, bad.reason) == (False, "failed") and "add(2, 3)" in bad.detail
    err = run_python("def add(a, b):\n    return a +", "assert add(2, 3) == 5")
    assert (err.passed, err.reason) == (False, "error") and "SyntaxError" in err.detail
    assert run_python("import math\nx = math.sqrt(16)", "assert x == 4").passed  # the stdlib still imports


HOSTILE = {
    "infinite loop": ("while True:\n    pass", "timeout"),
    "fork bomb": ("import os\nwhile True:\n    os.fork()", "blocked"),
    "subprocess": ("import subprocess\nsubprocess.run(['ls', '/'])", "blocked"),
    "os.system": ("import os\nos.system('echo pwned > /tmp/pwned')", "blocked"),
    "memory bomb": ("x = bytearray(2 * 1024**3)", "memory"),
    "read /etc/passwd": ("print(open('/etc/passwd').read())", "blocked"),
    "read the repo": (f"print(open({REPO_FILE!r}).read())", "blocked"),
    "write outside": ("open('/tmp/thinkforge-escape.txt', 'w').write('x')", "blocked"),
    "delete outside": ("import os\nos.remove('/tmp/anything')", "blocked"),
    "list the repo": (f"import os\nprint(os.listdir({os.path.dirname(REPO_FILE)!r}))", "blocked"),
    "socket": ("import socket\nsocket.create_connection(('127.0.0.1', 22))", "blocked"),
    "kill the parent": ("import os\nos.kill(os.getppid(), 9)", "blocked"),
    "huge stdout": ("while True:\n    print('x' * 10000)", "output_limit"),
    "fake a pass with os._exit": ("import os\nos._exit(0)", "blocked"),
    "ctypes": ("import ctypes\nctypes.CDLL(None).system(b'echo pwned')", "blocked"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_programs_are_contained(name):
    program, reason = HOSTILE[name]
    start = time.monotonic()
    r = run_python(program, "assert True", cpu_seconds=2, wall_seconds=5)
    assert not r.passed and r.reason == reason, (name, r)
    assert time.monotonic() - start < 8
    assert len(r.stdout) <= 64_000
    assert not os.path.exists("/tmp/thinkforge-escape.txt") and not os.path.exists("/tmp/pwned")


def test_tests_cannot_be_skipped_by_exiting_early():
    r = run_python("import sys\nsys.exit(0)", "assert False")
    assert not r.passed  # SystemExit in the program is an error, the tests never ran


def test_code_task_scores_through_the_sandbox():
    from thinkforge.rewards import accuracy
    from thinkforge.tasks import get_task
    from thinkforge.verify import STATS

    task = get_task("code")
    probs = list(task.candidates(0))
    assert len(probs) == 12
    assert all(task.score(p, task.extract(p.answer)) == 1.0 for p in probs)  # every reference solution passes
    p = next(q for q in probs if q.id == "add_two")
    before = dict(STATS)
    completions = [
        "<think>\nadd them\n</think>\n```python\ndef add_two(a, b):\n    return a + b\n```",
        "<think>\nx\n</think>\n<answer>def add_two(a, b):\n    return a * b</answer>",
        "```python\nimport os\nos.system('rm -rf /')\n```",
        "```python\nwhile True:\n    pass\n```",
        "no program at all",
    ]
    assert accuracy(completions, [p] * 5, task=task) == [1.0, 0.0, 0.0, 0.0, 0.0]  # the caller keeps running
    counted = {k: STATS[k] - before.get(k, 0) for k in STATS if k.startswith("sandbox/")}
    assert counted == {"sandbox/ok": 1, "sandbox/failed": 1, "sandbox/blocked": 1, "sandbox/timeout": 1,
                       "sandbox/no_program": 1}
