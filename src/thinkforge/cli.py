"""The ``thinkforge`` command.

    thinkforge tasks list
    thinkforge tasks show mul -n 3 [--split test] [--seed 0] [--options digits_a=4]
    thinkforge train sft --task mul --trace cot --out runs/mul-cot [--config run.toml] [--field value …]
    thinkforge train grpo --model runs/mul-cot/model --task mul --out runs/mul-grpo --loss dapo
    thinkforge eval --model runs/mul-cot/model --task mul --samples 8
    thinkforge eval --model runs/mul-cot/model --method maj,bon-prm,prm-beam --n 1,4,16 --prm runs/prm/model --plot t.png
    thinkforge train rm --kind prm --labels gold --policy runs/mul-cot/model --out runs/prm
    thinkforge generate --model runs/mul-cot/model --prompt "347*89" [--budget 16] [--temperature 0]
    thinkforge sample --model runs/mul-cot/model --task mul --problems 2000 --out runs/rs.jsonl
    thinkforge pipeline recipes/r1.toml
    thinkforge overopt --out runs/overopt
    thinkforge aha --out runs/aha
    thinkforge attack --out runs/attack
    thinkforge serve --model runs/demo/grpo/model [--port 8000 --api-key KEY]
    thinkforge demo [--quick]

Every command that takes a config accepts ``--config FILE.toml`` and ``--field value`` for any field;
``thinkforge <command> --help`` lists the fields with their types, defaults and documentation.
Errors in input (config, data files, model folders) print one line naming what is wrong and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from thinkforge.config import ConfigError, check, config_help, option, parse_config


@dataclass
class GenerateConfig:
    model: str = option("runs/demo/sft-cot/model", "model folder or hub id")
    prompt: str = option("347*89", "the user message (rendered with the chat template)")
    budget: int | None = option(None, "thinking budget in tokens (then </think> is forced)")
    wait_rounds: int = option(0, "budget forcing: replace the first k </think> with 'Wait'")
    temperature: float = option(0.0, "0 = greedy")
    top_p: float = option(1.0, "nucleus sampling threshold")
    max_new_tokens: int = option(256, "completion length cap")
    n: int = option(1, "number of completions")
    seed: int = option(0, "sampling seed")
    device: str = option("auto", "auto, cpu or cuda")

    def __post_init__(self):
        check(self.n >= 1 and self.max_new_tokens >= 1, "n and max_new_tokens must be >= 1")


def _tasks(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="thinkforge tasks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="built-in generators and every reasoning-gym dataset")
    show = sub.add_parser("show", help="print problems with their gold traces")
    show.add_argument("name")
    show.add_argument("-n", type=int, default=3)
    show.add_argument("--split", default="train", choices=["train", "test"])
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--options", default="", help="the task's knobs, e.g. digits_a=4,digits_b=3")
    args = ap.parse_args(argv)
    from thinkforge.tasks import REGISTRY, get_task

    if args.cmd == "list":
        from thinkforge.tasks.gym import gym_names

        print("built-in (with gold step-by-step traces):")
        for name, factory in REGISTRY.items():
            print(f"  {name:<12} {(factory.__doc__ or '').strip().splitlines()[0]}")
        names = gym_names()
        print(f"\nreasoning-gym ({len(names)} datasets, use as reasoning-gym:<name>):")
        for i in range(0, len(names), 6):
            print("  " + "  ".join(f"{n:<24}" for n in names[i : i + 6]).rstrip())
        print("\nfiles: any .jsonl or .parquet with question, answer and optional steps")
        return
    from thinkforge.config import _coerce

    task = get_task(args.name, **_coerce(args.options, dict, "--options"))
    for p in task.problems(args.n, args.split, args.seed):
        print(f"[{p.id}] {p.question}")
        for i, s in enumerate(p.steps or []):
            print(f"    step {i + 1}: {s}")
        print(f"    answer: {p.answer or '(judged by the task scorer)'}\n")


def _generate(cfg: GenerateConfig) -> None:
    from thinkforge import format as fmt
    from thinkforge.generation import Engine, SamplingParams
    from thinkforge.models import load_model

    model, tok = load_model(cfg.model, device=cfg.device)
    outs = Engine(model, tok).generate([fmt.ChatFormat.of(tok).prompt(cfg.prompt)], SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=cfg.n, seed=cfg.seed,
        thinking_budget=cfg.budget, wait_rounds=cfg.wait_rounds))
    for o in outs:
        print(o.text)
        print(f"-- finish: {o.finish_reason}; thinking tokens {o.thinking_tokens}, answer tokens {o.answer_tokens}"
              + (f", waits {o.waits}" if o.waits else ""))


def _train_sft(cfg) -> None:
    from thinkforge.train.sft import train_sft

    run = train_sft(cfg)
    print(f"model saved in {run / 'model'}")


def _train_grpo(cfg) -> None:
    from thinkforge.train.grpo import train_grpo

    run = train_grpo(cfg)
    print(f"model saved in {run / 'model'}")


def _train_rm(cfg) -> None:
    import json

    from thinkforge.train.reward_model import train_reward_model

    run = train_reward_model(cfg)
    if cfg.kind == "preference" and (run / "eval.json").exists():
        ev = json.loads((run / "eval.json").read_text())
        line = (f"held-out {ev['held_out_pairs']} pairs: accuracy {ev['accuracy']['mean']:.3f} "
                f"[{ev['accuracy']['ci_low']:.3f}, {ev['accuracy']['ci_high']:.3f}]")
        if "rm_agreement_with_gold" in ev:
            line += (f"; agreement with gold {ev['rm_agreement_with_gold']['mean']:.3f} (the labeller's own: "
                     f"{ev['labeller_agreement_with_gold']['mean']:.3f})")
        print(line)
    elif (run / "eval.json").exists():
        ev = json.loads((run / "eval.json").read_text())
        st = ev["step"]
        print(f"held-out {ev['completions']} completions, {st['steps']} steps ({ev['eval_labels']} labels): "
              f"wrong-step precision {st['precision']:.3f} recall {st['recall']:.3f} F1 {st['f1']:.3f}; "
              f"right-over-wrong ranking (min) {ev['ranking']['min']['accuracy']:.3f}")
    print(f"reward model saved in {run / 'model'}")


def _train_ppo(cfg) -> None:
    from thinkforge.train.ppo import train_ppo

    run = train_ppo(cfg)
    print(f"policy saved in {run / 'model'} (value model in {run / 'model' / 'value'})")


def _train_verifier(cfg) -> None:
    import json

    from thinkforge.train.verifier import train_verifier

    run = train_verifier(cfg)
    if (run / "eval.json").exists():
        ev = json.loads((run / "eval.json").read_text())
        for mode in ("verdict", "answer"):
            r = ev[mode]
            print(f"score = {mode}: right-over-wrong ranking {r['ranking']['accuracy']:.3f} over {r['ranking']['pairs']} pairs")
            for name, m in r["methods"].items():
                print(f"  {name:<12} {m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]  {m['tokens']:.0f} tokens/problem")
    print(f"verifier saved in {run / 'sft' / 'model'}")


def _train_dpo(cfg) -> None:
    import json

    from thinkforge.train.dpo import train_dpo

    run = train_dpo(cfg)
    if (run / "eval.json").exists():
        ev = json.loads((run / "eval.json").read_text())
        for k in ("greedy", "sampled", "greedy_accuracy"):
            d = ev[k]["difference"]
            print(f"{k}: {ev[k]['start']:.3f} -> {ev[k]['trained']:.3f} (paired 95% CI of the change "
                  f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}])")
    print(f"model saved in {run / 'model'}")


def _overopt(cfg) -> None:
    from thinkforge.overopt import run_overopt, summary

    results = run_overopt(cfg)
    print(summary(results))
    print(f"results in {cfg.out}/results.json, plot in {cfg.out}/overopt.png")


def _aha(cfg) -> None:
    from thinkforge.aha import run_aha, summary

    print(summary(run_aha(cfg)))
    print(f"results in {cfg.out}/results.json, plot in {cfg.out}/aha.png")


def _attack(cfg) -> None:
    from thinkforge.attack import run_attack, summary

    print(summary(run_attack(cfg), cfg))
    print(f"results in {cfg.out}/results.json, plot in {cfg.out}/attack.png")


def _preferences(cfg) -> None:
    from thinkforge.preferences import run_preferences

    s = run_preferences(cfg)
    agree = s["label_agreement_with_gold"]
    print(f"{s['rows']} rows ({s['pairs']} pairs) from {s['prompts']} prompts ({s['all_tied_prompts']} all tied, "
          f"not written); labels agree with the gold preference on {agree:.3f} of pairs; written to {s['out']}")


def _sample(cfg) -> None:
    from thinkforge.rejection import run_sample

    stats = run_sample(cfg)
    print(f"kept {stats['kept']} traces covering {stats['problems_covered']} of {stats['problems']} problems "
          f"({stats['correct']} of {stats['samples']} samples correct); written to {cfg.out}")


def _pipeline(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="thinkforge pipeline", description="run a recipe's stages in order")
    ap.add_argument("recipe", help="a TOML recipe, e.g. recipes/r1.toml")
    ap.add_argument("--out", default=None, help="output folder (default: the recipe's 'out')")
    args = ap.parse_args(argv)
    from thinkforge.evaluate import format_rows
    from thinkforge.pipeline import run_recipe

    res = run_recipe(args.recipe, args.out)
    print(format_rows(res["rows"]))
    print(f"{len(res['stages'])} stages in {res['seconds']:.0f} s; results in {res['out']}/results.json")


def _ui(cfg) -> None:
    from thinkforge.ui import serve

    serve(cfg)


def _export(cfg) -> None:
    from thinkforge.ui import export

    print(export(cfg))


def _serve(cfg) -> None:
    from thinkforge.serve import serve

    serve(cfg)


def _eval(cfg) -> None:
    from thinkforge.evaluate import format_rows, run_eval

    rows = run_eval(cfg)
    print(format_rows(rows))
    if cfg.plot:
        from thinkforge.report import compute_curves

        print(f"plot: {compute_curves(rows, cfg.plot)}")


def _demo(cfg) -> None:
    from thinkforge.pipeline import run_demo

    results = run_demo(cfg)
    print("\n" + results["summary"])
    print(f"results: {cfg.out}/results.json, report: {cfg.out}/report.md")
    last = list(results["models"])[-1]
    print(f"serve it: thinkforge serve --model {results['models'][last]}   (OpenAI-compatible, model name '{last}')")


# name -> (where its config class lives, what it does, what runs it). The class is imported only for the command
# that runs (or whose --help is asked for): the trainers' modules import torch and transformers (~5 s), which
# `thinkforge --help` and a mistyped command should not wait for.
COMMANDS = {
    "train sft": ("thinkforge.train.sft:SFTConfig", "supervised fine-tuning on reasoning traces", _train_sft),
    "train grpo": ("thinkforge.train.grpo:GRPOConfig", "RL with verifiable rewards: GRPO, DAPO, Dr. GRPO, BNPO, GSPO",
                   _train_grpo),
    "train rm": ("thinkforge.train.reward_model:RMConfig", "reward models: PRM (step labels: gold, judge, "
                 "Monte-Carlo), ORM, or a Bradley-Terry preference RM", _train_rm),
    "train ppo": ("thinkforge.train.ppo:PPOConfig", "PPO with a value model, GAE and a KL penalty in the reward "
                  "(classic RLHF)", _train_ppo),
    "train verifier": ("thinkforge.train.verifier:VerifierConfig", "a generative verifier: writes its own check, "
                       "then yes/no (best-of-N)", _train_verifier),
    "train dpo": ("thinkforge.train.dpo:DPOConfig", "direct preference optimisation (DPO / IPO) from pairs or "
                  "rankings", _train_dpo),
    "preferences": ("thinkforge.preferences:PreferencesConfig", "simulated labeller: rank a policy's samples by the "
                    "task's gold preference (+ noise) into a preference file", _preferences),
    "overopt": ("thinkforge.overopt:OveroptConfig", "reward over-optimisation measured: proxy RMs of two data sizes, "
                "best-of-n and RL against each, gold vs proxy against sqrt(KL), Gao et al.'s fits", _overopt),
    "aha": ("thinkforge.aha:AhaConfig", "does RL amplify self-checking? a primed cold start (checks, 'wait' fixes) "
            "vs a control, GRPO on accuracy, curves and paired CIs", _aha),
    "attack": ("thinkforge.attack:AttackConfig", "soft-token attacks (answer 42 / +1 / x7, think less) against "
               "thinking budgets: attack success by attacker resources and defender compute", _attack),
    "sample": ("thinkforge.rejection:SampleConfig", "rejection sampling: verified, well-formed traces to JSONL (for "
               "SFT --data)", _sample),
    "eval": ("thinkforge.evaluate:EvalConfig", "pass@1 ± CI, pass@k, maj@k on held-out problems", _eval),
    "generate": ("thinkforge.cli:GenerateConfig", "complete one prompt (thinking budget, budget forcing)", _generate),
    "serve": ("thinkforge.serve:ServeConfig", "OpenAI-compatible server: /v1/responses, /v1/chat/completions, "
              "/v1/models", _serve),
    "demo": ("thinkforge.pipeline:DemoConfig", "train direct vs chain-of-thought models at equal compute and compare",
             _demo),
    "ui": ("thinkforge.ui:UIConfig", "the browser app: runs and their curves, traces, labelling (rankings, step "
           "marks) in SQLite", _ui),
    "labels export": ("thinkforge.ui:ExportConfig", "write a queue's labels as rankings, pairs (preference RM, DPO) "
                      "or steps (PRM)", _export),
}


def _config_class(name: str) -> type:
    import importlib

    module, cls = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), cls)


USAGE = """usage: thinkforge <command> [--field value ...]

commands:
  tasks list | tasks show NAME   the tasks with verifiable answers
  pipeline RECIPE.toml           run a recipe stage by stage (recipes/r1.toml, r1_zero.toml, distill.toml)
{commands}
Run `thinkforge <command> --help` for a command's fields."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "--unsafe-sandbox" in argv:  # an environment variable, so worker processes (torchrun, pools) inherit it
        from thinkforge.sandbox import UNSAFE_ENV

        argv.remove("--unsafe-sandbox")
        os.environ[UNSAFE_ENV] = "1"
    try:
        name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else (argv[0] if argv else "")
        if name not in COMMANDS and name not in ("tasks", "pipeline"):
            lines = "\n".join(f"  {n:<30} {doc}" for n, (_, doc, _) in COMMANDS.items())
            print(USAGE.format(commands=lines))
            return 0 if not argv or argv[0] in ("-h", "--help") else 2
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if name in ("tasks", "pipeline"):
            (_tasks if name == "tasks" else _pipeline)(argv[1:])
            return 0
        _, doc, fn = COMMANDS[name]
        cls = _config_class(name)
        rest = argv[len(name.split()) :]
        if rest and rest[0] in ("-h", "--help"):
            print(f"thinkforge {name}: {doc}\n\nfields (--config FILE.toml sets any of them too):\n{config_help(cls)}")
            return 0
        fn(parse_config(cls, rest))
        return 0
    except BrokenPipeError:  # `thinkforge tasks list | head`
        sys.stderr.close()
        return 0
    except (ConfigError, ValueError, KeyError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
