"""What the server has done, for Prometheus (``GET /metrics``), under the names vLLM uses with our prefix.

- ``thinkforge:num_requests_running`` / ``thinkforge:num_requests_waiting`` / ``thinkforge:num_rows_running``:
  read from the scheduler at each scrape.
- ``thinkforge:prompt_tokens_total``: prompt tokens prefilled (once per request, whatever its n);
  ``thinkforge:generation_tokens_total``: tokens generated, forced ones included, of requests that ended
  (failed and cancelled ones too: the work was done).
- ``thinkforge:request_success_total{finished_reason}``: one per completion (a request with n = 4 counts 4),
  as vLLM counts each of n sequences, by the engine's reason: ``stop``, ``length``, or ``budget`` (a thinking
  budget cut the thinking, then the answer ended; the APIs report it as a stop); ``thinkforge:request_failure_total{reason}``: accepted requests that
  ended without a result (``cancelled``: the client went away or the server is stopping; ``deadline``;
  ``error``: a fault, answered with a 500).
- ``thinkforge:request_queue_time_seconds`` (submitted → its prompt prefilled in a batch),
  ``thinkforge:time_to_first_token_seconds`` (submitted → first token), ``thinkforge:e2e_request_latency_seconds``
  (submitted → result), histograms of the requests that got that far; measured inside the server, so a
  request's HTTP parsing and tokenizing come before and its response body after.
- ``thinkforge:http_responses_total{status}``: every HTTP response by status code, errors the app refused
  before any model work (400, 401, 404, 413, 429) included.

Each app has its own registry, so several servers in one process (tests) count apart.
"""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from thinkforge.generation.scheduler import Cancelled, DeadlineExceeded, Request, Scheduler

CONTENT_TYPE = CONTENT_TYPE_LATEST
# seconds: from a few milliseconds (a short request alone on a tiny model) to the longest deadline one would set
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
                   640.0)


class ServerMetrics:
    def __init__(self, scheduler: Scheduler):
        self.registry = r = CollectorRegistry()
        for name, doc, key in (("num_requests_running", "requests with rows in a running batch", "running"),
                               ("num_requests_waiting", "requests waiting for rows", "waiting"),
                               ("num_rows_running", "sequences being decoded (a request has n)", "running_rows")):
            Gauge(f"thinkforge:{name}", doc, registry=r).set_function(lambda key=key: scheduler.load()[key])
        self.prompt_tokens = Counter("thinkforge:prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("thinkforge:generation_tokens", "tokens generated", registry=r)
        self.success = Counter("thinkforge:request_success", "completions that ended, by finish reason",
                               ["finished_reason"], registry=r)
        self.failure = Counter("thinkforge:request_failure", "accepted requests that ended without a result, by reason",
                               ["reason"], registry=r)
        self.queue_time = Histogram("thinkforge:request_queue_time_seconds", "submitted to prefilled in a batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("thinkforge:time_to_first_token_seconds", "submitted to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("thinkforge:e2e_request_latency_seconds", "submitted to result", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.responses = Counter("thinkforge:http_responses", "HTTP responses by status code", ["status"], registry=r)

    def request_ended(self, req: Request) -> None:
        """Record a request that ended (the scheduler's ``on_end``: called once per request, from its thread)."""
        now = time.monotonic()
        if req.admitted is not None:
            self.prompt_tokens.inc(len(req.prompt_ids))
            self.queue_time.observe(req.admitted - req.submitted)
        self.generation_tokens.inc(sum(len(s.ids) for s in req.seqs))
        if req.first_token is not None:
            self.ttft.observe(req.first_token - req.submitted)
        if req.error is None:
            self.e2e.observe(now - req.submitted)
            for c in req.result:
                self.success.labels(finished_reason=c.finish_reason).inc()
        else:
            err = req.error
            reason = ("cancelled" if isinstance(err, Cancelled) else "deadline" if isinstance(err, DeadlineExceeded)
                      else "error")
            self.failure.labels(reason=reason).inc()

    def response(self, status: int) -> None:
        self.responses.labels(status=str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
