"""Run folders as the browser shows them: found under ``--runs``, read without ever writing.

A run is a folder holding ``metrics.jsonl`` (a trainer: one row per step), ``results.json`` (an evaluation
or a recipe: rows of method, metric, value and 95% CI) or ``eval.json`` (a trainer's evaluation). Paths
in URLs are relative to the runs root and must stay inside it (anything else is a 404, as is a missing
run). A metrics file being written by a live run may end in half a line: that line is left for the next
read, never shown half.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MARKERS = ("metrics.jsonl", "results.json", "eval.json", "traces.jsonl")  # and any *.traces.jsonl
MAX_TRACES = 200_000  # trace rows read from one run
FILTERS = {  # trace filters: a completion is shown when the filter holds for it
    "wrong": lambda t: not t.get("correct"),
    "truncated": lambda t: t.get("finish_reason") == "length",
    "format_only": lambda t: not t.get("correct") and (t.get("rewards") or {}).get("format", 0) > 0,
    "disagree": lambda t: t.get("answer") != t.get("majority"),
}
MAX_DEPTH = 4  # folder levels searched under the root
MAX_ROWS = 100_000  # metric rows read from one run


class NotFound(LookupError):
    pass


@dataclass
class Run:
    name: str  # path relative to the runs root, "/"-separated
    path: Path

    @property
    def modified(self) -> float:
        return max(p.stat().st_mtime for p in _marked(self.path))


def _marked(folder: Path) -> list[Path]:
    """The files that make ``folder`` a run (empty: not a run)."""
    return [folder / m for m in MARKERS if (folder / m).is_file()] + sorted(folder.glob("*.traces.jsonl"))


def find_runs(root: Path) -> list[Run]:
    root = root.resolve()
    found = []

    def walk(folder: Path, depth: int) -> None:
        if _marked(folder):
            found.append(Run(folder.relative_to(root).as_posix() or ".", folder))
        if depth < MAX_DEPTH:
            for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                                and p.name not in ("checkpoint", "model", "adapter")):
                walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def resolve(root: Path, name: str) -> Run:
    """The run ``name`` under ``root``; :class:`NotFound` for anything outside it or not a run."""
    root = root.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_dir() or not _marked(path):
        raise NotFound(f"no run {name!r}")
    return Run(path.relative_to(root).as_posix() or ".", path)


def file_in(root: Path, name: str) -> Path:
    """A file of a run (a plot) by its path under ``root``; :class:`NotFound` outside it."""
    root = root.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file() or path.suffix.lower() not in (".png", ".svg"):
        raise NotFound(f"no image {name!r}")
    return path


def metrics(run: Run) -> list[dict]:
    path = run.path / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    with path.open("rb") as f:
        for line in f:
            if not line.endswith(b"\n"):  # being written right now: next time
                break
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line that is not JSON is not a metric row (shown nowhere, counted in the page)
            if isinstance(row, dict):
                rows.append({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            if len(rows) >= MAX_ROWS:
                break
    return rows


def results(run: Run) -> list[dict]:
    """Evaluation rows: ``results.json``'s rows, and ``eval.json`` flattened to (metric, value, CI) rows."""
    out = []
    path = run.path / "results.json"
    if path.is_file():
        try:
            out += [r for r in json.loads(path.read_text()).get("rows", []) if isinstance(r, dict)]
        except (ValueError, AttributeError):
            pass
    path = run.path / "eval.json"
    if path.is_file():
        try:
            out += list(_flatten(json.loads(path.read_text())))
        except ValueError:
            pass
    return out


def _flatten(data, prefix: str = ""):
    if isinstance(data, dict) and "mean" in data and isinstance(data["mean"], (int, float)):
        yield {"metric": prefix, "value": data["mean"], "ci_low": data.get("ci_low"), "ci_high": data.get("ci_high")}
    elif isinstance(data, dict):
        for k, v in data.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        yield {"metric": prefix, "value": data}


def traces(run: Run) -> list[dict]:
    """The run's trace rows (``traces.jsonl`` and any ``*.traces.jsonl``; ``sampling.trace_rows`` documents
    them), each tagged with the file it came from."""
    out = []
    for path in sorted(run.path.glob("*traces.jsonl")):
        with path.open("rb") as f:
            for line in f:
                if not line.endswith(b"\n") or len(out) >= MAX_TRACES:
                    break
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "problem_id" in row:
                    out.append({**row, "file": path.name})
    return out


def problems(rows: list[dict], flt: str | None = None, query: str = "") -> list[dict]:
    """Problems of the trace rows, in order of first appearance, each with its completions; ``flt`` keeps the
    problems with at least one completion it holds for, ``query`` those whose question or a completion
    contains it (case-insensitive)."""
    if flt is not None and flt not in FILTERS:
        raise NotFound(f"no filter {flt!r}: choose from {sorted(FILTERS)}")
    by: dict[str, dict] = {}
    for r in rows:
        p = by.setdefault(str(r["problem_id"]), {"id": str(r["problem_id"]), "question": r.get("question", ""),
                                                  "gold": r.get("gold"), "rows": []})
        p["rows"].append(r)
    q = query.lower()
    return [p for p in by.values()
            if (flt is None or any(FILTERS[flt](r) for r in p["rows"]))
            and (not q or q in str(p["question"]).lower() or any(q in str(r.get("completion", "")).lower() for r in p["rows"]))]


def paired(rows_a: list[dict], rows_b: list[dict]) -> list[dict]:
    """Two evaluations of the same problems compared per method: each problem's accuracy (its samples' mean
    verdict) in A and in B over the problems both evaluated, and B − A with its paired-bootstrap 95% interval
    (``metrics.paired_bootstrap``: problems resampled together)."""
    from thinkforge.metrics import paired_bootstrap

    def per_problem(rows):
        acc: dict[tuple, list] = {}
        for r in rows:
            acc.setdefault((str(r.get("method", r.get("batch", ""))), str(r["problem_id"])), []).append(float(bool(r.get("correct"))))
        return {k: sum(v) / len(v) for k, v in acc.items()}

    a, b = per_problem(rows_a), per_problem(rows_b)
    out = []
    for method in sorted({m for m, _ in a} & {m for m, _ in b}):
        both = sorted(p for m, p in a if m == method and (m, p) in b)
        if not both:
            continue
        xa, xb = [a[(method, p)] for p in both], [b[(method, p)] for p in both]
        out.append({"method": method, "problems": len(both), "a": sum(xa) / len(xa), "b": sum(xb) / len(xb),
                    **paired_bootstrap(xa, xb), "changed": [p for p, u, v in zip(both, xa, xb) if u != v]})
    return out


def config_text(run: Run) -> str:
    path = run.path / "config.toml"
    return path.read_text(errors="replace")[:200_000] if path.is_file() else ""


def images(run: Run, root: Path) -> list[str]:
    return [p.relative_to(root.resolve()).as_posix() for p in sorted(run.path.glob("*.png"))]
