"""Test-time methods on a scripted policy and reward models with known scores."""
import pytest
from mock_policy import TableRM, plan_engine

from thinkforge import format as fmt
from thinkforge.generation import EFFORT_BUDGETS
from thinkforge.search import METHODS, Search, best_index, run_method, weighted_vote
from thinkforge.tasks import Problem, get_task

TASK = get_task("mul")
P = Problem("p0", "347*89", "30883")


def trace(answer, steps=("a",)):
    return fmt.render_completion(answer, "\n".join(steps))


def search_with(char_tok, plan, **kw):
    engine, backend = plan_engine(char_tok, plan)
    return Search(engine, TASK, **kw), backend


def test_majority_vote_ties_go_to_the_first_answer_and_tokens_count_every_sample(char_tok):
    answers = ["111", "30883", "30883", "111", "222"]
    s, _ = search_with(char_tok, lambda prompt, j: trace(answers[j]))
    (o,) = run_method("maj", s, [P], 5)
    # 111 and 30883 tie at two votes; 111 came first, so the vote is wrong although 30883 was there
    assert o.answer == "111" and not o.correct
    length = [len(char_tok.encode(trace(a))) + 1 for a in answers]  # + the end-of-turn token
    assert o.tokens == sum(length) == 64
    (o,) = run_method("maj", s, [P], 3)  # the first 3 samples of the same pool: 30883 wins 2 to 1
    assert o.answer == "30883" and o.correct and o.tokens == sum(length[:3])


def test_best_of_n_and_weighted_vote_follow_the_reward_model(char_tok):
    answers = ["111", "30883", "222", "111"]
    s, _ = search_with(char_tok, lambda prompt, j: trace(answers[j], (f"step{j}",)))
    table = {"step0": 0.6, "step1": 0.9, "step2": 0.9, "step3": 0.5}
    s.prm = TableRM(lambda step: table.get(step, 1.0))  # the answer step scores 1.0: min = the thinking step
    (o,) = run_method("bon-prm", s, [P], 4)
    assert o.answer == "30883" and o.rm_tokens > 0  # 0.9 ties with step2's 0.9: the first one wins
    (o,) = run_method("wmaj", s, [P], 4)
    assert o.answer == "111"  # 111: 0.6 + 0.5 = 1.1 beats 30883: 0.9 and 222: 0.9
    s.orm = TableRM(lambda c: 0.8 if "222" in c else 0.1, kind="orm")
    (o,) = run_method("bon-orm", s, [P], 4)
    assert o.answer == "222"
    assert best_index([0.2, 0.9, 0.9]) == 1 and weighted_vote([None, "3"], [5.0, 0.1]) == 1


def test_methods_that_need_a_reward_model_say_so(char_tok):
    s, _ = search_with(char_tok, lambda prompt, j: trace("1"))
    for name in ("bon-prm", "bon-orm", "wmaj", "prm-beam", "prm-greedy"):
        with pytest.raises(ValueError, match="needs"):
            run_method(name, s, [P], 2)
    with pytest.raises(ValueError, match="unknown method"):
        run_method("magic", s, [P], 2)


def lines_after_think(prompt: str) -> list[str]:
    body = prompt.split(fmt.THINK_OPEN + "\n", 1)[1] if fmt.THINK_OPEN in prompt else ""
    return [x for x in body.split("\n") if x]


def stepper(prompt: str, j: int) -> str:
    """Sample j of a partial trace writes the line "<j>"; after two lines it closes its thinking, then
    answers the digits of its lines."""
    done = lines_after_think(prompt)
    if fmt.THINK_CLOSE in prompt:
        return f"{fmt.ANSWER_OPEN}{''.join(done[:-1])}{fmt.ANSWER_CLOSE}"
    return f"{j}\n" if len(done) < 2 else f"{fmt.THINK_CLOSE}\n"


def test_prm_beam_keeps_the_top_k_partial_traces(char_tok):
    scores = {"0": 0.9, "1": 0.5, "2": 0.7}
    s, _ = search_with(char_tok, stepper, beam_width=2, aggregate="min")
    s.prm = TableRM(lambda step: scores.get(step, 1.0))
    (o,) = run_method("prm-beam", s, [Problem("q", "1+1", "0")], 6)  # 2 beams x 3 samples each
    depth0, depth1, depth2 = s.prm.calls
    lines = lambda calls: sorted({tuple(lines_after_think(c)) for c in calls})  # noqa: E731
    assert lines(depth0) == [("0",), ("1",), ("2",)]  # one root: 3 samples
    # kept "0" (0.9) and "2" (0.7), dropped "1" (0.5); each kept beam got 3 samples
    assert lines(depth1) == [("0", "0"), ("0", "1"), ("0", "2"), ("2", "0"), ("2", "1"), ("2", "2")]
    # by min score: 00 (0.9), then 02 and 20 and 22 tie at 0.7 -> 02 came first; 6 answers written
    assert [c.split(fmt.THINK_CLOSE)[0] for c in depth2] == ["<think>\n0\n0\n"] * 3 + ["<think>\n0\n2\n"] * 3
    assert o.answer == "00" and o.correct


def test_prm_greedy_takes_the_best_next_step_and_counts_every_token(char_tok):
    scores = {"0": 0.2, "1": 0.9, "2": 0.4}
    s, _ = search_with(char_tok, stepper)
    s.prm = TableRM(lambda step: scores.get(step, 1.0))
    (o,) = run_method("prm-greedy", s, [Problem("q", "1+1", "11")], 3)
    assert o.text == "<think>\n1\n1\n</think>\n<answer>11</answer>" and o.correct
    step, close = len(char_tok.encode("1\n")), len(char_tok.encode("</think>\n"))
    answer = len(char_tok.encode("<answer>11</answer>")) + 1  # + end of turn
    # 3 samples of step 1, 3 of step 2, 3 closings, each closing then writes its answer once
    assert o.tokens == 3 * step + 3 * step + 3 * close + 3 * answer


def test_budget_caps_thinking_and_zero_answers_at_once(char_tok):
    s, backend = search_with(char_tok, lambda prompt, j: trace("30883", ("abcdefghij",)))
    (full,) = run_method("budget", s, [P], 64)
    (cut,) = run_method("budget", s, [P], 4)
    assert full.correct and full.text.startswith("<think>\nabcdefghij")
    assert cut.text.startswith("<think>\nabc\n</think>") and cut.tokens < full.tokens
    (none,) = run_method("effort:none", s, [P])
    assert backend.prompts[-1].endswith(fmt.EMPTY_THINK) and none.text.startswith(fmt.EMPTY_THINK)
    run_method("effort:low", s, [P])
    assert EFFORT_BUDGETS["low"] == 32


def test_every_method_is_in_the_table():
    import thinkforge.search as search

    for name in METHODS:
        assert f"``{name}``" in search.__doc__


def test_eval_cli_sweeps_methods_and_plots(tmp_path, capsys):
    import json

    from thinkforge.cli import main
    from thinkforge.models import char_tokenizer, save_model, tiny_model

    tok = char_tokenizer(TASK.sample_text())
    save_model(tiny_model(tok, "micro"), tok, tmp_path / "m")
    args = ["eval", "--model", str(tmp_path / "m"), "--problems", "3", "--max-new-tokens", "16",
            "--method", "greedy,maj,budget", "--n", "1,2", "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "c.png")]
    assert main(args) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["greedy", "maj@1", "maj@2", "budget=1", "budget=2"]
    assert all(r["n"] == 3 and r["tokens"] > 0 for r in rows) and (tmp_path / "c.png").stat().st_size > 1000
    assert main(["eval", "--model", str(tmp_path / "m"), "--method", "maj", "--n", "0,4"]) == 2
    assert "n = 0 only makes sense for budget" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "m"), "--method", "bon-prm"]) == 2  # no --prm
    assert "needs a PRM" in capsys.readouterr().err


def test_a_sweep_draws_one_pool_and_smaller_n_read_its_prefix(char_tok):
    from thinkforge.evaluate import sweep

    answers = ["30883", "1", "1", "30883", "30883", "2", "3", "4"]
    s, backend = search_with(char_tok, lambda prompt, j: trace(answers[j]))
    rows = sweep(s, [P], [("sample", [1]), ("maj", [2, 8])], "t", log=None)
    assert len(backend.prompts) == 1  # one engine call: the pool of 8
    assert [(r["method"], r["value"]) for r in rows] == [("sample", 1.0), ("maj@2", 1.0), ("maj@8", 1.0)]
    assert rows[1]["tokens"] < rows[2]["tokens"]


def test_wait_forces_more_thinking_and_counts_the_forced_tokens(char_tok):
    s, _ = search_with(char_tok, lambda prompt, j: trace("30883", ("abc",)))
    (plain,) = run_method("budget", s, [P], 64)
    (waited,) = run_method("wait", s, [P], 1)
    assert waited.text == "<think>\nabc\n\nWait</think>\n<answer>30883</answer>" and waited.correct
    assert waited.tokens == plain.tokens + len(char_tok.encode("\nWait"))
