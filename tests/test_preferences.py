"""Preference data, the simulated labeller, the Bradley-Terry reward model, DPO / IPO, and a learned reward
inside GRPO: losses against hand-computed values, bad rows, exact resume, and the trainers end to end."""
import json
import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from resume_check import crash_then_resume

from thinkforge import format as fmt
from thinkforge.config import ConfigError
from thinkforge.preferences import Ranking, agreement, noisy_ranks, read_preferences
from thinkforge.train.losses import DPO_LOSSES, bradley_terry_loss, dpo_sigmoid_loss, ipo_loss


def test_losses_by_hand():
    # BT: -log sigmoid(2 - 1) = log(1 + e^-1); with a margin of 0.5: log(1 + e^-0.5)
    assert float(bradley_terry_loss(torch.tensor(2.0), torch.tensor(1.0))) == pytest.approx(math.log(1 + math.exp(-1)))
    assert float(bradley_terry_loss(torch.tensor(2.0), torch.tensor(1.0), 0.5)) == pytest.approx(math.log(1 + math.exp(-0.5)))
    # DPO: log-ratios 0.5 and -0.5, beta 0.1: -log sigmoid(0.1 * 1.0) = log(1 + e^-0.1)
    assert float(dpo_sigmoid_loss(torch.tensor(0.5), torch.tensor(-0.5), 0.1)) == pytest.approx(math.log(1 + math.exp(-0.1)))
    # IPO: (h - 1/(2 beta))^2 with h = 1: 0 at beta 0.5, 1 at beta 0.25
    assert float(ipo_loss(torch.tensor(0.5), torch.tensor(-0.5), 0.5)) == pytest.approx(0.0)
    assert float(ipo_loss(torch.tensor(0.5), torch.tensor(-0.5), 0.25)) == pytest.approx(1.0)
    assert DPO_LOSSES["ipo"][1] and not DPO_LOSSES["sigmoid"][1]  # IPO averages log-probs over tokens


def test_ranking_pairs_and_ties():
    r = Ranking("q", ["a", "b", "c", "d"], [0, 1, 2, 3])
    assert len(r.pairs()) == 6 and (0, 3) in r.pairs() and (3, 0) not in r.pairs()
    tied = Ranking("q", ["a", "b", "c"], [0, 1, 1])
    assert tied.pairs() == [(0, 1), (0, 2)]  # a declared tie gives no pair


def test_noisy_ranks_by_hand_and_agreement_matches_the_noise():
    assert noisy_ranks([0.9, 0.5, 0.1], 0.0, random.Random(0)) == ([0, 1, 2], [0, 1, 2])
    # noise 1 swaps every adjacent pair of the gold order in one pass: [0,1,2] -> [1,0,2] -> [2,0,1]
    assert noisy_ranks([0.9, 0.5, 0.1], 1.0, random.Random(0)) == ([2, 0, 1], [0, 1, 2])
    assert noisy_ranks([0.5, 0.5, 0.1], 1.0, random.Random(0))[1] == [0, 0, 1]  # equal utilities tie
    rng, rows = random.Random(1), []
    for _ in range(4000):
        ranks, gold = noisy_ranks([1.0, 0.2], 0.27, rng)
        rows.append(Ranking("q", ["a", "b"], ranks, gold_ranks=gold))
    agree, missing = agreement(rows)
    assert missing == 0 and sum(agree) / len(agree) == pytest.approx(0.73, abs=0.02)


def test_gold_utility_prefers_right_then_fewer_redundant_steps_then_a_later_error():
    from thinkforge.tasks import get_task

    task = get_task("mul")
    p = task.problems(1)[0]
    gold = fmt.render_completion(p.answer, "\n".join(p.steps))
    padded = fmt.render_completion(p.answer, "\n".join(p.steps + [p.steps[0], "hmm"]))  # 2 redundant lines
    late = fmt.render_completion("1", "\n".join(p.steps[:1] + ["1*1=2"] + p.steps[1:]))  # first error at line 2 of 3
    early = fmt.render_completion("1", "\n".join(["1*1=2"] + p.steps[1:]))
    values = [task.gold_utility(p, c) for c in (gold, padded, late, early)]
    assert values == pytest.approx([1.0, 0.9, 0.4 / 3, 0.0])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_reading_pairs_rankings_and_parquet(tmp_path):
    rows = [{"prompt": "1+1", "chosen": "2", "rejected": "3", "margin": 0.5},
            {"prompt": "2+2", "completions": ["4", "5", "6"], "ranking": [0, 1, 1], "gold_ranking": [0, 1, 2]}]
    got = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [(r.completions, r.ranks, r.margin) for r in got] == [(["2", "3"], [0, 1], 0.5), (["4", "5", "6"], [0, 1, 1], 0.0)]
    pq.write_table(pa.Table.from_pylist([rows[0]]), tmp_path / "p.parquet")
    assert read_preferences(tmp_path / "p.parquet")[0].completions == ["2", "3"]


@pytest.mark.parametrize("row,needle", [
    ({"chosen": "a", "rejected": "b"}, "p.jsonl:2: field 'prompt'"),
    ({"prompt": "q", "chosen": "a"}, "p.jsonl:2: field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": -1}, "field 'margin' must be a number >= 0"),
    ({"prompt": "q", "completions": ["a"], "ranking": [0]}, "field 'completions' must be a list of 2 to 16"),
    ({"prompt": "q", "completions": ["a", "b"], "ranking": [0]}, "field 'ranking' must be one integer rank"),
    ({"prompt": "q", "completions": ["a", "b"], "ranking": [1, 1]}, "ranks every completion the same"),
    ({"prompt": "q", "completions": ["a", "b"], "ranking": [0, "1"]}, "field 'ranking'"),
    ([1, 2], "p.jsonl:2: expected an object"),
])
def test_bad_preference_rows_name_file_line_and_field(tmp_path, row, needle):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_preferences(path)


def test_unreadable_preference_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="no rows"):
        read_preferences(tmp_path / "empty.jsonl")
    (tmp_path / "p.csv").write_text("x")
    with pytest.raises(ConfigError, match=r"must be \.jsonl or \.parquet"):
        read_preferences(tmp_path / "p.csv")
    with pytest.raises(ConfigError, match="no such file"):
        read_preferences(tmp_path / "none.jsonl")


# ---- trainers on a tiny model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from thinkforge.train.sft import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("pol") / "sft"
    return str(train_sft(SFTConfig(task="add", task_options={"digits": 2}, size="micro", steps=15, batch_size=16,
                                   max_len=64, out=str(out), train_problems=200, save_every=15)) / "model")


def toy_preferences(path, n=60, k=2):
    """A learnable preference: an answer ending in 7 beats one ending in 3 (ties among equals)."""
    rows = []
    for i in range(n):
        good, bad = f"<think>\n{i}\n</think>\n<answer>{i}7</answer>", f"<think>\n{i}\n</think>\n<answer>{i}3</answer>"
        if k == 2:
            rows.append({"prompt": f"{i}+{i}", "chosen": good, "rejected": bad, "gold_ranking": [0, 1]})
        else:
            rows.append({"prompt": f"{i}+{i}", "completions": [bad, good, bad + " "], "ranking": [1, 0, 2],
                         "gold_ranking": [1, 0, 1]})
    return write_jsonl(path, rows)


def rm_cfg(policy, tmp_path, data, **kw):
    from thinkforge.train.reward_model import RMConfig

    base = dict(kind="preference", data=data, policy=policy, out=str(tmp_path / "rm"), steps=30, batch_size=8,
                lr=3e-3, warmup=2, save_every=10, eval_share=0.25)
    return RMConfig(**{**base, **kw})


def test_held_out_measures_without_rows_or_without_a_gold_order(char_tok):
    """A proxy whose hold-out got no prompts (small preference files in ``thinkforge overopt``), or whose
    held-out rankings are all gold ties, gets the measures that exist instead of a bootstrap error."""
    from thinkforge.preferences import Ranking
    from thinkforge.train.preference_rm import evaluate_preference_rm

    class Longer:  # scores a completion by its length
        tok = char_tok

        def score(self, prompts, completions):
            return [[float(len(c))] for c in completions]

    assert evaluate_preference_rm(Longer(), []) == {"held_out_rankings": 0, "held_out_pairs": 0}
    rep = evaluate_preference_rm(Longer(), [Ranking("1+1", ["aa", "a"], [0, 1], gold_ranks=[0, 0])])
    assert rep["accuracy"]["mean"] == 1.0 and rep["held_out_pairs"] == 1 and "rm_agreement_with_gold" not in rep
    rep = evaluate_preference_rm(Longer(), [Ranking("1+1", ["aa", "a"], [0, 1], gold_ranks=[1, 0])])
    assert rep["rm_agreement_with_gold"]["mean"] == 0.0 and rep["labeller_agreement_with_gold"]["mean"] == 0.0


def test_bt_reward_model_learns_a_preference_and_scores_it(policy, tmp_path):
    from thinkforge.scorers import RewardModel
    from thinkforge.train.reward_model import train_reward_model

    run = train_reward_model(rm_cfg(policy, tmp_path, toy_preferences(tmp_path / "p.jsonl", k=3)))
    ev = json.loads((run / "eval.json").read_text())
    assert ev["held_out_rankings"] > 5 and ev["accuracy"]["mean"] > 0.9
    assert ev["accuracy"]["ci_low"] <= ev["accuracy"]["mean"] <= ev["accuracy"]["ci_high"]
    assert ev["labeller_agreement_with_gold"]["mean"] == 1.0  # the toy labels are the gold ones
    rm = RewardModel.load(str(run / "model"))
    assert rm.kind == "preference"
    s = rm.score(["5+5", "5+5"], ["<think>\n5\n</think>\n<answer>57</answer>", "<think>\n5\n</think>\n<answer>53</answer>"])
    assert s[0][0] > s[1][0]


def test_a_ranking_is_one_batch_element_whose_loss_is_the_mean_of_its_pairs(policy):
    from thinkforge.train.preference_rm import encode_ranking, make_loss_fn
    from thinkforge.train.reward_model import _backbone

    torch.manual_seed(0)
    model, tok = _backbone(policy, "cpu")
    r = Ranking("1+1", ["<answer>2</answer>", "<answer>3</answer>", "<answer>4</answer>"], [0, 1, 2])
    enc = encode_ranking(tok, r)
    loss, stats = make_loss_fn(0.0, tok.pad_token_id, "cpu")(model, {"rankings": [enc]})
    with torch.no_grad():
        rewards = [float(model(input_ids=torch.tensor([ids])).logits[0, -1, 0]) for ids in enc["ids"]]
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum(math.log(1 + math.exp(-(rewards[i] - rewards[j]))) for i, j in pairs) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    centred, _ = make_loss_fn(0.5, tok.pad_token_id, "cpu")(model, {"rankings": [enc]})
    assert float(centred) == pytest.approx(expected + 0.5 * (sum(rewards) / 3) ** 2, rel=1e-5)


def _hand_reward(model, ids: list[int], start: int, pooling: str) -> float:
    """The reward written out from the model's own outputs, one position at a time."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0]
    if pooling == "sum":
        return float(sum(out[t, 0] for t in range(start, len(ids))))
    return float(sum(torch.log_softmax(out[t - 1], -1)[ids[t]] for t in range(start, len(ids))))


@pytest.mark.parametrize("pooling", ["sum", "logprob"])
def test_pooled_rewards_equal_the_hand_sum_over_the_completion_and_end_token(policy, tmp_path, pooling):
    from thinkforge.models import ModelLoadError, load_model
    from thinkforge.preferences import prompt_text
    from thinkforge.scorers import RewardModel
    from thinkforge.train.preference_rm import encode_ranking, make_loss_fn
    from thinkforge.train.reward_model import _backbone, train_reward_model

    torch.manual_seed(0)
    model, tok = _backbone(policy, "cpu") if pooling == "sum" else load_model(policy, device="cpu")
    r = Ranking("1+1", ["<answer>2</answer>", "<answer>3</answer>", "<answer>44</answer>"], [0, 1, 2])
    enc = encode_ranking(tok, r)
    prompt_len = len(tok.encode(prompt_text("1+1", tok), add_special_tokens=False))
    assert enc["starts"] == [prompt_len] * 3
    loss, _ = make_loss_fn(0.0, tok.pad_token_id, "cpu", pooling)(model, {"rankings": [enc]})
    rewards = [_hand_reward(model, ids, prompt_len, pooling) for ids in enc["ids"]]
    expected = sum(math.log(1 + math.exp(-(rewards[i] - rewards[j]))) for i, j in [(0, 1), (0, 2), (1, 2)]) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    if pooling == "sum":
        last, _ = make_loss_fn(0.0, tok.pad_token_id, "cpu", "last")(model, {"rankings": [enc]})
        assert abs(float(last) - expected) > 1e-3  # the two poolings are different rewards

    run = train_reward_model(rm_cfg(policy, tmp_path, toy_preferences(tmp_path / "p.jsonl"), pooling=pooling, steps=4,
                                    lr=1e-3 if pooling == "logprob" else 3e-3))
    rm = RewardModel.load(str(run / "model"))
    assert rm.pooling == pooling
    done = "<think>\n5\n</think>\n<answer>57</answer>"
    ids = tok.encode(prompt_text("5+5", tok) + done + "<|im_end|>", add_special_tokens=False)
    assert rm.score(["5+5"], [done])[0][0] == pytest.approx(_hand_reward(rm.model, ids, prompt_len, pooling), rel=1e-5)
    cfg = json.loads((run / "model" / "config.json").read_text())
    cfg["thinkforge_rm"]["pooling"] = "mean"
    (run / "model" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="pooling is 'mean'"):
        RewardModel.load(str(run / "model"))
    with pytest.raises(ValueError, match="pooling must be one of"):
        rm_cfg(policy, tmp_path, "x.jsonl", pooling="max")


def test_held_out_scoring_in_batches_equals_one_ranking_at_a_time(policy, tmp_path):
    from thinkforge.models import load_model
    from thinkforge.preferences import prompt_text
    from thinkforge.scorers import RewardModel
    from thinkforge.train import preference_rm

    lm, tok = load_model(policy, device="cpu")
    rm = RewardModel(lm.eval(), tok, "preference", pooling="logprob", batch_rows=3)
    rankings = read_preferences(toy_preferences(tmp_path / "p.jsonl", k=3))[:12]
    twin = rankings[0]  # the same completion twice: its pair must stay a tie
    rankings.append(Ranking(twin.prompt, [twin.completions[0]] * 2, [0, 1]))
    calls = []
    real = rm.score
    rm.score = lambda p, c: calls.append(len(c)) or real(p, c)
    report = preference_rm.evaluate_preference_rm(rm, rankings)
    # one call; the twin's two copies are ranking 0's first completion (same prompt): scored once for all three
    assert calls == [sum(len(r.completions) for r in rankings) - 2]

    def by_hand(r):  # one ranking at a time, pairs compared as the docstring says
        sc = [s[0] for s in real([prompt_text(r.prompt, tok)] * len(r.completions), r.completions)]
        hits = [1.0 if sc[i] > sc[j] else 0.5 if sc[i] == sc[j] else 0.0 for i, j in r.pairs()]
        return sum(hits) / len(hits)

    per_prompt = [by_hand(r) for r in rankings]
    assert per_prompt[-1] == 0.5
    assert report["accuracy"]["mean"] == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-12)


def test_logprob_reward_model_learns_a_preference_and_resumes_exactly(policy, tmp_path, monkeypatch):
    from thinkforge.models import load_model
    from thinkforge.scorers import RewardModel
    from thinkforge.train import preference_rm
    from thinkforge.train.reward_model import train_reward_model

    data = toy_preferences(tmp_path / "p.jsonl", k=3)
    run = train_reward_model(rm_cfg(policy, tmp_path / "full", data, pooling="logprob", lr=1e-3))
    ev = json.loads((run / "eval.json").read_text())
    assert ev["accuracy"]["mean"] > 0.9
    lm, tok = load_model(policy, device="cpu")
    start = RewardModel(lm.eval(), tok, "preference", pooling="logprob")
    held = [r for r in read_preferences(data) if preference_rm.held_out(r.prompt, 0.25)]
    assert ev["start"] == {k: v for k, v in preference_rm.evaluate_preference_rm(start, held).items()
                           if k in ("accuracy", "rm_agreement_with_gold")}  # the policy as it was, not the trained RM
    assert ev["start"]["accuracy"]["mean"] < ev["accuracy"]["mean"]
    crash_then_resume(monkeypatch, preference_rm, train_reward_model,
                      lambda out, **kw: rm_cfg(policy, out, data, pooling="logprob", steps=6, save_every=2, out=str(out), **kw),
                      tmp_path)
    with pytest.raises(ValueError, match="no --extra-layers"):
        rm_cfg(policy, tmp_path, data, pooling="logprob", extra_layers=1)


def test_bt_reward_model_resumes_exactly(policy, tmp_path, monkeypatch):
    from thinkforge.train import preference_rm
    from thinkforge.train.reward_model import train_reward_model

    data = toy_preferences(tmp_path / "p.jsonl")
    crash_then_resume(monkeypatch, preference_rm, train_reward_model,
                       lambda out, **kw: rm_cfg(policy, out, data, steps=6, save_every=2, out=str(out), **kw), tmp_path)


def dpo_cfg(policy, out, data, **kw):
    from thinkforge.train.dpo import DPOConfig

    base = dict(model=policy, data=data, out=str(out), steps=12, batch_size=8, lr=1e-3, warmup=1, save_every=4,
                task="add", task_options={"digits": 2}, eval_problems=8, eval_samples=2, max_new_tokens=24)
    return DPOConfig(**{**base, **kw})


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_raises_the_chosen_over_the_rejected_and_reports_gold(policy, tmp_path, loss):
    from thinkforge.train.dpo import train_dpo

    run = train_dpo(dpo_cfg(policy, tmp_path / "dpo", toy_preferences(tmp_path / "p.jsonl"), loss=loss,
                            beta=0.5 if loss == "ipo" else 0.1))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert rows[-1]["rewards/margins"] > 0 and rows[-1]["rewards/accuracies"] > 0.5
    ev = json.loads((run / "eval.json").read_text())
    assert ev["problems"] == 8 and set(ev) >= {"greedy", "sampled", "greedy_accuracy"}
    assert ev["greedy"]["difference"]["ci_low"] <= ev["greedy"]["difference"]["diff"] <= ev["greedy"]["difference"]["ci_high"]


def test_dpo_loss_fn_is_the_formula(policy, tmp_path):
    from thinkforge.models import load_model
    from thinkforge.train.dpo import add_reference, encode_pairs, make_loss_fn, sequence_logps

    model, tok = load_model(policy, device="cpu")
    ref, _ = load_model(policy, device="cpu")
    with torch.no_grad():
        next(model.parameters()).mul_(1.1)  # the policy has moved away from the reference
    pairs = encode_pairs(read_preferences(toy_preferences(tmp_path / "p.jsonl", n=3)), tok, 128)
    add_reference(pairs, ref, tok.pad_token_id, "cpu", mean=False)
    cfg = dpo_cfg(policy, tmp_path, "unused.jsonl", beta=0.2)
    loss, stats = make_loss_fn(cfg, tok.pad_token_id, "cpu")(model, {"pairs": pairs})
    expected = 0.0
    for p in pairs:
        with torch.no_grad():
            lb, lw = sequence_logps(model, [p["better"], p["worse"]], [p["start"]] * 2, tok.pad_token_id, "cpu", False)
            rb, rw = sequence_logps(ref, [p["better"], p["worse"]], [p["start"]] * 2, tok.pad_token_id, "cpu", False)
        h = float((lb - rb) - (lw - rw))
        expected += math.log(1 + math.exp(-0.2 * h))
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_dpo_resumes_exactly(policy, tmp_path, monkeypatch):
    from thinkforge.train import dpo

    data = toy_preferences(tmp_path / "p.jsonl")
    crash_then_resume(monkeypatch, dpo, dpo.train_dpo,
                       lambda out, **kw: dpo_cfg(policy, out, data, steps=6, save_every=2, eval_problems=0, **kw), tmp_path)


def test_simulated_labeller_writes_readable_ranked_rows(policy, tmp_path):
    from thinkforge.models import load_model
    from thinkforge.preferences import PreferencesConfig, label_preferences
    from thinkforge.tasks import get_task

    model, tok = load_model(policy, device="cpu")
    task = get_task("add", digits=2)
    cfg = PreferencesConfig(model=policy, task="add", task_options={"digits": 2}, prompts=12, k=4, noise=0.0,
                            max_new_tokens=24, out=str(tmp_path / "p.jsonl"))
    rows, stats = label_preferences(model, tok, task, task.problems(12), cfg)
    assert stats["rows"] + stats["all_tied_prompts"] == 12 and stats["rows"] == len(rows)
    for row in rows:
        utils = row["gold_utility"]
        assert [sorted(set(utils), reverse=True).index(u) for u in utils] == row["ranking"] == row["gold_ranking"]
    if rows:
        assert stats["label_agreement_with_gold"] == 1.0  # no noise: the labels are the gold order
        write_jsonl(tmp_path / "p.jsonl", rows)
        assert len(read_preferences(tmp_path / "p.jsonl")) == len(rows)


def test_grpo_against_a_learned_reward_logs_proxy_and_gold(policy, tmp_path, monkeypatch):
    from thinkforge.rewards import reward_model_reward
    from thinkforge.tasks import get_task
    from thinkforge.train.grpo import GRPOConfig, train_grpo
    from thinkforge.train.reward_model import train_reward_model

    rm = train_reward_model(rm_cfg(policy, tmp_path, toy_preferences(tmp_path / "p.jsonl"), steps=10)) / "model"
    task = get_task("add", digits=2)
    prob = task.problems(1)[0]
    same_answer = ["<think>\n1\n</think>\n<answer>17</answer>", "<think>\n222\n</think>\n<answer>17</answer>"]
    score = reward_model_reward(str(rm))
    by_answer = score(same_answer, [prob, prob], scope="answer")
    by_all = score(same_answer, [prob, prob], scope="all")
    assert by_answer[0] == pytest.approx(by_answer[1]) and by_all[0] != pytest.approx(by_all[1])
    from thinkforge.rewards import compute_rewards  # the trainers' path: rm_scope reaches every rm: reward

    for scope, same in (("answer", True), ("all", False)):
        total = compute_rewards(same_answer, [prob, prob], task, {f"rm:{rm}": 1.0}, rm_scope=scope).total
        assert (total[0] == pytest.approx(total[1])) == same, scope
    own = compute_rewards(same_answer, [prob, prob], task, {f"rm:{rm}": 1.0}, rm_scope="all",
                          options={f"rm:{rm}": {"scope": "answer"}}).total
    assert own[0] == pytest.approx(own[1])  # a reward's own scope (GRPO's rm_scopes) wins over rm_scope
    from thinkforge.train import grpo

    seen = []
    monkeypatch.setattr(grpo, "compute_rewards", lambda *a, **kw: seen.append(kw) or compute_rewards(*a, **kw))
    cfg = GRPOConfig(model=policy, task="add", task_options={"digits": 2}, out=str(tmp_path / "g"), steps=2,
                     prompts_per_step=2, group_size=4, max_new_tokens=24, rewards={f"rm:{rm}": 1.0},
                     dynamic_sampling=False, train_problems=20, save_every=2, rm_scopes={f"rm:{rm}": "answer"})
    rows = [json.loads(x) for x in (train_grpo(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert seen and all(kw["options"] == {f"rm:{rm}": {"scope": "answer"}} for kw in seen)
    assert all({"overopt/proxy", "overopt/gold", "overopt/warning"} <= set(r) for r in rows)
    assert all(0.0 <= r["overopt/gold"] <= 1.0 for r in rows)
    with pytest.raises(ConfigError, match="rm_scope"):
        GRPOConfig(model=policy, rm_scope="thinking")


def test_held_out_share_is_independent_of_the_task_split():
    """The task's train split is itself a hash of the question: the held-out share must use another one."""
    from thinkforge.tasks import get_task
    from thinkforge.train.preference_rm import held_out

    questions = [p.question for p in get_task("mul").problems(1000, "train")]
    assert 60 <= sum(held_out(q, 0.1) for q in questions) <= 140


# ---- PPO -------------------------------------------------------------------------------------------------

def test_gae_by_hand():
    from thinkforge.train.losses import gae

    rewards, values, span = torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.5, 0.5, 0.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, span, 1.0, 1.0)  # deltas 0, 0, 0.5: every advantage 0.5
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.0]) and ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    adv, ret = gae(rewards, values, span, 1.0, 0.5)  # 0.5, 0.5*0.5, 0.5*0.25
    assert adv[0].tolist() == pytest.approx([0.125, 0.25, 0.5, 0.0]) and ret[0].tolist() == pytest.approx([0.625, 0.75, 1.0, 0.0])
    adv, _ = gae(rewards, values, span, 0.9, 1.0)  # deltas -0.05, -0.05, 0.5: A1 = -0.05 + 0.9*0.5, A0 = -0.05 + 0.9*A1
    assert adv[0].tolist() == pytest.approx([0.31, 0.4, 0.5, 0.0])


def test_ppo_losses_by_hand():
    from thinkforge.train.losses import clipped_value_loss, kl_penalised_rewards, ppo_policy_loss

    logp, old, adv, mask = torch.tensor([[0.5, 0.0]]), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    # token 0: r = e^0.5 > 1.2 with A > 0 -> -1.2; token 1: r = 1, A = -1 -> +1; mean -0.1
    assert float(ppo_policy_loss(logp, old, adv, mask)) == pytest.approx(-0.1)
    # V 1.0, V_old 0.5, R 2.0, eps 0.2: unclipped (1-2)^2 = 1, clipped (0.7-2)^2 = 1.69 -> 0.5 * 1.69
    v = clipped_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    assert float(v) == pytest.approx(0.845)
    # KL-in-reward: -beta * (logp - ref) per token, the score on the last span token only
    r = kl_penalised_rewards(torch.tensor([2.0, 3.0]), torch.tensor([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]]),
                             torch.tensor([[-1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]),
                             torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), 0.5)
    assert r[0].tolist() == pytest.approx([-0.5, 2.0, 0.0]) and r[1].tolist() == pytest.approx([3.5, 0.0, 0.0])


def ppo_cfg(policy, out, **kw):
    from thinkforge.train.ppo import PPOConfig

    base = dict(model=policy, task="add", task_options={"digits": 2}, out=str(out), steps=4, mu=2, prompts_per_step=4,
                samples=2, max_new_tokens=24, lr=1e-3, warmup=1, save_every=1, train_problems=40,
                rewards={"accuracy": 1.0, "format": 0.5}, adaptive_kl=True, kl_target=1.0)
    return PPOConfig(**{**base, **kw})


def test_ppo_trains_policy_and_value_and_logs_its_figures(policy, tmp_path):
    from thinkforge.models import load_model
    from thinkforge.train.ppo import train_ppo

    run = train_ppo(ppo_cfg(policy, tmp_path / "ppo"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    for key in ("score", "kl", "kl_coef", "policy_loss", "value_loss", "clipfrac", "vf_clipfrac", "gold", "accuracy"):
        assert key in rows[0], key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert rows[1]["score"] == rows[0]["score"]  # mu = 2: the second step reuses the roll-outs
    assert rows[2]["kl_coef"] != rows[0]["kl_coef"]  # the adaptive controller moved beta
    before, _ = load_model(policy, device="cpu")
    after, _ = load_model(str(run / "model"), device="cpu")
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    assert (run / "model" / "value" / "config.json").is_file()


def test_ppo_resumes_exactly(policy, tmp_path, monkeypatch):
    from thinkforge.train import ppo

    crash_then_resume(monkeypatch, ppo, ppo.train_ppo, lambda out, **kw: ppo_cfg(policy, out, **kw), tmp_path)


# ---- generative verifier ---------------------------------------------------------------------------------

def test_verification_examples_and_target():
    from thinkforge.sampling import Graded
    from thinkforge.tasks import Problem
    from thinkforge.train.verifier import verification_rows

    p = Problem("p", "12*3", "36", ["21*3=63"], {})
    g = Graded(p, [None] * 4, ["36", "35", "35", "34"], [True, False, False, False])
    rows = verification_rows([g])  # one 'yes' (36): one of the two distinct 'no' answers is kept
    # a user message and its target: SFT renders them in the verifier model's own chat template
    assert [r["label"] for r in rows] == ["yes", "no"] and rows[0]["prompt"] == "12*3=36?"
    wrong = rows[1]["prompt"].split("=")[1][:2]
    assert wrong in ("35", "34")
    assert rows[1]["completion"] == f"<think>\n21*3=63\n36\n{wrong}\n</think>\n<answer>no</answer>"


def test_generative_verifier_trains_scores_and_reports(policy, tmp_path):
    from thinkforge.models import load_model
    from thinkforge.tasks import get_task
    from thinkforge.train.verifier import VerifierConfig, train_verifier
    from thinkforge.verifier import GenerativeVerifier

    cfg = VerifierConfig(policy=policy, task="add", task_options={"digits": 2}, out=str(tmp_path / "gv"), problems=20,
                         samples=2, max_new_tokens=24, steps=3, batch_size=8, max_len=96, eval_problems=4, n=2, save_every=3)
    run = train_verifier(cfg)
    ev = json.loads((run / "eval.json").read_text())
    for mode in ("verdict", "answer"):
        assert set(ev[mode]["methods"]) == {"bon-gv@2", "maj@2", "maj@4", "sample"}
        assert 0 <= ev[mode]["ranking"]["accuracy"] <= 1
        assert ev[mode]["methods"]["bon-gv@2"]["tokens"] >= ev[mode]["methods"]["maj@2"]["tokens"]  # checks counted
    model, tok = load_model(str(run / "sft" / "model"), device="cpu")
    v = GenerativeVerifier(model, tok, max_new_tokens=24)
    prob = get_task("add", digits=2).problems(1)[0]
    scores = v.score([prob, prob, prob], [prob.answer, "1", None])
    spent = v.tokens_generated
    assert all(0.0 <= s <= 1.0 for s in scores) and scores[2] == 0.0 and spent > 0
    assert v.score([prob], [prob.answer]) == scores[:1] and v.tokens_generated == spent  # cached: no new check
    by_answer = GenerativeVerifier(model, tok, max_new_tokens=24, mode="answer").score([prob], [prob.answer])
    assert 0.0 <= by_answer[0] <= 1.0


def test_dpo_and_bt_rm_micro_batches_train_the_same_model(policy, tmp_path):
    """--micro-batch-size 3 on batches of 8 (passes of 3, 3, 2) trains the same weights as whole batches."""
    from safetensors.torch import load_file

    from thinkforge.train.dpo import train_dpo
    from thinkforge.train.loop import ItemBatcher
    from thinkforge.train.reward_model import train_reward_model

    parts = ItemBatcher(list(range(20)), 8, 0, "pairs", lambda x: 1, micro=3)({})
    assert [len(p["pairs"]) for p in parts] == [3, 3, 2] and sum(p["n_tokens"] for p in parts) == 8
    data = toy_preferences(tmp_path / "p.jsonl")
    for name, train, cfg in (
            ("dpo", train_dpo, lambda out, m: dpo_cfg(policy, out, data, steps=3, eval_problems=0, micro_batch_size=m)),
            ("rm", train_reward_model, lambda out, m: rm_cfg(policy, out, data, steps=3, out=str(out), micro_batch_size=m))):
        runs = [train(cfg(tmp_path / f"{name}{m}", m)) for m in (0, 3)]
        rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
        for key in ("loss", "grad_norm"):
            assert [x[key] for x in rows[0]] == pytest.approx([x[key] for x in rows[1]], rel=1e-5), (name, key)
        a, b = (load_file(str(r / "model" / "model.safetensors")) for r in runs)
        # Adam divides by sqrt(v): float-noise differences in near-zero gradients move weights by ~lr x 1e-2
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4, name


def test_ppo_micro_batches_train_the_same_policy_and_value(policy, tmp_path):
    """8 roll-outs a step in passes of 3 (3 + 3 + 2) against one pass: same losses, statistics and weights."""
    from safetensors.torch import load_file

    from thinkforge.train import ppo

    calls, make = [], ppo.make_loss_fn

    def counting(cfg):
        fn = make(cfg)
        return lambda ac, mb: (calls.append(cfg.micro_batch_size), fn(ac, mb))[1]

    ppo.make_loss_fn = counting
    try:
        runs = [ppo.train_ppo(ppo_cfg(policy, tmp_path / f"p{m}", steps=2, micro_batch_size=m)) for m in (0, 3)]
    finally:
        ppo.make_loss_fn = make
    assert calls.count(0) == 2 and calls.count(3) == 2 * 3
    rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    for key in ("loss", "policy_loss", "value_loss", "clipfrac", "grad_norm", "kl"):
        assert [x[key] for x in rows[0]] == pytest.approx([x[key] for x in rows[1]], rel=1e-4, abs=1e-6), key
    for sub in ("model.safetensors", "value/model.safetensors"):
        a, b = (load_file(str(r / "model" / sub)) for r in runs)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4, sub


# ---- over-optimisation ------------------------------------------------------------------------------

def test_best_of_n_expectation_is_the_mean_over_every_subset():
    from itertools import combinations

    from thinkforge.overopt import bon_expectation

    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=7), rng.normal(size=7)
    for n in range(1, 8):
        picks = [gold[max(s, key=lambda i: proxy[i])] for s in combinations(range(7), n)]
        assert abs(bon_expectation(proxy, gold, n) - np.mean(picks)) < 1e-12, n
    assert abs(bon_expectation(proxy, gold, 1) - gold.mean()) < 1e-12
    assert bon_expectation(proxy, gold, 7) == gold[np.argmax(proxy)]


def test_gao_forms_are_recovered_with_their_peaks():
    from thinkforge.overopt import fit_form, kl_bon

    d = np.linspace(0.2, 3.0, 12)
    rl = fit_form("rl", d, d * (0.3 - 0.2 * np.log(d)))
    assert abs(rl["alpha"] - 0.3) < 1e-9 and abs(rl["beta"] - 0.2) < 1e-9
    assert abs(rl["peak_sqrt_kl"] - np.exp(0.3 / 0.2 - 1)) < 1e-9  # d/dd d(a - b log d) = a - b - b log d = 0
    bon = fit_form("bon", d, d * (0.5 - 0.1 * d))
    assert abs(bon["peak_sqrt_kl"] - 2.5) < 1e-9 and abs(bon["peak_gain"] - 2.5 * (0.5 - 0.25)) < 1e-9
    falling = fit_form("bon", d, -0.1 * d - 0.2 * d * d)
    assert falling["alpha"] < 0 and falling["peak_sqrt_kl"] == 0.0 and falling["peak_gain"] == 0.0
    rising = fit_form("bon", d, 0.4 * d)  # no downturn measured: no finite peak is invented
    assert rising["peak_sqrt_kl"] == float("inf") or rising["beta"] <= 1e-12
    assert kl_bon(1) == 0.0 and abs(kl_bon(4) - (np.log(4) - 0.75)) < 1e-15


def test_overopt_command_measures_proxies_best_of_n_and_rl_and_continues(tmp_path):
    from thinkforge.config import ConfigError
    from thinkforge.overopt import OveroptConfig, run_overopt
    from thinkforge.train.sft import SFTConfig, train_sft

    policy = str(train_sft(SFTConfig(task="syllogism", size="micro", steps=60, batch_size=16, max_len=256, lr=3e-3, min_lr_ratio=1.0,
                                     out=str(tmp_path / "policy"), train_problems=500, save_every=60)) / "model")

    cfg = dict(task="syllogism", task_options={}, policy=policy, out=str(tmp_path / "o"),
               data_sizes=[6, 16], k=3, rm_steps=3, rm_batch_size=4, bon_problems=3, bon_n=4, rl_steps=2, rl_every=1,
               rl_lr=1e-3, prompts_per_step=2, group_size=2, eval_problems=3, eval_samples=2, max_new_tokens=64)
    res = run_overopt(OveroptConfig(**cfg))
    bon = res["best_of_n"]
    assert bon["n"] == [1, 2, 3, 4] and bon["kl"][0] == 0.0
    for size in ("6", "16"):
        proxy = [p["mean"] for p in bon["proxies"][size]["proxy"]]
        assert all(b >= a - 1e-12 for a, b in zip(proxy, proxy[1:]))  # the proxy's pick of more samples never scores lower
        assert abs(proxy[0]) < 1e-9  # n = 1 is the mean of the standardised scores
        pts = res["rl"][size]
        assert [p["step"] for p in pts] == [0, 1, 2]
        assert pts[0]["kl"] < 1e-3  # the start against itself (engine vs full-forward logprobs differ by ~1e-6)
        assert pts[-1]["kl"] > pts[0]["kl"]  # training moved the policy
        assert set(res["fits"]["rl"][size]) >= {"alpha", "beta", "peak_sqrt_kl", "best_measured"}
        assert res["reward_models"][size]["train_rankings"] >= 1
    assert (tmp_path / "o" / "overopt.png").stat().st_size > 10_000
    before = (tmp_path / "o" / "rl-16" / "points.json").read_text()
    again = run_overopt(OveroptConfig(**cfg))  # every part finished: nothing is recomputed
    assert (tmp_path / "o" / "rl-16" / "points.json").read_text() == before and again["rl"] == res["rl"]
    with pytest.raises(ConfigError, match="another config"):
        run_overopt(OveroptConfig(**{**cfg, "rl_lr": 2e-3}))
