"""Recipes run stage by stage. The first one is the demo: does thinking help at equal compute?

    thinkforge demo            # ~5 minutes on 2 CPU cores
    thinkforge demo --quick    # < 1 minute, for tests

Two models with the same architecture, the same training problems and the same number of training
tokens (so the same compute) are trained on 3-digit × 2-digit multiplication: one on direct answers,
one on chain-of-thought traces (partial products, digits least-significant first). Direct examples
are shorter, so at equal steps the direct model gets proportionally more rows per step
(``batch_size × mean CoT length / mean direct length``): it sees more problems, never fewer tokens.
Both are evaluated on held-out problems (greedy, sampled pass@1 over k samples, pass@k, maj@k with 95%
bootstrap intervals), and a paired bootstrap tests CoT against direct on the same problems.
Writes ``<out>/results.json``, ``<out>/report.md``, ``loss.png`` and ``accuracy.png``.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkforge.config import check, option
from thinkforge.evaluate import evaluate_model, format_rows, sweep
from thinkforge.metrics import paired_bootstrap
from thinkforge.models import keeps_torch_threads, load_model
from thinkforge.tasks import get_task


@dataclass
class DemoConfig:
    out: str = option("runs/demo", "output folder")
    quick: bool = option(False, "a < 1 minute version (a micro model, fewer steps, rows and problems) for tests")
    task: str = option("mul", "task with gold traces")
    task_options: dict = option({"digits_a": 3, "digits_b": 2}, "the task's knobs")
    size: str = option("small", "tiny model size (same for both models; quick: micro)")
    steps: int = option(450, "SFT steps per model (quick: 40)")
    train_problems: int = option(5000, "distinct training problems (measured: 5000 gave a stronger CoT model than 20000 at 450 steps)")
    batch_size: int = option(64, "rows per step of the CoT model (the direct model gets the same tokens)")
    max_len: int = option(128, "longest example in tokens")
    lr: float = option(2e-3, "peak learning rate")
    min_lr_ratio: float = option(1.0, "final lr share: 1.0 = constant after warm-up (measured: 23% vs 12% greedy CoT with decay to 0.1)")
    eval_problems: int = option(300, "held-out problems (quick: 40)")
    samples: int = option(8, "samples per problem for pass@1, pass@k and maj@k (quick: 4)")
    grpo_steps: int = option(200, "GRPO steps on top of the CoT model (0 = skip; quick: 4)")
    grpo_lr: float = option(6e-5, "GRPO learning rate (chosen among 2e-5, 4e-5, 6e-5, 8e-5 on other held-out problems)")
    grpo_dynamic_sampling: bool = option(False, "DAPO's dynamic sampling in the GRPO stage (resample problems whose "
                                                "group is all right or all wrong). Off: one roll-out batch per step; "
                                                "make demo on 2026-12-02 (AVX2 AMD EPYC), the same CoT model (24.7%): "
                                                "on, GRPO 599 s, greedy 43.0%; off, 403 s, 40.0%")
    test_time: bool = option(True, "test-time section: train a PRM, then greedy vs maj@N vs PRM best-of-N vs PRM "
                                   "beam search vs thinking budgets on the final model")
    prm_problems: int = option(300, "training problems whose sampled completions (4 each) label the PRM (quick: 60)")
    prm_steps: int = option(150, "PRM training steps (quick: 10)")
    search_n: list[int] = option([4, 16], "samples per problem of the test-time sweep (maj, bon-prm; wmaj at the last)")
    beam_n: int = option(8, "candidates per step of PRM beam search (4 beams x n/4 samples)")
    budgets: list[int] = option([0, 16, 32, 48, 64], "thinking budgets of the test-time sweep")
    seed: int = option(0, "seed")
    threads: int = option(2, "torch CPU threads")
    parallel_sft: bool = option(True, "train (and evaluate) the direct and CoT models at the same time, in two "
                                      "processes of threads / 2 each (the same training, thread count aside; "
                                      "measured on 2 cores: the SFT part 308 s instead of 373 s)")

    def __post_init__(self):
        if self.quick:
            self.steps, self.eval_problems, self.samples = min(self.steps, 40), min(self.eval_problems, 40), 4
            self.batch_size = min(self.batch_size, 16)
            self.train_problems = min(self.train_problems, 2000)
            self.grpo_steps = min(self.grpo_steps, 4)
            self.prm_problems, self.prm_steps = min(self.prm_problems, 60), min(self.prm_steps, 10)
            self.search_n, self.budgets, self.beam_n = [4], [0, 32], 4
            self.size = "micro"
        check(self.steps >= 1 and self.eval_problems >= 1 and self.samples >= 1,
              "steps, eval_problems and samples must be >= 1")


def _sft_stage(cfg: DemoConfig, trace: str, lengths: dict, threads: int | None = None):
    """Train and evaluate the demo's ``sft-<trace>`` model: (stage, training stats, eval rows, per-problem values).
    ``threads``: set first (when run in a process of its own)."""
    from thinkforge.train.sft import SFTConfig, train_sft

    if threads is not None:
        torch.set_num_threads(threads)
    stage, out = f"sft-{trace}", Path(cfg.out)
    task = get_task(cfg.task, **cfg.task_options)
    test = task.problems(cfg.eval_problems, "test", seed=cfg.seed)
    t0 = time.perf_counter()
    run = train_sft(SFTConfig(
        task=cfg.task, task_options=cfg.task_options, trace=trace, size=cfg.size, out=str(out / stage),
        train_problems=cfg.train_problems,
        steps=cfg.steps, batch_size=round(cfg.batch_size * lengths["cot"] / lengths[trace]), packing=False,
        max_len=cfg.max_len, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed, save_every=cfg.steps, overwrite=True,
        warmup=min(20, cfg.steps // 5),
    ))
    stats = _train_stats(run, time.perf_counter() - t0)
    rows, values = evaluate_stage(str(run / "model"), stage, task, test, cfg.samples, 128, cfg.seed)
    return stage, stats, rows, values


def evaluate_stage(model_path: str, stage: str, task, test, samples: int, max_new_tokens: int, seed: int,
                   **extra) -> tuple[list[dict], dict]:
    """Load a stage's model, evaluate it on ``test`` (rows tagged with ``extra``, e.g. ``from``), print the table."""
    model, tok = load_model(model_path, device="cpu")
    with torch.no_grad():
        rows, values = evaluate_model(model, tok, task, test, stage, samples=samples, max_new_tokens=max_new_tokens,
                                      seed=seed)
    for r in rows:
        r.update(extra)
    print(format_rows(rows), flush=True)
    return rows, values


def _grpo_stage(cfg: DemoConfig, out: Path, task, test, models, train, per_problem) -> list[dict]:
    """GRPO (DAPO loss, accuracy + format rewards) from the CoT model; its rows carry "from": "sft-cot"."""
    from thinkforge.train.grpo import GRPOConfig, train_grpo

    t0 = time.perf_counter()
    run = train_grpo(GRPOConfig(
        model=models["sft-cot"], task=cfg.task, task_options=cfg.task_options, out=str(out / "grpo"),
        steps=cfg.grpo_steps, lr=cfg.grpo_lr, prompts_per_step=8, group_size=16, max_new_tokens=96,
        save_every=cfg.grpo_steps, overwrite=True, seed=cfg.seed, dynamic_sampling=cfg.grpo_dynamic_sampling,
    ))
    train["grpo"] = _train_stats(run, time.perf_counter() - t0)
    models["grpo"] = str(run / "model")
    rows, per_problem["grpo"] = evaluate_stage(models["grpo"], "grpo", task, test, cfg.samples, 128, cfg.seed,
                                               **{"from": "sft-cot"})
    return rows


def _test_time_stage(cfg: DemoConfig, out: Path, task, test, models, train) -> tuple[list[dict], dict]:
    """Train a PRM (gold step labels) on the final model's samples, then sweep test-time methods on the
    held-out problems; rows carry ``"from"`` = the model's stage. Returns the rows and the PRM's eval."""
    from thinkforge.generation import Engine
    from thinkforge.scorers import RewardModel
    from thinkforge.search import Search
    from thinkforge.train.reward_model import RMConfig, train_reward_model

    source = "grpo" if "grpo" in models else "sft-cot"
    t0 = time.perf_counter()
    run = train_reward_model(RMConfig(
        policy=models[source], task=cfg.task, task_options=cfg.task_options, labels="gold", problems=cfg.prm_problems,
        samples=4, steps=cfg.prm_steps, extra_layers=2, out=str(out / "prm"), overwrite=True, save_every=cfg.prm_steps,
        eval_problems=min(100, cfg.eval_problems), seed=cfg.seed,
    ))
    train["prm"] = _train_stats(run, time.perf_counter() - t0)
    prm_eval = json.loads((run / "eval.json").read_text())
    model, tok = load_model(models[source], device="cpu")
    search = Search(Engine(model, tok), task, prm=RewardModel.load(str(run / "model"), device="cpu"), max_new_tokens=128,
                    seed=cfg.seed)
    plan = [("greedy", [1]), ("sample", [1]), ("maj", cfg.search_n), ("bon-prm", cfg.search_n),
            ("wmaj", cfg.search_n[-1:]), ("prm-beam", [cfg.beam_n]), ("budget", cfg.budgets)]
    with torch.no_grad():
        rows = sweep(search, test, plan, "test-time", cfg.seed)
    for r in rows:
        r["from"] = source
    return rows, prm_eval


def _mean_length(task, trace: str, seed: int, n: int = 400) -> float:
    """Mean tokens (prompt + completion) of a training example with this trace."""
    from thinkforge import format as fmt
    from thinkforge.models import char_tokenizer
    from thinkforge.train.sft import completion_text

    tok = char_tokenizer(task.sample_text())
    chat = fmt.ChatFormat.of(tok)
    probs = task.problems(n, "train", seed)
    return sum(len(tok.encode(chat.prompt(p.question) + completion_text(p, trace, chat))) for p in probs) / n


def _train_stats(run: Path, seconds: float) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"steps": len(rows), "supervised_tokens": sum(r["tokens"] for r in rows),
            "seen_tokens": sum(r["seen_tokens"] for r in rows), "seconds": seconds}


@keeps_torch_threads
def run_demo(cfg: DemoConfig) -> dict:
    from thinkforge.report import write_report

    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.task, **cfg.task_options)
    test = task.problems(cfg.eval_problems, "test", seed=cfg.seed)
    rows, models, train, per_problem = [], {}, {}, {}
    lengths = {trace: _mean_length(task, trace, cfg.seed) for trace in ("direct", "cot")}
    pool = None
    try:
        pending = []
        if cfg.parallel_sft and cfg.threads >= 2:  # the direct model in a second process, half the threads each
            pool = mp.get_context("spawn").Pool(1)
            pending.append(pool.apply_async(_sft_stage, (cfg, "direct", lengths, cfg.threads // 2)))
            torch.set_num_threads(cfg.threads - cfg.threads // 2)
        else:
            pending.append(_sft_stage(cfg, "direct", lengths))
        pending.append(_sft_stage(cfg, "cot", lengths))
        for result in pending:
            stage, train[stage], stage_rows, per_problem[stage] = result if isinstance(result, tuple) else result.get()
            models[stage] = str(out / stage / "model")
            rows += stage_rows
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        if pool is not None:
            pool.terminate()  # (after an error in either model: stop the other)
    torch.set_num_threads(cfg.threads)
    c = paired_bootstrap(per_problem["sft-direct"]["greedy"], per_problem["sft-cot"]["greedy"], seed=cfg.seed)
    comparisons = [{"a": "sft-direct", "b": "sft-cot", "metric": "greedy pass@1", **c}]
    if cfg.grpo_steps:
        rows += _grpo_stage(cfg, out, task, test, models, train, per_problem)
        for key, metric in (("greedy", "greedy pass@1"), ("sample", "sampled pass@1")):
            c = paired_bootstrap(per_problem["sft-cot"][key], per_problem["grpo"][key], seed=cfg.seed)
            comparisons.append({"a": "sft-cot", "b": "grpo", "metric": metric, **c})
    prm_eval = None
    if cfg.test_time:
        tt_rows, prm_eval = _test_time_stage(cfg, out, task, test, models, train)
        rows += tt_rows
    results = {
        "task": f"{cfg.task} {cfg.task_options}",
        "rows": rows,
        "prm_eval": prm_eval,
        "reward_models": {"prm": str(out / "prm" / "model")} if cfg.test_time else {},
        "models": models,
        "train": train,
        "comparisons": comparisons,
        "seconds": time.perf_counter() - start,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    }
    results["summary"] = _summary(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(out, results, {s: out / s for s in models if s.startswith("sft")}, rl_run=out / "grpo")
    return results


def _summary(results: dict) -> str:
    get = {(r["stage"], r["method"], r["metric"]): r for r in results["rows"]}
    d, c = get[("sft-direct", "greedy", "pass@1")], get[("sft-cot", "greedy", "pass@1")]
    t = results["train"]
    text = (f"Same model size, same compute ({t['sft-direct']['seen_tokens']:,} vs {t['sft-cot']['seen_tokens']:,} "
            f"training tokens): greedy accuracy {d['value'] * 100:.1f}% with direct answers vs "
            f"{c['value'] * 100:.1f}% with chain-of-thought traces, on {d['n']} held-out problems.")
    if ("grpo", "greedy", "pass@1") in get:
        g, gs, cs = get[("grpo", "greedy", "pass@1")], get[("grpo", "sample", "pass@1")], get[("sft-cot", "sample", "pass@1")]
        text += (f" GRPO ({t['grpo']['steps']} steps, {t['grpo']['seconds']:.0f} s) from the CoT model: greedy "
                 f"{c['value'] * 100:.1f}% -> {g['value'] * 100:.1f}%, sampled pass@1 {cs['value'] * 100:.1f}% -> "
                 f"{gs['value'] * 100:.1f}%.")
    tt = {r["method"]: r for r in results["rows"] if r["stage"] == "test-time"}
    if tt:
        big = max(results["config"]["search_n"])
        parts = [f"{m} {tt[m]['value'] * 100:.1f}% ({tt[m]['tokens']:.0f} tokens)"
                 for m in ("greedy", "sample", f"maj@{big}", f"bon-prm@{big}", f"wmaj@{big}",
                           f"prm-beam@{results['config']['beam_n']}") if m in tt]
        text += " Test-time compute on the final model: " + ", ".join(parts) + "."
    return text + f" The whole run took {results['seconds']:.0f} s."


# ---- recipes: stages from a TOML file ---------------------------------------------------------------

RECIPE_KEYS = {"name", "out", "task", "task_options", "eval_problems", "eval_samples", "max_new_tokens", "seed",
               "threads", "gold", "stage"}
DATA_STAGES = ("sample", "preferences")  # stages that write a data file rather than a model


def _stage_runners():
    from thinkforge.preferences import PreferencesConfig, run_preferences
    from thinkforge.rejection import SampleConfig, run_sample
    from thinkforge.train.dpo import DPOConfig, train_dpo
    from thinkforge.train.grpo import GRPOConfig, train_grpo
    from thinkforge.train.ppo import PPOConfig, train_ppo
    from thinkforge.train.reward_model import RMConfig, train_reward_model
    from thinkforge.train.sft import SFTConfig, train_sft

    return {"sft": (SFTConfig, train_sft), "grpo": (GRPOConfig, train_grpo), "sample": (SampleConfig, run_sample),
            "rm": (RMConfig, train_reward_model), "preferences": (PreferencesConfig, run_preferences),
            "dpo": (DPOConfig, train_dpo), "ppo": (PPOConfig, train_ppo)}


def _rm_rewards(rewards: dict, rms: dict) -> dict:
    """``rm:<stage>`` reward names pointing at an earlier rm stage become ``rm:<its model folder>``."""
    return {f"rm:{rms[n[3:]]}" if n.startswith("rm:") and n[3:] in rms else n: w for n, w in rewards.items()}


def _plan(recipe: dict, path: str, out_dir: Path, task_name: str, task_options: dict) -> list[tuple]:
    """(name, kind, from, config) per stage; raises ConfigError naming the stage and field on any mistake."""
    from thinkforge.config import ConfigError, build_config

    runners, made_model, made_data, made_rm, plan = _stage_runners(), set(), set(), set(), []
    for i, st in enumerate(recipe["stage"]):
        st = dict(st)
        name, kind, src = st.pop("name", f"stage{i}"), st.pop("run", None), st.pop("from", None)
        where = f"{path}: stage {name!r}"
        if kind not in runners:
            raise ConfigError(f"{where}: 'run' must be one of {sorted(runners)}, got {kind!r}")
        if src is not None and src not in made_model:
            raise ConfigError(f"{where}: 'from' = {src!r} is not an earlier stage that made a model")
        if kind in ("sft", "dpo", "rm") and "data" in st and st["data"] not in made_data:
            raise ConfigError(f"{where}: 'data' = {st['data']!r} is not an earlier sample or preferences stage")
        for reward in st.get("rewards", {}):
            if reward.startswith("rm:") and reward[3:] not in made_rm:
                raise ConfigError(f"{where}: reward {reward!r} does not name an earlier rm stage")
        if kind == "sample" and "prm" in st and st["prm"] not in made_rm:
            raise ConfigError(f"{where}: 'prm' = {st['prm']!r} is not an earlier rm stage")
        fields = {"task": task_name, "task_options": task_options, "seed": recipe.get("seed", 0), **st}
        if src is not None:  # filled in when that stage has run
            fields["policy" if kind == "rm" else "model"] = f"<model of stage {src}>"
        if kind in DATA_STAGES:
            fields["out"] = str(out_dir / name / ("traces.jsonl" if kind == "sample" else "preferences.jsonl"))
        else:
            fields.update(out=str(out_dir / name), overwrite=True)
        if kind in ("dpo", "ppo"):
            fields.setdefault("task", task_name)
        if kind == "dpo":
            fields.setdefault("eval_problems", 0)  # the recipe evaluates every model stage itself
        cfg = build_config(runners[kind][0], fields, where)
        if getattr(cfg, "reward_families", None):
            from thinkforge.train.grpo import check_families

            try:
                check_families(cfg.reward_families, get_task(cfg.task, **cfg.task_options))
            except (ConfigError, ValueError) as e:
                raise ConfigError(f"{where}: {e}") from None
        plan.append((name, kind, src, cfg))
        (made_data if kind in DATA_STAGES else made_rm if kind == "rm" else made_model).add(name)
    return plan


def gold_stage(model_path: str, name: str, task, test, recipe: dict, src: str | None, gold: dict):
    """Rows of the task's gold preference (``Task.gold_utility``) of a stage's greedy and sampled completions,
    and, for a stage started from another, the paired difference to it over the same problems."""
    from thinkforge.evaluate import row
    from thinkforge.preferences import gold_scores

    model, tok = load_model(model_path, device="cpu")
    g = gold_scores(model.eval(), tok, task, test, recipe.get("eval_samples", 4), recipe.get("max_new_tokens", 128),
                    recipe.get("seed", 0))
    extra = {"from": src} if src else {}
    rows = [row(name, "greedy", "gold", g["greedy"], 0.0, **extra),
            row(name, "sample (T=1)", f"gold (mean of {recipe.get('eval_samples', 4)})", g["sampled"], 0.0, **extra)]
    if src in gold:
        for r, key in zip(rows, ("greedy", "sampled")):
            r["vs_from"] = paired_bootstrap(gold[src][key], g[key], seed=recipe.get("seed", 0))
    for r in rows:
        print(f"{name:<14} {r['method']:<13} {r['metric']:<18} {r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
              + (f"  vs {src}: {r['vs_from']['diff']:+.3f} [{r['vs_from']['ci_low']:+.3f}, {r['vs_from']['ci_high']:+.3f}]"
                 if "vs_from" in r else ""), flush=True)
    return rows, g


def _by_family(task, test: list) -> list[tuple[str | None, list]]:
    """``[(None, test)]``, or for a mixed task ``[(family, its test problems), …]``."""
    families = getattr(task, "families", None)
    if not families:
        return [(None, test)]
    return [(f, [p for p in test if p.meta.get("family") == f]) for f in families]


@keeps_torch_threads
def run_recipe(path: str, out: str | None = None) -> dict:
    """Run every ``[[stage]]`` of a recipe in order; each writes its own folder and, if it makes a model,
    evaluation rows with ``"from"`` = the stage it started from. Writes ``<out>/results.json``.

    A stage has ``name``, ``run`` (``sft`` | ``grpo`` | ``ppo`` | ``dpo`` | ``sample`` | ``preferences`` |
    ``rm``), optional ``from`` (an earlier stage whose model it starts from; for ``rm``, the policy whose
    samples it labels, or whose weights a preference RM starts from) and any field of that command's
    config; in an ``sft``, ``dpo`` or ``rm`` stage, ``data`` may name an earlier ``sample`` or
    ``preferences`` stage; in a ``sample`` stage, ``prm`` may name an earlier ``rm`` stage; a ``grpo`` or
    ``ppo`` reward ``rm:<stage>`` names an earlier ``rm`` stage. With ``gold = true`` every model stage also
    gets rows of the task's gold preference, with the paired difference to the stage it started from. Top-level ``task``, ``task_options`` and ``seed`` are
    inherited by every stage.
    """
    import tomllib

    from thinkforge.config import ConfigError

    try:
        recipe = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from None
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)} (known: {sorted(RECIPE_KEYS)})")
    stages = recipe.get("stage", [])
    if not stages:
        raise ConfigError(f"{path}: no [[stage]] tables")
    out_dir = Path(out or recipe.get("out", f"runs/{Path(path).stem}"))
    task_name, task_options = recipe.get("task", "mul"), recipe.get("task_options", {})
    plan = _plan(recipe, path, out_dir, task_name, task_options)  # every stage checked before anything runs
    task = get_task(task_name, **task_options)
    test = task.problems(recipe.get("eval_problems", 200), "test", seed=recipe.get("seed", 0))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.get("threads", 2))
    runners, models, data, rms, rows, log, gold = _stage_runners(), {}, {}, {}, [], [], {}
    start = time.perf_counter()
    for name, kind, src, cfg in plan:
        if src is not None:
            setattr(cfg, "policy" if kind == "rm" else "model", models[src])
        if kind in ("sft", "dpo", "rm") and getattr(cfg, "data", None) in data:
            cfg.data = data[cfg.data]
        if kind in ("grpo", "ppo"):
            cfg.rewards = _rm_rewards(cfg.rewards, rms)
        if kind == "grpo":
            cfg.rm_scopes, cfg.reward_families = _rm_rewards(cfg.rm_scopes, rms), _rm_rewards(cfg.reward_families, rms)
        if kind == "sample" and cfg.prm in rms:
            cfg.prm = rms[cfg.prm]
        t0 = time.perf_counter()
        result = runners[kind][1](cfg)
        entry = {"stage": name, "run": kind, "from": src, "seconds": time.perf_counter() - t0}
        if kind in DATA_STAGES:
            data[name] = cfg.out
            entry["stats"] = result
        elif kind == "rm":
            rms[name] = str(Path(result) / "model")
            if (Path(result) / "eval.json").exists():
                entry["eval"] = json.loads((Path(result) / "eval.json").read_text())
        else:
            models[name] = str(Path(result) / "model")
            for family, problems in _by_family(task, test):  # a mixed task: each family measured on its own
                label, origin = (f"{name}:{family}", src and f"{src}:{family}") if family else (name, src)
                stage_rows, _ = evaluate_stage(models[name], label, task, problems, recipe.get("eval_samples", 4),
                                               recipe.get("max_new_tokens", 128), recipe.get("seed", 0),
                                               **{"from": origin})
                rows += stage_rows
                if recipe.get("gold"):
                    gold_rows, gold[label] = gold_stage(models[name], label, task, problems, recipe, origin, gold)
                    rows += gold_rows
            if (Path(result) / "metrics.jsonl").exists():
                entry["train_seconds"] = sum(json.loads(x)["step_time"] for x in
                                             (Path(result) / "metrics.jsonl").read_text().splitlines() if x.strip())
        log.append(entry)
    results = {"recipe": str(path), "out": str(out_dir), "task": f"{task_name} {task_options}", "rows": rows, "models": models,
               "data": data, "reward_models": rms, "stages": log, "seconds": time.perf_counter() - start}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results
