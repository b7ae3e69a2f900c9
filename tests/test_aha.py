"""The self-checking experiment: what it counts in a completion, and a tiny run of both arms end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
from mock_policy import plan_engine

from thinkforge.aha import AhaConfig, measure, run_aha
from thinkforge.config import ConfigError
from thinkforge.models import char_tokenizer
from thinkforge.tasks import get_task


def test_measure_counts_checks_waits_extra_lines_and_splits_by_size():
    task = get_task("add", digits=[1, 2])
    problems = task.problems(8, "test")
    by_q = {p.question: p for p in problems}

    def plan(prompt, j):  # sample 0 of a 2-digit problem checks and fixes a step; everything else is gold
        p = next(q for text, q in by_q.items() if text in prompt)
        lines = list(p.steps)
        if p.meta["digits"] == 2 and j == 0:
            lines = [*task.wrong_line(p, 0, __import__("random").Random(0)), "wait, that step is wrong", *lines,
                     task.check_line(p, 1)]
        return "<think>\n" + "\n".join(lines) + f"\n</think>\n<answer>{p.answer}</answer>"

    engine, _ = plan_engine(char_tokenizer(task.sample_text()), plan)
    m = measure(engine, task, problems, AhaConfig(eval_samples=2, max_new_tokens=96))
    two = np.array([p.meta["digits"] == 2 for p in problems])
    assert two.any() and (~two).any()
    per = m["per_problem"]
    assert per["greedy_accuracy"] == [1.0] * 8 and per["sampled_accuracy"] == [1.0] * 8
    assert per["check_share"] == per["wait_share"] == [0.5 if t else 0.0 for t in two]
    assert per["extra_lines"] == [2.0 if t else 0.0 for t in two]  # (4 extra lines + 0) / 2 samples
    assert m["check_share"]["mean"] == pytest.approx(two.mean() / 2)
    assert m["by_size"]["2"]["wait_share"] == 0.5 and m["by_size"]["1"]["wait_share"] == 0.0
    assert m["waits_then_right"] == {"n": int(two.sum()), "share": 1.0}
    assert m["errors_caught"] == {"n": int(two.sum()), "share": 1.0}  # the wrong step is followed by its check
    assert m["right_with_check"]["n"] == two.sum() and m["right_without_check"]["n"] == 16 - two.sum()


def test_tiny_run_of_both_arms_is_paired_kept_and_refuses_another_config(tmp_path):
    cfg = AhaConfig(out=str(tmp_path / "aha"), task_options={"digits": [1, 2], "terms": 2}, check_share=0.5,
                    fix_share=0.5, size="micro", sft_steps=3, sft_problems=40, max_len=128, rl_steps=1, rl_every=1,
                    prompts_per_step=2, group_size=2, eval_problems=6, eval_samples=2, max_new_tokens=24, threads=1)
    results = run_aha(cfg)
    for arm in ("primed", "control"):
        assert [p["step"] for p in results["arms"][arm]] == [0, 1]
        assert all(len(v) == 6 for v in results["arms"][arm][-1]["per_problem"].values())
    sft = {arm: (tmp_path / "aha" / f"sft-{arm}" / "config.toml").read_text() for arm in ("primed", "control")}
    assert "check_share = 0.5" in sft["primed"] and "check_share = 0.0" in sft["control"]
    end = results["paired"]["primed_minus_control_end"]["sampled_accuracy"]["diff"]
    a, b = (np.mean(results["arms"][arm][-1]["per_problem"]["sampled_accuracy"]) for arm in ("control", "primed"))
    assert end == pytest.approx(b - a)
    assert (tmp_path / "aha" / "aha.png").stat().st_size > 0
    points = tmp_path / "aha" / "rl-primed" / "points.json"
    stamp = points.stat().st_mtime_ns
    assert run_aha(cfg) == json.loads((tmp_path / "aha" / "results.json").read_text())  # a rerun continues: nothing new
    assert points.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="another config"):
        run_aha(AhaConfig(**{**cfg.__dict__, "rl_lr": 1e-4}))
    assert Path(cfg.out, "config.toml").is_file()
