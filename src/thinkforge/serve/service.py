"""The serving logic behind the routes: validation and limits per request, prompts, results, the response store.

- Every request is validated and tokenized on its own, before it joins the running batch: a request
  that cannot be served gets its own OpenAI-shaped error (:class:`APIError`), the others never see it.
- Prompts come from ``format.ChatFormat``: the model's own chat template (thinking dropped from earlier
  assistant turns, exactly as at training time, unless ``reasoning.context = "all_turns"``). Message text is tokenized with the
  tokenizer's special tokens *split*: ``<|im_end|>`` typed by a user is text, never a control token.
- Limits: prompt + max_tokens within the model's context (400 ``context_length_exceeded``), max_tokens
  and n × max_tokens capped, queued requests capped (429), a deadline per request (504).
- ``effort`` maps to a thinking budget through ``generation.EFFORT_BUDGETS``; ``none`` prefills an empty
  think block so the model answers at once.
- The visible answer is ``format.parse_completion(text).answer`` — exactly what the grader scores — and
  the raw thinking is never returned as visible text. Responses get a *summary* of it when asked: a
  deterministic extractive summary (``concise``/``auto``: the last line of the thinking; ``detailed``:
  its first, middle and last lines) — documented as such, not a model-written summary. Chat Completions
  return the thinking in ``reasoning_content`` (the vLLM / DeepSeek convention).
- Responses are kept in a bounded store (``store: false`` opts out) so ``previous_response_id`` and
  reasoning items passed back by id work; an unknown id is a 404, as OpenAI answers.
- Generation runs on ``generation.scheduler.Scheduler``: continuous batching, any mix of parameters.
"""
from __future__ import annotations

import collections
import functools
import itertools
import re
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

from thinkforge import format as fmt
from thinkforge.generation import EFFORT_BUDGETS, Engine, SamplingParams
from thinkforge.generation.scheduler import Cancelled, DeadlineExceeded, QueueFull, Request, Scheduler
from thinkforge.serve.telemetry import ServerMetrics


class APIError(Exception):
    """An error for one request, shaped as OpenAI's (``{"error": {message, type, param, code}}``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}
        self.type = type_ or {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error")


@dataclass
class Limits:
    context: int  # the model's context in tokens (prompt + completion)
    default_max_tokens: int = 256  # when a request sets none (further capped by what the context leaves)
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    max_total_tokens: int = 16384  # n × max_tokens
    timeout: float = 300.0  # seconds from arrival to the last token


def model_context(model) -> int:
    """The model's context in tokens (2048 when its config does not say)."""
    return getattr(model.config, "max_position_embeddings", None) or 2048


@dataclass
class Split:
    thinking: str | None  # None: the completion has no think block
    closed: bool  # the thinking ended (always True without a think block)
    visible: str  # the answer text: format.parse_completion's answer, what the grader scores


def split_text(text: str, prefilled: bool = False, partial: bool = False) -> Split:
    """The shown parts of a completion (``partial``: still streaming), from the one parser in ``format``;
    ``prefilled``: an empty think block was forced before it (effort "none"), parsed as part of the text."""
    p = fmt.parse_completion(fmt.EMPTY_THINK + text if prefilled else text, partial=partial)
    return Split(None if prefilled else p.thinking, p.thinking_closed, p.answer)


def summarize(thinking: str | None, mode: str | None) -> str | None:
    """Extractive summary of the thinking (see the module docstring); None when not asked or empty."""
    lines = [x.strip() for x in (thinking or "").splitlines() if x.strip()]
    if mode is None or not lines:
        return None
    if mode == "detailed":
        picked = [lines[0], lines[len(lines) // 2], lines[-1]]
        return "\n".join(dict.fromkeys(picked))  # keeps order, drops repeats
    return lines[-1]


_ID_BASE, _ID_COUNT = uuid.uuid4().hex[:12], itertools.count()


def new_id(prefix: str) -> str:
    """Unique per process run: a random base (per start) and a counter (a uuid4 per request cost ~3% of
    a request's server time under load)."""
    return f"{prefix}_{_ID_BASE}{next(_ID_COUNT):012x}"


@dataclass(eq=False)
class Job:
    """One accepted request: what the routes need to wait on it and to shape its result."""

    kind: str  # "chat" | "responses"
    body: object  # the validated ChatRequest / ResponsesRequest
    id: str
    created: int
    prompt_ids: list[int]
    params: SamplingParams
    prefilled: bool
    request: Request | None = None
    conversation: list[dict] = field(default_factory=list)  # Responses: the turns before this answer
    context_mode: str = "current_turn"


def service_tier(job: Job) -> str | None:
    """The tier that served it, as OpenAI reports it: "priority" in the express batch, "default" in the main
    one; None before it joins a batch (a stream's first Responses events)."""
    batch = job.request.batch if job.request is not None else None
    return None if batch is None else "priority" if batch == "express" else "default"


def _check_text(where: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raise APIError(400, f"Invalid value for '{where}': it contains U+{ord(bad):04X}, a lone surrogate, which is "
                            "not valid Unicode text.", param=where) from None


class ReasoningService:
    def __init__(self, model, tokenizer, model_name: str, limits: Limits | None = None, max_rows: int = 64,
                 max_waiting: int = 256, store_size: int = 1000, express_tokens: int = 0, express_rows: int = 8,
                 express_share: float = 0.5):
        self.tok, self.model_name = tokenizer, model_name
        self.limits = limits or Limits(context=model_context(model))
        self.engine = Engine(model, tokenizer)
        self.scheduler = Scheduler(self.engine, max_rows=max_rows, max_waiting=max_waiting,
                                   express_tokens=express_tokens, express_rows=express_rows,
                                   express_share=express_share)
        self.metrics = ServerMetrics(self.scheduler)
        self.scheduler.on_end = self.metrics.request_ended
        self.store: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.store_size = store_size
        self.lock = threading.Lock()

    # ---- prompts --------------------------------------------------------------------------------------

    def encode(self, messages: list[dict], effort: str | None, keep_thinking: bool = False) -> list[int]:
        """Token ids of the chat prompt in the model's own template (``format.ChatFormat``). The template's own
        text is tokenized with special tokens; message text with them split, so text can never close a turn or
        open a think block. Each message is rendered as a placeholder and the template's text around it kept;
        a template that rewrites message text in ways this cannot follow (beyond trimming it) is rendered whole,
        and then text holding one of the tokenizer's special tokens is refused."""
        chat, nonce = self.engine.chat, uuid.uuid4().hex
        contents = [m["content"] for m in chat.history(messages, keep_thinking)]
        marks = [{"role": m["role"], "content": f"\ue000{nonce}{i}\ue001"} for i, m in enumerate(messages)]
        thinking = effort != "none"
        pieces = re.split(f"\ue000{nonce}(\\d+)\ue001", chat.render(marks, keep_thinking=True, thinking=thinking))
        if chat.template is not None:
            whole = chat.render([{**m, "content": c} for m, c in zip(messages, contents)], keep_thinking=True,
                                thinking=thinking)
            join = lambda cs: "".join(cs[int(p)] if k % 2 else p for k, p in enumerate(pieces))  # noqa: E731
            if join(contents) != whole:
                contents = [c.strip() for c in contents]  # templates that trim (Llama 3's "| trim")
                if join(contents) != whole:
                    return self._encode_whole(whole, messages)
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                ids += self.tok.encode(contents[int(piece)], add_special_tokens=False, split_special_tokens=True)
            elif piece:
                ids += self._template_ids(piece)
        return ids

    def _encode_whole(self, text: str, messages: list[dict]) -> list[int]:
        for i, m in enumerate(messages):
            bad = next((t for t in self.tok.all_special_tokens if t and t in m["content"]), None)
            if bad is not None:
                raise APIError(400, f"Invalid value for 'messages[{i}].content': it contains {bad!r}, one of this "
                                    "model's control tokens, which its chat template would read as one.",
                               param=f"messages[{i}].content")
        return self.tok.encode(text, add_special_tokens=False)

    @functools.lru_cache(maxsize=256)
    def _template_ids(self, piece: str) -> tuple[int, ...]:
        """The template's own text between messages (a handful of distinct strings), tokenized once."""
        return tuple(self.tok.encode(piece, add_special_tokens=False))

    def check_cap(self, field: str, max_tokens: int) -> None:
        """The server's cap on a request's max_tokens (whatever the field is called)."""
        if max_tokens > self.limits.max_tokens:
            raise APIError(400, f"Invalid value for '{field}': {max_tokens} is more than this server's limit of "
                                f"{self.limits.max_tokens} tokens.", param=field)

    def params(self, prompt_len: int, max_tokens: int | None, temperature, top_p, effort: str | None, n: int = 1,
               seed: int | None = None, param: str = "max_tokens") -> SamplingParams:
        """Sampling parameters within the limits; raises :class:`APIError` naming what is over."""
        lim = self.limits
        if prompt_len >= lim.context:
            raise APIError(400, f"This model's maximum context length is {lim.context} tokens. However, your "
                                f"messages resulted in {prompt_len} tokens. Please reduce the length of the messages.",
                           param="messages", code="context_length_exceeded")
        if max_tokens is not None:
            self.check_cap(param, max_tokens)
            if prompt_len + max_tokens > lim.context:
                raise APIError(400, f"This model's maximum context length is {lim.context} tokens. However, you "
                                    f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
                                    f"{max_tokens} in the completion). Please reduce the length of the messages or "
                                    "completion.", param=param, code="context_length_exceeded")
        new = max_tokens or min(lim.default_max_tokens, lim.max_tokens, lim.context - prompt_len)
        if n * new > lim.max_total_tokens:
            raise APIError(400, f"Invalid value for 'n': n × {param} = {n} × {new} = {n * new} tokens is more than "
                                f"this server's limit of {lim.max_total_tokens}.", param="n")
        budget = EFFORT_BUDGETS[effort] if effort not in (None, "none") else None
        return SamplingParams(max_new_tokens=new, temperature=1.0 if temperature is None else temperature,
                              top_p=1.0 if top_p is None else top_p, n=n, seed=seed, thinking_budget=budget)

    def submit(self, job: Job, on_token=None, on_done=None, stop_text=None) -> Job:
        deadline = time.monotonic() + self.limits.timeout
        try:
            job.request = self.scheduler.submit(job.prompt_ids, job.params, on_token, deadline, stop_text, on_done,
                                                priority=job.body.service_tier == "priority")
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}); retry shortly.", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        return job

    def outcome(self, job: Job):
        """The completions of a finished job, or the :class:`APIError` its failure maps to."""
        err = job.request.error
        if err is None:
            return job.request.result
        if isinstance(err, DeadlineExceeded):
            raise APIError(504, f"The request ran past this server's limit of {self.limits.timeout:g} s.", code="timeout")
        if isinstance(err, Cancelled):
            raise APIError(499, "The request was cancelled.", code="cancelled")
        print(f"request {job.id} failed:\n{''.join(traceback.format_exception(err))}", file=sys.stderr)
        raise APIError(500, f"The server had an error while processing your request (request id {job.id}).",
                       code="server_error")

    def usage_counts(self, c, split: Split) -> dict:
        """Token counts; reasoning tokens are those of the thinking the parser found (0 when it found none)."""
        return {"input": len(c.prompt_ids), "output": len(c.ids), "reasoning": 0 if split.thinking is None else c.thinking_tokens}

    # ---- Responses ------------------------------------------------------------------------------------

    def start_responses(self, req, on_token=None, on_done=None) -> Job:
        effort = req.reasoning.effort if req.reasoning else None
        mode = (req.reasoning.context if req.reasoning else None) or "auto"
        keep = mode == "all_turns"
        conversation = self.responses_conversation(req, keep)
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        if req.instructions:
            _check_text("instructions", req.instructions)
        ids = self.encode(system + conversation, effort, keep)
        params = self.params(len(ids), req.max_output_tokens, req.temperature, req.top_p, effort, param="max_output_tokens")
        job = Job("responses", req, new_id("resp"), int(time.time()), ids, params, effort == "none",
                  conversation=conversation, context_mode="all_turns" if keep else "current_turn")
        return self.submit(job, on_token, on_done)

    def responses_conversation(self, req, keep_thinking: bool) -> list[dict]:
        """The turns of a Responses request: the stored conversation of ``previous_response_id``, then
        ``input``, where a reasoning item's text goes into the think block of the assistant turn after it."""
        turns: list[dict] = []
        if req.previous_response_id is not None:
            with self.lock:
                prev = self.store.get(req.previous_response_id)
            if prev is None:
                raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found.",
                               param="previous_response_id", code="previous_response_not_found")
            turns = [dict(t) for t in prev["conversation"]]
        if isinstance(req.input, str):
            _check_text("input", req.input)
            return turns + [{"role": "user", "content": req.input}]
        thinking = None
        for i, item in enumerate(req.input):
            if item.type == "reasoning":
                thinking = self.reasoning_text(item)
                _check_text(f"input[{i}]", thinking)
                continue
            text = item.text()
            _check_text(f"input[{i}].content", text)
            role = "system" if item.role == "developer" else item.role
            if role == "assistant" and thinking is not None and keep_thinking:
                text = f"{fmt.THINK_OPEN}\n{thinking}\n{fmt.THINK_CLOSE}\n{text}"
            thinking = None
            turns.append({"role": role, "content": text})
        return turns

    def reasoning_text(self, item) -> str:
        """A reasoning item's text: the raw thinking when this server stored it, else what the item carries."""
        if item.id:
            with self.lock:
                stored = self.store.get(item.id.replace("rs_", "resp_", 1))
            if stored is not None and stored.get("thinking") is not None:
                return stored["thinking"]
        if item.content:
            return "\n".join(p.text for p in item.content)
        return "\n".join(p.text for p in item.summary)

    def response_object(self, job: Job, completion=None, split: Split | None = None, status: str = "in_progress") -> dict:
        """The Response resource; with a completion, its output items and usage."""
        req, rid = job.body, job.id
        effort = req.reasoning.effort if req.reasoning else None
        summary_mode = (req.reasoning.summary or req.reasoning.generate_summary) if req.reasoning else None
        obj = {
            "id": rid, "object": "response", "created_at": job.created, "model": req.model, "status": status,
            "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "output": [], "parallel_tool_calls": False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": effort, "summary": summary_mode, "context": job.context_mode},
            "service_tier": service_tier(job), "store": req.store, "temperature": req.temperature,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": req.top_p,
            "usage": None,
        }
        if completion is None:
            return obj
        if split.thinking is not None:
            text = summarize(split.thinking, summary_mode)
            obj["output"].append({"type": "reasoning", "id": rid.replace("resp_", "rs_"), "status": "completed",
                                  "summary": [{"type": "summary_text", "text": text}] if text else []})
        if split.closed:
            obj["output"].append({
                "type": "message", "id": rid.replace("resp_", "msg_"), "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": split.visible, "annotations": []}]})
        if completion.finish_reason == "length":
            obj["status"], obj["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        else:
            obj["status"] = "completed"
        u = self.usage_counts(completion, split)
        obj["usage"] = {"input_tokens": u["input"], "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": u["output"], "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
                        "total_tokens": u["input"] + u["output"]}
        return obj

    def responses_result(self, job: Job, completions) -> dict:
        c = completions[0]
        split = split_text(c.text, job.prefilled)
        obj = self.response_object(job, c, split)
        if job.body.store:
            answer = split.visible if split.closed else ""
            content = answer if split.thinking is None else f"{fmt.THINK_OPEN}\n{split.thinking}\n{fmt.THINK_CLOSE}\n{answer}"
            with self.lock:
                self.store[job.id] = {"response": obj, "thinking": split.thinking,
                                      "conversation": job.conversation + [{"role": "assistant", "content": content}]}
                while len(self.store) > self.store_size:
                    self.store.popitem(last=False)
        return obj

    def _stored(self, rid: str, drop: bool = False) -> dict:
        """The store's entry for ``rid`` (taken out of the store with ``drop``); a 404 when there is none."""
        with self.lock:
            entry = self.store.pop(rid, None) if drop else self.store.get(rid)
        if entry is None:
            raise APIError(404, f"Response with id '{rid}' not found.", param="response_id", code="response_not_found")
        return entry

    def stored_response(self, rid: str) -> dict:
        return self._stored(rid)["response"]

    def delete_response(self, rid: str) -> dict:
        """Drop a stored response (``DELETE /v1/responses/{id}``): it can no longer be retrieved or continued."""
        self._stored(rid, drop=True)
        return {"id": rid, "object": "response", "deleted": True}

    # ---- Chat Completions -----------------------------------------------------------------------------

    def start_chat(self, req, on_token=None, on_done=None) -> Job:
        messages = []
        for i, m in enumerate(req.messages):
            text = m.text()
            _check_text(f"messages[{i}].content", text)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        for s in req.stop or []:
            _check_text("stop", s)
        ids = self.encode(messages, req.reasoning_effort)
        for name in ("max_tokens", "max_completion_tokens"):  # both checked, though the newer one wins
            value = getattr(req, name)
            if value is not None:
                self.check_cap(name, value)
            if value is not None and value >= self.limits.context:
                raise APIError(400, f"This model's maximum context length is {self.limits.context} tokens; '{name}' "
                                    f"asks for {value}.", param=name, code="context_length_exceeded")
        which = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        params = self.params(len(ids), req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p,
                             req.reasoning_effort, req.n, req.seed, param=which)
        job = Job("chat", req, new_id("chatcmpl"), int(time.time()), ids, params, req.reasoning_effort == "none")
        return self.submit(job, on_token, on_done, req.stop)

    def chat_choice(self, job: Job, i: int, c) -> dict:
        sp = split_text(c.text, job.prefilled)
        choice = {"index": i, "finish_reason": "length" if c.finish_reason == "length" else "stop",
                  "message": {"role": "assistant", "content": sp.visible if sp.closed else "",
                              "reasoning_content": sp.thinking},
                  "logprobs": self.logprobs(c) if job.body.logprobs else None}
        return choice

    def logprobs(self, c) -> dict:
        """Per generated token (the stop token excluded): its text, logprob and UTF-8 bytes."""
        n = len(c.ids) - (1 if c.finish_reason in ("stop", "budget") and c.ids else 0)
        out = []
        for t, lp in zip(c.ids[:n], c.logprobs[:n]):
            text = self.tok.decode([t])
            out.append({"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "replace")), "top_logprobs": []})
        return {"content": out, "refusal": None}

    def chat_result(self, job: Job, completions) -> dict:
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.body.model,
                "service_tier": service_tier(job), "choices": [self.chat_choice(job, i, c) for i, c in enumerate(completions)],
                "usage": self.chat_usage(job, completions)}

    def chat_usage(self, job: Job, comps) -> dict:
        out = sum(len(c.ids) for c in comps)
        reasoning = sum(self.usage_counts(c, split_text(c.text, job.prefilled))["reasoning"] for c in comps)
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": out,
                "total_tokens": len(job.prompt_ids) + out, "completion_tokens_details": {"reasoning_tokens": reasoning}}
