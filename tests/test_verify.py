import threading
import time

from thinkforge import verify
from thinkforge.verify import extract_answer, is_equivalent


def test_extraction():
    assert extract_answer("<think>\n<answer>1</answer>\n</think>\n<answer> 42 </answer>") == "42"
    assert extract_answer("<answer>so \\boxed{\\frac{1}{2}}</answer>") == "\\frac{1}{2}"
    assert extract_answer("first \\boxed{1} then \\boxed{{2}}") == "{2}"
    assert extract_answer("costs 1,250 dollars, or 3.5 each") == "3.5"
    assert extract_answer("<think>\nI get 12\n</think>\nno idea") is None
    assert extract_answer("no numbers") is None


def test_equivalence():
    assert is_equivalent("1,000", "1000.0") and is_equivalent("-4", "-4.00") and is_equivalent("Yes.", "yes")
    assert not is_equivalent("3", "4") and not is_equivalent("yes", "no")
    assert is_equivalent("0.5", "\\frac{1}{2}") and is_equivalent("(x+1)^2", "x^2+2x+1")
    assert not is_equivalent("(1,3)", "[1,3]")


def test_adversarial_answer_times_out_off_the_main_thread():
    before = verify.STATS["timeouts"]
    out = {}

    def run():
        start = time.monotonic()
        out["ok"] = is_equivalent("\\boxed{9^{9^{9^{9}}}}", "5", timeout=1.0)
        out["seconds"] = time.monotonic() - start

    is_equivalent("2/4", "\\frac{1}{2}")  # warm the worker so the deadline is the answer's alone
    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert out == {"ok": False, "seconds": out["seconds"]} and out["seconds"] < 3.0
    assert verify.STATS["timeouts"] == before + 1
    assert is_equivalent("0.25", "\\frac{1}{4}")  # the worker was replaced and works


def test_scientific_notation_and_choice_letters():
    from thinkforge.verify import as_choice, is_equivalent

    assert is_equivalent("1e3", "1000") and is_equivalent("1000", "1E3") and is_equivalent("2.5e-1", "1/4")
    assert not is_equivalent("1e3", "100")
    for pred in ("B", "(B)", "b", "B)", "B.", "\\text{(B)}", "$\\textbf{B}$"):
        assert is_equivalent(pred, "(B)") and is_equivalent("\\text{(B)}", pred), pred
    assert not is_equivalent("(C)", "B") and as_choice("Bob") is None and as_choice("AB") is None


def test_huge_numerals_from_a_model_are_text_not_giant_integers():
    """``1e999999999`` would be a billion-digit integer (minutes, GBs) and a 5,000-digit numeral makes ``str``/``int``
    raise past Python's 4,300-digit limit; both are compared as text, and an answer of them is simply wrong."""
    from thinkforge.metrics import answer_key, maj_correct
    from thinkforge.tasks import get_task
    from thinkforge.verify import as_number

    big = "7" * 5000
    assert as_number("1e999999999") is None and as_number(big) is None and as_number("1e-2000") is None
    assert as_number("1e1000") == 10**1000 and as_number("-2.5e-1") == verify.Fraction(-1, 4)
    assert answer_key("1e999999999") == "1e999999999" and answer_key(big) == big
    assert maj_correct(["1e999999999", big, big, "5"], [False, False, False, True]) is False
    add = get_task("add", digits=3, terms=2)
    p = add.problems(1)[0]
    assert add.score(p, big) == 0.0 and add.check_step(p, 0, f"{big}+1+0={big}") is False
    mul = get_task("mul")
    q = mul.problems(1)[0]
    assert mul.check_step(q, 0, f"{big}*1={big}") is False
    assert mul.gold_utility(q, f"<think>\n{big}*1={big}\n</think>\n<answer>{big}</answer>") == 0.0
    arith = get_task("arith")
    assert arith.check_step(arith.problems(1)[0], 0, f"{big}+1={big}") is False
