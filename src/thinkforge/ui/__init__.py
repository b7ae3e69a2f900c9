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
from urllib.parse import quote

from thinkforge.config import check, option
from thinkforge.ui.store import Item, LabelError, LabelStore, check_labeller

MAX_BODY = 1_000_000  # bytes of one JSON request


@dataclass
class UIConfig:
    db: str = option("labels.sqlite", "the SQLite label store (created when missing)")
    queue_file: str | None = option(None, "JSONL of {prompt, completions} (or {prompt, chosen, rejected}) to queue at start")
    queue: str = option("default", "queue the --queue-file rows go to")
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = option(7860, "port")
    token: str | None = option(None, "require this token (Authorization: Bearer, or ?token= once in the browser)")

    def __post_init__(self):
        check(0 < self.port < 65536, f"need 0 < port < 65536, got {self.port}")


@dataclass
class ExportConfig:
    db: str = option("labels.sqlite", "the SQLite label store")
    queue: str = option("default", "queue to export")
    format: str = option("rankings", "rankings (K-wise, one row per labeller and item) or pairs (chosen / rejected)")
    out: str = option("labels.jsonl", "JSONL file to write (replaced atomically)")

    def __post_init__(self):
        check(self.format in ("rankings", "pairs"), f"format must be 'rankings' or 'pairs', got {self.format!r}")


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
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse

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
<h1>Labelling</h1>
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
        if skip == ("ranking" in data):
            raise LabelError("send either 'ranking' or \"skip\": true", "ranking")
        label_id = store.submit(item_id, data.get("labeller"), None if skip else data.get("ranking"))
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
            f"<pre id='prompt'>{html.escape(item.prompt)}</pre><h2>Completions: order them, best first</h2>"
            + "".join(cards) + "</div>")


def _controls(queue: str, who: str, item: Item | None) -> str:
    q, w = json.dumps(queue), json.dumps(who)
    return f"""
<p id="order">order: <span id="order-text">(none yet)</span></p>
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
async function post(url, data) {{
  const r = await fetch(url, {{method: 'POST', headers: {{'content-type': 'application/json'}}, body: JSON.stringify(data)}});
  const out = await r.json();
  if (!r.ok) {{ document.getElementById('status').textContent = out.error.message; return null; }}
  return out;
}}
async function submit() {{
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
.rank{{font-weight:bold;color:#064}}button.pick{{min-width:2rem}}#status{{color:#a00}}</style></head>
<body>{body}</body></html>"""


def serve(cfg: UIConfig) -> None:
    import uvicorn

    app = create_app(cfg)
    if cfg.queue_file:
        from pathlib import Path

        from thinkforge.tasks.files import iter_jsonl

        rows = [row for _, row in iter_jsonl(Path(cfg.queue_file))]
        got = app.state.store.add_items(cfg.queue, rows, where=cfg.queue_file)
        print(f"queue {cfg.queue!r}: {got['added']} items added, {got['already_queued']} already queued")
    print(f"thinkforge ui on http://{cfg.host}:{cfg.port}/")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
