import pytest

from thinkforge.rewards import compute_rewards, get_reward
from thinkforge.tasks import Problem, get_task

GOOD = "<think>\n3+4=7\n</think>\n<answer>7</answer>"
WRONG = "<think>\n3+4=8\n</think>\n<answer>8</answer>"
BARE = "<answer>7</answer>"
MIXED = "<think>\nthree plus четыре\n</think>\n<answer>7</answer>"


def brevity(completions, problems, **ctx):
    return [-len(c) / 100 for c in completions]


def test_reward_values_on_hand_made_completions():
    task = get_task("arith")
    p = Problem("x", "3+4", "7")
    r = compute_rewards([GOOD, WRONG, BARE, MIXED], [p] * 4, task, {"accuracy": 1.0, "format": 0.5, "language": 0.25})
    assert r.components["accuracy"] == [1.0, 0.0, 1.0, 1.0]
    assert r.components["format"] == [1.0, 1.0, 0.0, 1.0]
    assert r.components["language"] == [1.0, 1.0, 1.0, 2 / 3]
    assert r.total == pytest.approx([1.75, 0.75, 1.25, 1.5 + 0.25 * 2 / 3])
    assert r.accuracy == r.components["accuracy"]


def test_accuracy_is_kept_when_not_weighted_and_length_penalty():
    task = get_task("arith")
    r = compute_rewards([GOOD, GOOD], [Problem("x", "3+4", "7")] * 2, task, {"format": 1.0, "length": 1.0},
                        lengths=[10, 500], options={"length": {"max_len": 512, "cache": 128}})
    assert r.accuracy == [1.0, 1.0] and r.components["length"] == [0.0, -116 / 128]
    assert r.total == pytest.approx([1.0, 1 - 116 / 128])


def test_user_function_by_dotted_path():
    fn = get_reward("test_rewards:brevity")
    assert fn([GOOD], None) == [-len(GOOD) / 100]
    with pytest.raises(KeyError, match="unknown reward 'speed'"):
        get_reward("speed")
    with pytest.raises(KeyError, match="cannot import"):
        get_reward("no_such_module.fn")
