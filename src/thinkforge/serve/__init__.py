"""An OpenAI-compatible HTTP server for a model trained (or loaded) by thinkforge.

    thinkforge serve --model runs/demo/grpo/model [--host 127.0.0.1 --port 8000 --api-key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    r = client.responses.create(model="grpo", input="347*89", reasoning={"effort": "low", "summary": "auto"})
    r.output_text, r.usage.output_tokens_details.reasoning_tokens

Endpoints: ``POST /v1/responses`` (Responses API: ``reasoning.effort`` / ``summary`` / ``context``,
``max_output_tokens`` over reasoning + answer, ``status: "incomplete"``, streaming, multi-turn through
``previous_response_id`` or earlier output passed back as input), ``GET`` and ``DELETE /v1/responses/{id}``, ``POST
/v1/chat/completions`` (``reasoning_content``, ``reasoning_effort``, ``n``, ``stop``, ``seed``, ``logprobs``,
streaming), ``GET /v1/models`` and ``GET /v1/models/{id}``; ``GET /health`` and ``GET /metrics`` (Prometheus,
``serve.telemetry``), which need no API key. Errors are OpenAI-shaped (``{"error":
{"message", "type", "param", "code"}}``); every request is validated on its own and a failure is its own.

Limits (``ServeConfig``): body bytes (counted as they arrive, chunked or not), max_tokens, n × max_tokens,
prompt + max_tokens within the model's context, queued requests (429 + ``Retry-After``), a deadline per
request; a client that disconnects cancels its generation; SIGTERM stops taking requests, lets running
ones finish for ``drain_seconds``, then exits.
"""

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

from thinkforge.config import check, option


@dataclass
class ServeConfig:
    model: str = option("runs/demo/grpo/model", "model folder (or hub id) to serve")
    name: str | None = option(None, "model name clients pass as `model` (default: the folder's parent name)")
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = option(8000, "port")
    api_key: str | None = option(None, "require `Authorization: Bearer <key>` when set")
    max_tokens: int = option(256, "default cap on generated tokens when a request sets none")
    max_tokens_limit: int = option(4096, "the largest max_tokens a request may ask for (400 above)")
    max_total_tokens: int = option(16384, "the largest n x max_tokens of one request (400 above)")
    context: int | None = option(None, "prompt + completion limit in tokens (default: the model's max_position_embeddings)")
    max_body_bytes: int = option(1_000_000, "larger request bodies are refused with 413 (counted as they arrive)")
    max_batch_rows: int = option(256, "sequences decoded together (KV cache <= rows x 3 x context slots); more wait for a free row")
    max_queued: int = option(256, "requests waiting for rows; more are refused with 429 + Retry-After")
    express_tokens: int = option(0, "requests with n x max_tokens up to this also run in the express batch (a small "
                                    "batch of their own, stepped between the main batch's steps): lower latency for "
                                    "short requests under load, less throughput (0: only service_tier 'priority' "
                                    "requests; see the README's serving section)")
    express_rows: int = option(8, "rows of the express batch, which requests with service_tier 'priority' use (0: "
                                  "none; one that finds it full joins the main batch)")
    express_share: float = option(0.5, "the most of the time that batch takes while the main one also has rows")
    timeout: float = option(300.0, "seconds a request may take from arrival to its last token (504 after)")
    drain_seconds: float = option(10.0, "on SIGTERM, how long running requests may finish before the server exits")
    store_size: int = option(1000, "responses kept for previous_response_id (oldest dropped first)")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    device: str = option("auto", "auto, cpu or cuda")

    def __post_init__(self):
        check(0 < self.port < 65536 and self.max_tokens >= 1 and self.max_body_bytes >= 1,
              "need 0 < port < 65536, max_tokens >= 1, max_body_bytes >= 1")
        check(self.max_tokens_limit >= 1 and self.max_total_tokens >= 1 and self.max_batch_rows >= 1
              and self.max_queued >= 0 and self.timeout > 0 and self.drain_seconds >= 0 and self.store_size >= 0
              and self.threads >= 0 and (self.context is None or self.context >= 2)
              and self.express_tokens >= 0 and self.express_rows >= 0 and 0 < self.express_share < 1,
              "need max_tokens_limit, max_total_tokens, max_batch_rows >= 1; max_queued, store_size, threads, "
              "express_tokens, express_rows >= 0; 0 < express_share < 1; "
              "timeout > 0; drain_seconds >= 0; context >= 2")


def model_name(cfg: ServeConfig) -> str:
    p = Path(cfg.model)
    return cfg.name or (p.parent.name if p.name == "model" else p.name)


OPEN_PATHS = ("/health", "/metrics")  # no API key needed, as in vLLM: probes and scrapers carry none


class _Guard:
    """ASGI middleware: the API key (scheme case-insensitive, as RFC 7235 says; not for ``OPEN_PATHS``) and the
    body limit, counted on the bytes as they arrive — a chunked body without Content-Length is cut off at the
    limit too. Every response's status is counted (``telemetry``), its own refusals included."""

    def __init__(self, app, api_key: str | None, max_body: int, metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics

    async def __call__(self, scope, receive, send_on):
        if scope["type"] != "http":
            return await self.app(scope, receive, send_on)

        async def send(message):
            if message["type"] == "http.response.start":
                self.metrics.response(message["status"])
            await send_on(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token.strip() != self.api_key:
                return await _send_error(send, 401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                                         "authentication_error", code="invalid_api_key")
        size = headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            return await _send_error(send, 413, f"Request body of {size} bytes exceeds the limit of {self.max_body}.")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await _send_error(send, 413, f"Request body exceeds the limit of {self.max_body} bytes.")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send_error(send, status: int, message: str, type_: str = "invalid_request_error", code=None, param=None):
    from thinkforge.serve.protocol import error_body

    payload = json.dumps(error_body(message, type_, param, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def create_app(cfg: ServeConfig, model=None, tokenizer=None):
    """The ASGI app; ``model``/``tokenizer`` may be passed in (tests), else loaded from ``cfg.model``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from thinkforge.serve import telemetry
    from thinkforge.serve.protocol import ERRORS, ChatRequest, ResponsesRequest, error_body
    from thinkforge.serve.service import APIError, Limits, ReasoningService, model_context
    from thinkforge.serve.streams import ChatStream, IncrementalText, ResponsesStream

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    if model is None:
        from thinkforge.models import load_model

        model, tokenizer = load_model(cfg.model, device=cfg.device)
    name = model_name(cfg)
    context = cfg.context or model_context(model)
    limits = Limits(context=context, default_max_tokens=cfg.max_tokens, max_tokens=cfg.max_tokens_limit,
                    max_total_tokens=cfg.max_total_tokens, timeout=cfg.timeout)
    svc = ReasoningService(model, tokenizer, name, limits, cfg.max_batch_rows, cfg.max_queued, cfg.store_size,
                           cfg.express_tokens, cfg.express_rows, cfg.express_share)
    app = FastAPI(title="thinkforge", docs_url=None, redoc_url=None)
    app.state.service = svc
    created = int(time.time())

    def openapi():  # the schema names the one model served, so clients and fuzzers reach the real routes
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            bodies = schema["components"]["schemas"]
            for body in ("ChatRequest", "ResponsesRequest"):
                bodies[body]["properties"]["model"]["enum"] = [name]
            for body, field in (("ChatRequest", "max_tokens"), ("ChatRequest", "max_completion_tokens"),
                                ("ResponsesRequest", "max_output_tokens")):  # this server's own limit
                for option in bodies[body]["properties"][field].get("anyOf", []):
                    if option.get("type") == "integer":
                        option["maximum"] = min(cfg.max_tokens_limit, context - 1)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    def error(e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        if first.get("type") == "json_invalid":
            return error(APIError(400, "The request body is not valid JSON."))
        where = ".".join(loc) or "body"
        return error(APIError(400, f"Invalid value for '{where}': {first.get('msg')}", param=".".join(loc) or None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # 404 path, 405 method (keeps its Allow header)
        return error(APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)))

    def check(req):
        if req.model != name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{name}'.",
                           param="model", code="model_not_found")
        if (bad := req.unsupported()) is not None:
            raise APIError(400, f"Unsupported parameter: '{bad}' is not supported by this server.", param=bad,
                           code="unsupported_parameter")

    async def run(start, req, request: Request, streamer):
        """Validate and submit on a worker thread, then serve the job: a JSON body, or an event stream."""
        check(req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def post(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        on_token = (lambda pairs: post(("tokens", pairs))) if req.stream else None
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) <= 16_384:  # tokenizing a small body costs less than a thread hop
            job = start(req, on_token, lambda: post(("done", None)))
        else:  # a large one must not hold the event loop
            job = await run_in_threadpool(start, req, on_token, lambda: post(("done", None)))
        if req.stream:
            return StreamingResponse(stream(job, queue, streamer(svc, job)), media_type="text/event-stream",
                                     headers={"x-request-id": job.id})
        try:
            while True:
                try:
                    kind, _ = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.request.cancel()
                        return JSONResponse(error_body("client disconnected", code="cancelled"), status_code=499)
                    continue
                if kind == "done":
                    break
        finally:
            if not job.request.done.is_set():
                job.request.cancel()  # the client went away (this task was cancelled)
        result = svc.outcome(job)
        body = svc.chat_result(job, result) if job.kind == "chat" else svc.responses_result(job, result)
        return JSONResponse(body, headers={"x-request-id": job.id})

    async def stream(job, queue, s):
        def frame(item):
            if job.kind == "chat":
                return f"data: {json.dumps(item)}\n\n"
            kind, payload = item
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

        texts: dict[int, IncrementalText] = {}
        try:
            for item in s.start():
                yield frame(item)
            while True:
                kind, value = await queue.get()
                if kind == "tokens":
                    new: dict[int, list[int]] = {}
                    for sample, token in value:
                        new.setdefault(sample, []).append(token)
                    for sample, tokens in new.items():
                        text = texts.setdefault(sample, IncrementalText(svc.tok)).add(tokens)
                        for item in s.tokens(sample, text):
                            yield frame(item)
                    continue
                try:
                    items = s.finish(svc.outcome(job))
                except APIError as e:
                    items = s.fail(e)
                for item in items:
                    yield frame(item)
                if job.kind == "chat":
                    yield "data: [DONE]\n\n"
                return
        finally:
            if not job.request.done.is_set():
                job.request.cancel()  # the client disconnected mid-stream

    @app.get("/health", response_class=Response,
             responses={200: {"description": "the loop runs (empty body)"}, **ERRORS})
    async def health():
        """200 while the generation loop runs (a liveness / readiness probe); 503 once it has stopped."""
        if not svc.scheduler.thread.is_alive():
            raise APIError(503, "The generation loop has stopped; this server cannot answer requests.")
        return Response(status_code=200)

    @app.get("/metrics", response_class=Response,
             responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
    async def metrics():
        """Prometheus text format: see ``thinkforge.serve.telemetry``."""
        return Response(svc.metrics.exposition(), media_type=telemetry.CONTENT_TYPE)

    @app.get("/v1/models", responses=ERRORS)
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "thinkforge"}]}

    @app.get("/v1/models/{model_id:path}", responses=ERRORS)
    async def model(model_id: str):
        if model_id != name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{name}'.",
                           param="model", code="model_not_found")
        return {"id": name, "object": "model", "created": created, "owned_by": "thinkforge"}

    streamed = {200: {"description": "the object, or with `stream: true` its server-sent events",
                      "content": {"application/json": {}, "text/event-stream": {}}}}

    @app.post("/v1/responses", responses={**streamed, **ERRORS})
    async def responses(req: ResponsesRequest, request: Request):
        return await run(svc.start_responses, req, request, ResponsesStream)

    # one route for both methods, so that a 405 on this path lists both in its Allow header
    @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"], responses=ERRORS)
    async def response_by_id(response_id: str, request: Request):
        if request.method == "DELETE":
            return svc.delete_response(response_id)
        return svc.stored_response(response_id)

    @app.post("/v1/chat/completions", responses={**streamed, **ERRORS})
    async def chat(req: ChatRequest, request: Request):
        return await run(svc.start_chat, req, request, ChatStream)

    return _Guard(app, cfg.api_key, cfg.max_body_bytes, svc.metrics)


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    app = create_app(cfg)
    print(f"serving '{model_name(cfg)}' on http://{cfg.host}:{cfg.port}/v1")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=cfg.drain_seconds)
