"""This tree's generation engine against the engine of another commit, on the demo's own GRPO roll-outs.

    make demo                                   # once: trains runs/demo/grpo/model
    .venv/bin/python bench/engine_ab.py [--against c95f4d1] [--rounds 20]

Both engines run in this one process (the other commit's ``src`` is taken with ``git archive`` into a
scratch folder and imported under its own module state), on the same model and the same batches: P = 8
problems × G = 16 samples, temperature 1, at most 96 new tokens, per-prompt seeds as GRPO draws them. The
sides alternate every round, so a busy neighbour hits both alike; medians are reported. First it checks
that the two sample the same tokens on one batch and prints the largest log-prob difference.
Ends with: RESULT engine_ab this_s=… other_s=… speedup=… (speedup = other / this)

``--serve``: the serving workload instead, in process (no HTTP): each side's continuous-batching scheduler
(``generation.scheduler``) under 64 client threads sending the mix of ``bench/serve_load.py`` (the README's
syllogism question in the chat template; temperature 0, 0.7 or 1; max_tokens 16, 64 or 256; unseeded),
384 requests per round, sides alternating. It also prints what the KV cache's time axis held at this
tree's decode steps: slots valid for their row, slots of other rows (ragged starts), leading slots no
active row uses, and the growth chunk ahead. Ends with: RESULT engine_ab_serve this_rps=… other_rps=… speedup=…
"""
from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scratch import scratch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load_thinkforge(src: Path):
    """The generation, models and tasks modules of the thinkforge package under ``src``, freshly imported."""
    for name in [m for m in sys.modules if m == "thinkforge" or m.startswith("thinkforge.")]:
        del sys.modules[name]
    sys.path.insert(0, str(src))
    try:
        import thinkforge.generation as generation
        import thinkforge.models as models
        import thinkforge.tasks as tasks
    finally:
        sys.path.pop(0)
    return generation, models, tasks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", default="c95f4d1", help="the other commit (default: before 2026-12-02's decode-step trims)")
    ap.add_argument("--model", default="runs/demo/grpo/model")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--serve", action="store_true", help="the serving workload (see the docstring)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=384)
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").exists():
        sys.exit(f"{args.model}: no model there; `make demo` trains it (or pass --model)")
    torch.set_num_threads(args.threads)
    archive = subprocess.run(["git", "archive", args.against, "src"], cwd=ROOT, capture_output=True, check=True).stdout
    other = Path(scratch("engine-ab-"))
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(other, filter="data")
    sides = {}
    for name, src in (("other", other / "src"), ("this", ROOT / "src")):
        generation, models, tasks = load_thinkforge(src)
        model, tok = models.load_model(args.model, device="cpu")
        sides[name] = (generation, generation.Engine(model.eval(), tok))
        if args.serve:
            import thinkforge.generation.backends as backends
            import thinkforge.generation.scheduler as scheduler

            sides[name] += (scheduler, backends)
    if args.serve:
        return serve(args, sides)
    task = tasks.get_task("mul", digits_a=3, digits_b=2)
    chat = sides["this"][1].chat
    problems = task.problems(8 * (args.rounds + 1), "test", seed=1)
    batches = [[chat.prompt(p.question) for p in problems[i : i + 8]] for i in range(0, len(problems), 8)]

    def run(name: str, batch: list[str], r: int):
        generation, engine = sides[name]
        return engine.generate(batch, generation.SamplingParams(n=16, temperature=1.0, max_new_tokens=96,
                                                                seed=[r * 1000 + i for i in range(len(batch))]))

    a, b = run("other", batches[0], 0), run("this", batches[0], 0)
    same = [x.ids for x in a] == [x.ids for x in b]
    err = max(abs(p - q) for x, y in zip(a, b) for p, q in zip(x.logprobs, y.logprobs))
    print(f"same tokens on one batch of 128: {same}; max log-prob difference {err:.1e}")
    times = {"this": [], "other": []}
    for r in range(args.rounds):
        for name in ("other", "this") if r % 2 == 0 else ("this", "other"):
            t = time.perf_counter()
            run(name, batches[r + 1], r + 1)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}, P=8 x G=16, T=1, max 96 new tokens, {args.threads} threads, {args.rounds} alternating rounds")
    print(f"this tree        median {med['this'] * 1000:7.1f} ms per batch")
    print(f"{args.against:<16} median {med['other'] * 1000:7.1f} ms per batch")
    print(f"RESULT engine_ab this_s={med['this']:.3f} other_s={med['other']:.3f} speedup={med['other'] / med['this']:.2f}")


def serve(args, sides) -> None:
    import random
    import threading

    question = "Q: If all bloops are razzies and all razzies are lazzies, are all bloops definitely lazzies?"
    engine = sides["this"][1]
    prompt = engine.tok.encode(engine.chat.prompt(question), add_special_tokens=False)
    slots = {"valid": 0, "other rows": 0, "leading": 0, "growth": 0}
    fast = sides["this"][3].FastBackend
    decode = fast.decode

    def counting(self, tokens):  # what the time axis holds at this step (before the step writes slot t)
        valid = self.valid[: self.B, : self.t]
        lead = self._first_used(self.t)
        slots["valid"] += int(valid.sum())
        slots["leading"] += self.B * lead
        slots["other rows"] += self.B * (self.t - lead) - int(valid.sum())
        slots["growth"] += self.B * (self.capacity - self.t)
        return decode(self, tokens)

    def one_round(name: str, r: int) -> float:
        generation, eng, scheduler, _ = sides[name]
        rng = random.Random(r)
        jobs = [dict(temperature=rng.choice([0.0, 0.7, 1.0]), max_new_tokens=rng.choice([16, 64, 256]))
                for _ in range(args.requests)]
        sched = scheduler.Scheduler(eng, max_rows=256, max_waiting=args.requests)
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    if not jobs:
                        return
                    job = jobs.pop()
                sched.submit(prompt, generation.SamplingParams(**job, seed=None)).wait(600)

        t = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        sched.close()
        return args.requests / wall

    fast.decode = counting
    one_round("this", 0)  # warm-up, and the slot count
    fast.decode = decode
    total = sum(slots.values())
    print("this tree's KV time axis at its decode steps: " + ", ".join(f"{k} {v / total:.0%}" for k, v in slots.items()))
    rps = {"this": [], "other": []}
    for r in range(args.rounds):
        for name in ("other", "this") if r % 2 == 0 else ("this", "other"):
            rps[name].append(one_round(name, r + 1))
            print(f"round {r + 1} {name:5s} {rps[name][-1]:6.1f} req/s", flush=True)
    med = {k: statistics.median(v) for k, v in rps.items()}
    print(f"{args.model}, {args.clients} clients x {args.requests} requests per round, {args.threads} threads")
    print(f"RESULT engine_ab_serve this_rps={med['this']:.1f} other_rps={med['other']:.1f} "
          f"speedup={med['this'] / med['other']:.2f}")


if __name__ == "__main__":
    main()
