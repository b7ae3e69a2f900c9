"""Answer extraction and equivalence, with hard timeouts that also work off the main thread.

    extract_answer("<think>…</think>\\n<answer>42</answer>")   # '42'
    is_equivalent("0.5", "\\\\frac{1}{2}")                      # True (math-verify)

Order of checks in :func:`is_equivalent`: normalised exact match, then exact rational comparison of
plain numbers (``1,000`` = ``1000.0``), then math-verify for anything that looks like maths.

math-verify's own timeout uses ``signal.alarm``, which only works in the main thread, and a symbolic
answer such as ``\\boxed{9^{9^{9^{9}}}}`` can hang sympy for ever. So math-verify runs in one worker
*process*; the caller waits at most ``timeout`` seconds, and on a miss the worker is killed and
replaced. The answer counts as wrong, the timeout is counted in :data:`STATS`, and no batch crashes.
"""
from __future__ import annotations

import atexit
import json
import re
import select
import subprocess
import sys
import threading
from collections import Counter
from fractions import Fraction

from thinkforge.format import parse_completion

STATS: Counter = Counter()  # 'math_verify_calls', 'timeouts', 'errors'
DEFAULT_TIMEOUT = 5.0


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{…}`` (braces balanced), or None.

    >>> last_boxed(r"so \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> str | None:
    """The last number in ``text`` (thousands separators removed), or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_answer(completion: str) -> str | None:
    """The value a completion answers with, read from ``format.parse_completion(completion).answer`` (what
    the server shows): the last ``\\boxed{}`` in it, else the answer-tag text, else (free text) the last
    number. None when there is nothing to extract, including thinking that never closed.

    >>> extract_answer("<think>\\n1+1=2\\n</think>\\n<answer>2</answer>")
    '2'
    >>> extract_answer("it is \\\\boxed{7}") , extract_answer("so 3, then 12.")
    ('7', '12')
    """
    parsed = parse_completion(completion)
    if not parsed.answer:
        return None
    boxed = last_boxed(parsed.answer)
    if boxed is not None:
        return boxed.strip() or None
    return parsed.answer if parsed.tagged else last_number(parsed.answer)


def normalize(s: str) -> str:
    """Lower case, collapsed white space, no surrounding ``$`` or trailing full stop."""
    s = " ".join(s.strip().strip("$").split()).lower()
    return s[:-1] if s.endswith(".") else s


MAX_NUMBER_CHARS = 1000  # a longer numeral (or ``1e<huge>``) is compared as text: never a huge integer built
MAX_EXPONENT = 1000


def as_number(s: str) -> Fraction | None:
    """The exact value of a numeral (``-4``, ``0.5``, ``1e3``, ``3/4``); ``None`` for anything else, including a
    numeral of over :data:`MAX_NUMBER_CHARS` characters or an exponent beyond ±:data:`MAX_EXPONENT` — model-written
    text such as ``1e999999999`` would otherwise make a billion-digit integer."""
    s = s.strip().replace(",", "")
    m = re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?(/\d+)?", s)
    if not m or len(s) > MAX_NUMBER_CHARS or (m[3] and abs(int(m[3])) > MAX_EXPONENT):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


_CHOICE = re.compile(r"\(?([A-Ja-j])\)?[.:]?")


def as_choice(s: str) -> str | None:
    r"""A multiple-choice letter written as ``B``, ``(B)``, ``B)``, ``B.``, ``\text{(B)}`` or ``$\textbf{B}$``.

    >>> as_choice(r"\text{(B)}"), as_choice("b."), as_choice("Bob")
    ('B', 'B', None)
    """
    s = s.strip().strip("$").strip()
    m = re.fullmatch(r"\\(?:text|textbf|mathrm|mathbf)\{(.*)\}", s)
    m = _CHOICE.fullmatch((m.group(1) if m else s).strip())
    return m.group(1).upper() if m else None


_MATHY = re.compile(r"[\\^{}/=]|\d")


def is_equivalent(pred: str, gold: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether ``pred`` means ``gold``. Never raises, never blocks longer than ``timeout`` seconds."""
    if normalize(pred) == normalize(gold):
        return True
    a, b = as_number(pred), as_number(gold)
    if a is not None and b is not None:
        return a == b
    x, y = as_choice(pred), as_choice(gold)
    if x is not None and y is not None:
        return x == y
    if not (_MATHY.search(pred) and _MATHY.search(gold)):
        return False
    return _MATH_VERIFY.check(_latex(gold), _latex(pred), timeout)


def _latex(s: str) -> str:
    """math-verify finds bare LaTeX only between delimiters: an extracted ``x^2+1`` becomes ``$x^2+1$``."""
    return s if "$" in s or "\\boxed" in s else f"${s}$"


def _serve() -> None:
    """The worker's loop: one JSON ``[gold, pred]`` per stdin line, one ``[status, value]`` per stdout line."""
    from math_verify import parse, verify

    for line in sys.stdin:
        gold, pred = json.loads(line)
        try:
            # In this process's main thread math-verify's own signal timeouts work too.
            reply = ["ok", bool(verify(parse(gold), parse(pred)))]
        except Exception as e:  # a parse/verify failure means "not shown equivalent"
            reply = ["error", repr(e)[:200]]
        print(json.dumps(reply), flush=True)


class _MathVerifyWorker:
    """One lazily started math-verify process; killed and restarted when a call misses its deadline.

    A plain subprocess rather than multiprocessing: it never re-imports the caller's main module."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thinkforge.verify"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def check(self, gold: str, pred: str, timeout: float) -> bool:
        with self.lock:
            STATS["math_verify_calls"] += 1
            fresh = self.proc is None or self.proc.poll() is not None
            if fresh:
                self._start()
            # A fresh worker first imports math-verify (~1-2 s): that start-up is not the answer's time.
            deadline = timeout + (20.0 if fresh else 0.0)
            try:
                self.proc.stdin.write(json.dumps([gold, pred]) + "\n")
                self.proc.stdin.flush()
                ready, _, _ = select.select([self.proc.stdout], [], [], deadline)
                if not ready:
                    STATS["timeouts"] += 1
                    self._kill()
                    return False
                status, value = json.loads(self.proc.stdout.readline())
            except (OSError, ValueError):  # the worker died or answered garbage
                STATS["errors"] += 1
                self._kill()
                return False
            if status == "error":
                STATS["errors"] += 1
                return False
            return value


_MATH_VERIFY = _MathVerifyWorker()
atexit.register(_MATH_VERIFY._kill)

if __name__ == "__main__":
    _serve()
