import json
import subprocess
import sys

import pytest

from thinkforge.cli import main


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("tasks list", "train sft", "eval", "generate", "demo"):
        assert cmd in out
    assert main(["train", "sft", "--help"]) == 0
    assert "--max-len" in capsys.readouterr().out


def test_help_and_unknown_commands_do_not_import_torch():
    # the command table names config classes by path: `thinkforge --help` answers in a fraction of a second
    # instead of importing every trainer (torch, transformers: ~5 s)
    probe = ("import sys; from thinkforge.cli import main; codes = [main(['--help']), main(['frobnicate'])]; "
             "sys.stdout.flush(); print('RESULT', codes, sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "RESULT [0, 2] []"


def test_every_command_has_its_config_and_field_help(capsys):
    from dataclasses import is_dataclass

    from thinkforge.cli import COMMANDS, _config_class

    for name in COMMANDS:
        assert is_dataclass(_config_class(name)), name
        assert main([*name.split(), "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"thinkforge {name}: {COMMANDS[name][1]}\n\nfields")


def test_tasks_show_prints_gold_traces(capsys):
    assert main(["tasks", "show", "mul", "-n", "2", "--options", "digits_a=2,digits_b=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("step 3:") == 2 and out.count("answer:") == 2


def test_tasks_list_includes_reasoning_gym(capsys):
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    assert "syllogism" in out and "gsm_symbolic" in out and "105 datasets" in out


def test_errors_are_one_line_and_exit_2(capsys, tmp_path):
    assert main(["train", "sft", "--lr", "x"]) == 2
    assert capsys.readouterr().err == "error: --lr: expected float, got 'x'\n"
    assert main(["eval", "--model", str(tmp_path / "missing" / "m")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert main(["tasks", "show", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """``thinkforge demo --quick`` once for this file: (its folder, its results)."""
    out = tmp_path_factory.mktemp("quick") / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.timeout(900)  # (it runs the quick demo first: a hang guard, as below)
def test_parallel_sft_stages_train_what_one_process_trains(tmp_path, quick_demo):
    """The demo trains its direct model in a second process (threads / 2 each): the same losses and rows as
    that model trained in this process at that thread count."""
    import torch

    from thinkforge.pipeline import DemoConfig, _mean_length, _sft_stage
    from thinkforge.tasks import get_task

    out, res = quick_demo
    cfg = DemoConfig(quick=True, out=str(out))
    assert cfg.parallel_sft and cfg.threads == 2 and res["config"] == {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    task = get_task(cfg.task, **cfg.task_options)
    lengths = {t: _mean_length(task, t, cfg.seed) for t in ("direct", "cot")}
    alone = DemoConfig(quick=True, out=str(tmp_path / "alone"))
    threads = torch.get_num_threads()
    try:
        stage, stats, rows, _ = _sft_stage(alone, "direct", lengths, threads=1)
    finally:
        torch.set_num_threads(threads)
    losses = [[json.loads(x)["loss"] for x in (run / "sft-direct" / "metrics.jsonl").read_text().splitlines()]
              for run in (out, tmp_path / "alone")]
    assert losses[0] == losses[1] and len(losses[0]) == 40
    key = lambda r: (r["stage"], r["method"], r["metric"], r["value"])  # noqa: E731
    assert [key(r) for r in res["rows"][: len(rows)]] == [key(r) for r in rows]  # its rows first, as before
    assert res["train"]["sft-direct"]["steps"] == stats["steps"] and stage == "sft-direct"


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "thinkforge", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "train sft" in r.stdout


@pytest.mark.timeout(900)  # a hang guard, not a speed check: a busy 2-core machine may take minutes
def test_quick_demo_writes_results_and_report(quick_demo, capsys):
    out, res = quick_demo
    assert {r["stage"] for r in res["rows"]} == {"sft-direct", "sft-cot", "grpo", "test-time"}
    assert {r.get("from") for r in res["rows"] if r["stage"] == "grpo"} == {"sft-cot"}  # read against its start
    assert {r.get("from") for r in res["rows"] if r["stage"] == "test-time"} == {"grpo"}
    tt = [r["method"] for r in res["rows"] if r["stage"] == "test-time"]
    assert tt == ["greedy", "sample", "maj@4", "bon-prm@4", "wmaj@4", "prm-beam@4", "budget=0", "budget=32"]
    assert res["reward_models"]["prm"].endswith("prm/model") and 0 <= res["prm_eval"]["step"]["f1"] <= 1
    for r in res["rows"]:
        assert set(r) >= {"stage", "method", "metric", "value", "ci_low", "ci_high", "n", "tokens"}
        assert 0 <= r["ci_low"] <= r["value"] <= r["ci_high"] <= 1 and r["n"] == 40
    assert res["train"]["sft-direct"]["steps"] == res["train"]["sft-cot"]["steps"] == 40
    assert set(res["models"]) == {"sft-direct", "sft-cot", "grpo"} and res["seconds"] > 0
    assert [c["b"] for c in res["comparisons"]] == ["sft-cot", "grpo", "grpo"]
    for f in ("report.md", "loss.png", "accuracy.png", "rl.png", "compute.png"):
        assert (out / f).stat().st_size > 0
    # the model the demo trained loads and generates through the CLI
    assert main(["generate", "--model", res["models"]["sft-cot"], "--prompt", "347*89", "--max-new-tokens", "20"]) == 0
    assert "-- finish:" in capsys.readouterr().out
