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


def test_add_mixes_operand_sizes_and_one_size_keeps_its_problems():
    mixed = get_task("add", digits=[2, 4])
    sizes = [p.meta["digits"] for p in mixed.problems(400)]
    assert set(sizes) == {2, 4} and 150 < sizes.count(2) < 250
    for p in mixed.problems(50):
        assert len(p.steps) == p.meta["digits"] and all(len(str(n)) == p.meta["digits"] for n in p.meta["nums"])
    assert get_task("add").problems(1)[0].question == "416+467"  # a single size draws exactly as before lists existed
    with pytest.raises(ValueError, match="digits"):
        get_task("add", digits=[])


def test_primed_traces_check_and_fix_steps_and_the_judge_labels_them():
    from thinkforge import format as fmt
    from thinkforge.tasks import WAIT_LINE
    from thinkforge.train.reward_model import judge_labels

    task = get_task("add", digits=[3, 5])
    problems = task.problems(2000)
    assert all(task.cold_start_steps(p) == p.steps for p in problems[:50])  # no shares: the gold trace
    traces = [task.cold_start_steps(p, check_share=0.1, fix_share=0.05) for p in problems]
    assert traces == [task.cold_start_steps(p, check_share=0.1, fix_share=0.05) for p in problems]  # a pure function
    fixes = checks = 0
    for p, lines in zip(problems, traces):
        n_wait = lines.count(WAIT_LINE)
        plain = [x for x in lines if not x.startswith("check")]
        fixes += n_wait
        checks += len(lines) - len(plain) - n_wait  # checks beyond the one that exposes a wrong step
        labels = judge_labels(task, p, fmt.render_completion(p.answer, "\n".join(lines)), True)
        if n_wait:  # wrong step, its check, wait, the step right: the first two wrong, everything else right
            w = lines.index(WAIT_LINE)
            assert labels[w - 2 : w] == [0.0, 0.0] and labels.count(0.0) == 2, (lines, labels)
            wrong, check = lines[w - 2], lines[w - 1]
            j = p.steps.index(lines[w + 1])
            assert not any(task.check_step(p, i, wrong) for i in range(len(p.steps)))
            assert wrong.split("=")[0] == p.steps[j].split("=")[0]  # the same column, a misstated total
            total, first = int(check.split()[1].split("-")[0]), int(check.split("=")[1])
            assert total == int(wrong.split("=")[1]) and first != p.meta["nums"][0] // 10**j % 10  # exposes it
        else:
            assert labels == [1.0] * len(labels), (lines, labels)
        for i, x in enumerate(lines):
            if x.startswith("check") and (i + 1 == len(lines) or lines[i + 1] != WAIT_LINE):
                j = p.steps.index(lines[i - 1])
                assert task.check_step(p, j, x) and x == task.check_line(p, j)  # a check of the step before it
                assert not task.check_step(p, j, x.replace("check", "check 1"))
    assert 0.07 < checks / len(problems) < 0.13 and 0.03 < fixes / len(problems) < 0.07
    with pytest.raises(NotImplementedError, match="primed"):
        get_task("mul").cold_start_steps(get_task("mul").problems(1)[0], check_share=0.1)
