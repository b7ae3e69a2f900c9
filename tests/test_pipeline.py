import json

import pytest

from thinkforge.config import ConfigError
from thinkforge.pipeline import run_recipe

RECIPE = """
name = "t"
task = "add"
task_options = {{ digits = 1 }}
eval_problems = 5
eval_samples = 2
max_new_tokens = 48
seed = 0
threads = 1

[[stage]]
name = "cold"
run = "sft"
model = "tiny"
size = "micro"
trace = "cot"
train_problems = 60
steps = 60
batch_size = 32
max_len = 64
lr = 3e-3
packing = false
min_lr_ratio = 1.0
{more}
"""

MORE = """
[[stage]]
name = "rs"
run = "sample"
from = "cold"
problems = 50
samples = 2
max_new_tokens = 48

[[stage]]
name = "sft2"
run = "sft"
from = "cold"
data = "rs"
steps = 3
batch_size = 8
max_len = 64

[[stage]]
name = "rl"
run = "grpo"
from = "sft2"
steps = 2
train_problems = 50
prompts_per_step = 2
group_size = 4
max_new_tokens = 48
"""


def test_recipe_runs_every_stage_and_records_lineage(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text(RECIPE.format(more=MORE))
    res = run_recipe(str(f), str(tmp_path / "out"))
    assert [s["stage"] for s in res["stages"]] == ["cold", "rs", "sft2", "rl"]
    assert {r["stage"]: r["from"] for r in res["rows"]} == {"cold": None, "sft2": "cold", "rl": "sft2"}
    stats = res["stages"][1]["stats"]
    assert stats["kept"] >= 1 and stats["kept"] <= stats["well_formed_correct"] <= stats["correct"]
    rows = [json.loads(x) for x in open(res["data"]["rs"])]
    assert len(rows) == stats["kept"] and all(r["completion"].endswith("<|im_end|>") for r in rows)
    assert len({r["problem_id"] for r in rows}) == len(rows)  # keep_per_problem = 1
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["models"].keys() == {"cold", "sft2", "rl"}


@pytest.mark.parametrize(
    "more,message",
    [
        ('\n[[stage]]\nname = "x"\nrun = "kto"\n', "'run' must be one of"),
        ('\n[[stage]]\nname = "x"\nrun = "grpo"\nfrom = "nope"\n', "'from' = 'nope' is not an earlier stage"),
        ('\n[[stage]]\nname = "x"\nrun = "sft"\ndata = "cold"\n', "'data' = 'cold' is not an earlier sample or preferences stage"),
        ('\n[[stage]]\nname = "x"\nrun = "grpo"\ngroup_size = 1\n', "group_size must be >= 2"),
        ('\n[[stage]]\nname = "x"\nrun = "sft"\nsteps = "many"\n', "stage 'x': field 'steps': expected int"),
        ('\n[[stage]]\nname = "x"\nrun = "sft"\nlearning_rate = 1\n', "stage 'x': unknown field 'learning_rate'"),
        ('\n[[stage]]\nname = "x"\nrun = "grpo"\nrewards = {"rm:none" = 1.0}\n', "reward 'rm:none' does not name an earlier rm"),
        ('\n[[stage]]\nname = "x"\nrun = "dpo"\ndata = "cold"\n', "'data' = 'cold' is not an earlier sample or preferences"),
        ('\n[[stage]]\nname = "x"\nrun = "grpo"\nreward_families = { accuracy = ["maths"] }\n',
         "stage 'x': reward_families needs a mixed task"),
        ('\n[[stage]]\nname = "x"\nrun = "grpo"\ntask = "mixed"\ntask_options = { parts = { a = { task = "add" } } }\n'
         'reward_families = { accuracy = ["maths"] }\n', "unknown family \\['maths'\\]; the task's are \\['a'\\]"),
    ],
)
def test_bad_recipes_are_named_before_anything_long_runs(tmp_path, more, message):
    f = tmp_path / "r.toml"
    header, cold = RECIPE.format(more="").split("[[stage]]", 1)
    f.write_text(header + more.strip() + "\n\n[[stage]]" + cold)  # the bad stage first: no training happens
    with pytest.raises(ConfigError, match=message):
        run_recipe(str(f), str(tmp_path / "out"))


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such recipe"):
        run_recipe(str(tmp_path / "none.toml"))
    f = tmp_path / "r.toml"
    f.write_text('name = "x"\nlr = 1\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lr'\]"):
        run_recipe(str(f))
    f.write_text('name = "x"\n')
    with pytest.raises(ConfigError, match="no \\[\\[stage\\]\\] tables"):
        run_recipe(str(f))


def test_shipped_recipes_plan(tmp_path):
    """Every stage of every shipped recipe builds a valid config, with valid references (nothing runs)."""
    import tomllib
    from pathlib import Path

    from thinkforge.pipeline import RECIPE_KEYS, _plan

    paths = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.toml"))
    assert {p.stem for p in paths} >= {"r1", "r1_zero", "distill"}
    for path in paths:
        recipe = tomllib.loads(path.read_text())
        assert set(recipe) <= RECIPE_KEYS, path
        plan = _plan(recipe, str(path), tmp_path, recipe["task"], recipe.get("task_options", {}))
        assert len(plan) == len(recipe["stage"])


LOOP = """
[[stage]]
name = "prm"
run = "rm"
from = "cold"
labels = "mc"
mc_rollouts = 2
problems = 6
samples = 2
max_new_tokens = 32
steps = 2
batch_size = 4
eval_problems = 2

[[stage]]
name = "searched"
run = "sample"
from = "cold"
method = "prm-beam"
prm = "prm"
n = 4
problems = 60
max_new_tokens = 32
"""


def test_recipe_with_a_reward_model_and_search_stage(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text(RECIPE.format(more=LOOP))
    res = run_recipe(str(f), str(tmp_path / "out"))
    assert [s["stage"] for s in res["stages"]] == ["cold", "prm", "searched"]
    assert res["reward_models"]["prm"].endswith("prm/model") and set(res["models"]) == {"cold"}
    ev = res["stages"][1]["eval"]
    assert ev["labels"] == "mc" and ev["eval_labels"] == "gold" and "train_labels_vs_gold" in ev
    stats = res["stages"][2]["stats"]
    assert stats["method"] == "prm-beam@4" and stats["problems"] == 60 and stats["tokens_per_problem"] > 0
    assert stats["kept"] <= stats["correct"]
    f.write_text(RECIPE.format(more=LOOP.replace('prm = "prm"', 'prm = "cold"')))
    with pytest.raises(ConfigError, match="'prm' = 'cold' is not an earlier rm stage"):
        run_recipe(str(f), str(tmp_path / "out2"))


RLHF = """
gold = true

[[stage]]
name = "prefs"
run = "preferences"
from = "cold"
prompts = 30
k = 4
noise = 0.25
max_new_tokens = 24

[[stage]]
name = "bt"
run = "rm"
kind = "preference"
from = "cold"
data = "prefs"
steps = 4
batch_size = 4
eval_share = 0.3

[[stage]]
name = "dpo"
run = "dpo"
from = "cold"
data = "prefs"
steps = 3
batch_size = 4

[[stage]]
name = "grpo-rm"
run = "grpo"
from = "cold"
rewards = {"rm:bt" = 1.0}
steps = 2
prompts_per_step = 2
group_size = 2
max_new_tokens = 24
dynamic_sampling = false
train_problems = 40

[[stage]]
name = "ppo-rm"
run = "ppo"
from = "cold"
rewards = {"rm:bt" = 1.0}
steps = 2
prompts_per_step = 2
samples = 2
max_new_tokens = 24
train_problems = 40
"""


def test_rlhf_recipe_runs_preferences_rm_dpo_grpo_and_ppo_with_gold_rows(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text(RECIPE.format(more=RLHF).replace("threads = 1\n", "threads = 1\ngold = true\n", 1).replace(
        "\ngold = true\n\n[[stage]]\nname = \"prefs\"", "\n[[stage]]\nname = \"prefs\""))
    res = run_recipe(str(f), str(tmp_path / "out"))
    assert set(res["models"]) == {"cold", "dpo", "grpo-rm", "ppo-rm"} and set(res["data"]) == {"prefs"}
    gold = [r for r in res["rows"] if r["metric"].startswith("gold")]
    assert {r["stage"] for r in gold} == {"cold", "dpo", "grpo-rm", "ppo-rm"}
    assert all("vs_from" in r for r in gold if r["stage"] != "cold")  # paired against the cold start
    grpo = [json.loads(x) for x in (tmp_path / "out" / "grpo-rm" / "metrics.jsonl").read_text().splitlines()]
    assert "overopt/proxy" in grpo[0]  # the learned reward really was the reward
    assert str(tmp_path / "out" / "bt" / "model") in (tmp_path / "out" / "grpo-rm" / "config.toml").read_text()
