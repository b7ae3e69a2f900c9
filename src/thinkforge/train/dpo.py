"""Direct preference optimisation: the policy learns from preference pairs with no reward model.

    thinkforge train dpo --model runs/demo/sft-cot/model --data runs/prefs.jsonl --out runs/dpo --beta 0.1
    thinkforge train dpo ... --loss ipo --beta 0.5

Every ranking of the preference file (``thinkforge.preferences``) expands to its pairs (better, worse).
The reference is the starting model, frozen; its sequence log-probabilities are computed once before
training (as TRL's ``precompute_ref_log_probs``), so a step is one forward and backward of the policy.
Losses (``losses.DPO_LOSSES``): ``sigmoid`` (DPO, Rafailov et al. 2023; log-probabilities summed over
completion tokens) and ``ipo`` (Azar et al. 2023; token-averaged log-probabilities, as TRL does). Logged
with TRL's names: ``rewards/chosen`` and ``rewards/rejected`` (β · log-ratio), ``rewards/accuracies``,
``rewards/margins``.

When the task has a gold preference (``Task.gold_utility``), ``eval.json`` compares the trained policy
with its start on ``eval_problems`` held-out problems: gold utility of the greedy completion and of
``eval_samples`` samples, and greedy accuracy, with paired bootstrap intervals over problems.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkforge import format as fmt
from thinkforge.config import ConfigError, check, option, save_config
from thinkforge.metrics import paired_bootstrap
from thinkforge.models import base_only, is_lora, is_sharded, load_model, resolve_device
from thinkforge.preferences import gold_scores, prompt_text, read_preferences
from thinkforge.scorers import pad_rows
from thinkforge.tasks import get_task
from thinkforge.train.loop import (
    ItemBatcher,
    LoopSettings,
    ModelOptions,
    autocast_dtype,
    distributed,
    load_trainee,
    run_training,
    start_run,
)
from thinkforge.train.losses import DPO_LOSSES


@dataclass
class DPOConfig(ModelOptions):
    model: str = option("runs/demo/sft-cot/model", "the starting policy (also the frozen reference)")
    data: str = option("runs/prefs.jsonl", "preference file: pairs or K-wise rankings (.jsonl / .parquet)")
    out: str = option("runs/dpo", "run folder")
    loss: str = option("sigmoid", f"loss: {', '.join(DPO_LOSSES)}")
    beta: float = option(0.1, "β: the strength of the implicit KL leash to the reference (larger = closer)")
    steps: int = option(200, "optimizer steps")
    batch_size: int = option(32, "preference pairs per step")
    micro_batch_size: int = option(0, "pairs per forward/backward (0: the whole batch); the update is the same")
    lr: float = option(5e-5, "peak learning rate")
    min_lr_ratio: float = option(1.0, "final lr share (cosine; 1.0 = constant after warm-up)")
    warmup: int = option(10, "warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay on matrices")
    grad_clip: float = option(1.0, "gradient-norm clip")
    max_len: int = option(384, "longest prompt + completion in tokens (a longer pair is an error, never cut)")
    task: str | None = option("mul", "task whose gold preference evaluates the result (none: skip the evaluation)")
    task_options: dict = option({}, "the task's knobs")
    eval_problems: int = option(200, "held-out problems for eval.json (0 = skip)")
    eval_samples: int = option(4, "sampled completions per held-out problem")
    max_new_tokens: int = option(128, "completion length cap in the evaluation")

    def __post_init__(self):
        super().__post_init__()
        check(self.loss in DPO_LOSSES, f"loss must be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}")
        check(self.beta > 0 and self.lr > 0, "need beta > 0 and lr > 0")
        for name in ("steps", "batch_size", "max_len", "eval_samples", "max_new_tokens"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.eval_problems >= 0 and self.micro_batch_size >= 0, "need eval_problems >= 0, micro_batch_size >= 0")


def encode_pairs(rankings, tok, max_len: int) -> list[dict]:
    """Every (better, worse) pair as token ids with the completion's start."""
    out = []
    for k, r in enumerate(rankings):
        p = tok.encode(prompt_text(r.prompt, tok), add_special_tokens=False)
        # the end-of-turn token ends every completion, as in SFT (TRL appends EOS the same way)
        end = fmt.ChatFormat.of(tok).end
        comps = [tok.encode(c if c.endswith(end) else c + end, add_special_tokens=False)
                 for c in r.completions]
        for i, j in r.pairs():
            if len(p) + max(len(comps[i]), len(comps[j])) > max_len:
                raise ConfigError(f"preference row {k + 1}: {len(p) + max(len(comps[i]), len(comps[j]))} tokens, "
                                  f"more than max_len={max_len}: raise --max-len")
            out.append({"better": p + comps[i], "worse": p + comps[j], "start": len(p)})
    return out


def sequence_logps(model, seqs: list[list[int]], starts: list[int], pad_id: int, device, mean: bool) -> torch.Tensor:
    """Sum (or mean) of log π over each sequence's completion tokens. (S,)"""
    from thinkforge.models import token_logprobs

    ids = pad_rows(seqs, pad_id).to(device)
    logp, _ = token_logprobs(model, ids, 1.0)  # (S, T-1): position t predicts token t+1
    mask = torch.zeros_like(logp)
    for row, (s, st) in enumerate(zip(seqs, starts)):
        mask[row, st - 1 : len(s) - 1] = 1.0
    total = (logp * mask).sum(1)
    return total / mask.sum(1).clamp(min=1) if mean else total


@torch.no_grad()
def add_reference(pairs: list[dict], ref, pad_id: int, device, mean: bool, chunk: int = 32) -> None:
    for i in range(0, len(pairs), chunk):
        part = pairs[i : i + chunk]
        seqs = [p["better"] for p in part] + [p["worse"] for p in part]
        lp = sequence_logps(ref, seqs, [p["start"] for p in part] * 2, pad_id, device, mean).cpu()
        for k, p in enumerate(part):
            p["ref_better"], p["ref_worse"] = float(lp[k]), float(lp[len(part) + k])


def make_loss_fn(cfg: DPOConfig, pad_id: int, device):
    loss_of, mean = DPO_LOSSES[cfg.loss]
    rank, world = distributed()

    def loss_fn(model, mb: dict):
        mine = mb["pairs"][rank::world]  # each process its share; the loop divides by the global count
        if not mine:
            return None, {}
        n = len(mine)
        lp = sequence_logps(model, [p["better"] for p in mine] + [p["worse"] for p in mine],
                            [p["start"] for p in mine] * 2, pad_id, device, mean)
        ref = torch.tensor([p["ref_better"] for p in mine] + [p["ref_worse"] for p in mine], device=lp.device)
        ratio = lp - ref  # (2n,)
        better, worse = ratio[:n], ratio[n:]
        losses = loss_of(better, worse, cfg.beta)
        rb, rw = cfg.beta * better.detach(), cfg.beta * worse.detach()
        return losses.sum(), {"rewards/chosen": float(rb.mean()), "rewards/rejected": float(rw.mean()),
                              "rewards/accuracies": float((rb > rw).float().mean()),
                              "rewards/margins": float((rb - rw).mean())}

    return loss_fn


def train_dpo(cfg: DPOConfig) -> Path:
    """Train the policy on the preference pairs; ``eval.json`` compares it with its start by gold preference."""
    run = start_run(cfg.out, cfg)
    device = resolve_device(cfg.device)
    rankings = read_preferences(cfg.data)
    model, tok = load_trainee(cfg, cfg.model, run, device)
    if os.environ.get("RANK", "0") == "0":
        save_config(cfg, run / "config.toml")
    pairs = encode_pairs(rankings, tok, cfg.max_len)
    if is_lora(model):  # the start is the base under the adapter: no second copy
        with base_only(model):
            add_reference(pairs, model.eval(), tok.pad_token_id, device, DPO_LOSSES[cfg.loss][1])
    else:
        ref = load_model(cfg.model, device=str(device), dtype=torch.float32)[0].eval()  # the start, also on resume
        add_reference(pairs, ref, tok.pad_token_id, device, DPO_LOSSES[cfg.loss][1])
        del ref
    settings = LoopSettings(cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio, cfg.weight_decay, cfg.grad_clip,
                            cfg.save_every, cfg.seed)
    batcher = ItemBatcher(pairs, cfg.batch_size, cfg.seed, "pairs", lambda p: len(p["better"]) + len(p["worse"]),
                          cfg.micro_batch_size)
    run_training(model, tok, run, settings, batcher,
                 make_loss_fn(cfg, tok.pad_token_id, device), report_to=cfg.report_to, resume=cfg.resume, merge=cfg.merge,
                 amp=autocast_dtype(cfg.dtype, device),
                 describe=lambda m: f"loss {m['loss']:.3f} acc {m.get('rewards/accuracies', 0):.2f}")
    if cfg.task and cfg.eval_problems and os.environ.get("RANK", "0") == "0":
        trained = load_model(str(run / "model"), device=str(device))[0] if is_sharded(model) else model
        report = compare_by_gold(cfg.model, trained, tok, get_task(cfg.task, **cfg.task_options), cfg.eval_problems,
                                 cfg.eval_samples, cfg.max_new_tokens, cfg.seed, device)
        (run / "eval.json").write_text(json.dumps({"pairs": len(pairs), **report}, indent=2))
    return run


def compare_by_gold(start_path: str, model, tok, task, n_problems: int, samples: int, max_new_tokens: int, seed: int,
                    device) -> dict:
    """Gold utility and accuracy of ``model`` against the model at ``start_path`` on the same held-out
    problems and seeds, with paired bootstrap intervals."""
    problems = task.problems(n_problems, "test", seed=seed)
    start, _ = load_model(start_path, device=str(device))
    before = gold_scores(start.eval(), tok, task, problems, samples, max_new_tokens, seed)
    after = gold_scores(model.eval(), tok, task, problems, samples, max_new_tokens, seed)
    return {"problems": len(problems),
            **{k: {"start": sum(before[k]) / len(problems), "trained": sum(after[k]) / len(problems),
                   "difference": paired_bootstrap(before[k], after[k], seed=seed)} for k in before}}
