"""One-step-off roll-outs (``thinkforge train grpo --async-rollouts``): a second process samples the next
roll-out batch while the trainer updates on this one, as verl, prime-rl and SkyRL do at scale.

    trainer  | train on batch k (weights θ_k → θ_k+1)        | train on batch k+1 (θ_k+1 → θ_k+2) | …
    sampler  | sample batch k+1 with θ_k                      | sample batch k+2 with θ_k+1          | …

The sampler is a second process (started by a forkserver) holding its own copy of the model, an :class:`~thinkforge.generation.Engine`
and the run's :class:`~thinkforge.train.grpo.RolloutSource` (problem stream, rewards, dynamic sampling,
traces). Weights are handed over through one shared-memory copy of the state dict, written by the trainer
only while the sampler is idle and read by the sampler at the start of each request. The data position
travels with each request and comes back with its batch, so the trainer's checkpointed state stays exact.

Off-policy correction: the batch carries the sampler's own logprobs (exactly those of the weights that
sampled it, fp32, same code), so the loss's importance ratio π_θ / π_old is taken against the policy that
actually sampled — the one step of lag is what the clipped ratio corrects, and ``clip_ratio/*`` shows how
much it does. (TRL and verl add truncated importance weights for a different gap: a sampler such as vLLM whose
logprobs differ from the trainer's for the same weights; here both are the same computation.)

Exact resume: no request is in flight when a checkpoint is written. After a step that saves (every
``save_every`` and the last), the next batch is sampled synchronously with the weights just saved, in the
original run and in a resumed one alike; ``rollout/lag`` logs the steps between the sampling weights and the
trained ones (0 or ``mu``). ``rollout_lag = 0`` never prefetches: the same results as synchronous GRPO, the
sampling done in the second process (the equivalence test).

Limits: one process (no torchrun), a full model (no LoRA, no FSDP); the sampler runs on the trainer's device.
"""
from __future__ import annotations

import queue
import traceback

import torch
import torch.multiprocessing as mp

from thinkforge.train.loop import saves_after

HANDSHAKE_S = 600  # seconds to wait for the sampler to load its model before giving up
POLL_S = 1.0  # how often a waiting trainer checks that the sampler is still alive


def _worker(cfg, shared: dict, run: str, device: str, requests, replies, threads: int) -> None:
    """The sampler: load the model once, then answer ``(state,)`` requests with ``(rollouts, state)``."""
    try:
        from pathlib import Path

        from thinkforge.models import load_model
        from thinkforge.tasks import get_task
        from thinkforge.train.grpo import RolloutSource

        torch.set_num_threads(threads)
        task = get_task(cfg.task, **cfg.task_options)
        problems = task.problems(cfg.train_problems, "train", seed=cfg.seed)
        model, tok = load_model(cfg.model, device=device, dtype=torch.float32)
        model.eval()
        source = RolloutSource(cfg, model, tok, task, problems, model.device)
        source.trace_path = Path(run) / "traces.jsonl"
        replies.put(("ready", None))
        while (state := requests.get()) is not None:
            with torch.no_grad():
                for name, p in model.state_dict().items():
                    p.copy_(shared[name])
            ro = source.collect(state)
            replies.put(("batch", (ro.__dict__, state)))
    except BaseException:  # the trainer raises it, named
        replies.put(("error", traceback.format_exc()))


# the keys of the trainer's data state that belong to the loop (next_rollouts), not to the sampler
LOOP_KEYS = ("rollouts", "pass")


class AsyncCollector:
    """The trainer's side: ``collect(state)`` returns the next roll-out batch (as ``RolloutSource.collect``)."""

    def __init__(self, cfg, model, run, settings, device):
        from thinkforge.train.grpo import Rollouts

        self.Rollouts, self.cfg, self.model, self.device = Rollouts, cfg, model, device
        self.settings = settings  # the loop's: when it checkpoints (loop.saves_after) and how many steps
        self.shared = {k: v.detach().to("cpu", copy=True).share_memory_() for k, v in model.state_dict().items()}
        # forkserver: a clean single-threaded server with the heavy imports done once per trainer process
        # (fork after torch has started threads is unsafe; spawn would import torch again per sampler)
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(["thinkforge.train.grpo"])
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_worker, args=(cfg, self.shared, str(run), str(device), self.requests,
                                                      self.replies, cfg.rollout_threads), daemon=True)
        self.proc.start()
        self.in_flight = False
        self.sampled_at = 0  # the optimizer step whose weights sampled the batch in flight
        self._reply("ready", HANDSHAKE_S)

    def _reply(self, expect: str, timeout: float | None = None):
        waited = 0.0
        while True:
            try:
                kind, payload = self.replies.get(timeout=POLL_S)
                break
            except queue.Empty:
                waited += POLL_S
                if not self.proc.is_alive():
                    raise RuntimeError(f"the roll-out process died (exit code {self.proc.exitcode})") from None
                if timeout is not None and waited > timeout:
                    raise RuntimeError(f"the roll-out process did not answer in {timeout:.0f} s") from None
        if kind == "error":
            raise RuntimeError(f"the roll-out process failed:\n{payload}")
        assert kind == expect, (kind, expect)
        return payload

    def _send(self, state: dict, step: int) -> None:
        with torch.no_grad():
            for name, p in self.model.state_dict().items():
                self.shared[name].copy_(p.detach())
        self.requests.put({k: v for k, v in state.items() if k not in LOOP_KEYS})
        self.in_flight, self.sampled_at = True, step

    def _may_prefetch(self, step: int) -> bool:
        """Whether the next batch may be sampled now, overlapping the steps on this one: not when a checkpoint
        is written before the next collect (nothing may be in flight then) or there is no next batch."""
        if self.cfg.rollout_lag == 0:
            return False
        nxt = step + self.cfg.mu
        saves = any(saves_after(j + 1, self.settings) for j in range(step, nxt))
        return not saves and nxt < self.settings.steps

    def collect(self, state: dict):
        step = state.get("batches", 0) * self.cfg.mu  # the first optimizer step on the batch collected now
        if not self.in_flight:
            self._send(state, step)
        ro, new = self._reply("batch")
        self.in_flight = False
        lag = step - self.sampled_at
        state.update({k: v for k, v in new.items() if k not in LOOP_KEYS})
        if self._may_prefetch(step):
            self._send(state, step)  # batch k+1 with the weights before this batch's update
        ro = self.Rollouts(**ro)
        ro.stats["rollout/lag"] = lag
        if ro.ids is not None:
            ro.ids, ro.mask, ro.old_logp, ro.adv = (t.to(self.device) for t in (ro.ids, ro.mask, ro.old_logp, ro.adv))
        return ro

    def close(self) -> None:
        if self.proc.is_alive():
            if self.in_flight:  # (a run that stopped early: let the sampler finish, then stop it)
                try:
                    self._reply("batch", 60)
                except RuntimeError:
                    pass
            self.requests.put(None)
            self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
