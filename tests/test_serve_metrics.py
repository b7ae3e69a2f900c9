"""GET /metrics (Prometheus) and GET /health: the counts equal what the API itself reported, and both answer
without the API key that every /v1 route needs."""
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import SEED_PROMPT, running_server

MSG = [{"role": "user", "content": SEED_PROMPT}]


def scrape(base: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of one /metrics scrape (no API key sent)."""
    r = httpx.get(base.removesuffix("/v1") + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def labelled(samples: dict, name: str, label: str) -> dict[str, float]:
    return {dict(k[1])[label]: v for k, v in samples.items() if k[0] == name}


def until(fn, seconds: float = 30.0):
    end = time.monotonic() + seconds
    while not (value := fn()) and time.monotonic() < end:
        time.sleep(0.02)
    return value


@pytest.fixture(scope="module")
def keyed(syllogism_model):
    model, tok, _ = syllogism_model
    with running_server(model, tok, name="syl", api_key="k", max_tokens_limit=512, context=700) as url:
        yield url, running_server.last


def test_metrics_count_exactly_what_the_api_reported(keyed):
    url, _ = keyed
    first = scrape(url)  # a fresh server: nothing counted yet (the gauges read the idle scheduler)
    assert first[("thinkforge:prompt_tokens_total", ())] == 0 and first[("thinkforge:num_requests_running", ())] == 0
    assert httpx.get(f"{url}/models", timeout=30).status_code == 401  # /v1 still needs the key
    client = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60)
    chat = client.chat.completions.create(model="syl", messages=MSG, n=2, max_tokens=12, temperature=1.0, seed=5)
    resp = client.responses.create(model="syl", input=SEED_PROMPT, max_output_tokens=300, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="syl", messages=MSG, max_tokens=513)  # over the limit: no model work

    m = scrape(url)
    assert m[("thinkforge:prompt_tokens_total", ())] == chat.usage.prompt_tokens + resp.usage.input_tokens
    assert m[("thinkforge:generation_tokens_total", ())] == chat.usage.completion_tokens + resp.usage.output_tokens
    reasons = [c.finish_reason for c in chat.choices] + ["length" if resp.status == "incomplete" else "stop"]
    expected = {r: float(reasons.count(r)) for r in set(reasons)}
    assert {k: v for k, v in labelled(m, "thinkforge:request_success_total", "finished_reason").items() if v} == expected
    for hist in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds"):
        assert m[(f"thinkforge:{hist}_count", ())] == 2, hist  # the two requests that ran, not the refused one
        assert 0 < m[(f"thinkforge:{hist}_sum", ())] < 60, hist
    assert m[("thinkforge:time_to_first_token_seconds_sum", ())] <= m[("thinkforge:e2e_request_latency_seconds_sum", ())]
    # the first scrape, the two answers; the refused request; the keyless /v1 call (this scrape comes after)
    assert labelled(m, "thinkforge:http_responses_total", "status") == {"200": 3.0, "400": 1.0, "401": 1.0}
    assert labelled(m, "thinkforge:request_failure_total", "reason") == {}

    # a client that goes away mid-stream: counted as cancelled, with the tokens it was sent
    stream = client.chat.completions.create(model="syl", messages=MSG, max_tokens=400, temperature=1.0, stream=True)
    next(iter(stream))
    stream.close()
    m = until(lambda: (s := scrape(url)).get(("thinkforge:request_failure_total", (("reason", "cancelled"),))) and s)
    assert m and labelled(m, "thinkforge:request_failure_total", "reason") == {"cancelled": 1.0}
    assert m[("thinkforge:e2e_request_latency_seconds_count", ())] == 2  # a latency only for requests answered
    assert m[("thinkforge:generation_tokens_total", ())] > chat.usage.completion_tokens + resp.usage.output_tokens


def test_gauges_show_the_running_request_and_its_rows(keyed):
    url, svc = keyed
    client = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60)
    gate, started = threading.Event(), threading.Event()

    def on_token(pairs):  # hold the scheduler's loop inside a step until the test has looked
        started.set()
        gate.wait(30)

    real = svc.scheduler.submit

    def submit(*args, **kw):
        req = real(*args, **kw)
        req.on_token = on_token
        return req

    svc.scheduler.submit = submit
    try:
        worker = threading.Thread(target=lambda: client.chat.completions.create(
            model="syl", messages=MSG, n=3, max_tokens=20, temperature=1.0, stream=True))
        worker.start()
        assert started.wait(30)
        svc.scheduler.submit = real
        waiting = threading.Thread(target=lambda: client.chat.completions.create(model="syl", messages=MSG, max_tokens=5))
        waiting.start()
        m = until(lambda: (s := scrape(url))[("thinkforge:num_requests_waiting", ())] == 1 and s)
        assert m and m[("thinkforge:num_requests_running", ())] == 1 and m[("thinkforge:num_rows_running", ())] == 3
    finally:
        svc.scheduler.submit = real
        gate.set()
    worker.join(60)
    waiting.join(60)
    m = until(lambda: (s := scrape(url))[("thinkforge:num_rows_running", ())] == 0 and s)
    assert m and m[("thinkforge:num_requests_running", ())] == 0 and m[("thinkforge:num_requests_waiting", ())] == 0


def test_health_is_200_without_a_key_and_503_once_the_loop_has_stopped(syllogism_model):
    model, tok, _ = syllogism_model
    with running_server(model, tok, name="syl", api_key="k") as url:
        health = url.removesuffix("/v1") + "/health"
        assert httpx.get(health, timeout=30).status_code == 200
        running_server.last.scheduler.close()
        r = httpx.get(health, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
