"""Preference data: pairs and K-wise rankings, read and checked; a simulated labeller that writes them.

    thinkforge preferences --model runs/demo/sft-cot/model --task mul --prompts 600 --k 4 --noise 0.25 \\
        --out runs/prefs.jsonl

Two row shapes, in JSONL or Parquet (a file may mix them):

| shape | fields | meaning |
|---|---|---|
| pair | ``prompt``, ``chosen``, ``rejected``; optional ``margin`` (≥ 0), ``labeller`` | TRL's convention: ``chosen`` is preferred |
| ranking | ``prompt``, ``completions`` (2–16 strings), ``ranking`` (one integer rank per completion, 0 = best); optional ``labeller`` | InstructGPT's K-wise ranking; equal ranks are declared ties |

``prompt`` is the user message (rendered with the model's chat template) or an already rendered prompt.
A bad row stops reading with ``file:line: field 'x' …``; nothing is dropped silently. A ranking expands
to every pair of different ranks — K(K−1)/2 without ties — kept together as one element of a batch
(InstructGPT: all of a prompt's comparisons in one batch element, so the reward model does not overfit).

**The simulated labeller** samples ``k`` completions per training prompt from a policy and ranks them by
the task's *gold preference* (``Task.gold_utility``: right beats wrong, fewer redundant steps, a later
first error), then adds label noise: with ``noise`` = p each adjacent pair of the gold order is swapped
with probability p (one pass), so a pair labeller (``k = 2``) agrees with the gold preference on a share
1 − p of the pairs it does not see as tied (InstructGPT reports ~73% agreement between people).
Completions of equal gold utility are declared ties. Each row also keeps ``gold_ranking`` (the
noise-free ranking), so the agreement of the labels — and of a reward model — with gold can be
measured.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from thinkforge import format as fmt
from thinkforge.config import ConfigError, check, option
from thinkforge.generation import Engine, SamplingParams
from thinkforge.sampling import sample_and_grade
from thinkforge.tasks import get_task
from thinkforge.tasks.files import write_jsonl

MAX_K = 16


@dataclass
class Ranking:
    """One prompt's completions and their ranks (0 = best; equal ranks are ties)."""

    prompt: str
    completions: list[str]
    ranks: list[int]
    margin: float = 0.0
    labeller: str | None = None
    gold_ranks: list[int] | None = None
    extra: dict = field(default_factory=dict)

    def pairs(self) -> list[tuple[int, int]]:
        """(better, worse) index pairs: every two completions of different rank."""
        n = len(self.completions)
        return [(i, j) for i in range(n) for j in range(n) if self.ranks[i] < self.ranks[j]]


def prompt_text(prompt: str, tok) -> str:
    """The prompt as the model reads it: a user message is rendered with the tokenizer's chat template."""
    return fmt.ChatFormat.of(tok).as_prompt(prompt)


def _ranking_of(row, where: str) -> Ranking:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected an object with 'prompt' and 'chosen'/'rejected' or 'completions'/'ranking'")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}: field 'prompt' must be a non-empty string")
    labeller = row.get("labeller")
    if labeller is not None and not isinstance(labeller, str):
        raise ConfigError(f"{where}: field 'labeller' must be a string")
    if "chosen" in row or "rejected" in row:
        for key in ("chosen", "rejected"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ConfigError(f"{where}: field {key!r} must be a non-empty string")
        margin = row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1e6:
            raise ConfigError(f"{where}: field 'margin' must be a number >= 0, got {margin!r}")
        return Ranking(prompt, [row["chosen"], row["rejected"]], [0, 1], float(margin), labeller,
                       _gold(row, 2, where))
    comps, ranks = row.get("completions"), row.get("ranking")
    if not isinstance(comps, list) or not 2 <= len(comps) <= MAX_K or not all(isinstance(c, str) and c for c in comps):
        raise ConfigError(f"{where}: field 'completions' must be a list of 2 to {MAX_K} non-empty strings "
                          "(or give 'chosen' and 'rejected')")
    if not isinstance(ranks, list) or len(ranks) != len(comps) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks):
        raise ConfigError(f"{where}: field 'ranking' must be one integer rank >= 0 per completion "
                          f"({len(comps)}), 0 = best, equal ranks for ties")
    if len(set(ranks)) < 2:
        raise ConfigError(f"{where}: field 'ranking' ranks every completion the same: no preference to learn")
    return Ranking(prompt, comps, ranks, 0.0, labeller, _gold(row, len(comps), where))


def _gold(row: dict, n: int, where: str) -> list[int] | None:
    gold = row.get("gold_ranking")
    if gold is not None and (not isinstance(gold, list) or len(gold) != n or not all(isinstance(g, int) for g in gold)):
        raise ConfigError(f"{where}: field 'gold_ranking' must be one integer rank per completion ({n})")
    return gold


def read_preferences(path: str | Path) -> list[Ranking]:
    """Every row of a preference file (JSONL or Parquet) as a :class:`Ranking`; errors name file, line, field."""
    from thinkforge.tasks.files import iter_jsonl

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such file")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = enumerate(pq.read_table(p).to_pylist(), 1)
        except Exception as e:  # pyarrow's own errors name no row
            raise ConfigError(f"{path}: not a readable Parquet file ({e})") from None
        out = [_ranking_of(r, f"{path}: row {n}") for n, r in rows]
    elif p.suffix == ".jsonl":
        out = [_ranking_of(r, f"{path}:{n}") for n, r in iter_jsonl(p)]
    else:
        raise ConfigError(f"{path}: preference data must be .jsonl or .parquet")
    if not out:
        raise ConfigError(f"{path}: no rows")
    return out


def agreement(rankings: list[Ranking], scores: list[list[float]] | None = None) -> tuple[list[float], int]:
    """Per gold-ordered pair (different gold ranks), 1.0 when the labels (or ``scores``, higher = better)
    order it as gold does (ties count half); and how many rankings carried no gold ranking."""
    out, missing = [], 0
    for k, r in enumerate(rankings):
        if r.gold_ranks is None:
            missing += 1
            continue
        n = len(r.completions)
        for i in range(n):
            for j in range(n):
                if r.gold_ranks[i] < r.gold_ranks[j]:
                    a, b = (r.ranks[j], r.ranks[i]) if scores is None else (scores[k][i], scores[k][j])
                    out.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return out, missing


def noisy_ranks(utilities: list[float], noise: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """(labelled ranks, gold ranks) of completions with these gold utilities: equal utilities tie; the
    labeller swaps each adjacent pair of the gold order with probability ``noise`` (one pass)."""
    levels = sorted(set(utilities), reverse=True)
    gold = [levels.index(u) for u in utilities]
    order = sorted(range(len(utilities)), key=lambda i: (gold[i], i))
    ranks = list(gold)
    for a in range(len(order) - 1):
        i, j = order[a], order[a + 1]
        if ranks[i] != ranks[j] and rng.random() < noise:
            ranks[i], ranks[j] = ranks[j], ranks[i]
            order[a], order[a + 1] = j, i
    return ranks, gold


@dataclass
class PreferencesConfig:
    model: str = option("runs/demo/sft-cot/model", "the policy whose completions are ranked")
    task: str = option("mul", "task name or .jsonl/.parquet file (its gold_utility is the labeller's preference)")
    task_options: dict = option({}, "the task's knobs")
    prompts: int = option(600, "training-split prompts")
    k: int = option(4, f"completions ranked per prompt (2 writes pairs; 3-{MAX_K} writes K-wise rankings)")
    noise: float = option(0.25, "chance that the labeller swaps an adjacent pair of the gold order (0 = gold labels)")
    temperature: float = option(1.0, "sampling temperature")
    max_new_tokens: int = option(128, "completion length cap")
    seed: int = option(0, "seed for the prompts, the samples and the label noise")
    split: str = option("train", "which split's prompts: train, or test for a held-out preference set")
    out: str = option("runs/prefs.jsonl", "JSONL file to write")
    batch_rows: int = option(256, "rows generated together")
    device: str = option("auto", "auto, cpu or cuda")

    def __post_init__(self):
        check(self.prompts >= 1 and 2 <= self.k <= MAX_K, f"need prompts >= 1 and 2 <= k <= {MAX_K}")
        check(0 <= self.noise <= 1 and self.temperature > 0, "need 0 <= noise <= 1 and temperature > 0")
        check(self.split in ("train", "test"), f"split must be train or test, got {self.split!r}")
        check(self.max_new_tokens >= 1 and self.batch_rows >= 1, "max_new_tokens and batch_rows must be >= 1")


def label_preferences(model, tok, task, problems, cfg: PreferencesConfig) -> tuple[list[dict], dict]:
    """Sample, rank by the gold preference with noise, and return the rows and their counts."""
    params = SamplingParams(n=cfg.k, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    with torch.no_grad():
        graded = sample_and_grade(Engine(model, tok), task, problems, params, cfg.batch_rows)
    rng = random.Random(cfg.seed)
    rows, flat = [], 0
    for g in graded:
        texts = [c.text.split(fmt.IM_END)[0] for c in g.completions]
        utils = [task.gold_utility(g.problem, t) for t in texts]
        ranks, gold = noisy_ranks(utils, cfg.noise, rng)
        if len(set(gold)) < 2:  # every completion equally good: nothing to prefer (counted, not written)
            flat += 1
            continue
        base = {"prompt": g.problem.question, "problem_id": g.problem.id, "labeller": f"gold+noise{cfg.noise}"}
        if cfg.k == 2:
            c, r = (0, 1) if ranks[0] < ranks[1] else (1, 0)
            rows.append({**base, "chosen": texts[c], "rejected": texts[r], "gold_ranking": [gold[c], gold[r]],
                         "gold_utility": [utils[c], utils[r]]})
        else:
            rows.append({**base, "completions": texts, "ranking": ranks, "gold_ranking": gold, "gold_utility": utils})
    labelled = [_ranking_of(r, "row") for r in rows]
    agree, _ = agreement(labelled)
    stats = {"prompts": len(problems), "rows": len(rows), "all_tied_prompts": flat,
             "pairs": sum(len(r.pairs()) for r in labelled),
             "label_agreement_with_gold": sum(agree) / len(agree) if agree else None}
    return rows, stats


def run_preferences(cfg: PreferencesConfig) -> dict:
    from thinkforge.models import load_model

    model, tok = load_model(cfg.model, device=cfg.device)
    task = get_task(cfg.task, **cfg.task_options)
    problems = task.problems(cfg.prompts, cfg.split, seed=cfg.seed)
    rows, stats = label_preferences(model, tok, task, problems, cfg)
    if not rows:
        raise ConfigError(f"{cfg.model}: every prompt's {cfg.k} completions were equally good: no preferences written")
    write_jsonl(rows, cfg.out)
    return {**stats, "out": cfg.out}


def gold_scores(model, tok, task, problems, samples: int = 4, max_new_tokens: int = 128, seed: int = 0,
                batch_rows: int = 256) -> dict[str, list[float]]:
    """Per problem: the gold utility of the greedy completion, the mean over ``samples`` sampled ones (T=1),
    and greedy correctness — what "the policy got better by the gold preference" is measured on."""
    engine = Engine(model, tok)
    out: dict[str, list[float]] = {}
    with torch.no_grad():
        for name, params in (("greedy", SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=seed)),
                             ("sampled", SamplingParams(n=samples, temperature=1.0, max_new_tokens=max_new_tokens,
                                                        seed=seed))):
            graded = sample_and_grade(engine, task, problems, params, batch_rows)
            out[name] = [sum(task.gold_utility(g.problem, c.text) for c in g.completions) / len(g.completions)
                         for g in graded]
            if name == "greedy":
                out["greedy_accuracy"] = [float(g.correct[0]) for g in graded]
    return out
