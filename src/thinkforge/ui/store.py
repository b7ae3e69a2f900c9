"""The label store: human rankings of model outputs and step marks in SQLite, exported as the files the
trainers read.

    store = LabelStore("labels.sqlite")
    store.add_items("mul-v1", [{"prompt": "347*89", "completions": ["…", "…", "…", "…"]}])
    item = store.next_item("mul-v1", "ana")           # the next item ana has not labelled
    store.submit(item.id, "ana", [0, 2, 1, 1])        # ranks: 0 is best, equal ranks are ties
    store.export("mul-v1", "rankings")                # rows for `thinkforge train rm --kind preference --data`
    store.add_items("steps-v1", [{"prompt": "347*89", "completion": "<think>\n…\n</think>\n<answer>…"}], mode="steps")
    store.submit(item.id, "ana", [1, 1, -1, 0], kind="steps")   # per step: good 1, neutral 0, bad -1
    store.export("steps-v1", "steps")                # rows for `thinkforge train rm --kind prm --data`

Durability: WAL journal with ``synchronous=FULL`` and one transaction per label, so a label is on disk
before it is acknowledged and a kill -9 of the server loses none (tested). Integrity: the schema keeps one
label per labeller per item (``UNIQUE(item_id, labeller)``), rankings are checked before they are stored,
and an item's completions are fixed when it is queued (a queue never changes under its labels). Every
connection is opened per call (SQLite serialises writers; ``busy_timeout`` makes a writer wait for another
instead of failing), so any number of server threads may write at once.

Export formats (``preferences.read_preferences`` reads both): ``rankings`` — one row per (item, labeller):
``{"prompt", "completions", "ranking", "labeller"}``; ``pairs`` — one row per (better, worse) pair of each
ranking: ``{"prompt", "chosen", "rejected", "labeller"}``. Skips are not exported; neither is an item
nobody ranked; both are counted in :meth:`LabelStore.counts`. ``steps`` (PRM800K-style step marks) — one row
per (item, labeller): ``{"question", "completion", "labels", "marks", "first_error", "labeller"}`` where the
steps are ``scorers.split_steps``'s (what ``train rm --kind prm`` reads), ``labels`` maps good to 1.0, neutral
to 0.5 (undecided: a soft target) and bad to 0.0, and ``first_error`` is the first bad step (None: none).
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    prompt TEXT NOT NULL,
    completions TEXT NOT NULL,            -- a JSON list: 2-16 strings to rank, or the one completion to mark
    mode TEXT NOT NULL DEFAULT 'ranking' CHECK (mode IN ('ranking', 'steps')),
    UNIQUE (queue, prompt, completions)
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items (id),
    labeller TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('ranking', 'steps', 'skip')),
    ranking TEXT,                         -- JSON: ranks (0 = best) or step marks (1, 0, -1); NULL for a skip
    created REAL NOT NULL,
    UNIQUE (item_id, labeller)
);
CREATE INDEX IF NOT EXISTS labels_by_labeller ON labels (labeller, created);
"""
MAX_COMPLETIONS = 16
MAX_TEXT = 100_000  # characters of one prompt or completion
MAX_LABELLER = 64


class LabelError(ValueError):
    """A request the store refuses; ``status`` is the HTTP status that fits and ``field`` what is wrong."""

    def __init__(self, message: str, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.field, self.status = field, status


@dataclass
class Item:
    id: int
    queue: str
    prompt: str
    completions: list[str]
    mode: str = "ranking"

    @property
    def steps(self) -> list[str]:
        """A steps item's completion cut into the steps a PRM scores (head first if any, then the steps)."""
        from thinkforge.scorers import split_steps

        return split_steps(self.completions[0])[1]


MARKS = {1: "good", 0: "neutral", -1: "bad"}
MARK_LABEL = {1: 1.0, 0: 0.5, -1: 0.0}


def check_marks(marks, n: int, field: str = "steps") -> list[int]:
    """One mark per step: 1 good, 0 neutral, -1 bad.

    >>> check_marks([1, 0, -1], 3)
    [1, 0, -1]
    """
    if not isinstance(marks, list) or len(marks) != n or not all(type(m) is int and m in MARKS for m in marks):
        raise LabelError(f"'{field}' must be a list of {n} marks, one per step: 1 (good), 0 (neutral) or -1 (bad); "
                         f"got {marks!r}", field)
    return marks


def check_ranking(ranking, k: int, field: str = "ranking") -> list[int]:
    """``ranking`` as k ranks (0 = best; ties share a rank); an error naming ``field`` otherwise.

    >>> check_ranking([0, 2, 1, 1], 4)
    [0, 2, 1, 1]
    """
    if not isinstance(ranking, list) or len(ranking) != k or not all(type(r) is int and 0 <= r < k for r in ranking):
        raise LabelError(f"'{field}' must be a list of {k} ranks, integers from 0 (best) to {k - 1}; got {ranking!r}",
                         field)
    if len(set(ranking)) == 1:
        raise LabelError(f"'{field}' ties every completion, which says nothing about them: skip the item instead",
                         field)
    return ranking


def check_labeller(name) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_LABELLER:
        raise LabelError(f"'labeller' must be a name of 1 to {MAX_LABELLER} characters; got {name!r}", "labeller")
    return name.strip()


class LabelStore:
    def __init__(self, path: str | Path):
        self.path = str(path)
        with self._db() as db:
            db.executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit transactions below
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=30000")
        return _Closing(db)

    # ---- queues -------------------------------------------------------------------------------------

    def add_items(self, queue: str, rows: list[dict], where: str = "rows", mode: str = "ranking") -> dict:
        """Queue ``rows``: to rank, ``{"prompt", "completions"}`` or ``{"prompt", "chosen", "rejected"}``; to mark
        step by step (``mode="steps"``), ``{"prompt" or "question", "completion"}``. Every row is checked first,
        so a bad row adds nothing; a queue holds one mode. Returns {"added", "already_queued"} (the same prompt
        and completions in the same queue are one item)."""
        if not queue or not isinstance(queue, str) or len(queue) > 100:
            raise LabelError(f"queue name must be 1 to 100 characters; got {queue!r}", "queue")
        if mode not in ("ranking", "steps"):
            raise LabelError(f"mode must be 'ranking' or 'steps'; got {mode!r}", "mode")
        have = next((q["mode"] for q in self.queues() if q["queue"] == queue), mode)
        if have != mode:
            raise LabelError(f"queue {queue!r} holds {have} items, not {mode}: use another queue name", "queue")
        parsed = [(_item_row if mode == "ranking" else _steps_row)(row, f"{where}[{i}]") for i, row in enumerate(rows)]
        if not parsed:
            raise LabelError(f"{where}: no items to queue", "rows")
        added = 0
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            for prompt, comps in parsed:
                cur = db.execute("INSERT OR IGNORE INTO items (queue, prompt, completions, mode) VALUES (?, ?, ?, ?)",
                                 (queue, prompt, json.dumps(comps), mode))
                added += cur.rowcount
            db.execute("COMMIT")
        return {"added": added, "already_queued": len(parsed) - added}

    def queues(self) -> list[dict]:
        with self._db() as db:
            rows = db.execute(
                "SELECT i.queue, COUNT(DISTINCT i.id), COUNT(l.id), COUNT(DISTINCT l.labeller), MIN(i.mode) "
                "FROM items i LEFT JOIN labels l ON l.item_id = i.id GROUP BY i.queue ORDER BY i.queue").fetchall()
        return [{"queue": q, "items": n, "labels": m, "labellers": p, "mode": mode} for q, n, m, p, mode in rows]

    def item(self, item_id: int) -> Item:
        with self._db() as db:
            row = db.execute("SELECT id, queue, prompt, completions, mode FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise LabelError(f"no item {item_id}", "item_id", status=404)
        return Item(row[0], row[1], row[2], json.loads(row[3]), row[4])

    def next_item(self, queue: str, labeller: str) -> Item | None:
        """The item of ``queue`` that ``labeller`` has not labelled and that has the fewest labels (then the
        oldest): several people spread over the queue before anyone labels an item twice."""
        labeller = check_labeller(labeller)
        with self._db() as db:
            row = db.execute(
                "SELECT i.id, i.queue, i.prompt, i.completions, i.mode FROM items i "
                "WHERE i.queue = ? AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = i.id AND l.labeller = ?) "
                "ORDER BY (SELECT COUNT(*) FROM labels l WHERE l.item_id = i.id), i.id LIMIT 1",
                (queue, labeller)).fetchone()
        return None if row is None else Item(row[0], row[1], row[2], json.loads(row[3]), row[4])

    # ---- labels -------------------------------------------------------------------------------------

    def submit(self, item_id: int, labeller: str, ranking: list[int] | None, kind: str = "ranking") -> int:
        """Store ``labeller``'s ranking of the item, or (``kind="steps"``) a mark per step; None: a skip. Returns
        the label's id once it is on disk. A second label by the same person for the same item is refused (409):
        undo it first."""
        labeller = check_labeller(labeller)
        item = self.item(item_id)
        if ranking is not None and item.mode != kind:
            raise LabelError(f"item {item_id} is a {item.mode} item: send '{'ranking' if item.mode == 'ranking' else 'steps'}'",
                             "ranking" if kind == "ranking" else "steps")
        if ranking is not None and kind == "ranking":
            check_ranking(ranking, len(item.completions))
        elif ranking is not None:
            check_marks(ranking, len(item.steps))
        with self._db() as db:
            try:
                db.execute("BEGIN IMMEDIATE")
                cur = db.execute("INSERT INTO labels (item_id, labeller, kind, ranking, created) VALUES (?, ?, ?, ?, ?)",
                                 (item_id, labeller, "skip" if ranking is None else kind,
                                  None if ranking is None else json.dumps(ranking), time.time()))
                db.execute("COMMIT")
            except sqlite3.IntegrityError:
                db.execute("ROLLBACK")
                raise LabelError(f"{labeller} has already labelled item {item_id}: undo that label to change it",
                                 "item_id", status=409) from None
        return cur.lastrowid

    def undo(self, queue: str, labeller: str) -> int | None:
        """Remove ``labeller``'s most recent label in ``queue``; returns its item id (None: nothing to undo)."""
        labeller = check_labeller(labeller)
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT l.id, l.item_id FROM labels l JOIN items i ON i.id = l.item_id "
                             "WHERE i.queue = ? AND l.labeller = ? ORDER BY l.created DESC, l.id DESC LIMIT 1",
                             (queue, labeller)).fetchone()
            if row is not None:
                db.execute("DELETE FROM labels WHERE id = ?", (row[0],))
            db.execute("COMMIT")
        return None if row is None else row[1]

    def labels(self, queue: str) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT l.id, l.item_id, l.labeller, l.kind, l.ranking, i.prompt, i.completions, i.mode "
                              "FROM labels l JOIN items i ON i.id = l.item_id WHERE i.queue = ? ORDER BY l.id",
                              (queue,)).fetchall()
        return [{"id": a, "item_id": b, "labeller": c, "kind": d, "ranking": json.loads(e) if e else None,
                 "prompt": f, "completions": json.loads(g), "mode": m} for a, b, c, d, e, f, g, m in rows]

    def counts(self, queue: str) -> dict:
        labels = self.labels(queue)
        ranked_items = {x["item_id"] for x in labels if x["kind"] != "skip"}
        items = next((q["items"] for q in self.queues() if q["queue"] == queue), 0)
        return {"items": items, "rankings": sum(x["kind"] != "skip" for x in labels),
                "skips": sum(x["kind"] == "skip" for x in labels), "items_unranked": items - len(ranked_items)}

    # ---- export and agreement -----------------------------------------------------------------------

    def export(self, queue: str, fmt: str = "rankings") -> list[dict]:
        if fmt not in ("rankings", "pairs", "steps"):
            raise LabelError(f"format must be 'rankings', 'pairs' or 'steps'; got {fmt!r}", "format")
        out = []
        for x in self.labels(queue):
            if x["kind"] == "steps" and fmt == "steps":
                marks = x["ranking"]
                out.append({"question": x["prompt"], "completion": x["completions"][0],
                            "labels": [MARK_LABEL[m] for m in marks], "marks": marks,
                            "first_error": marks.index(-1) if -1 in marks else None, "labeller": x["labeller"]})
            if x["kind"] != "ranking" or fmt == "steps":
                continue
            if fmt == "rankings":
                out.append({"prompt": x["prompt"], "completions": x["completions"], "ranking": x["ranking"],
                            "labeller": x["labeller"]})
                continue
            r, c = x["ranking"], x["completions"]
            out += [{"prompt": x["prompt"], "chosen": c[i], "rejected": c[j], "labeller": x["labeller"]}
                    for i in range(len(c)) for j in range(len(c)) if r[i] < r[j]]
        return out

    def agreement(self, queue: str) -> dict:
        """How often two labellers order a pair of completions the same way, over the pairs both ordered
        (a tie by either is left out): the figure InstructGPT reports (~73% between its labellers)."""
        by_item: dict[int, list[list[int]]] = {}
        for x in self.labels(queue):
            if x["kind"] == "ranking":
                by_item.setdefault(x["item_id"], []).append(x["ranking"])
        same = total = 0
        for rankings in by_item.values():
            for a in range(len(rankings)):
                for b in range(a + 1, len(rankings)):
                    ra, rb = rankings[a], rankings[b]
                    for i in range(len(ra)):
                        for j in range(i + 1, len(ra)):
                            if ra[i] != ra[j] and rb[i] != rb[j]:
                                total += 1
                                same += (ra[i] < ra[j]) == (rb[i] < rb[j])
        return {"pairs_compared": total, "agreement": same / total if total else None,
                "items_with_two_or_more": sum(len(r) > 1 for r in by_item.values())}


class _Closing:
    """A connection used as ``with``: closed at the end (sqlite3's own ``with`` only commits)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self.db.close()


def _item_row(row, where: str) -> tuple[str, list[str]]:
    if not isinstance(row, dict):
        raise LabelError(f"{where}: expected an object with 'prompt' and 'completions' (or 'chosen' and 'rejected')")
    prompt = row.get("prompt")
    comps = row.get("completions", [row.get("chosen"), row.get("rejected")] if "chosen" in row else None)
    if not isinstance(prompt, str) or not prompt or len(prompt) > MAX_TEXT:
        raise LabelError(f"{where}: field 'prompt' must be a non-empty string of at most {MAX_TEXT} characters", "prompt")
    if (not isinstance(comps, list) or not 2 <= len(comps) <= MAX_COMPLETIONS
            or not all(isinstance(c, str) and c and len(c) <= MAX_TEXT for c in comps)):
        raise LabelError(f"{where}: field 'completions' must be a list of 2 to {MAX_COMPLETIONS} non-empty strings "
                         f"of at most {MAX_TEXT} characters (or give 'chosen' and 'rejected')", "completions")
    return prompt, comps


def _steps_row(row, where: str) -> tuple[str, list[str]]:
    if not isinstance(row, dict):
        raise LabelError(f"{where}: expected an object with 'prompt' (or 'question') and 'completion'")
    prompt, completion = row.get("prompt", row.get("question")), row.get("completion")
    if not isinstance(prompt, str) or not prompt or len(prompt) > MAX_TEXT:
        raise LabelError(f"{where}: field 'prompt' (or 'question') must be a non-empty string of at most {MAX_TEXT} "
                         "characters", "prompt")
    if not isinstance(completion, str) or not completion or len(completion) > MAX_TEXT:
        raise LabelError(f"{where}: field 'completion' must be a non-empty string of at most {MAX_TEXT} characters",
                         "completion")
    return prompt, [completion]
