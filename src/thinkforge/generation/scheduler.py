"""Continuous batching for serving: requests join and leave the running batch between decode steps.

    sched = Scheduler(Engine(model, tok), max_rows=64, max_waiting=256)
    req = sched.submit(prompt_ids, SamplingParams(n=2, temperature=0.7, max_new_tokens=64, seed=3))
    completions = req.wait()          # or req.cancel(); req.on_token streams (sample, token) pairs

One thread owns the model. Each turn it (1) admits waiting requests while their rows fit in
``max_rows`` — every new request is prefilled on its own and its cache rows appended (``backend.join``),
so a request whose prefill fails fails alone; (2) samples one token for every running row, each request
with its own parameters and its own random stream (a seeded request gives the same tokens whatever else
is in the batch); (3) applies the engine's per-sequence rules (stops, thinking budget, forced tokens);
(4) drops finished, cancelled and past-deadline requests from the cache; (5) runs one decode step.
Nothing is allocated for a request's ``max_new_tokens`` ahead of time: the cache grows by chunks and
trims slots no row uses, so memory follows the tokens that exist. Bound: ``max_rows`` rows × at most
3 × context slots (dead leading slots are trimmed once they are half the axis, and the axis grows by half).

Requests submitted with ``priority`` (the API's ``service_tier: "priority"``) and, with ``express_tokens``
> 0, short ones (``n × max_new_tokens`` at most that) run in a second, small batch of their own
(``express_rows`` rows, its own cache): its decode steps are cheap (few rows, short cache), so such a request
is not slowed to the pace of a batch of long ones, nor does it wait for one of their rows to free. While
both batches have rows, the express one takes at most ``express_share`` of the time. It trades throughput
for latency — small steps do less work per second — so it is for the requests that ask (or, opted in,
the short ones), as priority scheduling is opt-in in vLLM. One that finds the express batch full joins
the main one.

A fault inside a decode step (all rows share it) fails the requests running at that moment with the
error and resets the batch; waiting requests and later ones are served normally.
"""
from __future__ import annotations

import atexit
import collections
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from thinkforge.generation import GREEDY_BELOW, Completion, Engine, SamplingParams, _sample, _Seq


class QueueFull(Exception):
    """More requests are waiting than ``max_waiting``: the server answers 429."""


class Cancelled(Exception):
    """The request was cancelled (its client went away)."""


class DeadlineExceeded(Exception):
    """The request ran past its deadline."""


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_token: Callable[[list[tuple[int, int]]], None] | None = None  # [(sample index, token id)] per step
    deadline: float | None = None  # time.monotonic() value
    stop_text: list[str] = field(default_factory=list)  # stop strings matched on decoded text
    result: list[Completion] | None = None
    error: Exception | None = None
    on_done: Callable[[], None] | None = None  # called once, from the scheduler's thread, when it ends
    priority: bool = False  # the express batch when it has rows (service_tier "priority")
    batch: str | None = None  # the batch it joined: "main" or "express"
    # time.monotonic() when it was submitted, joined a batch (its prompt prefilled) and emitted its first token
    submitted: float = 0.0
    admitted: float | None = None
    first_token: float | None = None

    def __post_init__(self):
        self.done = threading.Event()
        self.cancelled = False
        self.seqs = [_Seq() for _ in range(self.params.n)]
        self.gen: torch.Generator | None = None
        self.stops: list[list[int]] = []
        self.watch: frozenset | None = None
        self.wait_ids: list[int] = []

    def cancel(self) -> None:
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> list[Completion]:
        if not self.done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        return self.result


@dataclass(eq=False)
class _Batch:
    """One running batch: its rows, their next-token logits and the cache that holds them."""

    max_rows: int
    running: list[tuple[Request, int]] = field(default_factory=list)  # backend row -> (request, sample index)
    logits: torch.Tensor | None = None  # (rows, V): the next token's logits of every running row
    backend: object = None
    steps: int = 0
    last_step: float = 0.0  # seconds the last decode step took

    def reset(self) -> None:
        self.running, self.logits, self.backend = [], None, None


class Scheduler:
    def __init__(self, engine: Engine, max_rows: int = 64, max_waiting: int = 256, express_tokens: int = 0,
                 express_rows: int = 8, express_share: float = 0.5):
        if max_rows < 1 or max_waiting < 0 or express_tokens < 0 or express_rows < 0 or not 0 < express_share < 1:
            raise ValueError(f"need max_rows >= 1, max_waiting, express_tokens, express_rows >= 0 and 0 < express_share "
                             f"< 1, got {max_rows}, {max_waiting}, {express_tokens}, {express_rows}, {express_share}")
        self.engine, self.max_waiting = engine, max_waiting
        self.express_tokens = express_tokens if express_rows else 0
        self.waiting: collections.deque[Request] = collections.deque()
        self.main, self.express = _Batch(max_rows), _Batch(express_rows)
        self.express_spent = 0.0  # seconds of express steps since the main batch last stepped
        self.express_ratio = express_share / (1 - express_share)  # express time allowed per second of main steps
        self.cv = threading.Condition()
        self.gen = torch.Generator(device=next(engine.model.parameters()).device)
        self.gen.manual_seed(int(torch.randint(0, 2**62, (1,))))
        self.steps = 0
        self.on_end: Callable[[Request], None] | None = None  # called with every request that ends (metrics)
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="thinkforge-scheduler", daemon=True)
        self.thread.start()
        _LIVE.add(self)

    # ---- API ------------------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_token=None, deadline: float | None = None,
               stop_text: list[str] | None = None, on_done=None, priority: bool = False) -> Request:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if params.n > self.max_rows:
            raise ValueError(f"n={params.n} is more than the {self.max_rows} rows a batch holds")
        req = Request(list(prompt_ids), params, on_token, deadline, list(stop_text or []), on_done=on_done,
                      priority=priority, submitted=time.monotonic())
        with self.cv:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(req)
            self.cv.notify()
        return req

    @property
    def running(self) -> list[tuple[Request, int]]:
        """Every running row: the main batch's, then the express batch's."""
        return self.main.running + self.express.running

    @property
    def max_rows(self) -> int:
        """The main batch's rows: the most a request's n may be."""
        return self.main.max_rows

    @property
    def backend(self):
        """The main batch's cache."""
        return self.main.backend

    def load(self) -> dict:
        with self.cv:
            running = self.running
            return {"waiting": len(self.waiting), "running_rows": len(running),
                    "running": len({id(r) for r, _ in running})}

    def close(self, wait: float = 10.0) -> None:
        """Stop the loop (after the current step) and fail what is still queued or running."""
        with self.cv:
            self._stop = True
            self.cv.notify()
        if threading.current_thread() is not self.thread:
            self.thread.join(wait)
        for req in [*self.waiting, *(r for r, _ in self.running)]:
            self._fail(req, Cancelled("the server is shutting down"))

    # ---- the loop -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self._stop and not self.waiting and not (self.main.running or self.express.running):
                    self.cv.wait()
                if self._stop:
                    return
            if self.waiting:
                self._admit()
            batch = self._next()
            if batch is None:
                continue
            try:
                self._step(batch)
            except Exception as e:  # a fault shared by the whole batch: fail its requests, keep serving
                for req in {r for r, _ in batch.running}:
                    self._fail(req, e)
                batch.reset()

    def _next(self) -> _Batch | None:
        """The batch to step: the express one while it has rows and has spent less time since the main batch
        last stepped than its share allows against that step's time; else the main one."""
        main, express = self.main, self.express
        if express.running and (not main.running or self.express_spent < self.express_ratio * main.last_step):
            return express
        return main if main.running else None

    @torch.no_grad()
    def _admit(self) -> None:
        """Join every waiting request that fits into its batch (priority and short ones into the express batch
        while it has rows, else the main one), one prefill per batch."""
        taken: dict[_Batch, list[Request]] = {self.main: [], self.express: []}
        now = time.monotonic()
        with self.cv:
            free = {b: b.max_rows - len(b.running) for b in taken}
            later: collections.deque[Request] = collections.deque()
            main_blocked = False  # other requests are admitted in arrival order; express ones may pass them
            while self.waiting:
                req = self.waiting.popleft()
                if req.cancelled:
                    self._fail(req, Cancelled())
                    continue
                if req.deadline is not None and now > req.deadline:
                    self._fail(req, DeadlineExceeded("the request waited past its deadline"))
                    continue
                n = req.params.n
                fast = req.priority or n * req.params.max_new_tokens <= self.express_tokens
                if fast and n <= free[self.express]:
                    batch = self.express
                elif not main_blocked and n <= free[self.main]:
                    batch = self.main
                else:
                    main_blocked |= not fast
                    later.append(req)
                    continue
                taken[batch].append(req)
                free[batch] -= n
                req.batch = "express" if batch is self.express else "main"
            self.waiting = later
        for batch, reqs in taken.items():
            ready = []
            for req in reqs:
                try:
                    self._prepare(req)
                    ready.append(req)
                except Exception as e:
                    self._fail(req, e)
            if ready:
                self._join_all(batch, ready)

    def _join_all(self, batch: _Batch, ready: list[Request]) -> None:
        """Join ``ready`` in one prefill; if that fails, each alone, so that only the one at fault fails."""
        try:
            self._join(batch, ready)
        except Exception:
            if len(ready) == 1:
                self._fail(ready[0], sys.exc_info()[1])
                return
            for req in ready:
                try:
                    self._join(batch, [req])
                except Exception as e:  # this request's own prefill failed: only it fails
                    self._fail(req, e)

    def _join(self, batch: _Batch, reqs: list[Request]) -> None:
        if batch.backend is None or not batch.running:
            batch.backend = self._new_backend(batch.max_rows)
        try:
            logits = batch.backend.join([r.prompt_ids for r in reqs], [r.params.n for r in reqs])
        except Exception:
            if not batch.running:
                batch.backend = None
            raise
        batch.running += [(r, i) for r in reqs for i in range(r.params.n)]
        batch.logits = logits if batch.logits is None else torch.cat([batch.logits, logits])
        now = time.monotonic()
        for r in reqs:
            r.admitted = now

    def _new_backend(self, rows: int):
        from thinkforge.generation.backends import make_backend

        e = self.engine
        backend = e.backend_name(e.model) if callable(e.backend_name) else make_backend(e.model, e.backend_name)
        backend.row_limit = rows
        return backend

    def _prepare(self, req: Request) -> None:
        p, tok = req.params, self.engine.tok
        device = next(self.engine.model.parameters()).device
        if isinstance(p.seed, int):  # its own stream: the same tokens whatever else is in the batch
            req.gen = torch.Generator(device=device)
            req.gen.manual_seed(p.seed)
        req.stops = self.engine.stop_ids(p)
        req.watch = self.engine.watch_ids(req.stops)
        req.seqs = self.engine.new_seqs(req.prompt_ids, p.n)
        req.wait_ids = tok.encode(p.wait_text, add_special_tokens=False)

    @torch.no_grad()
    def _step(self, batch: _Batch | None = None) -> None:
        """Sample, advance and decode one token for every row of ``batch`` (default: the one ``_next`` picks)."""
        batch = batch or self._next()
        if batch is None:
            return
        start = time.perf_counter()
        self._advance(batch)
        batch.steps += 1
        batch.last_step = time.perf_counter() - start
        if batch is self.main:
            self.express_spent = 0.0
        else:
            self.express_spent += batch.last_step

    def _advance(self, batch: _Batch) -> None:
        e, running = self.engine, batch.running
        reqs = list(dict.fromkeys(r for r, _ in running))  # in row order, each once
        u = None
        if any(r.params.temperature >= GREEDY_BELOW for r in reqs):
            u = torch.rand(len(running), generator=self.gen, device=self.gen.device)  # unseeded rows
            seeded: dict[Request, tuple[list[int], list[int]]] = {}
            for j, (r, i) in enumerate(running):
                if r.gen is not None:
                    rows, samples = seeded.setdefault(r, ([], []))
                    rows.append(j)
                    samples.append(i)
            for r, (rows, samples) in seeded.items():  # n draws from its own stream, finished samples included
                draws = torch.rand(r.params.n, generator=r.gen, device=r.gen.device)
                u[torch.tensor(rows, device=u.device)] = draws[torch.tensor(samples, device=draws.device)]
        keys = {(r.params.temperature, r.params.top_p, r.params.top_k) for r in reqs}
        if len(keys) == 1:  # one kind of sampling for the whole batch: one call, no gathers
            t, lp = _sample(batch.logits, reqs[0].params, None, u)
            tokens, logps = t.tolist(), lp.tolist()
        else:
            tokens = [0] * len(running)
            logps = [0.0] * len(running)
            groups: dict[tuple, list[int]] = {}
            for j, (r, _) in enumerate(running):
                groups.setdefault((r.params.temperature, r.params.top_p, r.params.top_k), []).append(j)
            for rows in groups.values():
                idx = torch.tensor(rows, device=batch.logits.device)
                t, lp = _sample(batch.logits.index_select(0, idx), running[rows[0]][0].params, None,
                                None if u is None else u[idx.to(u.device)])
                for j, a, b in zip(rows, t.tolist(), lp.tolist()):
                    tokens[j], logps[j] = a, b
        emitted: dict[Request, list[tuple[int, int]]] = {}
        for j, (r, i) in enumerate(running):
            s = r.seqs[i]
            tokens[j] = e._advance(s, tokens[j], logps[j], r.params, r.stops, r.wait_ids, r.watch)
            if r.stop_text and s.done is None and not s.forced and _ends_with_stop(e.tok, s.ids, r.stop_text):
                s.done = "stop"
            emitted.setdefault(r, []).append((i, tokens[j]))
        self.steps += 1
        now = time.monotonic()
        for r, pairs in emitted.items():
            if r.first_token is None:
                r.first_token = now
            if r.on_token is not None and not r.cancelled:
                try:
                    r.on_token(pairs)
                except Exception:  # a broken listener cancels its own request only
                    r.cancelled = True
        keep, finished = [], []
        for j, (r, i) in enumerate(running):
            if r.cancelled or (r.deadline is not None and now > r.deadline):
                continue
            if r.seqs[i].done is None:
                keep.append(j)
        for r in reqs:
            if r.cancelled:
                self._fail(r, Cancelled())
            elif r.deadline is not None and now > r.deadline:
                self._fail(r, DeadlineExceeded("the request ran past its deadline"))
            elif all(s.done is not None for s in r.seqs):
                finished.append(r)
        for r in finished:
            r.result = [self._finish(r, s) for s in r.seqs]
            self._done(r)
        if len(keep) < len(running):
            order = batch.backend.select(keep, reorder=True)
            order = keep if order is None else order
            batch.backend.trim()
            batch.running = [running[j] for j in order]
            tokens = [tokens[j] for j in order]
        if not batch.running:
            batch.logits = None
            return
        device = batch.logits.device
        batch.logits = batch.backend.decode(torch.tensor(tokens, device=device))

    def _finish(self, r: Request, s: _Seq) -> Completion:
        c = self.engine._finish(s, r.prompt_ids, r.params, r.stops)
        if r.stop_text and s.done == "stop":
            cut = min((c.text.find(x) for x in r.stop_text if x in c.text), default=-1)
            if cut >= 0:
                c.text = c.text[:cut]
        return c

    def _fail(self, req: Request, error: Exception) -> None:
        if not req.done.is_set():
            req.error = error
            self._done(req)

    def _done(self, req: Request) -> None:
        if self.on_end is not None:
            try:
                self.on_end(req)
            except Exception as e:  # an observer's fault must not fail the request or stop the loop
                print(f"scheduler on_end failed: {e!r}", file=sys.stderr)
        req.done.set()
        if req.on_done is not None:
            try:
                req.on_done()
            except Exception:  # a listener that went away (closed event loop) changes nothing here
                pass


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # a thread killed inside a torch op at interpreter exit aborts the process
    for sched in list(_LIVE):
        sched.close()


def _ends_with_stop(tok, ids: list[int], stops: list[str]) -> bool:
    """Whether the decoded tail of ``ids`` contains one of ``stops`` (every token is at least one character,
    so the last ``len(stop) + 1`` tokens hold any occurrence that the newest token completed)."""
    window = max(len(x) for x in stops) + 1
    tail = tok.decode(ids[-window:])
    return any(x in tail for x in stops)
