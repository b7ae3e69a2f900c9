"""The browser app: human labelling (InstructGPT-style rankings) over the SQLite label store.

    thinkforge ui --db labels.sqlite [--queue-file prefs.jsonl --queue mul-v1] [--host 127.0.0.1 --port 7860 --token T]

Then open http://127.0.0.1:7860/ (with ``?token=T`` once when a token is set: it is kept in a cookie).
A labeller names themself, opens a queue and ranks its items one by one: the K completions of a prompt
are shown as text (model output is always escaped, never rendered as HTML), thinking folded away. Keys:
a completion's number puts it next in the order (best first), ``=`` before a number ties it with the one
before, Backspace takes the last one back, Enter submits, ``s`` skips, ``u`` undoes the last label. The
same can be done with the buttons. ``thinkforge labels export`` (or ``GET /api/export/{queue}``) writes
the labels as the files ``thinkforge train rm --kind preference`` and ``train dpo`` read.

Server-rendered pages with a little inline JavaScript: no build step, nothing fetched from a CDN. Binds
127.0.0.1 unless told otherwise. JSON API: ``POST /api/label`` ``{"item_id", "labeller", "ranking" | "skip"}``,
``POST /api/undo`` ``{"queue", "labeller"}``, ``GET /api/next/{queue}?labeller=``, ``GET /api/export/{queue}
?format=rankings|pairs``, ``GET /api/queues``. Errors are ``{"error": {"message", "field"}}`` with a 4xx
status, never a stack trace.
"""

import html
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from thinkforge.config import check, option
from thinkforge.ui import runs as runs_mod
from thinkforge.ui.store import MARKS, Item, LabelError, LabelStore, check_labeller

MAX_BODY = 1_000_000  # bytes of one JSON request


@dataclass
class UIConfig:
    runs: str = option("runs", "folder whose run folders (metrics.jsonl, results.json, eval.json, traces) are shown")
    db: str = option("labels.sqlite", "the SQLite label store (created when missing)")
    queue_file: str | None = option(None, "JSONL of {prompt, completions} (or {prompt, chosen, rejected}) to queue at start")
    queue: str = option("default", "queue the --queue-file rows go to")
    queue_mode: str = option("ranking", "what the --queue-file rows are for: ranking (K completions) or steps (one "
                                        "completion, each step marked good / neutral / bad: PRM labels)")
    queue_model: str | None = option(None, "a model folder to sample a queue from at start (with --queue-task)")
    queue_task: str = option("mul", "the task whose training problems --queue-model answers")
    queue_prompts: int = option(20, "problems sampled into the queue")
    queue_k: int = option(4, "completions per problem (ranking mode; step mode queues each one alone)")
    queue_temperature: float = option(1.0, "sampling temperature of the queued completions")
    queue_max_tokens: int = option(256, "length cap of the queued completions")
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = option(7860, "port")
    token: str | None = option(None, "require this token (Authorization: Bearer, or ?token= once in the browser)")

    def __post_init__(self):
        check(0 < self.port < 65536, f"need 0 < port < 65536, got {self.port}")
        check(self.queue_mode in ("ranking", "steps"), f"queue_mode must be ranking or steps, got {self.queue_mode!r}")
        check(self.queue_prompts >= 1 and 2 <= self.queue_k <= 16 and self.queue_temperature > 0
              and self.queue_max_tokens >= 1,
              "need queue_prompts >= 1, 2 <= queue_k <= 16, queue_temperature > 0 and queue_max_tokens >= 1")


@dataclass
class ExportConfig:
    db: str = option("labels.sqlite", "the SQLite label store")
    queue: str = option("default", "queue to export")
    format: str = option("rankings", "rankings (K-wise, one row per labeller and item), pairs (chosen / rejected) "
                                     "or steps (PRM labels of a steps queue)")
    out: str = option("labels.jsonl", "JSONL file to write (replaced atomically)")

    def __post_init__(self):
        check(self.format in ("rankings", "pairs", "steps"), f"format must be rankings, pairs or steps, got {self.format!r}")


def export(cfg: ExportConfig) -> str:
    """Write the queue's labels to ``cfg.out``; returns a one-line account of what was and was not written."""
    from pathlib import Path

    from thinkforge.tasks.files import write_jsonl

    if not Path(cfg.db).is_file():
        raise LabelError(f"{cfg.db}: no such label store")
    store = LabelStore(cfg.db)
    if cfg.queue not in {q["queue"] for q in store.queues()}:
        raise LabelError(f"{cfg.db}: no queue {cfg.queue!r} (queues: {[q['queue'] for q in store.queues()]})", "queue")
    rows = store.export(cfg.queue, cfg.format)
    write_jsonl(rows, Path(cfg.out))
    c = store.counts(cfg.queue)
    return (f"{cfg.out}: {len(rows)} {cfg.format} rows from {c['rankings']} rankings ({c['skips']} skips and "
            f"{c['items_unranked']} items nobody ranked are not exported)")


def create_app(cfg: UIConfig):
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse

    store = LabelStore(cfg.db)
    app = FastAPI(title="thinkforge ui", docs_url=None, redoc_url=None)
    app.state.store = store

    def error(status: int, message: str, field: str | None = None):
        return JSONResponse({"error": {"message": message, "field": field}}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if cfg.token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            sent = {request.cookies.get("tf_token"), request.query_params.get("token"),
                    given.strip() if scheme.lower() == "bearer" else None}
            if cfg.token not in sent:
                return error(401, "a token is required: open the page with ?token=<token> or send "
                                  "`Authorization: Bearer <token>`", "token")
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return error(413, f"request body over {MAX_BODY} bytes")
        response = await call_next(request)
        if cfg.token is not None and request.query_params.get("token") == cfg.token:
            response.set_cookie("tf_token", cfg.token, httponly=True, samesite="strict")
        return response

    root = Path(cfg.runs)

    @app.exception_handler(runs_mod.NotFound)
    async def not_found(request, e):
        return error(404, str(e))

    @app.get("/runs", response_class=HTMLResponse)
    async def runs_page():
        rows = []
        for r in runs_mod.find_runs(root):
            last = (runs_mod.metrics(r) or [{}])[-1]
            shown = " · ".join(f"{k} {last[k]:.3g}" for k in ("reward", "accuracy", "loss") if k in last)
            rows.append(f"<tr><td><input type='checkbox' class='pick' value='{html.escape(r.name, quote=True)}'></td>"
                        f"<td><a href='/run/{quote(r.name)}'>{html.escape(r.name)}</a></td>"
                        f"<td>{last.get('step', '')}</td><td>{html.escape(shown)}</td></tr>")
        return _page("thinkforge · runs", f"""<h1>Runs in {html.escape(str(root))}</h1><p><a href="/">labelling</a></p>
<table><tr><th></th><th>run</th><th>last step</th><th>last values</th></tr>{''.join(rows)}</table>
<p><button id="compare">overlay the ticked runs' curves</button>
<button id="pair">compare two ticked evaluations, problem by problem</button></p>
<script>const ticked = () => [...document.querySelectorAll('input.pick:checked')].map(x => x.value);
document.getElementById('compare').onclick = () => {{
  const q = ticked().map(v => 'run=' + encodeURIComponent(v)).join('&'); if (q) location.href = '/compare?' + q; }};
document.getElementById('pair').onclick = () => {{
  const t = ticked(); if (t.length === 2) location.href = '/pair?a=' + encodeURIComponent(t[0]) + '&b=' + encodeURIComponent(t[1]); }};
</script>""")

    @app.get("/pair", response_class=HTMLResponse)
    async def pair(a: str, b: str):
        ra, rb = runs_mod.resolve(root, a), runs_mod.resolve(root, b)
        rows = runs_mod.paired(runs_mod.traces(ra), runs_mod.traces(rb))
        if not rows:
            raise LabelError(f"{ra.name} and {rb.name} have no traces of the same problems with the same method", "b")
        link = lambda p: f'<a href="/trace/{quote(ra.name)}?problem={quote(p)}&vs={quote(rb.name)}">{html.escape(p)}</a>'  # noqa: E731
        body = "".join(
            f"<tr><td>{html.escape(r['method'])}</td><td>{r['problems']}</td><td>{r['a']:.3f}</td><td>{r['b']:.3f}</td>"
            f"<td class='diff'>{r['diff']:+.3f}</td><td>[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]</td><td>{r['p_value']:.3f}</td>"
            f"<td>{' '.join(link(p) for p in r['changed'][:30])}</td></tr>" for r in rows)
        return _page("paired comparison", f"""<h1>{html.escape(rb.name)} − {html.escape(ra.name)}</h1><p><a href="/runs">runs</a></p>
<p>Per method, each problem's accuracy (the mean verdict of its samples) in both evaluations, on the problems both
evaluated; the difference B − A with a paired-bootstrap 95% interval (problems resampled together) and the share of
resamples with B ≤ A.</p><table id="paired"><tr><th>method</th><th>problems</th><th>A</th><th>B</th><th>B − A</th>
<th>95% CI</th><th>p (B ≤ A)</th><th>problems that changed (side by side)</th></tr>{body}</table>""")

    @app.get("/run/{name:path}", response_class=HTMLResponse)
    async def run_page(name: str):
        run = runs_mod.resolve(root, name)
        table = _results_table(runs_mod.results(run))
        plots = "".join(f"<figure><img src='/file/{quote(p)}' alt='{html.escape(p, quote=True)}'></figure>"
                        for p in runs_mod.images(run, root))
        config = runs_mod.config_text(run)
        has_traces = any(run.path.glob("*traces.jsonl"))
        link = f" · <a href='/traces/{quote(run.name)}'>traces</a>" if has_traces else ""
        return _page(f"{run.name} · run", f"""<h1>{html.escape(run.name)}</h1><p><a href="/runs">runs</a>{link}</p>
{_chart([run.name])}{('<h2>Results</h2>' + table) if table else ''}{('<h2>Plots</h2>' + plots) if plots else ''}
{('<h2>Config</h2><pre id="config">' + html.escape(config) + '</pre>') if config else ''}""")

    @app.get("/compare", response_class=HTMLResponse)
    async def compare(run: list[str] = Query(default=[])):
        found = [runs_mod.resolve(root, r).name for r in run[:12]]
        if not found:
            raise LabelError("tick at least one run to compare", "run")
        return _page("compare runs", f"<h1>Compare</h1><p><a href='/runs'>runs</a></p>{_chart(found)}")

    @app.get("/traces/{name:path}", response_class=HTMLResponse)
    async def traces_page(name: str, filter: str | None = None, q: str = "", page: int = 0):
        run = runs_mod.resolve(root, name)
        probs = runs_mod.problems(runs_mod.traces(run), filter or None, q)
        shown = probs[page * 50 : (page + 1) * 50]
        rows = "".join(
            f"<tr><td><a class='problem' href='/trace/{quote(run.name)}?problem={quote(p['id'])}'>{html.escape(p['id'])}</a></td>"
            f"<td><pre>{html.escape(str(p['question'])[:300])}</pre></td><td>{sum(bool(r.get('correct')) for r in p['rows'])}"
            f"/{len(p['rows'])}</td></tr>" for p in shown)
        options = "".join(f"<option value='{k}' {'selected' if k == filter else ''}>{k}</option>" for k in runs_mod.FILTERS)
        more = f"<a href='?filter={quote(filter or '')}&q={quote(q)}&page={page + 1}'>next page</a>" if len(probs) > (page + 1) * 50 else ""
        return _page(f"{run.name} · traces", f"""<h1>Traces of {html.escape(run.name)}</h1><p><a href="/run/{quote(run.name)}">run</a></p>
<form><select name="filter"><option value="">all</option>{options}</select> <input name="q" value="{html.escape(q, quote=True)}"
placeholder="search"> <button>show</button></form><p>{len(probs)} problems</p>
<table id="problems"><tr><th>problem</th><th>question</th><th>correct</th></tr>{rows}</table>{more}""")

    @app.get("/trace/{name:path}", response_class=HTMLResponse)
    async def trace_page(name: str, problem: str, vs: str | None = None):
        sides = [runs_mod.resolve(root, name)] + ([runs_mod.resolve(root, vs)] if vs else [])
        cols = []
        for run in sides:
            found = [p for p in runs_mod.problems(runs_mod.traces(run)) if p["id"] == problem]
            cols.append(f"<div class='side'><h2>{html.escape(run.name)}</h2>"
                        + (_trace_html(found[0]) if found else "<p>this run has no traces of this problem</p>") + "</div>")
        others = "".join(f"<option>{html.escape(r.name)}</option>" for r in runs_mod.find_runs(root) if r.name != name)
        return _page(f"{problem} · trace", f"""<h1>Problem {html.escape(problem)}</h1><p><a href="/traces/{quote(name)}">traces</a></p>
<form><input type="hidden" name="problem" value="{html.escape(problem, quote=True)}">side by side with
<select name="vs"><option value="">—</option>{others}</select> <button>compare</button></form>
<div style="display:flex;gap:1rem">{''.join(cols)}</div>""")

    @app.get("/api/metrics/{name:path}")
    async def metrics_api(name: str):
        run = runs_mod.resolve(root, name)
        return {"run": run.name, "rows": runs_mod.metrics(run), "modified": run.modified}

    @app.get("/file/{name:path}")
    async def file(name: str):
        return FileResponse(runs_mod.file_in(root, name))

    @app.exception_handler(LabelError)
    async def label_error(request, e: LabelError):
        return error(e.status, str(e), e.field)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(400, f"invalid value for '{where}': {first.get('msg', 'invalid')}", where or None)

    async def body(request: Request) -> dict:
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise LabelError(f"request body over {MAX_BODY} bytes", status=413)
        try:
            data = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise LabelError("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise LabelError("the request body must be a JSON object")
        return data

    @app.get("/", response_class=HTMLResponse)
    async def index():
        rows = "".join(
            f"<tr><td>{html.escape(q['queue'])}</td><td>{q['items']}</td><td>{q['labels']}</td><td>{q['labellers']}</td>"
            f"<td>{_pct(store.agreement(q['queue'])['agreement'])}</td>"
            f"<td><a class='open' href='#' data-queue='{html.escape(q['queue'], quote=True)}'>label</a></td>"
            f"<td><a href='/api/export/{quote(q['queue'])}?format=rankings'>rankings</a> · "
            f"<a href='/api/export/{quote(q['queue'])}?format=pairs'>pairs</a></td></tr>"
            for q in store.queues())
        return _page("thinkforge · labelling", f"""
<p><a href="/runs">runs</a></p><h1>Labelling</h1>
<p><label>your name <input id="labeller" maxlength="64" autocomplete="name"></label></p>
<table><tr><th>queue</th><th>items</th><th>labels</th><th>labellers</th><th>agreement</th><th></th><th>export</th></tr>
{rows}</table>
<script>
const who = document.getElementById('labeller');
who.value = localStorage.getItem('tf_labeller') || '';
for (const a of document.querySelectorAll('a.open')) a.onclick = (ev) => {{
  ev.preventDefault();
  if (!who.value.trim()) {{ who.focus(); return; }}
  localStorage.setItem('tf_labeller', who.value.trim());
  location.href = '/label/' + encodeURIComponent(a.dataset.queue) + '?labeller=' + encodeURIComponent(who.value.trim());
}};
</script>""")

    @app.get("/label/{queue}", response_class=HTMLResponse)
    async def label_page(queue: str, labeller: str = ""):
        if not labeller.strip():
            return RedirectResponse("/")
        who = check_labeller(labeller)
        item = store.next_item(queue, who)
        counts = store.counts(queue)
        head = (f"<h1>{html.escape(queue)}</h1><p>labeller <b id='who'>{html.escape(who)}</b> · {counts['rankings']} "
                f"rankings, {counts['skips']} skips in this queue · <a href='/'>queues</a></p>")
        if item is None:
            return _page(f"{queue} · done", head + "<p id='done'>Nothing left for you in this queue.</p>"
                         + _controls(queue, who, None))
        if item.mode == "steps":
            return _page(f"{queue} · item {item.id}", head + _steps_html(item) + _step_controls(queue, who, item))
        return _page(f"{queue} · item {item.id}", head + _item_html(item) + _controls(queue, who, item))

    @app.get("/api/queues")
    async def queues():
        return [{**q, **store.agreement(q["queue"])} for q in store.queues()]

    @app.get("/api/next/{queue}")
    async def next_item(queue: str, labeller: str):
        item = store.next_item(queue, labeller)
        return None if item is None else {"item_id": item.id, "prompt": item.prompt, "completions": item.completions}

    @app.post("/api/label")
    async def label(request: Request):
        data = await body(request)
        item_id = data.get("item_id")
        if type(item_id) is not int:
            raise LabelError(f"'item_id' must be an integer; got {item_id!r}", "item_id")
        skip = data.get("skip", False)
        if skip is not False and skip is not True:
            raise LabelError(f"'skip' must be true or false; got {skip!r}", "skip")
        kind = "steps" if "steps" in data else "ranking"
        if skip == (kind in data) or ("steps" in data and "ranking" in data):
            raise LabelError("send one of 'ranking', 'steps' or \"skip\": true", kind)
        label_id = store.submit(item_id, data.get("labeller"), None if skip else data.get(kind), kind)
        return {"id": label_id, "item_id": item_id}

    @app.post("/api/undo")
    async def undo(request: Request):
        data = await body(request)
        return {"item_id": store.undo(str(data.get("queue", "")), data.get("labeller"))}

    @app.get("/api/export/{queue}")
    async def export(queue: str, format: str = "rankings"):
        rows = store.export(queue, format)
        name = f"{queue}-{format}.jsonl".replace("/", "_").replace('"', "_")
        return PlainTextResponse("".join(json.dumps(r) + "\n" for r in rows), media_type="application/x-ndjson",
                                 headers={"content-disposition": f'attachment; filename="{name}"'})

    return app


def _trace_html(problem: dict) -> str:
    """One problem's completions: verdict, answer, reward parts, token counts; thinking folded; all text escaped."""
    esc = html.escape
    cards = []
    for r in problem["rows"]:
        tags = " · ".join(f"{k} {esc(str(r[k]))}" for k in ("file", "stage", "method", "batch", "sample") if k in r)
        parts = ", ".join(f"{esc(k)} {v:.3g}" for k, v in (r.get("rewards") or {}).items() if isinstance(v, (int, float)))
        flags = [name for name, holds in runs_mod.FILTERS.items() if holds(r)]
        think = r.get("thinking")
        fold = (f"<details><summary>thinking ({r.get('thinking_tokens', '?')} tokens)</summary><pre class='thinking'>"
                f"{esc(str(think))}</pre></details>") if think is not None else ""
        chosen = " · <b class='chosen'>chosen</b>" if r.get("chosen") and "method" in r else ""
        orm = f" · ORM {r['orm']:.3g}" if isinstance(r.get("orm"), (int, float)) else ""
        body = (_scored_steps_html(r["steps"]) if _valid_steps(r.get("steps"))
                else f"<pre class='completion'>{_completion_html(str(r.get('completion', '')), r.get('forced_spans'))}</pre>")
        cards.append(
            f"<div class='card {'right' if r.get('correct') else 'wrong'}'><p>{'✓' if r.get('correct') else '✗'} "
            f"answer <b class='answer'>{esc(str(r.get('answer')))}</b> · {tags}{chosen}</p>{fold}"
            f"{body}<p class='meta'>{r.get('tokens', '?')} tokens, "
            f"{r.get('forced_tokens', 0)} forced, finish {esc(str(r.get('finish_reason')))}{orm}"
            + (f" · reward {r['reward']:.3g} ({parts})" if isinstance(r.get("reward"), (int, float)) else "")
            + (f" · {', '.join(flags)}" if flags else "") + "</p></div>")
    return (f"<pre class='question'>{esc(str(problem['question']))}</pre><p>gold answer <b>{esc(str(problem['gold']))}</b></p>"
            + "".join(cards))


def _completion_html(text: str, spans) -> str:
    """The completion escaped, with the spans the engine forced (``forced_spans``) in ``<mark class='forced'>``;
    spans that are not sorted, in-bounds ``[start, end)`` pairs are ignored (a hand-edited file)."""
    out, at = [], 0
    for span in spans if isinstance(spans, list) else []:
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)
                and at <= span[0] < span[1] <= len(text)):
            continue
        out += [html.escape(text[at : span[0]]), "<mark class='forced' title='forced by the engine: not sampled, not "
                "trained on'>", html.escape(text[span[0] : span[1]]), "</mark>"]
        at = span[1]
    return "".join(out) + html.escape(text[at:])


def _valid_steps(steps) -> bool:
    return isinstance(steps, list) and bool(steps) and all(
        isinstance(x, dict) and isinstance(x.get("text"), str) and isinstance(x.get("score"), (int, float)) for x in steps)


def _scored_steps_html(steps: list[dict]) -> str:
    """The completion cut into the PRM's steps, each coloured by its score (red 0 → green 1) with the score."""
    rows = []
    for st in steps:
        score = min(1.0, max(0.0, float(st["score"])))
        rows.append(f"<div class='prm-step' data-score='{score:.3f}' style='background:hsl({120 * score:.0f},70%,90%)'>"
                    f"<span class='prm-score'>{score:.2f}</span><pre>{html.escape(st['text'])}</pre></div>")
    return "<div class='prm-steps' title='PRM score of each step'>" + "".join(rows) + "</div>"


def _results_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = [k for k in ("stage", "method", "metric", "value", "ci_low", "ci_high", "n", "tokens") if any(k in r for r in rows)]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else html.escape(str(v if v is not None else ""))  # noqa: E731
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table class='results'><tr>{''.join(f'<th>{k}</th>' for k in keys)}</tr>{body}</table>"


def _chart(names: list[str]) -> str:
    """Curves of one metric for the runs ``names`` (overlaid), drawn as SVG by a little JavaScript from
    /api/metrics; x = step, tokens seen or seconds; EMA smoothing as TensorBoard's; a zoom range; live: the
    runs are polled every 3 s while their metrics file keeps changing."""
    return f"""<div id="chart-box"><p>metric <select id="metric"></select> x <select id="xaxis">
<option value="step">step</option><option value="seen_tokens">tokens</option><option value="step_time">seconds</option>
</select> smoothing <input id="smooth" type="range" min="0" max="0.99" step="0.01" value="0">
zoom x from <input id="xmin" size="6"> to <input id="xmax" size="6"> <span id="live"></span></p>
<svg id="chart" width="900" height="320" viewBox="0 0 900 320" role="img"></svg><div id="legend"></div></div>
<script>
const names = {json.dumps(names)}, data = {{}}, colors = ['#1f77b4','#d62728','#2ca02c','#9467bd','#ff7f0e','#8c564b'];
const $ = (id) => document.getElementById(id);
async function load() {{
  let changed = false;
  for (const n of names) {{
    const r = await fetch('/api/metrics/' + n.split('/').map(encodeURIComponent).join('/'));
    if (!r.ok) continue;
    const got = await r.json();
    if (!data[n] || got.rows.length !== data[n].rows.length) changed = true;
    data[n] = got;
  }}
  const keys = new Set(); Object.values(data).forEach(d => d.rows.forEach(row => Object.keys(row).forEach(k => keys.add(k))));
  const sel = $('metric'), had = sel.value;
  if (sel.options.length !== keys.size) {{
    sel.innerHTML = '';
    [...keys].filter(k => k !== 'step').sort().forEach(k => sel.add(new Option(k, k)));
    sel.value = had || (keys.has('reward') ? 'reward' : keys.has('loss') ? 'loss' : sel.options[0]?.value);
  }}
  const fresh = Object.values(data).some(d => Date.now() / 1000 - d.modified < 60);
  $('live').textContent = fresh ? 'live' : '';
  if (changed) draw();
  if (fresh) setTimeout(load, 3000);
}}
function series(rows, metric, xkey) {{
  let acc = 0, sm = null; const a = Number($('smooth').value), out = [];
  for (const row of rows) {{
    const x = xkey === 'step' ? row.step : (acc += (row[xkey] || 0));
    if (!(metric in row)) continue;
    sm = sm === null ? row[metric] : a * sm + (1 - a) * row[metric];
    out.push([x, sm]);
  }}
  const lo = parseFloat($('xmin').value), hi = parseFloat($('xmax').value);
  return out.filter(([x]) => !(x < lo) && !(x > hi));
}}
function draw() {{
  const metric = $('metric').value, xkey = $('xaxis').value, svg = $('chart');
  const all = names.map(n => data[n] ? series(data[n].rows, metric, xkey) : []);
  const pts = all.flat();
  svg.innerHTML = ''; $('legend').innerHTML = '';
  if (!pts.length) return;
  const [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  const [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  const X = (x) => 50 + 830 * (x - x0) / ((x1 - x0) || 1), Y = (y) => 300 - 280 * (y - y0) / ((y1 - y0) || 1);
  const ns = 'http://www.w3.org/2000/svg', el = (t, at) => {{ const e = document.createElementNS(ns, t);
    for (const k in at) e.setAttribute(k, at[k]); svg.appendChild(e); return e; }};
  el('line', {{x1: 50, y1: 300, x2: 880, y2: 300, stroke: '#999'}}); el('line', {{x1: 50, y1: 20, x2: 50, y2: 300, stroke: '#999'}});
  for (const [v, y] of [[y0, 300], [y1, 20]]) el('text', {{x: 2, y: y + 4, 'font-size': 11}}).textContent = v.toPrecision(3);
  for (const [v, x] of [[x0, 50], [x1, 850]]) el('text', {{x: x, y: 316, 'font-size': 11}}).textContent = v.toPrecision(4);
  all.forEach((s, i) => {{
    if (!s.length) return;
    el('polyline', {{points: s.map(p => X(p[0]) + ',' + Y(p[1])).join(' '), fill: 'none', stroke: colors[i % 6],
                     'stroke-width': 1.5, class: 'curve', 'data-run': names[i]}});
    const item = document.createElement('span'); item.style.color = colors[i % 6];
    item.textContent = '■ ' + names[i] + '  '; $('legend').appendChild(item);
  }});
}}
for (const id of ['metric', 'xaxis', 'smooth', 'xmin', 'xmax']) $(id).oninput = draw;
load();
</script>"""


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _item_html(item: Item) -> str:
    """The prompt and the K completions, every model-written character escaped; thinking folded away."""
    cards = []
    for k, text in enumerate(item.completions):
        thinking, rest = None, text
        if "</think>" in text:
            thinking, rest = text.split("</think>", 1)
            thinking = thinking.replace("<think>", "", 1)
        fold = (f"<details><summary>thinking ({len(thinking.split())} words)</summary><pre>{html.escape(thinking.strip())}"
                f"</pre></details>") if thinking is not None else ""
        cards.append(f"<div class='card' data-k='{k}'><button class='pick' data-k='{k}'>{k + 1}</button>"
                     f"<span class='rank' id='rank-{k}'></span>{fold}<pre class='answer'>{html.escape(rest.strip())}</pre></div>")
    return (f"<div id='item' data-item='{item.id}' data-k='{len(item.completions)}'><h2>Prompt</h2>"
            f"<pre id='prompt'>{html.escape(item.prompt)}</pre><h2>Completions: order them, best first (keys 1–9, = for a tie; or drag)</h2>"
            + "".join(cards) + "</div>")


_JS_POST = """async function post(url, data) {
  const r = await fetch(url, {method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify(data)});
  const out = await r.json();
  if (!r.ok) { document.getElementById('status').textContent = out.error.message; return null; }
  return out;
}
"""  # POST JSON; a 4xx message goes to the page's status line


def _steps_html(item: Item) -> str:
    """A steps item: the prompt and the completion cut into the PRM's steps, each to be marked."""
    rows = "".join(f"<div class='step' data-i='{i}'><span class='mark' id='mark-{i}'></span><pre>{html.escape(step)}</pre>"
                   f"<span class='buttons'>" + "".join(f"<button class='m' data-i='{i}' data-m='{m}'>{name}</button>"
                                                        for m, name in MARKS.items()) + "</span></div>"
                   for i, step in enumerate(item.steps))
    return (f"<div id='item' data-item='{item.id}' data-n='{len(item.steps)}'><h2>Prompt</h2><pre id='prompt'>"
            f"{html.escape(item.prompt)}</pre><h2>Steps: mark each good (g), neutral (n) or bad (b)</h2>{rows}</div>"
            "<p>first error: <b id='first-error'>none</b></p>")


def _step_controls(queue: str, who: str, item: Item) -> str:
    q, w = json.dumps(queue), json.dumps(who)
    return f"""<p><button id="back">⌫ back</button> <button id="submit">submit ⏎</button> <button id="skip">skip (s)</button>
<button id="undo">undo last label (u)</button></p><p id="status" role="status"></p>
<script>
const queue = {q}, labeller = {w}, box = document.getElementById('item');
const N = Number(box.dataset.n), itemId = Number(box.dataset.item), names = {{'1': 'good', '0': 'neutral', '-1': 'bad'}};
const marks = new Array(N).fill(null); let cursor = 0;
function show() {{
  marks.forEach((m, i) => {{
    document.getElementById('mark-' + i).textContent = m === null ? (i === cursor ? '▶' : '') : names[m];
    document.querySelector(`.step[data-i='${{i}}']`).className = 'step' + (m === -1 ? ' bad' : m === 1 ? ' good' : '');
  }});
  const first = marks.indexOf(-1);
  document.getElementById('first-error').textContent = first < 0 ? 'none' : 'step ' + (first + 1);
}}
function mark(i, m) {{ marks[i] = m; cursor = Math.min(N, Math.max(cursor, i + 1)); show(); }}
{_JS_POST}async function submit() {{
  if (marks.includes(null)) {{ document.getElementById('status').textContent = 'mark every step first'; return; }}
  if (await post('/api/label', {{item_id: itemId, labeller, steps: marks}})) location.reload();
}}
document.querySelectorAll('button.m').forEach(b => b.onclick = () => mark(Number(b.dataset.i), Number(b.dataset.m)));
document.getElementById('back').onclick = () => {{ cursor = Math.max(0, cursor - 1); marks[cursor] = null; show(); }};
document.getElementById('submit').onclick = submit;
document.getElementById('skip').onclick = async () => {{ if (await post('/api/label', {{item_id: itemId, labeller, skip: true}})) location.reload(); }};
document.getElementById('undo').onclick = async () => {{ if (await post('/api/undo', {{queue, labeller}})) location.reload(); }};
document.addEventListener('keydown', (e) => {{
  const m = {{g: 1, n: 0, b: -1}}[e.key];
  if (m !== undefined && cursor < N) mark(cursor, m);
  else if (e.key === 'Backspace') document.getElementById('back').click();
  else if (e.key === 'Enter') submit();
  else if (e.key === 's') document.getElementById('skip').click();
  else if (e.key === 'u') document.getElementById('undo').click();
}});
show();
</script>"""


def _controls(queue: str, who: str, item: Item | None) -> str:
    q, w = json.dumps(queue), json.dumps(who)
    return f"""
<p id="order" title="drop a card here to give it the next rank">order: <span id="order-text">(none yet)</span></p>
<p><button id="tie" {'' if item else 'disabled'}>= tie next</button> <button id="back" {'' if item else 'disabled'}>⌫ back</button>
<button id="submit" {'' if item else 'disabled'}>submit ⏎</button> <button id="skip" {'' if item else 'disabled'}>skip (s)</button>
<button id="undo">undo last label (u)</button></p><p id="status" role="status"></p>
<script>
const queue = {q}, labeller = {w}, box = document.getElementById('item');
const K = box ? Number(box.dataset.k) : 0, itemId = box ? Number(box.dataset.item) : null;
let order = [], tieNext = false;  // order: list of groups (ties), best first
function show() {{
  document.querySelectorAll('.rank').forEach(s => s.textContent = '');
  order.forEach((g, r) => g.forEach(k => document.getElementById('rank-' + k).textContent = ' rank ' + (r + 1)));
  document.getElementById('order-text').textContent = order.length ? order.map(g => g.map(k => k + 1).join('=')).join(' > ') : '(none yet)';
}}
function pick(k) {{
  if (!box || k >= K || order.some(g => g.includes(k))) return;
  if (tieNext && order.length) order[order.length - 1].push(k); else order.push([k]);
  tieNext = false; show();
}}
function back() {{ if (order.length) {{ const g = order[order.length - 1]; g.pop(); if (!g.length) order.pop(); }} show(); }}
// Drag a card (pointer events: mouse, pen, touch): onto the order line = the next rank; onto a ranked card = tied
// with it; anywhere else = out of the order again.
function unrank(k) {{ order.forEach(g => {{ const i = g.indexOf(k); if (i >= 0) g.splice(i, 1); }}); order = order.filter(g => g.length); }}
function drop(k, el) {{
  const card = el && el.closest('.card[data-k]'), onOrder = el && el.closest('#order');
  const j = card ? Number(card.dataset.k) : null;
  if (j === k) return;
  unrank(k);
  const group = j === null ? null : order.find(g => g.includes(j));
  if (onOrder) order.push([k]); else if (group) group.push(k);
  tieNext = false; show();
}}
let drag = null;
document.querySelectorAll('.card[data-k]').forEach(c => c.addEventListener('pointerdown', e => {{
  if (e.target.closest('button, summary')) return;
  drag = {{k: Number(c.dataset.k), x: e.clientX, y: e.clientY, moved: false, card: c}};
}}));
document.addEventListener('pointermove', e => {{
  if (drag && !drag.moved && Math.hypot(e.clientX - drag.x, e.clientY - drag.y) > 6) {{
    drag.moved = true; drag.card.classList.add('dragging'); e.preventDefault();
  }}
}});
document.addEventListener('pointerup', e => {{
  if (!drag) return;
  const d = drag; drag = null; d.card.classList.remove('dragging');
  if (d.moved) {{ window.getSelection().removeAllRanges(); drop(d.k, document.elementFromPoint(e.clientX, e.clientY)); }}
}});
{_JS_POST}async function submit() {{
  const seen = order.flat();
  if (seen.length < K - 1) {{ document.getElementById('status').textContent = 'order every completion first'; return; }}
  const ranking = new Array(K).fill(order.length);  // one left out is last
  order.forEach((g, r) => g.forEach(k => ranking[k] = r));
  if (await post('/api/label', {{item_id: itemId, labeller, ranking}})) location.reload();
}}
async function skip() {{ if (await post('/api/label', {{item_id: itemId, labeller, skip: true}})) location.reload(); }}
async function undo() {{ if (await post('/api/undo', {{queue, labeller}})) location.reload(); }}
document.querySelectorAll('button.pick').forEach(b => b.onclick = () => pick(Number(b.dataset.k)));
document.getElementById('tie').onclick = () => {{ tieNext = true; }};
document.getElementById('back').onclick = back;
document.getElementById('submit').onclick = submit;
document.getElementById('skip').onclick = skip;
document.getElementById('undo').onclick = undo;
document.addEventListener('keydown', (e) => {{
  if (e.target.tagName === 'INPUT') return;
  if (e.key >= '1' && e.key <= '9') pick(Number(e.key) - 1);
  else if (e.key === '=') tieNext = true;
  else if (e.key === 'Backspace') back();
  else if (e.key === 'Enter' && box) submit();
  else if (e.key === 's' && box) skip();
  else if (e.key === 'u') undo();
}});
</script>"""


def _page(title: str, body: str) -> str:
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:15px/1.4 system-ui,sans-serif;max-width:60rem;margin:1.5rem auto;padding:0 1rem}}
table{{border-collapse:collapse}}td,th{{padding:.2rem .6rem;border-bottom:1px solid #ddd;text-align:left}}
.card{{border:1px solid #ccc;border-radius:6px;padding:.5rem;margin:.5rem 0}}pre{{white-space:pre-wrap;margin:.3rem 0}}
.rank{{font-weight:bold;color:#064}}.card.wrong{{border-color:#d99}}.step{{display:flex;gap:.5rem;align-items:baseline}}.step pre{{flex:1}}
.step.bad pre{{background:#fdd}}mark.forced{{background:#fe9;outline:1px dashed #b80}}.prm-step{{display:flex;gap:.5rem;align-items:baseline;padding:0 .3rem}}.prm-step pre{{flex:1;margin:0}}.prm-score{{font:12px monospace;min-width:2.5rem}}.step.good pre{{background:#efe}}.mark{{min-width:4rem;font-weight:bold}}.card.right{{border-color:#8c8}}.side{{flex:1;min-width:0}}button.pick{{min-width:2rem}}.card[data-k]{{cursor:grab}}.card.dragging{{opacity:.5;cursor:grabbing}}#order{{border:1px dashed #aaa;padding:.4rem;border-radius:6px}}#status{{color:#a00}}</style></head>
<body>{body}</body></html>"""


def sample_queue(cfg: UIConfig) -> list[dict]:
    """Queue rows sampled from ``cfg.queue_model`` on ``cfg.queue_task``'s training problems: K completions of
    each prompt to rank, or (step mode) each completion on its own to mark."""
    from thinkforge.generation import Engine, SamplingParams
    from thinkforge.models import load_model
    from thinkforge.sampling import sample_and_grade
    from thinkforge.tasks import get_task

    model, tok = load_model(cfg.queue_model, device="auto")
    task = get_task(cfg.queue_task)
    problems = task.problems(cfg.queue_prompts, "train", seed=0)
    graded = sample_and_grade(Engine(model, tok), task, problems,
                              SamplingParams(n=cfg.queue_k, temperature=cfg.queue_temperature, max_new_tokens=cfg.queue_max_tokens, seed=0))
    if cfg.queue_mode == "steps":
        return [{"prompt": g.problem.question, "completion": c.text} for g in graded for c in g.completions if c.text]
    return [{"prompt": g.problem.question, "completions": [c.text or "(empty)" for c in g.completions]} for g in graded]


def serve(cfg: UIConfig) -> None:
    import uvicorn

    app = create_app(cfg)
    if cfg.queue_file:
        from pathlib import Path

        from thinkforge.tasks.files import iter_jsonl

        rows = [row for _, row in iter_jsonl(Path(cfg.queue_file))]
        got = app.state.store.add_items(cfg.queue, rows, where=cfg.queue_file, mode=cfg.queue_mode)
        print(f"queue {cfg.queue!r}: {got['added']} items added, {got['already_queued']} already queued")
    if cfg.queue_model:
        got = app.state.store.add_items(cfg.queue, sample_queue(cfg), where=cfg.queue_model, mode=cfg.queue_mode)
        print(f"queue {cfg.queue!r}: {got['added']} items sampled from {cfg.queue_model}, {got['already_queued']} already queued")
    print(f"thinkforge ui on http://{cfg.host}:{cfg.port}/")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
