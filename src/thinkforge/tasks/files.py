"""Problems from files: JSONL or Parquet rows with ``question``, ``answer`` and optional ``steps`` / ``id``.

The GSM8K convention is understood: an answer ``"…reasoning…\\n#### 72"`` gives the gold answer ``72``
and the lines before ``####`` become the gold steps (calculator annotations ``<<48/2=24>>`` removed).
``steps`` may be a list of strings or one string with a step per line.

Every row is checked when the file is read; a bad row stops with an error that names the file, the
line (JSONL) or row (Parquet) and the field. Nothing is silently dropped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from thinkforge.tasks import Problem, Task


class DataFileError(ValueError):
    pass


def _gsm8k(answer: str) -> tuple[str, list[str] | None]:
    if "####" not in answer:
        return answer.strip(), None
    body, final = answer.rsplit("####", 1)
    steps = [re.sub(r"<<[^>]*>>", "", s).strip() for s in body.strip().splitlines() if s.strip()]
    return final.strip().replace(",", ""), steps or None


def _problem(row, where: str, index: int) -> Problem:
    if not isinstance(row, dict):
        raise DataFileError(f"{where}: expected an object with 'question' and 'answer', got {type(row).__name__}")
    for key in ("question", "answer"):
        if key not in row or row[key] is None:
            raise DataFileError(f"{where}: missing field {key!r}")
    q, a = row["question"], row["answer"]
    if not isinstance(q, str) or not q.strip():
        raise DataFileError(f"{where}: field 'question' must be a non-empty string, got {q!r:.60}")
    if isinstance(a, bool) or not isinstance(a, (str, int, float)):
        raise DataFileError(f"{where}: field 'answer' must be a string or a number, got {type(a).__name__}")
    answer, steps = _gsm8k(str(a))
    if not answer:
        raise DataFileError(f"{where}: field 'answer' is empty")
    if row.get("steps") is not None:
        s = row["steps"]
        if isinstance(s, str):
            steps = [x for x in s.splitlines() if x.strip()]
        elif isinstance(s, list) and all(isinstance(x, str) for x in s):
            steps = list(s)
        else:
            raise DataFileError(f"{where}: field 'steps' must be a list of strings or a string, got {type(s).__name__}")
    pid = str(row.get("id", index))
    meta = {k: v for k, v in row.items() if k not in ("question", "answer", "steps", "id")}
    return Problem(pid, q, answer, steps, meta)


def iter_jsonl(path: Path):
    """(line number, parsed row) for each non-blank line; bad encoding or JSON names the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield n, row


def read_problems(path: str | Path) -> list[Problem]:
    """All rows of a .jsonl or .parquet file as problems (see the module docstring for the checks)."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        rows = [_problem(row, f"{path}:{n}", n - 1) for n, row in iter_jsonl(path)]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataFileError(f"{path}: not a readable Parquet file ({e})") from None
        rows = [_problem(r, f"{path}: row {i}", i) for i, r in enumerate(table.to_pylist())]
    else:
        raise DataFileError(f"{path}: expected a .jsonl or .parquet file")
    if not rows:
        raise DataFileError(f"{path}: no problems in the file")
    ids = [p.id for p in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataFileError(f"{path}: duplicate id {dup!r}")
    return rows


class FileTask(Task):
    """A file of problems. Splits follow the question hash like every task, so a file's held-out rows are
    the same whichever seed reads it; the seed only shuffles the order."""

    def __init__(self, path: str):
        self.path, self.name = path, path
        self.rows = read_problems(path)
        self.has_gold_steps = any(p.steps for p in self.rows)

    def candidates(self, seed: int):
        import random

        order = list(range(len(self.rows)))
        random.Random(seed).shuffle(order)
        return (self.rows[i] for i in order)


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write ``rows`` as JSONL atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path
