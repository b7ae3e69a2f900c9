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
