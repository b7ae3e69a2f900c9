"""The server, driven through the official openai client against uvicorn on 127.0.0.1."""
import json
import threading
import time

import httpx
import openai
import pytest
from serve_helpers import SEED_PROMPT, free_port, running_server

from thinkforge.format import render_chat
from thinkforge.generation import EFFORT_BUDGETS
from thinkforge.serve.service import split_text, summarize


@pytest.fixture(scope="module")
def server(syllogism_model):
    model, tok, _ = syllogism_model
    with running_server(model, tok, name="syl", api_key="sekret", max_tokens=96, max_body_bytes=20_000) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="sekret", max_retries=0, timeout=60)


def test_seed_snippet_runs_unchanged(client):
    completion = client.chat.completions.create(model="syl", messages=[{"role": "user", "content": SEED_PROMPT}])
    msg = completion.choices[0].message
    assert isinstance(msg.content, str) and completion.choices[0].finish_reason in ("stop", "length")
    assert isinstance(msg.reasoning_content, str) and "<think>" not in msg.content
    u = completion.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 < u.completion_tokens_details.reasoning_tokens <= u.completion_tokens


@pytest.mark.parametrize("effort", list(EFFORT_BUDGETS))
def test_responses_each_effort(client, effort):
    r = client.responses.create(model="syl", input=SEED_PROMPT, reasoning={"effort": effort}, temperature=0)
    assert r.status in ("completed", "incomplete") and r.object == "response" and r.id.startswith("resp_")
    u = r.usage
    assert u.total_tokens == u.input_tokens + u.output_tokens
    reasoning = u.output_tokens_details.reasoning_tokens
    if effort == "none":
        assert reasoning == 0 and [o.type for o in r.output] == ["message"]
    elif EFFORT_BUDGETS[effort] is not None:
        assert reasoning <= EFFORT_BUDGETS[effort] + 3  # <think>, the budget, then the forced "\n</think>"
    if r.status == "completed":
        assert isinstance(r.output_text, str) and "<answer>" not in r.output_text


def test_summary_is_the_documented_extract(client):
    chat = client.chat.completions.create(model="syl", messages=[{"role": "user", "content": SEED_PROMPT}], temperature=0)
    thinking = chat.choices[0].message.reasoning_content
    for mode in ("concise", "detailed"):
        r = client.responses.create(model="syl", input=SEED_PROMPT, temperature=0, reasoning={"effort": "high", "summary": mode})
        item = next(o for o in r.output if o.type == "reasoning")
        assert item.summary[0].text == summarize(thinking, mode)
        assert not getattr(item, "content", None)  # the raw thinking is not returned
        assert r.output_text == chat.choices[0].message.content  # same greedy completion


def test_incomplete_when_max_output_tokens_runs_out_during_reasoning(client):
    r = client.responses.create(model="syl", input=SEED_PROMPT, max_output_tokens=3, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "" and [o.type for o in r.output] == ["reasoning"]
    assert r.usage.output_tokens == 3


def test_responses_streaming(client):
    full = client.responses.create(model="syl", input=SEED_PROMPT, temperature=0, reasoning={"summary": "auto"})
    events = list(client.responses.create(model="syl", input=SEED_PROMPT, temperature=0, stream=True,
                                          reasoning={"summary": "auto"}))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "response.reasoning_summary_text.delta" in types and "response.output_text.done" in types
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == full.output_text == events[-1].response.output_text
    with client.responses.stream(model="syl", input=SEED_PROMPT, temperature=0) as stream:  # the SDK's helper
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == full.output_text and final.usage.total_tokens == full.usage.total_tokens


def test_chat_completions_n_length_and_streaming(client):
    msgs = [{"role": "user", "content": SEED_PROMPT}]
    r = client.chat.completions.create(model="syl", messages=msgs, n=3, max_completion_tokens=5, reasoning_effort="low")
    assert len(r.choices) == 3 and {c.finish_reason for c in r.choices} == {"length"}
    assert r.usage.completion_tokens == 15
    full = client.chat.completions.create(model="syl", messages=msgs, temperature=0)
    chunks = list(client.chat.completions.create(model="syl", messages=msgs, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    thinking = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content and thinking == full.choices[0].message.reasoning_content
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_earlier_thinking_is_dropped_from_the_history():
    msgs = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "<think>\nSECRET\n</think>\n<answer>yes</answer>"},
            {"role": "user", "content": "b?"}]
    assert "SECRET" not in render_chat(msgs) and "<answer>yes</answer>" in render_chat(msgs)


def test_models_and_concurrency(client):
    assert [m.id for m in client.models.list().data] == ["syl"]
    results, errors = [], []

    def ask():
        try:
            results.append(client.chat.completions.create(model="syl", messages=[{"role": "user", "content": SEED_PROMPT}],
                                                          max_tokens=20))
        except Exception as e:  # collected: the assertion below names any
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 8


@pytest.mark.parametrize(
    "call,status,needle",
    [
        (lambda c: c.responses.create(model="nope", input="x"), 404, "does not exist"),
        (lambda c: c.responses.create(model="syl", input="x", reasoning={"effort": "extreme"}), 400, "reasoning.effort"),
        (lambda c: c.responses.create(model="syl", input="x", max_output_tokens=0), 400, "max_output_tokens"),
        (lambda c: c.responses.create(model="syl", input=""), 400, "input"),
        (lambda c: c.responses.create(model="syl", input=[]), 400, "input"),
        (lambda c: c.chat.completions.create(model="syl", messages=[]), 400, "messages"),
        (lambda c: c.chat.completions.create(model="syl", messages=[{"role": "user", "content": "x"}], temperature="hot"), 400, "temperature"),
        (lambda c: c.chat.completions.create(model="syl", messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
        (lambda c: c.chat.completions.create(model="syl", messages=[{"role": "user", "content": "x" * 30_000}]), 413, "exceeds"),
    ],
)
def test_errors_are_openai_shaped_4xx(client, call, status, needle):
    with pytest.raises(openai.APIStatusError) as info:
        call(client)
    assert info.value.status_code == status and needle in info.value.message
    assert set(info.value.body) >= {"message", "type"}


def test_raw_http_errors(server):
    r = httpx.post(f"{server}/chat/completions", content=b"{not json", headers={"Authorization": "Bearer sekret",
                                                                               "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server}/chat/completions", json={"model": "syl", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()


def test_split_text_grows_monotonically():
    text = "<think>\nall a are b\nso yes\n</think>\n<answer>yes</answer><|im_end|>"
    seen = ["", ""]
    for i in range(1, len(text) + 1):
        sp = split_text(text[:i], partial=True)
        for j, part in enumerate((sp.thinking or "", sp.visible)):
            assert part.startswith(seen[j]), (text[:i], part, seen[j])
            seen[j] = part
    assert seen == ["all a are b\nso yes", "yes"]
    assert json.dumps(split_text("<answer>42</ans", partial=True).__dict__) == '{"thinking": null, "closed": true, "visible": "42"}'
    assert split_text("<think>\nx\n</think>\n<answer>a <answer>b</answer>").visible == "b"  # what the grader scores


def test_thinkforge_serve_command(syllogism_model):
    """`thinkforge serve` as a user runs it: a real process, the model folder, the name from the folder."""
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "thinkforge", "serve", "--model", syllogism_model[2],
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        for _ in range(300):
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        assert [m.id for m in models.data] == ["syllogism"]  # runs/<name>/model is served as <name>
        r = client.chat.completions.create(model="syllogism", messages=[{"role": "user", "content": SEED_PROMPT}])
        assert isinstance(r.choices[0].message.content, str)
    finally:
        proc.terminate()
        proc.wait(10)
