"""A Bradley–Terry reward model learned from preferences (InstructGPT's reward model).

    thinkforge preferences --model runs/demo/sft-cot/model --out runs/prefs.jsonl
    thinkforge train rm --kind preference --data runs/prefs.jsonl --policy runs/demo/sft-cot/model --out runs/bt

The model is the policy's weights under a one-logit head (``AutoModelForTokenClassification``, an
ordinary HF checkpoint); the reward of ``prompt + completion`` is the logit at the end-of-turn token
appended to it (``scorers.preference_ids``; TRL's RewardTrainer appends EOS the same way), or with
``pooling = "sum"`` the head's logits summed over the completion. ``pooling = "logprob"`` adds no head: the
reward is the model's own log-probability of the completion and end token (the policy's causal LM, saved
as one), so what the language model already predicts about each token is kept
(``scorers.preference_rewards`` owns the three). The loss
per comparison is −log σ(r_better − r_worse − margin) (``losses.bradley_terry_loss``); a K-wise ranking
contributes the *mean* over its K(K−1)/2 comparisons as one element of the batch (InstructGPT §3.5:
so the model does not overfit to the many correlated pairs of one prompt), and the step's loss is the
sum over rankings divided by their number. ``center_rewards`` adds λ·(mean reward of the prompt's
completions)², which pins the otherwise free offset near 0 (Eisenstein et al. 2023; TRL's
``center_rewards_coefficient`` uses (r_chosen + r_rejected)² for pairs, the same up to a factor 4).

A share ``eval_share`` of the prompts (chosen by a hash of the prompt) is held out; ``eval.json``
reports the reward model's pairwise accuracy on their labels with a 95% bootstrap interval over
prompts, its agreement with the gold preference (when the rows carry ``gold_ranking``), and the
labeller's own agreement with gold on the same rows — the ceiling a reward model of noisy labels is
measured against — and under ``start`` the same for the model training started from.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from thinkforge.config import ConfigError, save_config
from thinkforge.metrics import ci_record
from thinkforge.models import is_sharded, resolve_device
from thinkforge.preferences import Ranking, agreement, prompt_text, read_preferences
from thinkforge.scorers import RewardModel, pad_rows, preference_ids, preference_rewards
from thinkforge.tasks import hash_fraction
from thinkforge.train.loop import ItemBatcher, LoopSettings, autocast_dtype, distributed, run_training, start_run
from thinkforge.train.losses import bradley_terry_loss
from thinkforge.train.reward_model import RMConfig, load_rm


def held_out(prompt: str, share: float) -> bool:
    """Whether ``prompt`` is in the held-out share. Its own salt: the task splits hash the unsalted
    question, so every training-split prompt would otherwise land on one side."""
    return hash_fraction(prompt, salt=b"tf-prefs") < share


def encode_ranking(tok, r: Ranking) -> dict:
    """Token ids of every completion after the prompt (the same encoding ``RewardModel.score`` uses)."""
    prompt = prompt_text(r.prompt, tok)
    ids, starts = zip(*(preference_ids(tok, prompt, c) for c in r.completions))
    return {"ids": list(ids), "starts": list(starts), "pairs": r.pairs(), "margin": r.margin}


def make_loss_fn(center: float, pad_id: int, device, pooling: str = "last"):
    """Sum over this process's rankings of the mean BT loss of each ranking's pairs (+ centring)."""
    rank, world = distributed()

    def loss_fn(model, mb: dict):
        mine = mb["rankings"][rank::world]  # each process its share; the loop divides by the global count
        if not mine:
            return None, {"accuracy": 0.0, "margin": 0.0}
        seqs = [ids for r in mine for ids in r["ids"]]
        ids = pad_rows(seqs, pad_id).to(device)
        rewards = preference_rewards(model, ids, [len(s) for s in seqs], [st for r in mine for st in r["starts"]], pooling)
        loss, right, n_pairs, margin, start = 0.0, 0.0, 0, 0.0, 0
        for r in mine:
            rw = rewards[start : start + len(r["ids"])]
            start += len(r["ids"])
            better, worse = (torch.tensor(x) for x in zip(*r["pairs"]))
            loss = loss + bradley_terry_loss(rw[better], rw[worse], r["margin"]).mean()
            if center:
                loss = loss + center * rw.mean() ** 2
            diff = (rw[better] - rw[worse]).detach()
            right += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            margin += float(diff.sum())
            n_pairs += len(r["pairs"])
        return loss, {"accuracy": right / n_pairs, "margin": margin / n_pairs}

    return loss_fn


def _freeze_offset(model) -> None:
    """The Bradley-Terry loss cannot see a constant added to every reward, so the head's bias gets only
    rounding noise as gradient (which Adam would scale up into a random walk): keep it at 0, untrained."""
    for name, head in model.named_modules():  # the head, and under LoRA its trained copy too
        if "score" in name.split(".") and isinstance(head, torch.nn.Linear) and head.bias is not None:
            with torch.no_grad():
                head.bias.zero_()
            head.bias.requires_grad_(False)


def train_preference_rm(cfg: RMConfig) -> Path:
    """Read the preferences, hold out ``eval_share`` of the prompts, train, write ``model/`` and ``eval.json``."""

    run = start_run(cfg.out, cfg)
    device = resolve_device(cfg.device)
    rankings = read_preferences(cfg.data)
    train = [r for r in rankings if not held_out(r.prompt, cfg.eval_share)]
    test = [r for r in rankings if held_out(r.prompt, cfg.eval_share)]
    if not train:
        raise ConfigError(f"{cfg.data}: every prompt fell in the held-out share ({cfg.eval_share}): lower --eval-share")
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        save_config(cfg, run / "config.toml")
    model, tok = load_rm(cfg, run, device, dropout=0.0)
    _freeze_offset(model)
    model.config.thinkforge_rm = {"kind": "preference", "step_delimiter": "\n", "pooling": cfg.pooling}
    settings = LoopSettings(cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio, cfg.weight_decay, cfg.grad_clip,
                            cfg.save_every, cfg.seed)
    batcher = ItemBatcher([encode_ranking(tok, r) for r in train], cfg.batch_size, cfg.seed, "rankings",
                          lambda r: sum(len(x) for x in r["ids"]), cfg.micro_batch_size)
    run_training(model, tok, run, settings, batcher, make_loss_fn(cfg.center_rewards, tok.pad_token_id, device, cfg.pooling),
                 report_to=cfg.report_to, resume=cfg.resume, amp=autocast_dtype(cfg.dtype, device),  # (run/model: merged, what rm: loads)
                 describe=lambda m: f"loss {m['loss']:.3f} acc {m['accuracy']:.2f}")
    if rank0 and test:
        sharded = is_sharded(model)  # (then rank 0 reads the saved model: a sharded forward needs every rank)
        rm = RewardModel.load(str(run / "model"), str(device)) if sharded else RewardModel(model.eval(), tok, "preference", pooling=cfg.pooling)
        report = evaluate_preference_rm(rm, test, cfg.seed)
        report.update(train_rankings=len(train), data=cfg.data, start=_start_report(cfg, run, device, tok, test))
        (run / "eval.json").write_text(json.dumps(report, indent=2))
    return run


def _start_report(cfg: RMConfig, run: Path, device, tok, test: list[Ranking]) -> dict:
    """The same held-out measures for the model training started from (rebuilt as the run built it, seed included):
    what training added. For ``pooling = "logprob"`` that is the policy's own likelihood as a reward; for a fresh
    head, a random ranking."""
    start, _ = load_rm(replace(cfg, resume=False, fsdp=False, gradient_checkpointing=False), run, device, dropout=0.0)
    _freeze_offset(start)
    report = evaluate_preference_rm(RewardModel(start.eval(), tok, "preference", pooling=cfg.pooling), test, cfg.seed)
    return {k: v for k, v in report.items() if k in ("accuracy", "rm_agreement_with_gold")}


def evaluate_preference_rm(rm: RewardModel, rankings: list[Ranking], seed: int = 0) -> dict:
    """Held-out pairwise accuracy on the labels, agreement with gold, and the labeller's own agreement with
    gold; 95% intervals bootstrap over prompts (a prompt's pairs move together). Every distinct (prompt,
    completion) is scored once, in the reward model's batches: a completion that appears twice has one score,
    so such a pair stays a tie (0.5) whatever batch it fell in. No rankings: only the counts (0); no prompt with
    a gold-ordered pair: no agreement measures."""
    if not rankings:
        return {"held_out_rankings": 0, "held_out_pairs": 0}
    texts = [prompt_text(r.prompt, rm.tok) for r in rankings]
    unique = list(dict.fromkeys((t, c) for t, r in zip(texts, rankings) for c in r.completions))
    got = dict(zip(unique, (s[0] for s in rm.score([t for t, _ in unique], [c for _, c in unique]))))
    scores = [[got[(t, c)] for c in r.completions] for t, r in zip(texts, rankings)]
    per_prompt_acc = []
    for r, sc in zip(rankings, scores):
        hits = [1.0 if sc[i] > sc[j] else 0.5 if sc[i] == sc[j] else 0.0 for i, j in r.pairs()]
        per_prompt_acc.append(sum(hits) / len(hits))
    report = {"held_out_rankings": len(rankings), "held_out_pairs": sum(len(r.pairs()) for r in rankings)}
    report["accuracy"] = ci_record(per_prompt_acc, seed)
    gold = [r for r in rankings if r.gold_ranks is not None]
    if gold:
        rm_gold = [agreement([r], [sc])[0] for r, sc in zip(rankings, scores) if r.gold_ranks is not None]
        lab_gold = [agreement([r])[0] for r in gold]
        keep = [i for i, a in enumerate(rm_gold) if a]  # prompts with at least one gold-ordered pair
        if keep:
            report["rm_agreement_with_gold"] = ci_record([sum(rm_gold[i]) / len(rm_gold[i]) for i in keep], seed)
            report["labeller_agreement_with_gold"] = ci_record([sum(lab_gold[i]) / len(lab_gold[i]) for i in keep], seed)
    return report
