"""Hostile programs: each is contained, scored as a failure with a reason, and the caller keeps running."""
import os
import time

import pytest

from thinkforge.sandbox import _processes_of, run_python

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


# Programs that first switch off the in-process guard (the audit hook is ordinary Python state in the
# program's own interpreter), prove it is off, then try a forbidden act. The OS boundary must hold.
TAMPER = {
    "harness globals via frames": (
        "import sys\ng = sys._getframe(1).f_globals\n"
        "g.update(BLOCKED_PREFIXES=('never.',), BLOCKED_IMPORTS=set(), PATH_EVENTS=set(), LIST_EVENTS=set(), "
        "ROOT='', LIBS=('',))\n"),
    "hook code swapped via gc": (
        "import gc\nfor f in gc.get_objects():\n"
        "    if type(f).__name__ == 'function' and f.__name__ == '_hook':\n"
        "        f.__code__ = (lambda event, args: None).__code__\n"),
    "builtins and globals": (
        "import builtins, sys\nbuiltins.any = lambda it: True\n"
        "sys._getframe(1).f_globals['_hook'].__globals__['BLOCKED_IMPORTS'].clear()\n"
        "sys._getframe(1).f_globals['BLOCKED_PREFIXES'] = ('never.',)\n"),
}
PROOF = "import socket, subprocess, ctypes\nopen('/usr/lib/os-release').read()\nprint('GUARD-OFF', flush=True)\n"


@pytest.fixture
def host(tmp_path):
    """Things on the host a contained program must not reach: a secret, a target path, a process, a port."""
    import socket
    import subprocess

    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-4417")
    sleeper = subprocess.Popen(["sleep", "60"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    yield {"secret": str(secret), "target": str(tmp_path / "escaped.txt"), "pid": sleeper.pid,
           "port": listener.getsockname()[1], "sleeper": sleeper, "listener": listener}
    sleeper.kill()
    listener.close()


ACTS = {
    "read a secret": "print(open({secret!r}).read())",
    "read /etc/shadow": "print(open('/etc/shadow').read())",
    "write outside": "open({target!r}, 'w').write('x')",
    "write the system": "open('/usr/thinkforge-escape', 'w').write('x')",
    "start a process that writes outside": "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo x > {target}'])\n"
                                           "assert False, 'still contained'",
    "ctypes system()": "import ctypes\nctypes.CDLL(None).system(b'echo x > {target}')\nassert False, 'still contained'",
    "kill a host process": "import os\nos.kill({pid}, 9)",
    "connect to the host": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
}


@pytest.mark.parametrize("tamper", list(TAMPER))
@pytest.mark.parametrize("act", list(ACTS))
def test_tampered_guard_is_still_contained_by_the_os(tamper, act, host):
    program = TAMPER[tamper] + PROOF + ACTS[act].format(**host)
    r = run_python(program, "assert True", cpu_seconds=2, wall_seconds=5)
    assert "GUARD-OFF" in r.stdout, (tamper, r)  # the in-process layer really was switched off
    assert not r.passed and r.reason in ("error", "failed", "timeout", "crashed"), (tamper, act, r)
    assert "TOP-SECRET" not in r.stdout + r.detail and "root:" not in r.stdout
    assert not os.path.exists(host["target"]) and not os.path.exists("/usr/thinkforge-escape")
    assert host["sleeper"].poll() is None  # the host's process is alive
    with pytest.raises(BlockingIOError):
        host["listener"].accept()  # nobody connected


def test_no_process_outlives_its_sandbox():
    """A program that leaves children behind (a double fork) takes them down when it ends or times out."""
    program = TAMPER["hook code swapped via gc"] + "import os, time\nif os.fork() == 0:\n    time.sleep(60)\ntime.sleep(60)"
    before = _processes_of(65534 if os.geteuid() == 0 else os.getuid())
    r = run_python(program, "assert True", cpu_seconds=2, wall_seconds=1.5)
    assert r.reason == "timeout"
    time.sleep(0.2)
    assert _processes_of(65534 if os.geteuid() == 0 else os.getuid()) <= before


def test_without_an_os_boundary_it_refuses_unless_told(monkeypatch):
    import thinkforge.sandbox as sb

    monkeypatch.setattr(sb, "BWRAP", "no-such-bwrap")
    monkeypatch.setattr(sb, "_probe", None)
    monkeypatch.delenv(sb.UNSAFE_ENV, raising=False)
    with pytest.raises(sb.SandboxUnavailable, match="bubblewrap .* not installed.*--unsafe-sandbox"):
        run_python("x = 1", "assert x == 1")
    assert run_python("x = 1", "assert x == 1", unsafe=True).passed  # the Python-level layer still runs it
    monkeypatch.setenv(sb.UNSAFE_ENV, "1")
    r = run_python("open('/tmp/thinkforge-escape.txt', 'w')", "assert True")
    assert r.reason == "blocked"


def test_cli_unsafe_sandbox_flag_sets_the_environment(monkeypatch):
    import thinkforge.sandbox as sb
    from thinkforge.cli import main

    monkeypatch.delenv(sb.UNSAFE_ENV, raising=False)
    assert main(["--unsafe-sandbox", "tasks", "list"]) == 0
    assert os.environ.get(sb.UNSAFE_ENV) == "1"
