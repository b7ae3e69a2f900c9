"""Run untrusted model-written Python in a subprocess sandbox, never in-process.

    r = run_python("def add(a, b):\\n    return a + b", "assert add(2, 3) == 5")
    r.passed, r.reason          # True, 'ok'

Layers (defence in depth; none alone is a security boundary):
- a separate process (``python -I -S``: no site-packages, no environment, no current dir on the path),
  started in a fresh temporary working directory that is deleted afterwards, with an empty environment;
- its own session (the whole process group is killed on a deadline) and, where the kernel allows, its own
  network namespace (no network at all, not even loopback);
- resource limits: CPU seconds, address space (memory), written-file size (stdout goes to a file, so
  this also caps output), open files, no core dumps; the parent enforces a wall-clock deadline;
- an audit hook installed before the program runs (``sys.addaudithook`` hooks cannot be removed): no
  sockets, no fork / exec / spawn / subprocess, no signals (``os.kill``), no ctypes, and no file access
  outside the working directory except reading Python's own standard library;
- ``os._exit`` is replaced, so a program cannot fake a pass by exiting 0 before its tests ran: the exit
  status, set by the harness after the tests, is the verdict (0 all tests passed, 1 a test failed, 2 the
  program raised).

Every failure is contained and reported as a reason: ``timeout``, ``memory``, ``output_limit``,
``blocked`` (the audit hook refused something), ``failed`` (a test), ``error`` (the program raised),
``crashed`` (killed by a signal).
"""
from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000

HARNESS = r"""
import os, sys
ROOT = os.path.realpath(os.getcwd())
LIBS = tuple(os.path.realpath(p) for p in sys.path if p) + (os.path.realpath(sys.base_prefix),)
BLOCKED_PREFIXES = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn",
                    "os.system", "os.kill", "os.killpg", "signal.", "ctypes.", "os.setuid", "os.chroot", "pty.")
BLOCKED_IMPORTS = {"ctypes", "_ctypes", "socket", "_socket", "subprocess", "_posixsubprocess", "multiprocessing",
                   "pty", "mmap", "resource"}
PATH_EVENTS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.symlink", "os.link",
               "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile"}  # changes: work dir only
LIST_EVENTS = {"os.listdir", "os.scandir"}  # reads: work dir and the standard library (imports list it)

def _inside(path, roots):
    p = os.path.realpath(path)
    return any(p == r or p.startswith(r + os.sep) for r in roots)

def _hook(event, args):
    if event == "open":
        path, mode = args[0], args[1] or "r"
        if isinstance(path, int):
            return
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        writes = any(c in str(mode) for c in "wax+")
        if not _inside(path, (ROOT,) if writes else (ROOT,) + LIBS):
            raise PermissionError(f"sandbox: no {'write' if writes else 'read'} access to {path}")
    elif event == "import" and args[0].split(".")[0] in BLOCKED_IMPORTS:
        raise PermissionError(f"sandbox: import of {args[0]} is not allowed")
    elif event in PATH_EVENTS or event in LIST_EVENTS:
        roots = (ROOT,) + LIBS if event in LIST_EVENTS else (ROOT,)
        for a in args:
            if isinstance(a, (str, bytes)) and not _inside(os.fsdecode(a), roots):
                raise PermissionError(f"sandbox: {event} outside the working directory")
    elif event.startswith(BLOCKED_PREFIXES):
        raise PermissionError(f"sandbox: {event} is not allowed")

def _no_exit(*a, **k):
    raise PermissionError("sandbox: os._exit is not allowed")

import posix
program = open("program.py").read()
tests = open("tests.py").read()
sys.addaudithook(_hook)
os._exit = posix._exit = os.abort = _no_exit
def run(source, name, scope):
    try:
        exec(compile(source, name, "exec"), scope)
        return None
    except AssertionError as e:
        return ("failed", f"{type(e).__name__}: {e}")
    except PermissionError as e:
        return ("blocked", str(e))
    except MemoryError:
        return ("memory", "MemoryError")
    except OSError as e:
        if e.errno == 27:  # EFBIG: the output file hit its size limit (Python ignores SIGXFSZ)
            return ("output_limit", str(e))
        return ("error", f"{type(e).__name__}: {e}")
    except BaseException as e:
        return ("error", f"{type(e).__name__}: {e}")
scope = {"__name__": "__main__"}
verdict = run(program, "program.py", scope) or run(tests, "tests.py", scope)
if verdict is not None:
    sys.stderr.write(f"SANDBOX {verdict[0]}: {verdict[1]}\n")
sys.exit({None: 0, "failed": 1}.get(verdict and verdict[0], 2) if verdict else 0)
"""


@dataclass
class SandboxResult:
    passed: bool
    reason: str  # ok | failed | error | blocked | timeout | memory | output_limit | crashed
    detail: str  # the harness's message or the signal, for logs
    stdout: str
    seconds: float


def _limits(cpu_seconds: int, memory_mb: int, max_output: int):
    def apply():
        os.setsid()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(CLONE_NEWNET)  # best effort: without the privilege, the audit hook still blocks sockets
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_output, max_output))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))  # ignored for root; the audit hook blocks forks

    return apply


def run_python(program: str, tests: str, cpu_seconds: int = 2, wall_seconds: float = 5.0, memory_mb: int = 256,
               max_output: int = 64_000) -> SandboxResult:
    """Run ``program`` then ``tests`` (assert statements) in the sandbox; never raises for hostile input."""
    work = tempfile.mkdtemp(prefix="thinkforge-sandbox-")
    os.chmod(work, 0o700)
    start = time.monotonic()
    try:
        for name, text in (("program.py", program), ("tests.py", tests), ("harness.py", HARNESS)):
            with open(os.path.join(work, name), "w") as f:
                f.write(text)
        out_path = os.path.join(work, "stdout.txt")
        with open(out_path, "wb") as out, open(os.path.join(work, "stderr.txt"), "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "harness.py"], cwd=work, env={}, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, preexec_fn=_limits(cpu_seconds, memory_mb, max_output))
            try:
                code = proc.wait(timeout=wall_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
        stdout = open(out_path, "rb").read(max_output).decode("utf-8", "replace")
        stderr = open(os.path.join(work, "stderr.txt"), "rb").read(4000).decode("utf-8", "replace")
        seconds = time.monotonic() - start
        return SandboxResult(code == 0, *_verdict(code, stderr), stdout, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _verdict(code: int | None, stderr: str) -> tuple[str, str]:
    line = next((x for x in stderr.splitlines() if x.startswith("SANDBOX ")), "")
    if code is None:
        return "timeout", "wall-clock deadline"
    if code == 0:
        return "ok", ""
    if code < 0:
        sig = signal.Signals(-code).name
        reason = {"SIGXCPU": "timeout", "SIGXFSZ": "output_limit", "SIGKILL": "timeout"}.get(sig, "crashed")
        return reason, sig
    if line:
        kind, _, detail = line[len("SANDBOX "):].partition(": ")
        return kind, detail
    return ("memory", "MemoryError") if "MemoryError" in stderr else ("error", stderr.strip()[-300:])
