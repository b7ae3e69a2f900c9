"""The serving logic behind the routes: prompts, sampling, splitting thinking from the answer, usage.

- Prompts come from ``format.render_chat`` (thinking dropped from earlier assistant turns, exactly as
  at training time). ``effort`` maps to a thinking budget through ``generation.EFFORT_BUDGETS``;
  ``none`` prefills an empty think block so the model answers at once.
- The visible answer is ``format.parse_completion(text).answer`` — exactly what the grader scores —
  and the raw thinking is never returned as visible text. Responses get a *summary* of it when
  asked: a deterministic extractive summary (``concise``/``auto``: the last line of the thinking;
  ``detailed``: its first, middle and last lines) — documented as such, not a model-written summary.
  Chat Completions return the thinking in ``reasoning_content`` (the vLLM / DeepSeek convention).
- Concurrent requests are batched: a worker runs one engine call at a time over every waiting request
  with the same sampling parameters (up to 64), so load raises throughput instead of queueing time.
- Streaming is real: the engine reports every token, and events are emitted as the text grows.
"""
from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass

from thinkforge import format as fmt
from thinkforge.generation import EFFORT_BUDGETS, Engine, SamplingParams


@dataclass
class Split:
    thinking: str | None  # None: the completion has no think block
    closed: bool  # the thinking ended (always True without a think block)
    visible: str  # the answer text so far: format.parse_completion's answer, what the grader scores


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


@dataclass
class _Job:
    prompt: str
    params: SamplingParams
    on_step: object = None
    result: list | None = None
    error: Exception | None = None

    def __post_init__(self):
        self.done = threading.Event()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ReasoningService:
    def __init__(self, model, tokenizer, model_name: str, default_max_tokens: int = 256, max_batch: int = 64):
        self.tok, self.model_name, self.default_max_tokens = tokenizer, model_name, default_max_tokens
        self.engine = Engine(model, tokenizer)
        self.max_batch = max_batch
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._batch_worker, daemon=True).start()

    # ---- shared ------------------------------------------------------------------------------------

    def prompt(self, messages: list[dict], effort: str | None) -> str:
        text = fmt.render_chat(messages)
        return text + fmt.EMPTY_THINK if effort == "none" else text

    def params(self, max_tokens: int | None, temperature, top_p, effort: str | None, n: int = 1) -> SamplingParams:
        budget = EFFORT_BUDGETS[effort] if effort not in (None, "none") else None
        return SamplingParams(max_new_tokens=max_tokens or self.default_max_tokens,
                              temperature=1.0 if temperature is None else temperature,
                              top_p=1.0 if top_p is None else top_p, n=n, seed=None, thinking_budget=budget)

    def run(self, prompt: str, params: SamplingParams, on_step=None):
        """Completions of one prompt. Concurrent calls with equal sampling parameters share one batch."""
        job = _Job(prompt, params, on_step)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _batch_worker(self) -> None:
        """One engine call at a time: the first waiting job plus every other waiting job with equal
        parameters (up to ``max_batch`` prompts); the rest wait for the next call."""
        while True:
            batch, others = [self.jobs.get()], []
            while len(batch) < self.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                (batch if job.params == batch[0].params else others).append(job)
            for job in others:
                self.jobs.put(job)
            n = batch[0].params.n

            def on_step(rows, batch=batch):
                for row, token in rows:
                    job = batch[row // n]
                    if job.on_step is not None:
                        job.on_step([(row % n, token)])

            try:
                outs = self.engine.generate([j.prompt for j in batch], batch[0].params, on_step)
                for i, job in enumerate(batch):
                    job.result = outs[i * n : (i + 1) * n]
            except Exception as e:  # every waiting request gets the error, none hangs
                for job in batch:
                    job.error = e
            for job in batch:
                job.done.set()

    def stream_tokens(self, prompt: str, params: SamplingParams):
        """Yield ``("token", row, ids_so_far)`` as tokens arrive, then ``("done", completions)``."""
        q: queue.Queue = queue.Queue()

        def work():
            try:
                q.put(("done", self.run(prompt, params, lambda rows: q.put(("step", rows)))))
            except Exception as e:  # surfaced to the client as a failed stream, never a hung one
                q.put(("error", e))

        threading.Thread(target=work, daemon=True).start()
        ids: dict[int, list[int]] = {}
        while True:
            kind, value = q.get()
            if kind == "step":
                for row, token in value:
                    ids.setdefault(row, []).append(token)
                    yield "token", row, ids[row]
            elif kind == "done":
                yield "done", None, value
                return
            else:
                raise value

    def usage_counts(self, c, prefilled: bool = False) -> dict:
        """Token counts; after the empty think block of effort "none" every generated token is answer."""
        return {"input": len(c.prompt_ids), "output": len(c.ids), "reasoning": 0 if prefilled else c.thinking_tokens}

    # ---- Responses ---------------------------------------------------------------------------------

    def responses_messages(self, req) -> list[dict]:
        msgs = [{"role": "system", "content": req.instructions}] if req.instructions else []
        if isinstance(req.input, str):
            return msgs + [{"role": "user", "content": req.input}]
        return msgs + [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.input]

    def response_object(self, req, rid: str, created: int, completion=None, split: Split | None = None,
                        status: str = "in_progress") -> dict:
        """The Response resource; with a completion, its output items and usage."""
        effort = req.reasoning.effort if req.reasoning else None
        summary_mode = req.reasoning.summary if req.reasoning else None
        obj = {
            "id": rid, "object": "response", "created_at": created, "model": req.model, "status": status,
            "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "output": [], "parallel_tool_calls": False,
            "reasoning": {"effort": effort, "summary": summary_mode}, "temperature": req.temperature,
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
        u = self.usage_counts(completion, effort == "none")
        obj["usage"] = {"input_tokens": u["input"], "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": u["output"], "output_tokens_details": {"reasoning_tokens": u["reasoning"]},
                        "total_tokens": u["input"] + u["output"]}
        return obj

    def responses_input(self, req) -> tuple[str, SamplingParams, bool]:
        """(prompt, sampling parameters, prefilled?) of a Responses request: one rule for both the
        plain and the streamed call."""
        effort = req.reasoning.effort if req.reasoning else None
        prompt = self.prompt(self.responses_messages(req), effort)
        return prompt, self.params(req.max_output_tokens, req.temperature, req.top_p, effort), effort == "none"

    def respond(self, req) -> dict:
        prompt, params, prefilled = self.responses_input(req)
        c = self.run(prompt, params)[0]
        return self.response_object(req, new_id("resp"), int(time.time()), c, split_text(c.text, prefilled))

    # ---- Chat Completions --------------------------------------------------------------------------

    def chat_messages(self, req) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]

    def chat_input(self, req) -> tuple[str, SamplingParams, bool]:
        """(prompt, sampling parameters, prefilled?) of a chat request, plain or streamed."""
        prompt = self.prompt(self.chat_messages(req), req.reasoning_effort)
        params = self.params(req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p,
                             req.reasoning_effort, req.n)
        return prompt, params, req.reasoning_effort == "none"

    def chat(self, req) -> dict:
        prompt, params, prefilled = self.chat_input(req)
        comps = self.run(prompt, params)
        choices = []
        for i, c in enumerate(comps):
            sp = split_text(c.text, prefilled)
            choices.append({"index": i, "logprobs": None,
                            "finish_reason": "length" if c.finish_reason == "length" else "stop",
                            "message": {"role": "assistant", "content": sp.visible if sp.closed else "",
                                        "reasoning_content": sp.thinking}})
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": self.chat_usage(comps, prefilled)}

    def chat_usage(self, comps, prefilled: bool = False) -> dict:
        out = sum(len(c.ids) for c in comps)
        reasoning = sum(self.usage_counts(c, prefilled)["reasoning"] for c in comps)
        return {"prompt_tokens": len(comps[0].prompt_ids), "completion_tokens": out,
                "total_tokens": len(comps[0].prompt_ids) + out, "completion_tokens_details": {"reasoning_tokens": reasoning}}
