"""Load test of `thinkforge serve`: N concurrent chat requests through the official openai client.

    .venv/bin/python bench/serve_load.py [--model runs/demo/grpo/model] [--requests 200] [--concurrency 200]

Starts the server on 127.0.0.1 (a free port) in a subprocess, fires the requests from a thread pool,
and reports throughput, p50/p95 latency and the error count; then stops the server. Without
``--model`` it trains a tiny syllogism model first (about 10 s). Traffic goes to this machine only.
Ends with: RESULT serve_load requests=… errors=… rps=… p50_ms=… p95_ms=…
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

PROMPT = "Q: If all bloops are razzies and all razzies are lazzies, are all bloops definitely lazzies?"


def tiny_model() -> str:
    from thinkforge.train.sft import SFTConfig, train_sft

    out = Path(tempfile.mkdtemp()) / "syllogism"
    return str(train_sft(SFTConfig(task="syllogism", size="micro", steps=120, batch_size=32, max_len=256,
                                   out=str(out), train_problems=1000, save_every=120, lr=3e-3, min_lr_ratio=1.0)) / "model")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    model = args.model or tiny_model()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "thinkforge", "serve", "--model", model, "--name", "m",
                               "--port", str(port)], stdout=subprocess.DEVNULL)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    try:
        for _ in range(600):  # wait for the server (model load) for up to 60 s
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)

        def one(_):
            t = time.perf_counter()
            try:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=args.max_tokens)
                return time.perf_counter() - t, None
            except Exception as e:  # counted, and the first is printed
                return time.perf_counter() - t, e

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(10)
    errors = [e for _, e in results if e is not None]
    if errors:
        print(f"first error: {errors[0]!r}")
    lat = sorted(t for t, e in results if e is None) or [float("nan")]
    p50, p95 = statistics.median(lat) * 1000, lat[int(0.95 * (len(lat) - 1))] * 1000
    print(f"{args.requests} requests, {args.concurrency} concurrent, max_tokens {args.max_tokens}: "
          f"{len(errors)} errors, {args.requests / wall:.1f} req/s, p50 {p50:.0f} ms, p95 {p95:.0f} ms")
    print(f"RESULT serve_load requests={args.requests} errors={len(errors)} rps={args.requests / wall:.2f} "
          f"p50_ms={p50:.0f} p95_ms={p95:.0f}")


if __name__ == "__main__":
    main()
