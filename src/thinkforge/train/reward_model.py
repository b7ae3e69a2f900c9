"""Reward models: an ORM (is the final answer right?) and a PRM (is each step right?), trained on CPU.

    thinkforge train rm --kind prm --labels gold --policy runs/demo/grpo/model --out runs/prm
    thinkforge train rm --kind prm --labels mc --task reasoning-gym:basic_arithmetic ...
    thinkforge train rm --kind orm --policy runs/demo/grpo/model --out runs/orm

Data: the policy samples ``samples`` completions for each of ``problems`` training problems; each is
cut into steps (``scorers.split_steps``: thinking lines, then the answer step) and labelled:

| labels | a step is right when … | needs |
|---|---|---|
| ``gold`` | the task's checker accepts it as gold step *i* (its position) | a task with gold steps |
| ``judge`` | Error-Propagation / Error-Cessation: it states a fact of the gold solution, whatever its position (a step built on an earlier error is wrong; one that redoes a step correctly, after "Wait", is right again); reflection lines without content are right | a task with gold steps |
| ``mc`` | Monte-Carlo roll-outs (Math-Shepherd, Wang et al. 2024): of ``mc_rollouts`` continuations from the prefix ending at it, any (hard) / the share (soft) reach a correct answer | any task with a verifier |

The answer step's label is the outcome (is the extracted answer correct). An external LLM judge that
applies the same rules is :func:`llm_judge_labels` (any OpenAI-compatible endpoint; prompt in
``JUDGE_PROMPT``).

Model: the policy's weights with a one-logit token-classification head (``AutoModelForTokenClassification``),
trained with binary cross-entropy (soft labels allowed) at the last token of every step (PRM), or at every
completion token with the outcome as target (ORM, Cobbe et al. 2021). The shared loop gives checkpoints,
exact resume and torchrun. After training, ``eval.json`` holds step precision / recall / F1 (wrong steps
as the positive class) on completions of held-out problems, labelled by the gold checkers when the task
has them (so an MC-trained PRM is measured against exact labels), plus the agreement of the training
labels with gold ones.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from thinkforge import format as fmt
from thinkforge.config import ConfigError, check, option, save_config
from thinkforge.generation import Engine, SamplingParams
from thinkforge.models import add_lora, is_sharded, load_model, resolve_device
from thinkforge.sampling import sample_and_grade
from thinkforge.scorers import (
    AGGREGATES,
    POOLINGS,
    RM_KINDS,
    RewardModel,
    aggregate,
    answer_steps,
    encode,
    pad_rows,
    ranking_accuracy,
    split_steps,
    step_metrics,
    step_text,
)
from thinkforge.tasks import Problem, Task, get_task
from thinkforge.tasks.files import write_jsonl
from thinkforge.train.loop import (
    EpochStream,
    LoopSettings,
    ModelOptions,
    autocast_dtype,
    prepare,
    run_training,
    start_run,
)

LABEL_SOURCES = ("gold", "judge", "mc")
REFLECTION = re.compile(r"^\W*(wait|hmm|let me|check|so far|ok(ay)?)\b[^0-9=]*$", re.IGNORECASE)


@dataclass
class RMConfig(ModelOptions):
    kind: str = option("prm", "prm: a score per step; orm: one score per completion; preference: a Bradley-Terry "
                               "reward learned from --data pairs / rankings (thinkforge preferences)")
    policy: str = option("runs/demo/grpo/model", "model whose sampled completions are labelled (and the default backbone)")
    model: str | None = option(None, "backbone to start from (default: the policy)")
    extra_layers: int = option(0, "fresh transformer layers on top of the backbone's (they start as the identity)")
    task: str = option("mul", "task name or .jsonl/.parquet file")
    task_options: dict = option({}, "the task's knobs")
    labels: str = option("gold", "step labels: gold, judge (Error Propagation/Cessation) or mc (Monte-Carlo roll-outs)")
    data: str | None = option(None, "labels.jsonl of an earlier run to train on, instead of sampling and labelling; "
                                    "for kind=preference the preference file (.jsonl / .parquet)")
    center_rewards: float = option(0.0, "preference: weight of (mean reward of a prompt's completions)^2 in the loss "
                                        "(reward centring, Eisenstein et al. 2023; TRL's center_rewards_coefficient)")
    eval_share: float = option(0.1, "preference: share of the prompts held out for eval.json (by prompt hash)")
    pooling: str = option("last", "preference: how the reward is read: a fresh scalar head's logit at the end-of-turn "
                                  "token (last, InstructGPT / TRL) or summed over the completion's tokens (sum); or no "
                                  "new head, the model's own log-probability of the completion (logprob)")
    problems: int = option(1000, "training-split problems to sample completions for")
    samples: int = option(4, "completions per problem")
    gold_traces: bool = option(True, "also train on each problem's gold trace (all steps right), when the task has one: "
                               "it gives every problem a right completion to contrast with the policy's wrong ones")
    temperature: float = option(1.0, "sampling temperature of the completions and the roll-outs")
    max_new_tokens: int = option(128, "completion length cap")
    mc_rollouts: int = option(8, "roll-outs per step for mc labels")
    mc_soft: bool = option(False, "mc labels: share of roll-outs that succeed (soft) instead of any (hard)")
    eval_problems: int = option(100, "held-out problems whose completions measure step F1 (0 = skip)")
    out: str = option("runs/prm", "run folder")
    steps: int = option(300, "optimizer steps")
    batch_size: int = option(32, "completions per step")
    micro_batch_size: int = option(0, "--kind preference: rankings per forward/backward (0: the whole batch); "
                                      "the update is the same")
    lr: float = option(5e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final lr share (cosine)")
    warmup: int = option(20, "warm-up steps")
    weight_decay: float = option(0.01, "AdamW weight decay on matrices")
    grad_clip: float = option(1.0, "gradient-norm clip")
    batch_rows: int = option(256, "rows generated together when sampling")

    def __post_init__(self):
        super().__post_init__()
        check(self.kind in RM_KINDS, f"kind must be one of {RM_KINDS}, got {self.kind!r}")
        check(self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        check(self.pooling == "last" or self.kind == "preference", "--pooling is for --kind preference")
        check(not (self.pooling == "logprob" and self.extra_layers), "--pooling logprob keeps the model as it is: "
                                                                      "no --extra-layers")
        check(self.labels in LABEL_SOURCES, f"labels must be one of {LABEL_SOURCES}, got {self.labels!r}")
        check(not (self.lora_r and self.extra_layers), "LoRA freezes the backbone, so fresh --extra-layers would stay "
                                                       "random: use one or the other")
        for name in ("problems", "samples", "max_new_tokens", "mc_rollouts", "steps", "batch_size", "batch_rows"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.eval_problems >= 0 and self.temperature > 0 and self.lr > 0, "need eval_problems >= 0, temperature > 0, lr > 0")
        check(self.kind != "preference" or self.data is not None, "kind=preference needs --data (a preference file)")
        check(0 <= self.eval_share < 1 and self.center_rewards >= 0, "need 0 <= eval_share < 1 and center_rewards >= 0")
        check(self.micro_batch_size >= 0 and (self.micro_batch_size == 0 or self.kind == "preference"),
              "micro_batch_size must be >= 0 and applies to --kind preference only (orm/prm batch by --batch-rows)")


# ---- step labels -------------------------------------------------------------------------------------

def gold_labels(task: Task, problem: Problem, completion: str, outcome: bool) -> list[float]:
    """Step i is right when the task's checker accepts it as gold step i; the answer step is the outcome."""
    head, steps, answers = answer_steps(completion, task.step_delimiter)
    return [float(outcome) if is_answer else float(task.check_step(problem, i, step_text(s)))
            for i, (s, is_answer) in enumerate(zip(steps, answers))]


def judge_labels(task: Task, problem: Problem, completion: str, outcome: bool) -> list[float]:
    """The Error-Propagation / Error-Cessation rules with the task's checkers as the judge of facts.

    A thinking step is right when it states a fact of the gold solution (it matches gold step j for some
    j, so it is not built on an earlier error) or is a reflection without content ("Wait", "let me
    check"); otherwise it is wrong. So a step that carries an earlier error forward is wrong (propagation)
    and a step that redoes an earlier step correctly is right again (cessation), which positional
    ``gold`` labels get wrong once a reflective trace repeats a step."""
    head, steps, answers = answer_steps(completion, task.step_delimiter)
    labels = []
    for s, is_answer in zip(steps, answers):
        text = step_text(s)
        if is_answer:
            labels.append(float(outcome))
        elif REFLECTION.match(text):
            labels.append(1.0)
        else:
            labels.append(float(task.gold_match(problem, text) is not None))
    return labels


def mc_labels(engine: Engine, task: Task, items: list[tuple[Problem, str, bool]], rollouts: int, soft: bool,
              temperature: float, max_new_tokens: int, seed: int, batch_rows: int = 256) -> list[list[float]]:
    """Monte-Carlo step labels for many ``(problem, completion, outcome)`` at once (Math-Shepherd).

    For every thinking step, ``rollouts`` continuations are sampled from the prompt plus the completion up
    to and including that step; the step's label is whether any (hard) or which share (soft) of them ends
    with a correct answer. The answer step is the outcome. With hard labels a correct completion is its
    own successful roll-out from every prefix, so its steps are all 1 without sampling."""
    labels: list[list[float]] = []
    jobs: list[tuple[int, int, str]] = []  # (item, step, completion up to and including the step)
    for i, (prob, completion, outcome) in enumerate(items):
        head, steps, answers = answer_steps(completion, task.step_delimiter)
        labels.append([float(outcome)] * len(steps))
        if outcome and not soft:
            continue
        done = head
        for k, (s, is_answer) in enumerate(zip(steps, answers)):
            done += s
            if not is_answer:
                jobs.append((i, k, done))
    per_call = max(1, batch_rows // rollouts)
    for start in range(0, len(jobs), per_call):
        chunk = jobs[start : start + per_call]
        params = SamplingParams(n=rollouts, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + start)
        outs = engine.generate([engine.chat.prompt(items[i][0].question) + done for i, _, done in chunk], params)
        for j, (i, k, done) in enumerate(chunk):
            prob = items[i][0]
            wins = [task.score(prob, task.extract(done + o.text)) >= 1.0
                    for o in outs[j * rollouts : (j + 1) * rollouts]]
            labels[i][k] = sum(wins) / rollouts if soft else float(any(wins))
    return labels


JUDGE_PROMPT = """You are checking a step-by-step solution, one step at a time.

Problem: {question}
Correct final answer: {answer}

Steps:
{steps}

Rules:
- A step is correct if everything it states is true and it follows from the problem and the correct steps before it.
- Error Propagation: a step that uses or builds on an earlier wrong step is wrong, even if its own arithmetic is right.
- Error Cessation: a step that notices and corrects an earlier error, or starts a new approach free of earlier errors, is correct.
- A reflection without a claim ("Wait", "let me check") is correct.

Reply with exactly one line per step, "<number>: correct" or "<number>: wrong", and nothing else."""


def judge_messages(problem: Problem, steps: list[str]) -> list[dict]:
    listing = "\n".join(f"{i + 1}. {step_text(s)}" for i, s in enumerate(steps))
    return [{"role": "user", "content": JUDGE_PROMPT.format(question=problem.question, answer=problem.answer,
                                                            steps=listing)}]


def parse_judgement(reply: str, n_steps: int) -> list[float]:
    """Labels from a judge's reply; raises ValueError if a step has no verdict."""
    verdicts = {int(m[1]): m[2].lower() for m in re.finditer(r"(?m)^\s*(\d{1,6})\s*[:.)-]\s*(correct|wrong)\b", reply, re.I)}
    missing = [i + 1 for i in range(n_steps) if i + 1 not in verdicts]
    if missing:
        raise ValueError(f"judge reply has no verdict for step(s) {missing}: {reply[:200]!r}")
    return [float(verdicts[i + 1] == "correct") for i in range(n_steps)]


def llm_judge_labels(client, model: str, problem: Problem, completion: str, delimiter: str = "\n") -> list[float]:
    """Step labels from an LLM judge behind any OpenAI-compatible endpoint (``client`` is an ``openai.OpenAI``,
    e.g. ``OpenAI(base_url="http://localhost:8000/v1")`` in front of ``thinkforge serve`` or vLLM)."""
    head, steps = split_steps(completion, delimiter)
    reply = client.chat.completions.create(model=model, messages=judge_messages(problem, steps), temperature=0)
    return parse_judgement(reply.choices[0].message.content or "", len(steps))


def label_completions(cfg: RMConfig, task: Task, policy, tok, problems: list[Problem], source: str,
                      seed: int, add_gold: bool = False) -> list[dict]:
    """Sample ``cfg.samples`` completions per problem (plus its gold trace if ``add_gold``) and label their
    steps; one row per completion."""
    engine = Engine(policy, tok)
    params = SamplingParams(n=cfg.samples, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=seed)
    with torch.no_grad():
        graded = sample_and_grade(engine, task, problems, params, cfg.batch_rows)
    items = [(g.problem, c.text, ok) for g in graded for c, ok in zip(g.completions, g.correct)]
    if add_gold and task.has_gold_steps:
        items += [(p, fmt.render_completion(p.answer, "\n".join(p.steps)), True) for p in problems]
    if source == "mc":
        with torch.no_grad():
            labels = mc_labels(engine, task, items, cfg.mc_rollouts, cfg.mc_soft, cfg.temperature,
                               cfg.max_new_tokens, seed, cfg.batch_rows)
    else:
        fn = gold_labels if source == "gold" else judge_labels
        labels = [fn(task, p, c, ok) for p, c, ok in items]
    rows = []
    for (p, c, ok), lab in zip(items, labels):
        row = {"problem_id": p.id, "question": p.question, "completion": c, "outcome": float(ok), "labels": lab}
        if task.has_gold_steps and source != "gold":
            row["gold_labels"] = gold_labels(task, p, c, ok)
        rows.append(row)
    return rows


def read_labels(path: str) -> list[dict]:
    """Rows of a labels.jsonl; errors name the file, line and field."""
    from thinkforge.tasks.files import iter_jsonl

    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file")
    rows = []
    for n, row in iter_jsonl(Path(path)):
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{n}: expected an object")
        for key, kind in (("question", str), ("completion", str), ("labels", list)):
            if not isinstance(row.get(key), kind):
                raise ConfigError(f"{path}:{n}: field {key!r} must be a {kind.__name__}")
        if not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in row["labels"]):
            raise ConfigError(f"{path}:{n}: field 'labels' must hold numbers in [0, 1]")
        if len(split_steps(row["completion"])[1]) != len(row["labels"]):
            raise ConfigError(f"{path}:{n}: {len(row['labels'])} labels but the completion has "
                              f"{len(split_steps(row['completion'])[1])} steps")
        row.setdefault("outcome", row["labels"][-1] if row["labels"] else 0.0)
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


# ---- training ------------------------------------------------------------------------------------------

def examples_of(rows: list[dict], tok, kind: str, delimiter: str) -> list[tuple[list[int], list[int], list[float]]]:
    """(ids, labelled positions, targets) per row: step ends (PRM) or every completion token (ORM)."""
    out = []
    for row in rows:
        ids, ends, start = encode(tok, fmt.ChatFormat.of(tok).prompt(row["question"]), row["completion"], delimiter)
        if kind == "orm":
            positions = list(range(start, len(ids)))
            targets = [float(row["outcome"])] * len(positions)
        else:
            positions, targets = ends, [float(x) for x in row["labels"]]
        if positions:
            out.append((ids, positions, targets))
    return out


class RMBatcher:
    """Seeded, resumable micro-batches of right-padded rows with a target per labelled position (-1 elsewhere)."""

    def __init__(self, examples, batch_size: int, pad_id: int, seed: int, device):
        self.stream, self.batch_size, self.pad, self.device = EpochStream(examples, seed), batch_size, pad_id, device

    def __call__(self, state: dict) -> list[dict]:
        rows = [self.stream.next(state) for _ in range(self.batch_size)]
        ids = pad_rows([r[0] for r in rows], self.pad)
        targets = torch.full(ids.shape, -1.0)
        for b, (_, pos, tgt) in enumerate(rows):
            targets[b, pos] = torch.tensor(tgt)
        return [{"input_ids": ids.to(self.device), "targets": targets.to(self.device),
                 "n_tokens": int((targets >= 0).sum()), "seen_tokens": sum(len(r[0]) for r in rows)}]


def rm_loss(model, mb: dict):
    """Summed binary cross-entropy at the labelled positions; accuracy of the 0.5-thresholded prediction."""
    logits = model(input_ids=mb["input_ids"]).logits[..., 0].float()  # (B, T)
    sel = mb["targets"] >= 0
    z, y = logits[sel], mb["targets"][sel]
    loss = F.binary_cross_entropy_with_logits(z, y, reduction="sum")
    return loss, {"label_accuracy": float(((z > 0) == (y >= 0.5)).float().mean()) if sel.any() else 0.0}


def _backbone(path: str, device, extra_layers: int = 0, dropout: float | None = None):
    """The policy's weights under a fresh one-logit token-classification head, optionally with
    ``extra_layers`` new layers on top whose output projections start at zero (so they start as the
    identity on the residual stream). ``dropout`` sets the head's dropout (transformers' default is 0.1;
    the preference RM and PPO's value model use 0, as TRL does, so a run does not depend on how its rows
    are split over processes; the PRM/ORM keep the default their measured figures were made with)."""
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    _, tok = load_model(path, device="cpu")  # the same checks and messages as any model load
    config = AutoConfig.from_pretrained(path, num_labels=1)
    if dropout is not None:
        config.classifier_dropout = dropout
    base = config.num_hidden_layers
    config.num_hidden_layers = base + extra_layers
    if getattr(config, "layer_types", None):
        config.layer_types = (config.layer_types + config.layer_types[-1:] * extra_layers)[: base + extra_layers]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head (and layers) are reported missing: expected
    try:
        model = AutoModelForTokenClassification.from_pretrained(path, config=config)
    finally:
        hf_logging.set_verbosity(verbosity)
    with torch.no_grad():
        for layer in model.base_model.layers[base:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model.to(device), tok


def load_rm(cfg: RMConfig, run: Path, device, dropout: float | None = None):
    """(model, tokenizer) the reward-model trainers start from: the backbone with a fresh head (seeded), with
    LoRA adapters (the head trained whole) when ``cfg.lora_r``; on resume, ``run/checkpoint`` (a LoRA checkpoint
    goes back on the same backbone). ``pooling = "logprob"``: the backbone's own causal LM, no new head.
    Activation checkpointing and FSDP2 as ``cfg`` asks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    path, ck = cfg.model or cfg.policy, run / "checkpoint"
    torch.manual_seed(cfg.seed)  # the new head's initial weights
    lm = cfg.pooling == "logprob"  # the preference RM that keeps the LM head: no new head

    def backbone(extra_layers: int = 0):
        return load_model(path, device=str(device)) if lm else _backbone(path, device, extra_layers, dropout)

    if cfg.resume and (ck / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(backbone()[0], str(ck), is_trainable=True)
        tok = AutoTokenizer.from_pretrained(str(ck))
    elif cfg.resume:
        model = (AutoModelForCausalLM if lm else AutoModelForTokenClassification).from_pretrained(str(ck)).to(device)
        tok = AutoTokenizer.from_pretrained(str(ck))  # saved with every checkpoint
    else:
        model, tok = backbone(cfg.extra_layers)
        if cfg.lora_r:
            model = add_lora(model, path, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout,
                             **({} if lm else {"keep": ("score",), "task_type": "TOKEN_CLS"}))
    return prepare(model, cfg), tok


def train_reward_model(cfg: RMConfig) -> Path:
    """Label (or read) the data, train the ORM/PRM, write ``model/``, ``labels.jsonl`` and ``eval.json``."""

    if cfg.kind == "preference":
        from thinkforge.train.preference_rm import train_preference_rm

        return train_preference_rm(cfg)
    run = start_run(cfg.out, cfg)
    device = resolve_device(cfg.device)
    task = get_task(cfg.task, **cfg.task_options)
    if cfg.labels in ("gold", "judge") and not task.has_gold_steps and cfg.kind == "prm" and not cfg.data:
        raise ConfigError(f"task {cfg.task!r} has no step checker for labels={cfg.labels!r}: use labels=mc")
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        save_config(cfg, run / "config.toml")
    policy, tok = load_model(cfg.policy, device=str(device))
    if cfg.data:
        rows = read_labels(cfg.data)
    elif cfg.resume and (run / "labels.jsonl").is_file():
        rows = read_labels(str(run / "labels.jsonl"))  # the labels the interrupted run trained on
    else:
        problems = task.problems(cfg.problems, "train", seed=cfg.seed)
        rows = label_completions(cfg, task, policy, tok, problems, cfg.labels, cfg.seed, add_gold=cfg.gold_traces)
        if rank0:
            write_jsonl(rows, run / "labels.jsonl")
    model, tok = load_rm(cfg, run, device)
    model.config.thinkforge_rm = {"kind": cfg.kind, "step_delimiter": task.step_delimiter}
    examples = examples_of(rows, tok, cfg.kind, task.step_delimiter)
    if not examples:
        raise ConfigError(f"{cfg.out}: no labelled steps to train on")
    settings = LoopSettings(cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio, cfg.weight_decay, cfg.grad_clip,
                            cfg.save_every, cfg.seed)
    run_training(model, tok, run, settings, RMBatcher(examples, cfg.batch_size, tok.pad_token_id, cfg.seed, device),
                 rm_loss, report_to=cfg.report_to, resume=cfg.resume, amp=autocast_dtype(cfg.dtype, device),
                 describe=lambda m: f"loss {m['loss']:.3f} acc {m['label_accuracy']:.2f}")
    if rank0 and cfg.eval_problems:
        rm = (RewardModel.load(str(run / "model"), str(device)) if is_sharded(model)  # (a sharded forward needs
              else RewardModel(model.eval(), tok, cfg.kind, task.step_delimiter))  # every rank: read the saved one)
        report = evaluate_reward_model(rm, cfg, task, policy, tok, rows)
        (run / "eval.json").write_text(json.dumps(report, indent=2))
    return run


def evaluate_reward_model(rm: RewardModel, cfg: RMConfig, task: Task, policy, tok, train_rows: list[dict]) -> dict:
    """Step P/R/F1 on completions of held-out problems (gold labels when the task has them), outcome
    detection for an ORM, and how the training labels agree with gold ones."""
    held_out = task.problems(cfg.eval_problems, "test", seed=cfg.seed)
    source = "gold" if task.has_gold_steps else cfg.labels
    rows = label_completions(cfg, task, policy, tok, held_out, source, cfg.seed + 1)
    scores = rm.score([r["question"] for r in rows], [r["completion"] for r in rows])
    truth = [[r["outcome"]] for r in rows] if cfg.kind == "orm" else [r["labels"] for r in rows]
    report = {"kind": cfg.kind, "labels": cfg.labels, "eval_labels": source, "completions": len(rows),
              "step": step_metrics(scores, truth),
              "ranking": {agg: ranking_accuracy([r["question"] for r in rows], [aggregate(x, agg) for x in scores],
                                                [r["outcome"] for r in rows]) for agg in AGGREGATES}}
    if "gold_labels" in (train_rows[0] if train_rows else {}):
        report["train_labels_vs_gold"] = step_metrics([r["labels"] for r in train_rows],
                                                      [r["gold_labels"] for r in train_rows])
    return report

