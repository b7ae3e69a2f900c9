"""Scratch folders for a bench run, all under one folder that is removed when the run's process exits.

The benches write start models, runs and TRL output directories that are only needed while they
run; without this each run left them in /tmp (a few MB to GBs each).
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_root: Path | None = None


def scratch(prefix: str = "") -> str:
    """A new empty folder, removed (with everything in it) when this process exits."""
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="thinkforge-bench-"))
        atexit.register(shutil.rmtree, _root, True)
    return tempfile.mkdtemp(prefix=prefix, dir=_root)
