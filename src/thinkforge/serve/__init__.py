"""An OpenAI-compatible HTTP server for a model trained (or loaded) by thinkforge.

    thinkforge serve --model runs/demo/grpo/model [--host 127.0.0.1 --port 8000 --api-key KEY]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    r = client.responses.create(model="grpo", input="347*89", reasoning={"effort": "low", "summary": "auto"})
    r.output_text, r.usage.output_tokens_details.reasoning_tokens

Endpoints: ``POST /v1/responses`` (Responses API: ``reasoning.effort`` / ``reasoning.summary``,
``max_output_tokens`` over reasoning + answer, ``status: "incomplete"``, streaming), ``POST
/v1/chat/completions`` (``reasoning_content``, ``reasoning_effort``, ``n``, streaming) and ``GET
/v1/models``. ``create_app(settings)`` builds the app, so tests drive it in-process or on 127.0.0.1.
Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``) with 4xx codes.
"""

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
    max_body_bytes: int = option(1_000_000, "larger request bodies are refused with 413")
    device: str = option("auto", "auto, cpu or cuda")

    def __post_init__(self):
        check(0 < self.port < 65536 and self.max_tokens >= 1 and self.max_body_bytes >= 1,
              "need 0 < port < 65536, max_tokens >= 1, max_body_bytes >= 1")


def model_name(cfg: ServeConfig) -> str:
    p = Path(cfg.model)
    return cfg.name or (p.parent.name if p.name == "model" else p.name)


def create_app(cfg: ServeConfig, model=None, tokenizer=None):
    """The FastAPI app; ``model``/``tokenizer`` may be passed in (tests), else loaded from ``cfg.model``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from thinkforge.serve.protocol import ChatRequest, ResponsesRequest, error_body
    from thinkforge.serve.service import ReasoningService
    from thinkforge.serve.streams import chat_chunks, responses_events

    if model is None:
        from thinkforge.models import load_model

        model, tokenizer = load_model(cfg.model, device=cfg.device)
    name = model_name(cfg)
    svc = ReasoningService(model, tokenizer, name, cfg.max_tokens)
    app = FastAPI(title="thinkforge", docs_url=None, redoc_url=None)
    created = int(time.time())

    def error(status: int, message: str, param: str | None = None, code: str | None = None, type_=None):
        kind = type_ or ("authentication_error" if status == 401 else "invalid_request_error")
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if cfg.api_key and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            return error(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            return error(413, f"Request body of {size} bytes exceeds the limit of {cfg.max_body_bytes}.")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        if first.get("type") == "json_invalid":
            return error(400, "The request body is not valid JSON.")
        return error(400, f"Invalid value for '{'.'.join(loc) or 'body'}': {first.get('msg')}", param=".".join(loc) or None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    def check_model(requested: str):
        if requested != name:
            return error(404, f"The model '{requested}' does not exist; this server serves '{name}'.",
                         param="model", code="model_not_found")
        return None

    def sse(pairs):
        for kind, payload in pairs:
            yield f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def sse_chat(chunks):
        for c in chunks:
            yield f"data: {json.dumps(c)}\n\n"
        yield "data: [DONE]\n\n"

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "thinkforge"}]}

    @app.post("/v1/responses")
    def responses(req: ResponsesRequest):
        if (bad := check_model(req.model)) is not None:
            return bad
        if req.stream:
            return StreamingResponse(sse(responses_events(svc, req)), media_type="text/event-stream")
        return svc.respond(req)

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        if (bad := check_model(req.model)) is not None:
            return bad
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(sse_chat(chat_chunks(svc, req, usage)), media_type="text/event-stream")
        return svc.chat(req)

    return app


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    app = create_app(cfg)
    print(f"serving '{model_name(cfg)}' on http://{cfg.host}:{cfg.port}/v1")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
