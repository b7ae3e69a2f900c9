import pytest

from thinkforge.tasks import REGISTRY, get_task, split_of

BUILTIN = {
    "add": [{}, {"digits": 2, "terms": 4}],
    "mul": [{}, {"digits_a": 4, "digits_b": 3}],
    "arith": [{}, {"ops": 5, "max_num": 20}],
    "syllogism": [{}, {"chain": 4, "distractors": 2}],
    "mixed": [{"parts": {"r": {"task": "mul"}, "g": {"task": "add", "digits": 5}}}],
}


def test_every_builtin_is_covered():
    assert set(BUILTIN) == set(REGISTRY) - {"code"}  # code has tests, not gold steps: see test_sandbox.py


@pytest.mark.parametrize("name,opts", [(n, o) for n, os in BUILTIN.items() for o in os])
def test_gold_answers_and_every_gold_step_check(name, opts):
    task = get_task(name, **opts)
    for p in task.problems(200, seed=3):
        assert task.score(p, p.answer) == 1.0
        assert p.steps and all(task.check_step(p, i, s) for i, s in enumerate(p.steps)), p
        if name != "syllogism":  # positional traces have no step beyond the last; syllogism steps are position-free
            assert not task.check_step(p, len(p.steps), p.steps[-1])


def test_gold_answers_are_right():
    add, mul, arith = get_task("add"), get_task("mul"), get_task("arith")
    for p in add.problems(50):
        assert int(p.answer) == sum(map(int, p.question.split("+")))
    for p in mul.problems(50):
        a, b = map(int, p.question.split("*"))
        assert int(p.answer) == a * b
    for p in arith.problems(50):  # the question is plain Python integer arithmetic; evaluate our own text
        assert int(p.answer) == eval(p.question, {"__builtins__": {}})  # noqa: S307 (our generated text only)


def test_step_checkers_reject_wrong_steps():
    mul = get_task("mul")
    p = next(q for q in mul.problems(20) if q.meta["a"] == 347 or True)
    a, b = p.meta["a"], p.meta["b"]
    good = p.steps[0]
    wrong = f"{str(a)[::-1]}*{b % 10}={str(a * (b % 10) + 1)[::-1]}"
    assert mul.check_step(p, 0, good) and not mul.check_step(p, 0, wrong)
    add = get_task("add")
    q = add.problems(1)[0]
    d0 = [n % 10 for n in q.meta["nums"]]
    assert add.check_step(q, 0, f"{d0[0]}+{d0[1]}+0={sum(d0)}")
    assert not add.check_step(q, 0, f"{d0[0]}+{d0[1]}+0={sum(d0) + 1}")
    # a step that builds on a wrong carry is wrong (error propagation)
    col = q.steps[1]
    carry = sum(d0) // 10
    assert not add.check_step(q, 1, col.replace(f"+{carry}=", f"+{1 - carry}=", 1))


def test_syllogism_checker_uses_entailment():
    t = get_task("syllogism", chain=3, distractors=0)
    p = next(q for q in t.problems(50) if q.answer == "yes")
    a, c = p.meta["subject"], p.meta["object"]
    assert t.check_step(p, 0, f"all {a} are {c}")  # a valid shortcut is still a correct step
    assert not t.check_step(p, 0, f"all {c} are {a}")
    assert t.check_step(p, 9, "so yes") and not t.check_step(p, 9, "so no")
    assert t.score(p, "Yes.") == 1.0 and t.score(p, "unknown") == 0.0
    assert {q.answer for q in t.problems(60)} == {"yes", "no", "unknown"}


def test_splits_never_overlap_and_are_reproducible():
    t = get_task("add", digits=2)
    train = t.problems(2000, "train", seed=0)
    test = t.problems(200, "test", seed=1)
    assert not {p.question for p in train} & {p.question for p in test}
    assert all(split_of(p.question) == "test" for p in test)
    assert [p.question for p in t.problems(50, seed=0)] == [p.question for p in train[:50]]
    assert [p.question for p in t.problems(50, seed=5)] != [p.question for p in train[:50]]


def test_small_space_is_reported():
    with pytest.raises(ValueError, match="only .* distinct test problems"):
        get_task("add", digits=1).problems(500, "test")


def test_bad_task_names_and_options():
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="bad option for task 'add'"):
        get_task("add", width=3)
    with pytest.raises(ValueError, match="digits must be >= 1"):
        get_task("mul", digits_a=0)


def test_mixed_task_interleaves_families_by_weight_and_delegates_to_each():
    mixed = get_task("mixed", parts={"reasoning": {"task": "mul", "digits_a": 3, "digits_b": 2},
                                     "general": {"task": "add", "digits": 5, "terms": 2}},
                     weights={"reasoning": 3, "general": 1})
    assert mixed.families == ["reasoning", "general"] and mixed.has_gold_steps
    ps = mixed.problems(800, seed=1)
    share = sum(p.meta["family"] == "reasoning" for p in ps) / len(ps)
    assert 0.70 < share < 0.80  # weights 3:1
    mul, add = get_task("mul"), get_task("add", digits=5, terms=2)
    for p in ps[:40]:
        own = mul if p.meta["family"] == "reasoning" else add
        assert ("*" in p.question) == (own is mul)
        assert mixed.score(p, p.answer) == 1.0 and mixed.score(p, str(int(p.answer) + 1)) == 0.0
        wrong = f"<think>\n{p.steps[0]}\n1+1=3\n</think>\n<answer>{int(p.answer) + 1}</answer>"
        assert mixed.gold_utility(p, wrong) == own.gold_utility(p, wrong)
    assert [p.question for p in mixed.problems(20, seed=1)] == [p.question for p in ps[:20]]  # reproducible


@pytest.mark.parametrize("options,message", [
    ({}, "parts must be a table"),
    ({"parts": {"a": {"digits": 3}}}, "parts.a must be a table with a task name"),
    ({"parts": {"a": {"task": "mixed"}}}, "cannot itself be mixed"),
    ({"parts": {"a": {"task": "add"}}, "weights": {"b": 1}}, "weights name unknown family ['b']"),
    ({"parts": {"a": {"task": "add"}}, "weights": {"a": 0}}, "positive sum"),
    ({"parts": {"a": {"task": "add", "digitz": 3}}}, "bad option for task 'add'"),
    ({"parts": {"a": {"task": "code"}}}, "reads answers its own way"),
])
def test_mixed_task_bad_options(options, message):
    with pytest.raises(ValueError) as e:
        get_task("mixed", **options)
    assert message in str(e.value)
