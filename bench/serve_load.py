"""Load test of `thinkforge serve`, the server of an earlier commit and today's, side by side in one run.

    .venv/bin/python bench/serve_load.py [--model runs/demo/grpo/model] [--baseline 070116e]

Both servers run as subprocesses on 127.0.0.1 (the baseline from ``git archive <rev> src``, today's from
this tree) and take turns: for each number of concurrent clients (1, 16, 64, 200) the baseline runs, then
today's, so a busy neighbour hurts both alike. Each client sends chat requests through the official
openai client with a mix of sampling parameters and lengths (temperature 0, 0.7 or 1.0; max_tokens 16,
64 or 256), as real traffic has. Then "short under long": the latency of a short greedy request (max_tokens 8) alone, and
while 8 clients keep sending long ones (n=8, max_tokens 256, temperature 1); ``--short-tier priority`` sends
the short ones with that ``service_tier``. ``--single N``: only N single
requests, alternating (one client's latency). Without ``--model`` a tiny syllogism model is trained first
(about 10 s). Ends with
``RESULT serve_load c64_ratio=… c200_ratio=… short_under_long_p99_x=… …``.
"""
from __future__ import annotations

import argparse
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from scratch import scratch  # noqa: E402  (bench/scratch.py: removed when the run exits)

PROMPT = "Q: If all bloops are razzies and all razzies are lazzies, are all bloops definitely lazzies?"
ROOT = Path(__file__).resolve().parent.parent


def tiny_model() -> str:
    from thinkforge.train.sft import SFTConfig, train_sft

    out = Path(scratch()) / "syllogism"
    return str(train_sft(SFTConfig(task="syllogism", size="micro", steps=120, batch_size=32, max_len=256,
                                   out=str(out), train_problems=1000, save_every=120, lr=3e-3, min_lr_ratio=1.0)) / "model")


def start(model: str, src: Path, extra: list[str]):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "thinkforge", "serve", "--model", model, "--name", "m",
                             "--port", str(port), *extra], stdout=subprocess.DEVNULL, env=env)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    for _ in range(600):
        try:
            client.models.list()
            return proc, client
        except openai.APIConnectionError:
            time.sleep(0.1)
    raise SystemExit(f"the server from {src} did not start")


def ask(client, rng: random.Random, **kw) -> tuple[float, Exception | None]:
    t = time.perf_counter()
    params = kw or dict(temperature=rng.choice([0.0, 0.7, 1.0]), max_tokens=rng.choice([16, 64, 256]))
    try:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], **params)
        return time.perf_counter() - t, None
    except Exception as e:  # counted, and the first is printed
        return time.perf_counter() - t, e


def load(client, clients: int, requests: int, seed: int) -> dict:
    rngs = [random.Random(seed * 1000 + i) for i in range(requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda r: ask(client, r), rngs))
    wall = time.perf_counter() - t0
    errors = [e for _, e in results if e is not None]
    if errors:
        print(f"  first error: {errors[0]!r}")
    lat = sorted(t for t, e in results if e is None) or [float("nan")]
    return {"rps": requests / wall, "p50": statistics.median(lat) * 1000, "p99": lat[int(0.99 * (len(lat) - 1))] * 1000,
            "errors": len(errors)}


def short_under_long(client, shorts: int = 20, tier: str | None = None) -> tuple[float, float]:
    short = dict(temperature=0.0, max_tokens=8, **({"service_tier": tier} if tier else {}))
    alone = sorted(ask(client, None, **short)[0] for _ in range(shorts))
    stop = threading.Event()

    def long_loop():
        while not stop.is_set():
            ask(client, None, temperature=1.0, max_tokens=256, n=8)

    threads = [threading.Thread(target=long_loop, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    loaded = []
    for _ in range(shorts):
        loaded.append(ask(client, None, **short)[0])
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(120)
    loaded.sort()
    p99 = lambda xs: xs[int(0.99 * (len(xs) - 1))] * 1000  # noqa: E731
    return p99(alone), p99(loaded)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--baseline", default="070116e", help="git revision of the server to compare against")
    ap.add_argument("--levels", default="1,16,64,200")
    ap.add_argument("--today-args", default="", help="more `thinkforge serve` options for today's server, e.g. "
                                                     "'--express-rows 0'")
    ap.add_argument("--short-tier", default=None, help="service_tier of the short requests of 'short under long' "
                                                       "(e.g. priority; the long ones and the mixed load: none)")
    ap.add_argument("--single", type=int, default=0,
                    help="only this many single requests (T=0.7, max_tokens 64), alternating between the servers")
    args = ap.parse_args()
    model = args.model or tiny_model()
    base_dir = Path(scratch())
    subprocess.run(f"git -C {ROOT} archive {args.baseline} src | tar -x -C {base_dir}", shell=True, check=True)
    sides = {"baseline": (base_dir / "src", []), "today": (ROOT / "src", ["--max-queued", "1000", *args.today_args.split()])}
    servers = {k: start(model, src, extra) for k, (src, extra) in sides.items()}
    table: dict[tuple[str, int], dict] = {}
    if args.single:
        times: dict[str, list[float]] = {side: [] for side in sides}
        try:
            for _ in range(args.single):
                for side in sides:
                    times[side].append(ask(servers[side][1], None, temperature=0.7, max_tokens=64)[0] * 1000)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
        med = {side: statistics.median(v) for side, v in times.items()}
        print(f"RESULT serve_single requests={args.single} baseline_ms={med['baseline']:.0f} today_ms={med['today']:.0f}")
        return
    try:
        for c in [int(x) for x in args.levels.split(",")]:
            n = max(2 * c, 32)
            for side in sides:  # alternate: the baseline, then today's, at each level
                table[side, c] = r = load(servers[side][1], c, n, seed=c)
                print(f"{side:8s} {c:3d} clients, {n} requests: {r['rps']:6.1f} req/s  p50 {r['p50']:6.0f} ms  "
                      f"p99 {r['p99']:6.0f} ms  errors {r['errors']}", flush=True)
        sul = {}
        for side in sides:
            sul[side] = short_under_long(servers[side][1], tier=args.short_tier)
            print(f"{side:8s} short request p99: alone {sul[side][0]:.0f} ms, under long requests {sul[side][1]:.0f} ms "
                  f"({sul[side][1] / sul[side][0]:.1f}x)", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    levels = sorted({c for _, c in table})
    print("\n| clients | baseline req/s | today req/s | ratio | baseline p50 / p99 ms | today p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for c in levels:
        b, t = table["baseline", c], table["today", c]
        print(f"| {c} | {b['rps']:.1f} | {t['rps']:.1f} | {t['rps'] / b['rps']:.2f}x | {b['p50']:.0f} / {b['p99']:.0f} | "
              f"{t['p50']:.0f} / {t['p99']:.0f} |")
    ratios = " ".join(f"c{c}_ratio={table['today', c]['rps'] / table['baseline', c]['rps']:.2f}" for c in levels)
    errors = sum(r["errors"] for r in table.values())
    print(f"RESULT serve_load {ratios} short_under_long_p99_x={sul['today'][1] / sul['today'][0]:.2f} "
          f"baseline_short_under_long_p99_x={sul['baseline'][1] / sul['baseline'][0]:.2f} errors={errors}")


if __name__ == "__main__":
    main()
