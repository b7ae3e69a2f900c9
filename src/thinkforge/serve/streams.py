"""Server-sent event sequences, built as the engine emits tokens.

Responses (``stream: true``), as the OpenAI API orders them:
``response.created`` → ``response.in_progress`` → [reasoning item: ``response.output_item.added``,
(when a summary is asked) ``response.reasoning_summary_part.added``,
``response.reasoning_summary_text.delta``/``.done``, ``response.reasoning_summary_part.done``,
``response.output_item.done``] → [message item: ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` …, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``] → ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` ran out). Every event carries ``sequence_number``;
there is no ``[DONE]`` sentinel. The summary is extractive, so it is sent when the thinking ends.

Chat Completions (``stream: true``): ``chat.completion.chunk`` objects with ``delta.reasoning_content``
while the model thinks and ``delta.content`` for the answer, a last chunk per choice with its
``finish_reason``, a usage chunk when ``stream_options.include_usage`` is set, then ``[DONE]``.
"""
from __future__ import annotations

import time

from thinkforge.serve.service import Split, new_id, split_text, summarize


def responses_events(svc, req):
    """Yield (event type, payload) pairs for one streamed Response."""
    summary_mode = req.reasoning.summary if req.reasoning else None
    prompt, params, prefilled = svc.responses_input(req)
    rid, created = new_id("resp"), int(time.time())
    rs_id, msg_id = rid.replace("resp_", "rs_"), rid.replace("resp_", "msg_")
    seq = 0

    def event(kind: str, **payload):
        nonlocal seq
        seq += 1
        return kind, {"type": kind, "sequence_number": seq - 1, **payload}

    yield event("response.created", response=svc.response_object(req, rid, created))
    yield event("response.in_progress", response=svc.response_object(req, rid, created))
    state = {"reasoning_open": False, "reasoning_done": False, "message_open": False, "sent": ""}
    index = {"reasoning": 0, "message": 0}

    def reasoning_item(summary_text=None):
        parts = [{"type": "summary_text", "text": summary_text}] if summary_text else []
        return {"type": "reasoning", "id": rs_id, "summary": parts, "status": "completed" if summary_text is not None else "in_progress"}

    def message_item(text="", status="in_progress"):
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"type": "message", "id": msg_id, "role": "assistant", "status": status, "content": content}

    def advance(sp: Split):
        out = []
        if sp.thinking is not None and not state["reasoning_open"]:
            state["reasoning_open"] = True
            out.append(event("response.output_item.added", output_index=0, item=reasoning_item()))
        if sp.thinking is not None and sp.closed and not state["reasoning_done"]:
            state["reasoning_done"] = True
            text = summarize(sp.thinking, summary_mode)
            if text:
                part = {"type": "summary_text", "text": text}
                common = dict(item_id=rs_id, output_index=0, summary_index=0)
                out += [event("response.reasoning_summary_part.added", part={**part, "text": ""}, **common),
                        event("response.reasoning_summary_text.delta", delta=text, **common),
                        event("response.reasoning_summary_text.done", text=text, **common),
                        event("response.reasoning_summary_part.done", part=part, **common)]
            out.append(event("response.output_item.done", output_index=0, item=reasoning_item(text or "")))
        if sp.closed and sp.visible and not state["message_open"]:
            state["message_open"] = True
            index["message"] = 1 if sp.thinking is not None else 0
            out += [event("response.output_item.added", output_index=index["message"], item=message_item()),
                    event("response.content_part.added", item_id=msg_id, output_index=index["message"],
                          content_index=0, part={"type": "output_text", "text": "", "annotations": []})]
        if state["message_open"] and len(sp.visible) > len(state["sent"]):
            delta = sp.visible[len(state["sent"]):]
            state["sent"] = sp.visible
            out.append(event("response.output_text.delta", item_id=msg_id, output_index=index["message"],
                             content_index=0, delta=delta, logprobs=[]))
        return out

    for kind, _, value in svc.stream_tokens(prompt, params):
        if kind == "token":
            yield from advance(split_text(svc.tok.decode(value), prefilled, partial=True))
            continue
        completion = value[0]
        final = split_text(completion.text, prefilled)
        yield from advance(final)
        if state["message_open"]:
            i = index["message"]
            yield event("response.output_text.done", item_id=msg_id, output_index=i, content_index=0,
                        text=final.visible, logprobs=[])
            yield event("response.content_part.done", item_id=msg_id, output_index=i, content_index=0,
                        part={"type": "output_text", "text": final.visible, "annotations": []})
            yield event("response.output_item.done", output_index=i, item=message_item(final.visible, "completed"))
        response = svc.response_object(req, rid, created, completion, final)
        done = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield event(done, response=response)


def chat_chunks(svc, req, include_usage: bool):
    """Yield chat.completion.chunk dicts for one streamed chat completion (then the caller sends [DONE])."""
    prompt, params, prefilled = svc.chat_input(req)
    cid, created = new_id("chatcmpl"), int(time.time())
    sent: dict[int, dict] = {}

    def chunk(choices, usage=None):
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": choices, **({"usage": usage} if usage is not None else {})}

    def deltas(row: int, sp: Split):
        s = sent.setdefault(row, {"thinking": "", "visible": "", "role": False})
        delta = {}
        if not s["role"]:
            s["role"], delta["role"] = True, "assistant"
        if sp.thinking is not None and len(sp.thinking) > len(s["thinking"]):
            delta["reasoning_content"], s["thinking"] = sp.thinking[len(s["thinking"]):], sp.thinking
        if sp.closed and len(sp.visible) > len(s["visible"]):
            delta["content"], s["visible"] = sp.visible[len(s["visible"]):], sp.visible
        return delta

    for kind, row, value in svc.stream_tokens(prompt, params):
        if kind == "token":
            delta = deltas(row, split_text(svc.tok.decode(value), prefilled, partial=True))
            if delta:
                yield chunk([{"index": row, "delta": delta, "logprobs": None, "finish_reason": None}])
            continue
        for i, c in enumerate(value):
            delta = deltas(i, split_text(c.text, prefilled))
            reason = "length" if c.finish_reason == "length" else "stop"
            yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}])
        if include_usage:
            yield chunk([], usage=svc.chat_usage(value, prefilled))
