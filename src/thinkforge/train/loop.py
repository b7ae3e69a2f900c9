"""The shared training loop: AdamW, warm-up + cosine schedule, clipping, accumulation, checkpoints, resume.

A trainer supplies two functions: ``next_batch(state) -> list[micro-batch]`` (it may keep its data
position in ``state``, a dict saved with every checkpoint; each micro-batch is a dict with
``n_tokens``, the loss normaliser, and ``seen_tokens``, the tokens processed) and ``loss_fn(model,
micro) -> (loss_sum, stats)``; a loss of None means nothing to learn, and a step where no micro-batch
has anything to learn makes no optimizer update (it is still logged and counted). The loop divides by the ``n_tokens`` of the whole optimizer step, so
gradient accumulation gives the same update as one large batch.

Under ``torchrun --nproc-per-node N -m thinkforge train sft …`` every rank builds the same seeded global
batch, keeps its rows (``shard``), divides its loss by the global token count and sums gradients with
``torch.distributed.all_reduce``: the update equals the single-process one on the same global batch
(tested with 2 gloo processes). Only rank 0 writes metrics and checkpoints.

Run folder ``runs/<name>/``: ``config.toml``, ``metrics.jsonl`` (one row per step), ``checkpoint/``
(HF folder + ``trainer_state.pt``: optimizer, RNG states, step, data position) replaced atomically
(written to a temporary folder, then renamed), and ``model/``, the final model. Under FSDP2 (``--fsdp``)
every process writes its own shards, nothing gathered: the weights still as a plain HF folder, the optimizer
state as one file per process in ``checkpoint/optimizer/`` (read back on any process count). ``resume=True`` loads
``checkpoint/`` and continues exactly: same next batch, same losses as an uninterrupted run; metric rows
written after the checkpoint are dropped and recomputed.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from thinkforge.config import ConfigError, check, option
from thinkforge.models import (add_lora, is_lora, is_sharded, load_model, replace_dir, save_merged, save_model,
                               shared_tempdir, write_sharded_weights)


@dataclass
class RunOptions:
    """Fields every training command shares (its own fields follow these in ``--help``)."""

    seed: int = option(0, "seed for the problems, the data order, the initial weights and the roll-outs")
    save_every: int = option(100, "checkpoint every N optimizer steps (and at the end)")
    resume: bool = option(False, "continue the run in --out from its checkpoint, exactly")
    overwrite: bool = option(False, "start afresh even if --out holds a checkpoint")
    device: str = option("auto", "auto, cpu or cuda")
    threads: int = option(0, "torch CPU threads (0 = torch's default)")
    report_to: str = option("none", "also write the metrics to: tensorboard (event files in <out>/tensorboard, "
                                    "the names of metrics.jsonl; `tensorboard --logdir runs`) or none")

    def __post_init__(self):
        check(self.save_every >= 1 and self.threads >= 0, "save_every must be >= 1 and threads >= 0")
        check(self.report_to in ("none", "tensorboard"), f"report_to must be none or tensorboard, got {self.report_to!r}")


@dataclass
class ModelOptions(RunOptions):
    """RunOptions plus how the trained model is held: LoRA adapters, mixed precision, activation checkpointing."""

    lora_r: int = option(0, "LoRA rank: train low-rank adapters (peft) instead of every weight; 0 = full fine-tuning")
    lora_alpha: float = option(32.0, "LoRA scale: an adapter adds (lora_alpha / lora_r)·BA to its layer's weight")
    lora_targets: str = option("all-linear", "layers that get adapters: all-linear (every linear layer but the output "
                                             "head) or comma-separated names, e.g. q_proj,v_proj")
    lora_dropout: float = option(0.0, "dropout on the adapters' input")
    merge: bool = option(True, "with LoRA: run/model is a plain HF model with the adapter merged (false: the adapter "
                               "alone, loadable on its base); the adapter is always in run/adapter")

    dtype: str = option("auto", "compute precision: auto (bf16 on GPUs that have it, fp32 elsewhere), fp32, bf16 or "
                                "fp16; bf16/fp16 run the forward and backward under autocast with fp32 weights and "
                                "optimizer state (fp16 with loss scaling); output heads and log-probs stay fp32")
    gradient_checkpointing: bool = option(False, "recompute each layer's activations in the backward pass instead of "
                                                 "keeping them: less memory for about a third more compute")
    fsdp: bool = option(False, "under torchrun: shard parameters, gradients and optimizer state over the processes, "
                               "layer by layer (FSDP2 fully_shard), instead of a full copy per process (DDP)")

    def __post_init__(self):
        super().__post_init__()
        check(self.dtype in PRECISIONS, f"dtype must be one of {', '.join(PRECISIONS)}, got {self.dtype!r}")
        check(self.lora_r >= 0 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1,
              f"need lora_r >= 0, lora_alpha > 0, 0 <= lora_dropout < 1; got {self.lora_r}, {self.lora_alpha}, "
              f"{self.lora_dropout}")
        check(not (self.fsdp and self.lora_r), "fsdp shards full fine-tuning; LoRA adapters are small: use LoRA "
                                               "without --fsdp (each process keeps the base and the adapters)")
        check(not self.lora_r or getattr(self, "model", None) != "tiny",
              "LoRA adapts a trained model: give --model a folder or hub id (a 'tiny' model starts from random weights)")


PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--dtype name`` on ``device`` (None: plain fp32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return None if name == "fp32" else PRECISIONS[name]


def load_trainee(cfg: ModelOptions, start: str, run: Path, device, keep: tuple[str, ...] = ()):
    """(model, tokenizer) a trainer starts from: ``run/checkpoint`` on resume (a LoRA checkpoint with its
    adapter trainable again), else ``start`` with LoRA adapters when ``cfg.lora_r``. Weights are fp32 (the
    master copy mixed precision updates); activation checkpointing is switched on when asked."""
    if cfg.fsdp and distributed()[1] > 1:  # (no LoRA: refused with fsdp)
        return load_sharded(str(run / "checkpoint") if cfg.resume else start, device, cfg)
    if cfg.resume:
        model, tok = load_model(str(run / "checkpoint"), device=str(device), dtype=torch.float32, trainable=True)
    else:
        model, tok = load_model(start, device=str(device), dtype=torch.float32)
        if cfg.lora_r:
            torch.manual_seed(cfg.seed)  # the adapters' initial weights
            model = add_lora(model, start, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout, keep)
    return prepare(model, cfg), tok


def load_sharded(src: str, device, cfg: ModelOptions):
    """(model, tokenizer) for FSDP2 with one full copy of the weights in memory in all: rank 0 reads the
    checkpoint; every other process builds the architecture without weights (meta parameters); all shard it,
    and rank 0 sends each process its shards (``broadcast_from_rank0``). Without this every process would
    hold the whole model before sharding it (eight copies of a 7B model on an 8-GPU host)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    first = distributed()[0] == 0
    model, tok = load_model(src, device=str(device), dtype=torch.float32, weights=first)
    full = model.state_dict() if first else {}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model = prepare(model, cfg)
    model.to_empty(device=device)  # this process's shards, allocated (rank 0's too: filled below like the rest)
    with torch.no_grad():
        for n, b in model.named_buffers():  # (to_empty leaves buffers unset: the rotary tables, as built)
            b.copy_(buffers[n])
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model, tok


def prepare(model, cfg: ModelOptions):
    """Activation checkpointing and FSDP2 sharding as ``cfg`` asks (sharding only under torchrun)."""
    model = checkpointing(model, cfg)
    if cfg.fsdp and distributed()[1] > 1:
        shard_model(model)
    return model


def shard_model(model):
    """FSDP2: every decoder layer its own unit (its parameters all-gathered just for its forward and backward),
    the rest (embeddings, final norm, output head: tied weights stay in one unit) the root's. Gradients are
    reduce-scattered as sums: each process's loss is already divided by the global token count."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.layers:
        fully_shard(layer)
    fully_shard(model)
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)
    return model


SHARDED_OPTIMIZER = "optimizer"  # run/checkpoint/optimizer/: a sharded model's AdamW state, one file per process


def save_sharded_optimizer(model, optimizer, folder: Path) -> None:
    """Every process writes its own shard of the optimizer state (torch.distributed.checkpoint; nothing
    gathered). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder))


def load_sharded_optimizer(model, optimizer, folder: Path) -> None:
    """The optimizer state :func:`save_sharded_optimizer` wrote, each process reading the part its shards
    need: the same or another process count, sharded or not (a 1-process run resumes a 2-process one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # (allocates AdamW's state to read into)
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def by_name(model, optimizer, state: dict) -> dict:
    """``optimizer.state_dict()`` of an unsharded run (parameters numbered in the groups' order) keyed by
    parameter name instead, the form torch.distributed.checkpoint's ``set_optimizer_state_dict`` reads;
    ``optimizer`` (built by :func:`make_optimizer` for the same model) gives the order."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def checkpointing(model, cfg: ModelOptions):
    """``model`` with activation checkpointing on when ``cfg.gradient_checkpointing``."""
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def save_final(model, tokenizer, run: Path, merge: bool = True) -> None:
    """``run/model``; a LoRA model also writes ``run/adapter`` and, with ``merge``, a plain merged ``run/model``.
    A sharded model's every process must call it (each writes its shard)."""
    if not is_lora(model):
        save_model(model, tokenizer, run / "model")
        return
    save_model(model, tokenizer, run / "adapter")
    (save_merged if merge else save_model)(model, tokenizer, run / "model")


def recover_checkpoint(run: Path) -> None:
    """Repair what a kill during a checkpoint write can leave: a half-written temporary folder is
    deleted; if the kill fell between ``replace_dir``'s two renames (old moved aside, new not yet in
    place), the previous checkpoint is put back."""
    for tmp in run.glob(".checkpoint.*"):
        if tmp.name != ".checkpoint.old":
            shutil.rmtree(tmp, ignore_errors=True)
    old, ck = run / ".checkpoint.old", run / "checkpoint"
    if old.exists():
        if ck.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, ck)


def start_run(out: str, opts: RunOptions) -> Path:
    """The run folder, refusing to clobber an existing run unless asked; sets the CPU threads and repairs
    what a crash during a checkpoint write left behind."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    run = Path(out)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 repairs and writes
    if run.exists() and rank == 0:
        recover_checkpoint(run)
    if opts.resume and not (run / "checkpoint" / "trainer_state.pt").is_file():
        raise ConfigError(f"{run}: nothing to resume (no checkpoint/); drop --resume to start a new run")
    try:  # an unwritable or missing-parent output folder fails now, not after the first hour of training
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write-test-{rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{run}: cannot write the run folder here ({e.strerror})") from None
    if (run / "checkpoint").exists() and not (opts.resume or opts.overwrite):
        raise ConfigError(f"{run} already holds a run: pass --resume to continue it or --overwrite to start afresh")
    return run


@dataclass
class LoopSettings:
    steps: int
    lr: float
    warmup: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    save_every: int
    seed: int


class EpochStream:
    """Items in a seeded random order, epoch after epoch; the position lives in a resumable ``state``
    dict (``epoch``, ``cursor``), so a resumed run draws exactly what the original would have."""

    def __init__(self, items: list, seed: int):
        self.items, self.seed = items, seed
        self._order: tuple[int | None, list[int]] = (None, [])

    def next(self, state: dict):
        state.setdefault("epoch", 0)
        state.setdefault("cursor", 0)
        if self._order[0] != state["epoch"]:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + state["epoch"])
            self._order = (state["epoch"], torch.randperm(len(self.items), generator=g).tolist())
        item = self.items[self._order[1][state["cursor"]]]
        state["cursor"] += 1
        if state["cursor"] == len(self.items):
            state["epoch"], state["cursor"] = state["epoch"] + 1, 0
        return item


class ItemBatcher:
    """Seeded, resumable batches of ``batch_size`` items handed to the loss function under ``key``
    (rankings, preference pairs), whole or ``micro`` items per forward/backward: the loss is a sum over
    items and the step divides by their number, so the update is the same either way; ``tokens(item)``
    counts what an item makes the model read."""

    def __init__(self, items: list, batch_size: int, seed: int, key: str, tokens: Callable[[object], int],
                 micro: int = 0):
        self.stream, self.batch_size, self.key, self.tokens = EpochStream(items, seed), batch_size, key, tokens
        self.micro = micro or batch_size

    def __call__(self, state: dict) -> list[dict]:
        items = [self.stream.next(state) for _ in range(self.batch_size)]
        return [{self.key: part, "n_tokens": len(part), "seen_tokens": sum(self.tokens(x) for x in part)}
                for part in (items[i : i + self.micro] for i in range(0, len(items), self.micro))]


def distributed() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed under torchrun (gloo on CPU, NCCL on GPUs)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def shard(mb: dict, rank: int, world: int) -> dict:
    """This rank's rows of a global micro-batch (rows rank, rank + world, …); scalars stay global. A
    micro-batch without ``input_ids`` is left whole: its ``loss_fn`` picks its rows itself (GRPO)."""
    if "input_ids" not in mb:
        return mb
    rows = mb["input_ids"].shape[0]
    if rows % world:
        raise ValueError(f"a micro-batch of {rows} rows cannot be split over {world} processes: "
                         f"make batch_size / grad_accum a multiple of {world}")
    return {k: v[rank::world] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v
            for k, v in mb.items()}


def all_reduce_grads(params: list) -> None:
    """Sum gradients over the processes: each rank's loss is already divided by the *global* token count,
    so the sum is exactly the gradient of the whole global batch (what DDP computes, without its buckets).
    A rank with nothing to learn this step (no rows) contributes zeros."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def mean_over_ranks(stats: dict) -> dict:
    """Each statistic averaged over the processes that report it (roll-out statistics are the same on
    every rank; per-row ones such as entropy are each rank's mean over its rows)."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, stats)
    keys = dict.fromkeys(k for p in parts for k in p)
    return {k: sum(p[k] for p in parts if k in p) / sum(k in p for p in parts) for k in keys}


def lr_at(step: int, s: LoopSettings) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine down to ``lr * min_lr_ratio``."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def saves_after(done: int, s: LoopSettings) -> bool:
    """Whether the loop writes a checkpoint once ``done`` optimizer steps are done: every ``save_every``, and the last."""
    return done % s.save_every == 0 or done == s.steps


def make_optimizer(model, s: LoopSettings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and embeddings (1-D tensors and the embedding matrix)."""
    emb = model.get_input_embeddings().weight
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2 and p is not emb]
    rest = [p for p in model.parameters() if p.requires_grad and (p.dim() < 2 or p is emb)]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type in ("cpu", "cuda") and not is_sharded(model)
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), fused=fused)


def release_host_memory() -> None:
    """Hand the pages freed by the forward and backward (glibc keeps them in its heap) back to the OS, so the
    optimizer's first allocation reuses memory instead of growing the process: a 494M-parameter GRPO step with
    gradient checkpointing peaked 2 GB lower than without (bench/memory.py). A no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def checkpoint_bytes(model) -> int:
    """What one checkpoint needs on disk, roughly: the weights and AdamW's two moments (fp32)."""
    return sum(p.numel() * (p.element_size() + 8) for p in model.parameters())


def check_free_space(run: Path, model) -> None:
    """Refuse to start when the disk cannot hold a checkpoint being written beside the previous one plus
    the final model (the atomic replacement needs both at once): better now than at the first save."""
    need = 2 * checkpoint_bytes(model) + sum(p.numel() * p.element_size() for p in model.parameters())
    free = shutil.disk_usage(run).free
    if free < need:
        raise ConfigError(f"{run}: {free / 1e6:.1f} MB free on this disk, training needs about {need / 1e6:.1f} MB "
                          f"(two checkpoints while one replaces the other, plus the final model)")


def save_checkpoint(run: Path, model, tokenizer, optimizer, step: int, data_state: dict, scaler=None) -> None:
    """Write ``run/checkpoint`` atomically: a crash, or a full disk, leaves the previous checkpoint whole.

    An FSDP2-sharded model's checkpoint is written by every process at once, nothing gathered: the weights
    as a plain HF folder (:func:`models.write_sharded_weights`) and the optimizer state in one file per
    process under ``optimizer/``; rank 0 then writes the rest and moves the folder into place. A failure on
    any process (a full disk) is every process's error, not a hang of the others."""
    from torch.distributed.checkpoint.api import CheckpointException

    sharded = is_sharded(model)
    first = not sharded or torch.distributed.get_rank() == 0
    tmp = shared_tempdir(run, ".checkpoint.") if sharded else Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=run))
    failed = None
    try:
        if sharded:
            write_sharded_weights(model, tmp)  # (a write that fails on one process raises on all of them)
            save_sharded_optimizer(model, optimizer, tmp / SHARDED_OPTIMIZER)
        else:
            model.save_pretrained(tmp)
        if first:
            tokenizer.save_pretrained(tmp)
            torch.save({"step": step, "optimizer": None if sharded else optimizer.state_dict(), "rng": _rng_state(),
                        "data": data_state, "scaler": scaler.state_dict() if scaler is not None else None},
                       tmp / "trainer_state.pt")
            replace_dir(tmp, run / "checkpoint")
    except OSError as e:  # disk full, quota, folder removed under us: say so, keep the last good checkpoint
        failed = e.strerror or str(e)
    except CheckpointException as e:
        why = {r: x[0] if isinstance(x, tuple) else x for r, x in getattr(e, "failures", {}).items()}  # (error, frames)
        failed = "; ".join(f"process {r}: {getattr(x, 'strerror', None) or x}" for r, x in why.items()) or str(e)
    finally:
        if first:
            shutil.rmtree(tmp, ignore_errors=True)
    if sharded:  # every process learns whether any failed
        said = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(said, failed)
        failed = next((x for x in said if x), None)
    if failed:
        kept = f"the previous checkpoint in {run / 'checkpoint'} is intact" if (run / "checkpoint").exists() else "no earlier checkpoint exists"
        raise RuntimeError(f"step {step}: could not write the checkpoint ({failed}); {kept}")


def load_checkpoint(run: Path) -> dict:
    path = run / "checkpoint" / "trainer_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: nothing to resume (no checkpoint/trainer_state.pt)")
    return torch.load(path, weights_only=False)


def _trim_metrics(path: Path, step: int) -> None:
    """Keep only rows of steps before ``step`` (rows after the last checkpoint are recomputed on resume)."""
    trim_jsonl(path, lambda row: row["step"] < step)


def trim_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Keep only the rows of a JSONL file that ``keep`` accepts (rewritten atomically; none: emptied)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        tmp.replace(path)


def run_training(
    model,
    tokenizer,
    run: Path,
    settings: LoopSettings,
    next_batch: Callable[[dict], list],
    loss_fn: Callable,
    resume: bool = False,
    data_state: dict | None = None,
    describe: Callable[[dict], str] = lambda m: f"loss {m['loss']:.3f}",
    merge: bool = True,
    amp: torch.dtype | None = None,
    report_to: str = "none",
) -> list[dict]:
    """Train for ``settings.steps`` optimizer steps; returns the metric rows of this process.

    With ``resume`` the caller passes the model loaded from ``run/checkpoint``; the loop restores the
    optimizer, RNG states, step and data position saved beside it. ``amp``: run ``loss_fn`` under autocast
    to this dtype (fp16 with a gradient scaler); the weights and the optimizer stay as they are."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    rank, world = distributed()
    run.mkdir(parents=True, exist_ok=True)
    model.train()
    optimizer = make_optimizer(model, settings)
    sharded = is_sharded(model)
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type) if amp == torch.float16 else None
    data_state = dict(data_state or {})
    start = 0
    if resume:
        st = load_checkpoint(run)  # the caller built ``model`` from run/checkpoint
        if st["optimizer"] is None:  # written by a sharded run: one file per process, read back in shards
            load_sharded_optimizer(model, optimizer, run / "checkpoint" / SHARDED_OPTIMIZER)
        elif sharded:  # a 1-process (or DDP) checkpoint resumed under FSDP: each process keeps its shard of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, by_name(model, optimizer, st["optimizer"]),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(st["optimizer"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        _set_rng_state(st["rng"])
        start, data_state = st["step"], st["data"]
    else:
        torch.manual_seed(settings.seed)
    metrics_path = run / "metrics.jsonl"
    if rank == 0:
        check_free_space(run, model)
        if resume:
            _trim_metrics(metrics_path, start)
        else:
            metrics_path.write_text("")
    rows = []
    params = [p for p in model.parameters() if p.requires_grad]
    board = None
    if report_to == "tensorboard" and rank == 0:  # a resumed run drops the events after its checkpoint, as metrics
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(run / "tensorboard"), purge_step=start if resume else None)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), transient=True, disable=rank != 0) as progress:
        bar = progress.add_task(run.name, total=settings.steps, completed=start)
        for step in range(start, settings.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, settings)
            for g in optimizer.param_groups:
                g["lr"] = lr
            micro_batches = next_batch(data_state)  # the global batch: the same on every rank
            total_tokens = sum(mb["n_tokens"] for mb in micro_batches)
            if world > 1:
                micro_batches = [shard(mb, rank, world) for mb in micro_batches]
            optimizer.zero_grad(set_to_none=True)
            loss_sum, stats_sum, seen = 0.0, {}, 0
            learned = False
            for mb in micro_batches:
                with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss, stats = loss_fn(model, mb)
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + v / len(micro_batches)
                seen += mb.get("seen_tokens", 0)
                if loss is None:  # nothing to learn from this micro-batch (e.g. every RL group dropped)
                    continue
                # Each micro-batch's loss sum over the whole step's count: the same update as one big batch.
                part = loss / max(1, total_tokens)
                (scaler.scale(part) if scaler else part).backward()
                loss_sum += float(loss.detach())
                learned = True
            if world > 1:
                if not sharded:  # (FSDP reduce-scatters the gradients itself, in the backward)
                    all_reduce_grads(params)
                totals = torch.tensor([loss_sum, float(learned)], device=params[0].device)
                torch.distributed.all_reduce(totals)
                loss_sum, learned = float(totals[0]), bool(totals[1])
                stats_sum = mean_over_ranks(stats_sum)
            if scaler and learned:
                scaler.unscale_(optimizer)
            grad_norm = 0.0
            if learned:
                norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # (a DTensor under FSDP)
            # (under fp16 loss scaling an overflowing gradient is expected now and then: the scaler skips that step)
            if not math.isfinite(loss_sum) or (not math.isfinite(grad_norm) and scaler is None):
                raise FloatingPointError(
                    f"step {step}: non-finite loss ({loss_sum}) or gradient norm ({grad_norm}); "
                    f"the last good checkpoint is in {run / 'checkpoint'}"
                )
            if learned and step == start:  # AdamW's state is allocated by its first step: give it freed pages
                release_host_memory()
            if learned and scaler:
                scaler.step(optimizer)
                scaler.update()
            elif learned:  # no step on an empty batch: AdamW's momentum would still move the weights
                optimizer.step()
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": loss_sum / max(1, total_tokens), "lr": lr, "grad_norm": grad_norm,
                   "tokens": total_tokens, "seen_tokens": seen, "step_time": dt, "tokens_per_s": seen / dt,
                   **stats_sum}
            rows.append(row)
            if rank == 0:  # one writer: rank 0 logs and checkpoints (every rank holds the same weights)
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                if board is not None:
                    for key, value in row.items():
                        if key != "step" and isinstance(value, (int, float)):
                            board.add_scalar(key, value, step)
                    board.flush()
                progress.update(bar, advance=1, description=f"{run.name} {describe(row)} {row['tokens_per_s']:.0f} tok/s")
            done = step + 1
            if saves_after(done, settings) and (rank == 0 or sharded):  # (sharded: every process writes its shard)
                save_checkpoint(run, model, tokenizer, optimizer, done, data_state, scaler)
    if board is not None:
        board.close()
    model.eval()
    if rank == 0 or sharded:
        save_final(model, tokenizer, run, merge)
    if world > 1:
        torch.distributed.barrier()  # no rank leaves before the model is written
    return rows
