"""Supervised fine-tuning on reasoning traces (cold start, distillation, rejection-sampling SFT).

    thinkforge train sft --task mul --trace cot --model tiny --out runs/mul-cot --steps 300

Each example is ``prompt → completion``: the prompt is the question in the tokenizer's own chat template
(``format.ChatFormat``), the completion ``<think>\\n<gold steps>\\n</think>\\n<answer>…</answer>`` and the
template's end of turn (``<|im_end|>`` for thinkforge's tokenizers) (``--trace cot``), or just the answer
part (``--trace direct``). ``--data FILE.jsonl`` trains on ready-made ``{"prompt", "completion"}`` rows
instead (e.g. verified samples of a teacher): a prompt that is not rendered yet (does not end at the
assistant header) is rendered as one user message, and a completion without the end of turn gets it. The loss is next-token cross-entropy on completion
tokens only (prompt tokens masked), summed over the step's tokens and divided by their number.

Packing (default on): examples are laid end to end in rows of ``max_len`` tokens, each with its own
positions from 0 and a block-diagonal causal mask, so no example attends to another; the loss equals
the unpacked loss (a test checks this) while no compute goes to padding. Logits are computed only at
supervised positions, not over the prompt.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from thinkforge import format as fmt
from thinkforge.config import ConfigError, check, option, save_config
from thinkforge.models import (TINY_SIZES, char_tokenizer, gathered_call, head_logprobs, logit_rows, plain_head,
                               resolve_device, tiny_model)
from thinkforge.tasks import get_task
from thinkforge.train.loop import (
    EpochStream,
    LoopSettings,
    ModelOptions,
    autocast_dtype,
    load_trainee,
    prepare,
    run_training,
    start_run,
)


@dataclass
class SFTConfig(ModelOptions):
    task: str = option("mul", "task name (`thinkforge tasks list`) or a .jsonl/.parquet file of problems")
    task_options: dict = option({}, "the task's knobs, e.g. digits_a=3,digits_b=2")
    trace: str = option("cot", "cot: train on <think> gold steps then the answer; direct: the answer only; "
                               "mixed: cot for a share cot_share of the problems, direct for the rest")
    cot_share: float = option(0.1, "with trace=mixed: share of problems trained with their CoT trace")
    check_share: float = option(0.0, "share of CoT traces that re-check one step another way (Task.cold_start_steps; "
                                     "a primed cold start)")
    fix_share: float = option(0.0, "share of CoT traces with one deliberately wrong step, then 'wait, that step is "
                                   "wrong', then the step right")
    data: str | None = option(None, "JSONL of {prompt, completion} rows to train on instead of the task's gold traces")
    model: str = option("tiny", "'tiny' (from scratch, character tokenizer), a local folder or a hub id")
    size: str = option("small", f"size of a tiny model: {', '.join(TINY_SIZES)}")
    out: str = option("runs/sft", "run folder (config.toml, metrics.jsonl, checkpoint/, model/)")
    train_problems: int = option(20000, "number of distinct training problems drawn from the task")
    steps: int = option(300, "optimizer steps")
    batch_size: int = option(64, "rows per optimizer step (split into grad_accum micro-batches)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_len: int = option(128, "tokens per row; an example longer than this is an error, never cut")
    packing: bool = option(True, "lay examples end to end in rows (block-diagonal attention)")
    lr: float = option(2e-3, "peak learning rate (AdamW, betas 0.9/0.95)")
    min_lr_ratio: float = option(0.1, "final learning rate as a share of lr (cosine schedule)")
    warmup: int = option(20, "linear warm-up steps")
    weight_decay: float = option(0.01, "AdamW weight decay on matrices (not on norms or embeddings)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this")

    def __post_init__(self):
        super().__post_init__()
        check(self.trace in ("cot", "direct", "mixed"), f"trace must be 'cot', 'direct' or 'mixed', got {self.trace!r}")
        check(0 <= self.cot_share <= 1, f"cot_share must be in [0, 1], got {self.cot_share}")
        for name in ("check_share", "fix_share"):
            share = getattr(self, name)
            check(0 <= share <= 1, f"{name} must be in [0, 1], got {share}")
            check(share == 0 or (self.trace != "direct" and self.data is None),
                  f"{name} primes the task's CoT traces: it needs trace cot or mixed and no --data")
        for name in ("train_problems", "steps", "batch_size", "grad_accum", "max_len"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.batch_size % self.grad_accum == 0,
              f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        check(self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup >= 0,
              "need lr > 0, 0 <= min_lr_ratio <= 1, warmup >= 0")


def traces(cfg: SFTConfig) -> list[str]:
    """Each training problem's trace kind. ``mixed`` (a "base model" for R1-Zero that has seen some reasoning
    text, as a pretrained LM has, but answers directly by default): a seeded ``cot_share`` of the problems
    get their CoT trace, the rest the answer only."""
    if cfg.trace != "mixed":
        return [cfg.trace] * cfg.train_problems
    g = torch.Generator().manual_seed(cfg.seed + 1)
    return ["cot" if u < cfg.cot_share else "direct" for u in torch.rand(cfg.train_problems, generator=g).tolist()]


def completion_text(problem, trace: str, chat: fmt.ChatFormat, steps: list[str] | None = None) -> str:
    """The SFT target for a problem: its trace (``steps``, by default the gold steps) for ``cot``, or its answer
    alone, ended as ``chat`` ends a turn."""
    steps = problem.steps if steps is None else steps
    return chat.completion(problem.answer, "\n".join(steps) if trace == "cot" else None)


def load_pairs(path: str) -> list[tuple[str, str]]:
    """``{"prompt", "completion"}`` rows; errors name the file, line and field."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file")
    from thinkforge.tasks.files import iter_jsonl

    pairs = []
    for n, row in iter_jsonl(Path(path)):
        for key in ("prompt", "completion"):
            if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key]:
                raise ConfigError(f"{path}:{n}: field {key!r} must be a non-empty string")
        pairs.append((row["prompt"], row["completion"]))
    if not pairs:
        raise ConfigError(f"{path}: no rows")
    return pairs


def encode_pairs(pairs: list[tuple[str, str]], tok, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels with -100 on the prompt) per example; too long an example is an error."""
    out = []
    for i, (prompt, completion) in enumerate(pairs):
        p = tok.encode(prompt, add_special_tokens=False)
        c = tok.encode(completion, add_special_tokens=False)
        if len(p) + len(c) > max_len:
            raise ConfigError(f"example {i} has {len(p) + len(c)} tokens, more than max_len={max_len}: raise --max-len")
        out.append((p + c, [-100] * len(p) + c))
    return out


class Batcher:
    """Seeded, resumable stream of micro-batches. State: {'epoch', 'cursor'} into the epoch's permutation."""

    def __init__(self, examples, cfg: SFTConfig, pad_id: int, device):
        self.cfg, self.pad, self.device = cfg, pad_id, device
        self.stream = EpochStream(examples, cfg.seed)

    def __call__(self, state: dict) -> list[dict]:
        rows_per_micro = self.cfg.batch_size // self.cfg.grad_accum
        return [self._micro(state, rows_per_micro) for _ in range(self.cfg.grad_accum)]

    def _micro(self, state: dict, rows: int) -> dict:
        L = self.cfg.max_len
        ids = torch.full((rows, L), self.pad, dtype=torch.long)
        labels = torch.full((rows, L), -100, dtype=torch.long)
        pos = torch.zeros((rows, L), dtype=torch.long)
        seg = torch.full((rows, L), -1, dtype=torch.long)  # example number within the row; -1 = padding
        pending = state.pop("pending", None)
        for r in range(rows):
            t, k = 0, 0
            while True:
                ex = pending if pending is not None else self.stream.next(state)
                pending = None
                n = len(ex[0])
                if t + n > L:
                    pending = ex  # starts the next row
                    break
                ids[r, t : t + n], labels[r, t : t + n] = torch.tensor(ex[0]), torch.tensor(ex[1])
                pos[r, t : t + n], seg[r, t : t + n] = torch.arange(n), k
                t, k = t + n, k + 1
                if not self.cfg.packing:
                    break
        if pending is not None:
            state["pending"] = pending
        used = int((seg >= 0).sum(1).max())  # trim columns that are padding in every row
        ids, labels, pos, seg = ids[:, :used], labels[:, :used], pos[:, :used], seg[:, :used]
        if bool((seg <= 0).all()):
            # One example per row, padding only after it: causal attention alone never lets a real token see
            # the padding, so no mask is needed and SDPA takes its fast causal path.
            mask = None
        else:
            causal = torch.ones(used, used, dtype=torch.bool).tril()
            same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
            mask = ((same & causal) | torch.eye(used, dtype=torch.bool))[:, None].to(self.device)  # (b, 1, T, T)
            # (pad positions see themselves, so no attention row is empty: no NaN)
        return {
            "input_ids": ids.to(self.device), "labels": labels.to(self.device), "position_ids": pos.to(self.device),
            "attention_mask": mask,
            "n_tokens": int((labels[:, 1:] != -100).sum()), "seen_tokens": int((seg >= 0).sum()),
        }


def sft_loss(model, mb: dict):
    """Summed next-token cross-entropy over completion tokens, the output head applied only where there is a
    label: all at once when those logits fit in one block (``models.logit_rows``: a small vocabulary),
    else a block of positions at a time (:func:`models.head_logprobs`: no (tokens × vocab) logits). An
    FSDP2-sharded model the same, inside :func:`models.gathered_call`."""
    return gathered_call(model, _sft_loss, mb)


def _sft_loss(model, mb: dict):
    targets = mb["labels"][:, 1:]  # (b, T-1)
    sel = targets != -100
    inputs = dict(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], position_ids=mb["position_ids"])
    head = plain_head(model)
    if head is None:  # a capped or scaled head: the model's own logits
        logits = model(**inputs).logits[:, :-1][sel].float()  # (n, V)
    else:
        h = model.get_decoder()(**inputs).last_hidden_state[:, :-1][sel]  # (n, H)
        if h.shape[0] > logit_rows(head.weight.shape[0]):  # more than one block of logits
            hits = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
            loss = -head_logprobs(head, h, targets[sel], correct=hits).sum()
            return loss, {"token_accuracy": float(hits.float().mean()) if sel.any() else 0.0}
        logits = head(h).float()  # (n, V): one block
    loss = F.cross_entropy(logits, targets[sel], reduction="sum")
    acc = float((logits.argmax(-1) == targets[sel]).float().mean()) if sel.any() else 0.0
    return loss, {"token_accuracy": acc}


def train_sft(cfg: SFTConfig) -> Path:
    """Run SFT as configured; returns the run folder (final model in ``run/model``)."""
    if cfg.data:
        pairs = load_pairs(cfg.data)
        sample_text = [p + c for p, c in pairs[:500]]
    else:
        task = get_task(cfg.task, **cfg.task_options)
        if cfg.trace != "direct" and not task.has_gold_steps:
            raise ConfigError(f"task {cfg.task!r} has no gold steps: use --trace direct or --data with traces")
        problems = task.problems(cfg.train_problems, "train", seed=cfg.seed)
        sample_text = task.sample_text()
        try:
            cold = [task.cold_start_steps(p, cfg.check_share, cfg.fix_share) for p in problems]
        except NotImplementedError as e:
            raise ConfigError(f"--check-share/--fix-share: {e} (add can)") from None
    run = start_run(cfg.out, cfg)  # after the data is known good: a bad task or file leaves no run folder
    device = resolve_device(cfg.device)
    if cfg.model == "tiny" and not cfg.resume:
        tok = char_tokenizer(sample_text)
        model = prepare(tiny_model(tok, cfg.size, seed=cfg.seed).to(device), cfg)
    else:
        model, tok = load_trainee(cfg, cfg.model, run, device)
    chat = fmt.ChatFormat.of(tok)  # prompts in the tokenizer's own chat template
    if cfg.data:  # a prompt may be rendered already; a completion gets the end of turn unless it has it
        pairs = [(chat.as_prompt(p), c if c.endswith(chat.end) else c + chat.end) for p, c in pairs]
    else:
        pairs = [(chat.prompt(p.question), completion_text(p, t, chat, c)) for p, t, c in zip(problems, traces(cfg), cold)]
    examples = encode_pairs(pairs, tok, cfg.max_len)
    if os.environ.get("RANK", "0") == "0":
        save_config(cfg, run / "config.toml")
    settings = LoopSettings(cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio, cfg.weight_decay, cfg.grad_clip,
                            cfg.save_every, cfg.seed)
    run_training(model, tok, run, settings, Batcher(examples, cfg, tok.pad_token_id, device), sft_loss,
                 report_to=cfg.report_to, resume=cfg.resume, merge=cfg.merge, amp=autocast_dtype(cfg.dtype, device))
    return run


def cold_start(folder: Path, task: str, task_options: dict, steps: int, seed: int, threads: int, **overrides) -> str:
    """The experiments' default start policy (overopt, aha, attack): CoT SFT of a small tiny model, batch 64,
    lr 2e-3 held after warm-up, 5,000 problems (``overrides`` change any SFTConfig field), trained into
    ``folder`` once; an existing ``folder/model`` is kept. Returns the model folder."""
    model = Path(folder) / "model"
    if not (model / "config.json").is_file():
        train_sft(SFTConfig(**{**dict(task=task, task_options=task_options, trace="cot", size="small", steps=steps,
                                      batch_size=64, lr=2e-3, min_lr_ratio=1.0, train_problems=5000, out=str(folder),
                                      save_every=steps, seed=seed, overwrite=True, threads=threads), **overrides}))
    return str(model)
