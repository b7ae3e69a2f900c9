"""Reward models: step splitting, labels (gold, judge, Monte-Carlo, LLM judge), training and scoring."""
import json
import random
from types import SimpleNamespace

import pytest
import torch
from mock_policy import plan_engine

from thinkforge import format as fmt
from thinkforge.config import ConfigError
from thinkforge.models import ModelLoadError, char_tokenizer, save_model, tiny_model
from thinkforge.scorers import RewardModel, aggregate, encode, ranking_accuracy, split_steps, step_metrics
from thinkforge.tasks import get_task
from thinkforge.train.reward_model import (
    RMConfig,
    gold_labels,
    judge_labels,
    llm_judge_labels,
    mc_labels,
    parse_judgement,
    read_labels,
    train_reward_model,
)

MUL = get_task("mul", digits_a=3, digits_b=2)
PROB = MUL.problems(1, "train", seed=0)[0]


def completion(steps, answer):
    return fmt.render_completion(answer, "\n".join(steps))


def test_split_steps_cuts_without_rewriting():
    rng = random.Random(0)
    alphabet = ["a", "1", "\n", "\n\n", " ", fmt.THINK_OPEN, fmt.THINK_CLOSE, fmt.ANSWER_OPEN, "="]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        head, steps = split_steps(text)
        assert head + "".join(steps) == text and all(steps)
    head, steps = split_steps(completion(["1+2=3", "3*4=12"], "12") + fmt.IM_END)
    assert head == "<think>\n" and steps == ["1+2=3\n", "3*4=12\n", "</think>\n<answer>12</answer>"]


def test_encode_marks_the_last_token_of_each_step(char_tok):
    ids, ends, start = encode(char_tok, "Q", completion(["ab", "cde"], "7"))
    assert start == 1 and len(ends) == 3
    assert [char_tok.decode(ids[e]) for e in ends[:2]] == ["\n", "\n"] and ends[-1] == len(ids) - 1
    assert char_tok.decode(ids[ends[0] - 2 : ends[0]]) == "ab"


def test_aggregates_and_metrics_by_hand():
    assert aggregate([0.9, 0.5, 0.8], "min") == 0.5 and aggregate([0.5, 0.4], "prod") == pytest.approx(0.2)
    assert aggregate([0.9, 0.2], "last") == 0.2 and aggregate([], "min") == 0.0
    # wrong steps (label 0) are the positive class: scores < 0.5 flag them
    m = step_metrics([[0.1, 0.9, 0.2], [0.8]], [[0, 1, 1], [0]])
    # flagged: 0.1 (wrong: tp), 0.2 (right: fp); missed wrong: 0.8 (fn); right not flagged: 0.9 (tn)
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.5, 0.5, 0.5, 0.5)
    r = ranking_accuracy(["a", "a", "a", "b"], [0.9, 0.3, 0.9, 0.1], [1, 0, 0, 1])
    assert r == {"accuracy": 0.75, "pairs": 2}  # (0.9 > 0.3) = 1, (0.9 = 0.9) = 0.5; b has no wrong one


def test_gold_and_judge_labels_follow_error_propagation_and_cessation():
    gold = PROB.steps
    right = completion(gold, PROB.answer)
    assert gold_labels(MUL, PROB, right, True) == [1.0] * (len(gold) + 1)
    bad = gold[0][:-1] + str((int(gold[0][-1]) + 1) % 10)  # the first partial product with one wrong digit
    # the later steps match the gold ones... except the sum, which a wrong product would change; here the
    # model copies the gold sum, so positional labels say [0, 1, 1] and the outcome decides the answer step
    assert gold_labels(MUL, PROB, completion([bad, *gold[1:]], PROB.answer), True) == [0.0, 1.0, 1.0, 1.0]
    # a reflective trace: a wrong step, "Wait", the step redone right, then the rest
    reflective = completion([bad, "Wait", *gold], PROB.answer)
    assert gold_labels(MUL, PROB, reflective, True) == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # positions shifted: all wrong
    assert judge_labels(MUL, PROB, reflective, True) == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # cessation: right again
    # propagation: a sum that adds the wrong product correctly is still wrong
    a, b = PROB.meta["a"], PROB.meta["b"]
    wrong_p = int(bad.split("=")[1][::-1])
    second = a * (b // 10 * 10)
    carried = f"{str(wrong_p)[::-1]}+{str(second)[::-1]}={str(wrong_p + second)[::-1]}"
    assert judge_labels(MUL, PROB, completion([bad, gold[1], carried], str(wrong_p + second)), False) == [0, 1, 0, 0]


def test_mc_labels_from_scripted_rollouts(char_tok):
    """After a prefix that contains 'X' the scripted policy answers wrong, otherwise right: a step is good
    (hard label) when some roll-out from it reaches the right answer; soft labels are the share."""
    def plan(prompt, j):
        thinking = prompt.split(fmt.THINK_OPEN)[-1]
        right = "X" not in thinking and (j % 2 == 0 or "h" not in thinking)
        return f"{fmt.THINK_CLOSE}\n{fmt.ANSWER_OPEN}{PROB.answer if right else '1'}{fmt.ANSWER_CLOSE}"

    engine, _ = plan_engine(char_tok, plan)
    wrong = completion(["ok", "h", "X"], "1")
    hard = mc_labels(engine, MUL, [(PROB, wrong, False)], rollouts=4, soft=False, temperature=1.0,
                     max_new_tokens=16, seed=0)
    soft = mc_labels(engine, MUL, [(PROB, wrong, False)], rollouts=4, soft=True, temperature=1.0,
                     max_new_tokens=16, seed=0)
    assert hard == [[1.0, 1.0, 0.0, 0.0]]  # "h": half the roll-outs still succeed; "X": none; answer: outcome
    assert soft == [[1.0, 0.5, 0.0, 0.0]]
    right = completion(["ok"], PROB.answer)  # a correct completion is its own successful roll-out: no sampling
    assert mc_labels(engine, MUL, [(PROB, right, True)], 4, False, 1.0, 16, 0) == [[1.0, 1.0]]


def test_llm_judge_through_an_openai_compatible_client():
    seen = {}

    def create(model, messages, temperature):
        seen["prompt"] = messages[0]["content"]
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content="1: correct\n2: wrong\n3: wrong"))])

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    labels = llm_judge_labels(client, "judge", PROB, completion(["a", "b"], "1"))
    assert labels == [1.0, 0.0, 0.0] and "Error Propagation" in seen["prompt"] and "2. b" in seen["prompt"]
    with pytest.raises(ValueError, match=r"no verdict for step\(s\) \[2\]"):
        parse_judgement("1: correct", 2)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    tok = char_tokenizer(MUL.sample_text())
    path = tmp_path_factory.mktemp("policy") / "model"
    save_model(tiny_model(tok, "micro"), tok, path)
    return path


@pytest.mark.timeout(120)
def test_prm_trains_scores_and_resumes_exactly(policy_dir, tmp_path):
    # labels from the gold checkers; the random policy's completions are mostly wrong, gold traces are right
    cfg = dict(policy=str(policy_dir), task="mul", task_options={"digits_a": 3, "digits_b": 2}, problems=24,
               samples=2, max_new_tokens=48, steps=6, batch_size=8, save_every=3, eval_problems=4, seed=0)
    run = train_reward_model(RMConfig(out=str(tmp_path / "a"), **cfg))
    rows = [json.loads(x) for x in (run / "labels.jsonl").read_text().splitlines()]
    assert len(rows) == 24 * 2 + 24 and all(len(split_steps(r["completion"])[1]) == len(r["labels"]) for r in rows)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["eval_labels"] == "gold" and ev["completions"] == 8 and 0 <= ev["step"]["f1"] <= 1
    rm = RewardModel.load(str(run / "model"), device="cpu")
    scores = rm.score([PROB.question, PROB], [completion(PROB.steps, PROB.answer), "<answer>1</answer>"])
    assert len(scores[0]) == len(PROB.steps) + 1 and len(scores[1]) == 1 and all(0 < s < 1 for s in scores[0])
    # kill-free resume check: a run stopped at step 3 and resumed ends with the same weights
    b = tmp_path / "b"
    train_reward_model(RMConfig(out=str(b), **{**cfg, "steps": 3}))
    resumed = train_reward_model(RMConfig(out=str(b), resume=True, **cfg))
    la = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert la[:3] == lb[:3]
    a_w, b_w = RewardModel.load(str(run / "model"), "cpu").model, RewardModel.load(str(resumed / "model"), "cpu").model
    assert all(torch.equal(x, y) for x, y in zip(a_w.state_dict().values(), b_w.state_dict().values()))


def test_orm_is_read_at_the_last_token(policy_dir, tmp_path):
    cfg = RMConfig(policy=str(policy_dir), kind="orm", task="mul", task_options={"digits_a": 3, "digits_b": 2},
                   problems=8, samples=2, max_new_tokens=32, steps=2, batch_size=4, eval_problems=0,
                   out=str(tmp_path / "orm"))
    rm = RewardModel.load(str(train_reward_model(cfg) / "model"), device="cpu")
    assert rm.kind == "orm"
    (s,) = rm.score([PROB], [completion(PROB.steps, PROB.answer)])
    with torch.no_grad():
        logits = rm.logits(torch.tensor([encode(rm.tok, fmt.render_prompt(PROB.question),
                                                completion(PROB.steps, PROB.answer))[0]]))
    assert s == [pytest.approx(float(torch.sigmoid(logits[0, -1])))]


def test_bad_reward_model_inputs(policy_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="not a thinkforge reward model"):
        RewardModel.load(str(policy_dir))  # a causal LM is not a reward model
    bad = tmp_path / "labels.jsonl"
    bad.write_text(json.dumps({"question": "1*1", "completion": "<think>\na\n</think>\n<answer>1</answer>",
                               "labels": [1.0]}) + "\n")
    with pytest.raises(ConfigError, match=r"labels.jsonl:1: 1 labels but the completion has 2 steps"):
        read_labels(str(bad))
    bad.write_text(json.dumps({"question": "1*1", "completion": "<answer>1</answer>", "labels": [3]}) + "\n")
    with pytest.raises(ConfigError, match=r":1: field 'labels' must hold numbers in \[0, 1\]"):
        read_labels(str(bad))
    with pytest.raises(ConfigError, match="no step checker"):
        train_reward_model(RMConfig(policy=str(policy_dir), task="reasoning-gym:basic_arithmetic", labels="gold",
                                    out=str(tmp_path / "x")))
