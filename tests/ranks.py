"""Run ``thinkforge`` commands as the ranks of a torchrun job, without a Python start-up per process.

``python -m torch.distributed.run`` costs a launcher start-up (torch imported) and one per rank (torch and
transformers imported: ~7 s of CPU each here), far more than the few training steps the tests run. These
ranks are forked from a fork server that imported all that once, and get what torchrun gives a rank (the
``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` / ``MASTER_*`` environment of its env:// rendezvous); then
they run the command line, ``thinkforge.cli.main``, as ``python -m thinkforge`` does. Like torchrun,
when one rank fails the others are stopped after a grace period. tests/test_ddp.py keeps one run through
torchrun itself, so the launcher path stays covered.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from serve_helpers import free_port

# Imported once by the fork server: what a rank imports. (Installed modules only: the fork server does not get
# the tests' sys.path, and a preload that fails to import is skipped without a word.)
_PRELOAD = ["torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "transformers.models.llama.modeling_llama",
            "thinkforge.cli", "thinkforge.train.sft", "thinkforge.train.grpo", "thinkforge.train.dpo",
            "thinkforge.train.reward_model"]
_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(_PRELOAD)


@dataclass
class Result:
    returncode: int  # 0 when every rank exited 0; else the first failing rank's code
    stderr: str  # every rank's stdout and stderr, rank 0 first


def _main(args: list[str], env: dict, log: str | None, file_limit: int | None) -> None:
    os.environ.update(env)
    fd = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if file_limit is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))  # (Python ignores SIGXFSZ: EFBIG)
    from thinkforge.cli import main

    sys.exit(main(list(args)))


class Process:
    """``python -m thinkforge <args>`` forked from the fork server, output to ``log`` (or discarded); the part
    of ``subprocess.Popen`` that bench/crash_resume.py uses (``wait``, ``kill``, ``returncode``)."""

    def __init__(self, args: list[str], env: dict | None = None, log: str | None = None, file_limit: int | None = None):
        self._p = _CTX.Process(target=_main, args=(args, dict(env or {}), log, file_limit))
        self._p.start()

    @property
    def returncode(self) -> int | None:
        return self._p.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._p.join(timeout)
        if self._p.exitcode is None:
            raise subprocess.TimeoutExpired(["thinkforge"], timeout)
        return self._p.exitcode

    def kill(self) -> None:
        self._p.kill()  # SIGKILL, as Popen.kill


def warm() -> None:
    """Start the fork server and wait for its imports (the first process otherwise waits for them)."""
    if Process(["--help"]).wait() != 0:
        raise RuntimeError("thinkforge --help failed in a forked process")


def run(args: list[str], world: int = 2, env: dict | None = None, timeout: float = 200, grace: float = 20,
        file_limit: int | None = None) -> Result:
    """``torchrun --nproc-per-node <world> -m thinkforge <args>`` (``world`` 1: ``python -m thinkforge <args>``).
    A rank's environment is the fork server's (this process's when it was started) updated with ``env``."""
    port = free_port()
    with tempfile.TemporaryDirectory() as logs:
        procs = []
        try:
            for rank in range(world):
                rank_env = dict(env or {})
                if world > 1:
                    rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                                    LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                                    MASTER_PORT=str(port))
                procs.append(Process(args, rank_env, os.path.join(logs, f"{rank}.log"), file_limit))
            deadline, failed_at = time.monotonic() + timeout, None
            while any(p.returncode is None for p in procs):
                now = time.monotonic()
                if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                    failed_at = now
                if now > deadline or (failed_at is not None and now > failed_at + grace):
                    for p in procs:
                        if p.returncode is None:
                            p.kill()
                for p in procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(0.05)
        finally:  # (a test timeout or ^C here leaves no rank running)
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    p.wait()
        codes = [p.returncode for p in procs]
        said = "".join(open(p, errors="replace").read() for p in (os.path.join(logs, f"{r}.log") for r in range(world))
                       if os.path.exists(p))
    return Result(next((c for c in codes if c != 0), 0), said)
