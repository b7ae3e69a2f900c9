"""Server-sent event sequences, built as the scheduler emits tokens.

A streamer is fed the decoded text of each sample as it grows (``tokens``), then the finished
completions (``finish``) or the request's error (``fail``); each call returns the events to send.

Faithful by construction: the concatenated deltas equal the final text, always. Thinking is streamed
token by token (a partial parse's thinking only ever grows: the parser holds back a partial tag). The
answer is sent when the completion ends: the grader's answer is the *last* ``<answer>`` block after the
thinking, so text the model writes before a late ``<answer>`` is not part of it, and no prefix of the
answer is certain until the completion is done. For a reasoning model the thinking is the long part.

Responses (``stream: true``), as the OpenAI API orders them:
``response.created`` → ``response.in_progress`` → [reasoning item: ``response.output_item.added``,
(when a summary is asked) ``response.reasoning_summary_part.added``,
``response.reasoning_summary_text.delta``/``.done``, ``response.reasoning_summary_part.done``,
``response.output_item.done``] → [message item: ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta``, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``] → ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` ran out). Every added item is done, and the items are
exactly those of the non-streamed response. Every event carries ``sequence_number``; there is no
``[DONE]`` sentinel. A request that fails ends with ``response.failed`` and an ``error`` event.

Chat Completions (``stream: true``): ``chat.completion.chunk`` objects with ``delta.reasoning_content``
while the model thinks and ``delta.content`` for the answer, a last chunk per choice with its
``finish_reason``, a usage chunk when ``stream_options.include_usage`` is set, then ``[DONE]``; a request
that fails sends ``{"error": …}`` instead (the openai client raises it).
"""
from __future__ import annotations

from thinkforge.serve.service import APIError, Job, ReasoningService, Split, service_tier, split_text, summarize


class IncrementalText:
    """A sample's decoded text as its tokens arrive, in constant work per token (not a decode of the whole
    sequence each time, which made a long stream O(length²)): each step decodes only the tokens since the
    last emitted boundary, with the token before it as context (how byte-level BPE and SentencePiece
    detokenizers know whether a piece starts with a space), and emits the part past that context. Text
    ending in an incomplete UTF-8 character (U+FFFD) is held back until the character completes. Where a
    tokenizer's decoding of the window disagrees with its decoding of the context (it rewrote earlier
    text), the whole sequence is decoded once and the window starts again from there."""

    def __init__(self, tok):
        self.tok, self.ids, self.text = tok, [], ""
        self.prefix = self.read = 0  # ids[prefix:read]: the context already in text; ids[read:]: not yet

    def add(self, tokens: list[int]) -> str:
        self.ids += tokens
        context = self.tok.decode(self.ids[self.prefix : self.read])
        window = self.tok.decode(self.ids[self.prefix :])
        if not window.startswith(context):  # the tokenizer rewrote the context: decode it all once
            whole = self.tok.decode(self.ids)
            if not whole.endswith("\ufffd"):
                self.text, self.prefix, self.read = whole, max(0, len(self.ids) - 1), len(self.ids)
            return self.text
        if len(window) > len(context) and not window.endswith("\ufffd"):
            self.text += window[len(context) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text


class ResponsesStream:
    def __init__(self, svc: ReasoningService, job: Job):
        self.svc, self.job = svc, job
        req = job.body
        self.summary_mode = (req.reasoning.summary or req.reasoning.generate_summary) if req.reasoning else None
        self.rs_id, self.msg_id = job.id.replace("resp_", "rs_"), job.id.replace("resp_", "msg_")
        self.seq = 0
        self.reasoning_open = self.reasoning_done = False

    def event(self, kind: str, **payload) -> tuple[str, dict]:
        self.seq += 1
        return kind, {"type": kind, "sequence_number": self.seq - 1, **payload}

    def start(self) -> list:
        return [self.event("response.created", response=self.svc.response_object(self.job)),
                self.event("response.in_progress", response=self.svc.response_object(self.job))]

    def _reasoning_item(self, summary: str | None, done: bool) -> dict:
        parts = [{"type": "summary_text", "text": summary}] if summary else []
        return {"type": "reasoning", "id": self.rs_id, "summary": parts, "status": "completed" if done else "in_progress"}

    def _reasoning(self, sp: Split) -> list:
        out = []
        if sp.thinking is not None and not self.reasoning_open:
            self.reasoning_open = True
            out.append(self.event("response.output_item.added", output_index=0, item=self._reasoning_item(None, False)))
        if self.reasoning_open and sp.closed and not self.reasoning_done:
            self.reasoning_done = True
            text = summarize(sp.thinking, self.summary_mode)
            if text:
                part = {"type": "summary_text", "text": text}
                common = dict(item_id=self.rs_id, output_index=0, summary_index=0)
                out += [self.event("response.reasoning_summary_part.added", part={**part, "text": ""}, **common),
                        self.event("response.reasoning_summary_text.delta", delta=text, **common),
                        self.event("response.reasoning_summary_text.done", text=text, **common),
                        self.event("response.reasoning_summary_part.done", part=part, **common)]
            out.append(self.event("response.output_item.done", output_index=0, item=self._reasoning_item(text, True)))
        return out

    def tokens(self, sample: int, text: str) -> list:
        return self._reasoning(split_text(text, self.job.prefilled, partial=True))

    def finish(self, completions) -> list:
        c = completions[0]
        final = split_text(c.text, self.job.prefilled)
        out = self._reasoning(final)
        if self.reasoning_open and not self.reasoning_done:  # thinking cut by max_output_tokens: close the item
            self.reasoning_done = True
            out.append(self.event("response.output_item.done", output_index=0,
                                  item=self._reasoning_item(summarize(final.thinking, self.summary_mode), True)))
        if final.closed:
            i = 1 if final.thinking is not None else 0
            part = {"type": "output_text", "text": final.visible, "annotations": []}
            ids = dict(item_id=self.msg_id, output_index=i, content_index=0)
            out += [self.event("response.output_item.added", output_index=i,
                               item={"type": "message", "id": self.msg_id, "role": "assistant", "status": "in_progress",
                                     "content": []}),
                    self.event("response.content_part.added", part={**part, "text": ""}, **ids)]
            if final.visible:
                out.append(self.event("response.output_text.delta", delta=final.visible, logprobs=[], **ids))
            out += [self.event("response.output_text.done", text=final.visible, logprobs=[], **ids),
                    self.event("response.content_part.done", part=part, **ids),
                    self.event("response.output_item.done", output_index=i,
                               item={"type": "message", "id": self.msg_id, "role": "assistant", "status": "completed",
                                     "content": [part]})]
        response = self.svc.responses_result(self.job, completions)
        done = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return out + [self.event(done, response=response)]

    def fail(self, err: APIError) -> list:
        response = self.svc.response_object(self.job, status="failed")
        response["error"] = {"code": err.code or err.type, "message": err.message}
        error = {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
        return [self.event("response.failed", response=response),
                self.event("error", code=err.code, message=err.message, param=err.param, error=error)]


class ChatStream:
    def __init__(self, svc: ReasoningService, job: Job):
        self.svc, self.job = svc, job
        self.include_usage = bool((job.body.stream_options or {}).get("include_usage"))
        self.sent: dict[int, str] = {}  # sample -> thinking sent so far

    def chunk(self, choices: list, usage: dict | None = None) -> dict:
        return {"id": self.job.id, "object": "chat.completion.chunk", "created": self.job.created,
                "model": self.job.body.model, "service_tier": service_tier(self.job), "choices": choices,
                **({"usage": usage} if usage is not None else {})}

    def start(self) -> list:
        return []

    def _delta(self, sample: int, sp: Split, final: bool) -> dict:
        delta = {}
        if sample not in self.sent:
            self.sent[sample], delta["role"] = "", "assistant"
        sent, thinking = self.sent[sample], sp.thinking or ""
        if len(thinking) > len(sent) and thinking.startswith(sent):
            delta["reasoning_content"], self.sent[sample] = thinking[len(sent):], thinking
        if final and sp.closed and sp.visible:
            delta["content"] = sp.visible
        return delta

    def tokens(self, sample: int, text: str) -> list:
        delta = self._delta(sample, split_text(text, self.job.prefilled, partial=True), False)
        return [self.chunk([{"index": sample, "delta": delta, "logprobs": None, "finish_reason": None}])] if delta else []

    def finish(self, completions) -> list:
        out = []
        for i, c in enumerate(completions):
            delta = self._delta(i, split_text(c.text, self.job.prefilled), True)
            reason = "length" if c.finish_reason == "length" else "stop"
            logprobs = self.svc.logprobs(c) if self.job.body.logprobs else None  # every token's, with the last chunk
            out.append(self.chunk([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]))
        if self.include_usage:
            out.append(self.chunk([], usage=self.svc.chat_usage(self.job, completions)))
        return out

    def fail(self, err: APIError) -> list:
        return [{"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}]
