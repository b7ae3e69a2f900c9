"""Run untrusted model-written Python behind an operating-system boundary, never in-process.

    r = run_python("def add(a, b):\\n    return a + b", "assert add(2, 3) == 5")
    r.passed, r.reason          # True, 'ok'

**The boundary is the operating system** (bubblewrap, Debian's ``bubblewrap``; ``make`` installs it):
- the program runs as an unprivileged uid — when thinkforge runs as root it first drops to ``nobody``
  (65534), so even an escape would hold no privilege on the machine — with no capabilities, no new
  privileges, and no further user namespaces;
- in its own user, mount, pid, network, IPC, UTS and cgroup namespaces: it sees only ``/usr`` and the
  Python installation (read-only), a fresh ``/proc`` of its own pid namespace, a minimal ``/dev``,
  and two small tmpfs (``/sandbox``, its working directory, and ``/tmp``); no ``/etc``, no home, no
  repository, no other process to signal, no network at all (not even the host's loopback);
- resource limits: CPU seconds, address space, written-file size (stdout goes to a file, so this also
  caps output), open files, processes (counted for the sandbox's uid), no core dumps; the tmpfs sizes
  cap disk use; the parent enforces a wall-clock deadline, and ``--die-with-parent`` plus the pid
  namespace take every process the program started down with it.

**A second layer inside** gives failures a readable reason: an audit hook installed before the program
runs refuses sockets, fork / exec / subprocess, signals, ctypes and file access outside the working
directory, and ``os._exit`` is replaced so a program cannot fake a pass by exiting 0 before its tests
ran (the exit status, set by the harness after the tests, is the verdict: 0 all tests passed, 1 a test
failed, 2 the program raised). This layer is ordinary Python state in the program's own interpreter: a
program can switch it off (``tests/test_sandbox.py`` does, in several ways), and then the OS boundary
still holds. It follows that a program that tampers with the harness could also fake its own verdict:
code rewards should not be trusted beyond "the tests passed in an interpreter the program controlled".

Without bubblewrap (or where the kernel refuses user namespaces) :func:`run_python` raises
:class:`SandboxUnavailable` and says why, unless the caller passes ``unsafe=True`` (the CLI's
``--unsafe-sandbox``, which sets ``THINKFORGE_UNSAFE_SANDBOX=1`` for worker processes too): then the
program runs in a plain subprocess behind the Python-level layer, rlimits and (as root) a network
namespace only.

Every failure is contained and reported as a reason: ``timeout``, ``memory``, ``output_limit``,
``blocked`` (the audit hook refused something), ``failed`` (a test), ``error`` (the program raised, for
example an ``OSError`` from the boundary), ``crashed`` (killed by a signal).
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


class SandboxUnavailable(RuntimeError):
    """The OS boundary cannot be had here; the message says why and what to do."""


BWRAP = "bwrap"
NOBODY = 65534
UNSAFE_ENV = "THINKFORGE_UNSAFE_SANDBOX"
TMPFS_BYTES = 16 * 2**20  # each of /sandbox and /tmp inside
_MS_BIND, _MS_REC, _MS_PRIVATE, _CLONE_NEWNS = 4096, 1 << 14, 1 << 18, 0x00020000
_probe: tuple[bool, str] | None = None


def _python() -> tuple[str, str]:
    """(interpreter, installation prefix): the real binary of the running Python, not a venv's link."""
    base = os.path.realpath(sys.base_prefix)
    exe = os.path.realpath(sys.executable)
    if not exe.startswith(base + os.sep):
        exe = os.path.join(base, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    return exe, base


def _system_dirs() -> list[str]:
    """Bind arguments for /usr and the top-level library and binary folders (links on merged-/usr systems)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/lib", "/lib64", "/lib32", "/bin", "/sbin"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def _bwrap_command(work: str, python_view: str) -> list[str]:
    """The bubblewrap command line: ``python_view`` is where this process can reach the Python prefix."""
    exe, base = _python()
    files = []
    for name in ("harness.py", "program.py", "tests.py"):
        files += ["--ro-bind", os.path.join(work, name), f"/sandbox/{name}"]
    return [BWRAP, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            *_system_dirs(), "--ro-bind", python_view, base, "--proc", "/proc", "--dev", "/dev",
            "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp", "--size", str(TMPFS_BYTES), "--tmpfs", "/sandbox",
            *files, "--chdir", "/sandbox", "--clearenv", "--hostname", "sandbox", "--",
            exe, "-I", "-S", "harness.py"]


def _processes_of(uid: int) -> int:
    count = 0
    for d in os.listdir("/proc"):
        try:
            count += d.isdigit() and os.stat(f"/proc/{d}").st_uid == uid
        except OSError:
            pass
    return count


def _confine(python_view: str, cpu_seconds: int, memory_mb: int, max_output: int):
    """What the child does between fork and exec: its own session, then (as root) a private mount
    namespace where the Python prefix is bound to ``python_view`` — root's home is not readable by
    ``nobody`` — then it drops to ``nobody``, sets its limits and execs bubblewrap."""
    root = os.geteuid() == 0
    uid = NOBODY if root else os.getuid()
    nproc = _processes_of(uid) + 32  # RLIMIT_NPROC counts every process of the uid

    def apply():
        os.setsid()
        if root:
            libc = ctypes.CDLL(None, use_errno=True)
            _, base = _python()
            for ok, what in ((lambda: libc.unshare(_CLONE_NEWNS), "unshare"),
                             (lambda: libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount private"),
                             (lambda: libc.mount(base.encode(), python_view.encode(), None, _MS_BIND | _MS_REC, None),
                              "bind python")):
                if ok() != 0:
                    raise OSError(ctypes.get_errno(), f"sandbox: {what} failed")
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        _rlimits(cpu_seconds, memory_mb, max_output, nproc)

    return apply


def _rlimits(cpu_seconds: int, memory_mb: int, max_output: int, nproc: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 2**20, memory_mb * 2**20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_output, max_output))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _unsafe_limits(cpu_seconds: int, memory_mb: int, max_output: int):
    def apply():
        os.setsid()
        ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET)  # best effort (needs root)
        _rlimits(cpu_seconds, memory_mb, max_output, 64)  # NPROC is ignored for root

    return apply


def os_boundary() -> tuple[bool, str]:
    """Whether the OS boundary works here (probed once: bubblewrap runs ``pass`` in a sandbox), and why not."""
    global _probe
    if _probe is None:
        if shutil.which(BWRAP) is None:
            _probe = (False, "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)")
        else:
            r = _run("pass", "", 10, 30.0, 256, 64_000, unsafe=False)
            ok = r.reason == "ok"
            _probe = (ok, "" if ok else f"bubblewrap could not start a sandbox here ({r.reason}: {r.detail.strip()[-200:]});"
                      " user namespaces may be disabled (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone)")
    return _probe


def run_python(program: str, tests: str, cpu_seconds: int = 2, wall_seconds: float = 5.0, memory_mb: int = 256,
               max_output: int = 64_000, unsafe: bool | None = None) -> SandboxResult:
    """Run ``program`` then ``tests`` (assert statements) in the sandbox; never raises for hostile input.

    Raises :class:`SandboxUnavailable` when the OS boundary cannot be had and ``unsafe`` is not set
    (``None`` reads ``THINKFORGE_UNSAFE_SANDBOX=1`` from the environment)."""
    if unsafe is None:
        unsafe = os.environ.get(UNSAFE_ENV) == "1"
    ok, why = os_boundary()
    if not ok and not unsafe:
        raise SandboxUnavailable(f"refusing to run model-written code: {why}. Pass --unsafe-sandbox to run it behind "
                                 "Python-level checks only (not a security boundary)")
    return _run(program, tests, cpu_seconds, wall_seconds, memory_mb, max_output, unsafe=not ok)


def _run(program: str, tests: str, cpu_seconds: int, wall_seconds: float, memory_mb: int, max_output: int,
         unsafe: bool) -> SandboxResult:
    work = tempfile.mkdtemp(prefix="thinkforge-sandbox-")
    os.chmod(work, 0o700 if unsafe else 0o755)  # nobody must reach the files it binds
    start = time.monotonic()
    try:
        for name, text in (("program.py", program), ("tests.py", tests), ("harness.py", HARNESS)):
            with open(os.path.join(work, name), "w") as f:
                f.write(text)
        out_path, err_path = os.path.join(work, "stdout.txt"), os.path.join(work, "stderr.txt")
        if unsafe:
            cmd, cwd, setup = [sys.executable, "-I", "-S", "harness.py"], work, _unsafe_limits(cpu_seconds, memory_mb, max_output)
        else:
            view = os.path.join(work, "python")
            os.mkdir(view)
            python_view = view if os.geteuid() == 0 else _python()[1]
            cmd, cwd, setup = _bwrap_command(work, python_view), "/", _confine(view, cpu_seconds, memory_mb, max_output)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, env={}, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    preexec_fn=setup)
            try:
                code = proc.wait(timeout=wall_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # bwrap; --die-with-parent and the pid namespace take the rest
                proc.wait()
                code = None
        stdout = open(out_path, "rb").read(max_output).decode("utf-8", "replace")
        stderr = open(err_path, "rb").read(4000).decode("utf-8", "replace")
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
    if code > 128 and not line:  # bwrap's pid-1 reaper reports a signalled child as 128 + signal
        return _verdict(128 - code, stderr)
    if line:
        kind, _, detail = line[len("SANDBOX "):].partition(": ")
        return kind, detail
    return ("memory", "MemoryError") if "MemoryError" in stderr else ("error", stderr.strip()[-300:])
