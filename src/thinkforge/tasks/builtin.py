"""Built-in generators that emit gold step-by-step traces, each step checkable on its own.

| task | question | gold steps | knobs |
|---|---|---|---|
| ``add`` | ``347+589`` | one column per step, least significant first: ``7+9+0=16`` (digits, then carry in) | digits (one size or a list), terms, phrasing |
| ``mul`` | ``347*89`` | partial products, then their running sum, every number written **least-significant digit first** (``743*9=3213`` means 347*9=3123; ``743*08=06772`` means 347*80=27760) | digits_a, digits_b |
| ``arith`` | ``(3+4)*2-5`` | one operation per step in evaluation order: ``3+4=7`` | ops, max_num |
| ``syllogism`` | ``all wugs are daxes. all daxes are feps. are all wugs feps?`` | derived facts ``all wugs are feps`` then ``so yes`` (yes / no / unknown) | chain, distractors |

Why reversed digits in ``mul``: a left-to-right decoder writes a number's low digit first when it
computes it, as one does by hand. The operands are restated reversed too, so each digit of a result
sits at a fixed distance from the digits it depends on; with the operands in normal order a 0.6M
model trained 450 steps reached 0.3% (every digit must be found at a mirrored position).

Step checkers judge a step against the gold context (the correct earlier steps): a step that builds on
an earlier error (a wrong carry, a wrong partial sum) is wrong — the Error-Propagation rule.
"""
from __future__ import annotations

import random
import re

from thinkforge.tasks import Problem, Task, register
from thinkforge.verify import MAX_NUMBER_CHARS


class _IntegerAnswer:
    """Integer answers compare by value (``-4`` = ``-4.0``); anything else is wrong, with no maths parser."""

    def score(self, problem: Problem, answer: str | None) -> float:
        from thinkforge.verify import as_number

        return float(answer is not None and as_number(answer) == int(problem.answer))


def _digits(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1), 10**n - 1)


def _int(s: str) -> int | None:
    """A model-written integer; ``None`` (equal to no gold value) when longer than ``verify.MAX_NUMBER_CHARS``
    (past 4,300 digits ``int`` refuses)."""
    return int(s) if len(s) <= MAX_NUMBER_CHARS else None


def _ints(step: str) -> list[int | None]:
    return [_int(x) for x in re.findall(r"-?\d+", step)]


def _rev(n: int) -> str:
    return str(n)[::-1]


def _unrev(s: str) -> int | None:
    return _int(s[::-1])


@register("add")
class AddTask(_IntegerAnswer, Task):
    """Multi-digit addition of ``terms`` numbers of ``digits`` digits, one column (with its carry) per step.

    ``digits`` may be a list of sizes: each problem draws one (mixed difficulty). A check of column
    ``7+9+0=16`` recomputes it by subtraction, ``check 16-9-0=7`` (the total minus the other digits and
    the carry gives the first digit back); a wrong step misstates the total by 1 or 10, and its check then
    gives another digit (``7+9+0=17``, ``check 17-9-0=8``)."""

    has_gold_steps = True

    PHRASINGS = ("{sum}", "What is {sum}?", "{spaced} = ?", "Add {listed}.", "Q: {sum}", "{sum} Explain step-by-step.",
                 "Compute {sum}, please.")

    def __init__(self, digits: int | list[int] = 3, terms: int = 2, phrasing: bool = False):
        sizes = digits if isinstance(digits, list) else [digits]
        if not sizes or any(not isinstance(d, int) or d < 1 for d in sizes) or terms < 2:
            raise ValueError(f"add: need digits >= 1 (or a list of them) and terms >= 2, got digits={digits}, terms={terms}")
        self.digits, self.sizes, self.terms, self.phrasing, self.name = digits, sizes, terms, phrasing, "add"

    def _question(self, rng: random.Random, nums: list[int]) -> str:
        """``347+589``; with ``phrasing``, one of ``PHRASINGS`` (a model trained on them tolerates words around
        the sum, as a model of real prompts must)."""
        text = "+".join(map(str, nums))
        if not self.phrasing:
            return text
        return rng.choice(self.PHRASINGS).format(sum=text, spaced=" + ".join(map(str, nums)),
                                                  listed=", ".join(map(str, nums[:-1])) + f" and {nums[-1]}")

    @staticmethod
    def _columns(nums: list[int]) -> list[tuple[list[int], int, int]]:
        cols, carry = [], 0
        for j in range(len(str(max(nums)))):
            ds = [n // 10**j % 10 for n in nums]
            cols.append((ds, carry, sum(ds) + carry))
            carry = (sum(ds) + carry) // 10
        return cols

    def candidates(self, seed: int):
        rng = random.Random(f"add-{seed}")
        for i in range(10**9):
            size = self.sizes[0] if len(self.sizes) == 1 else rng.choice(self.sizes)  # one size: the same draws as ever
            nums = [_digits(rng, size) for _ in range(self.terms)]
            steps = ["+".join(map(str, ds)) + f"+{c}={s}" for ds, c, s in self._columns(nums)]
            yield Problem(f"add-{seed}-{i}", self._question(rng, nums), str(sum(nums)), steps,
                          {"nums": nums, "digits": size})

    def check_step(self, problem: Problem, index: int, step: str) -> bool:
        cols = self._columns(problem.meta["nums"])
        if not 0 <= index < len(cols):
            return False
        ds, carry, total = cols[index]
        check = re.fullmatch(r"\s*check (\d+)((?:-\d+)+)=(\d+)\s*", step)
        if check:  # the column recomputed by subtraction (check_line)
            return [_int(check[1]), *(_int(x) for x in check[2][1:].split("-")), _int(check[3])] == [total, *ds[1:], carry, ds[0]]
        return _ints(step) == [*ds, carry, total]

    @staticmethod
    def _check(ds: list[int], carry: int, total: int) -> str:
        return f"check {total}-" + "-".join(map(str, [*ds[1:], carry])) + f"={total - sum(ds[1:]) - carry}"

    def check_line(self, problem: Problem, index: int) -> str:
        return self._check(*self._columns(problem.meta["nums"])[index])

    def wrong_line(self, problem: Problem, index: int, rng) -> list[str]:
        ds, carry, total = self._columns(problem.meta["nums"])[index]
        wrong = total + rng.choice([d for d in (-10, -1, 1, 10) if ds[0] + d >= 0])  # its check stays >= 0
        return ["+".join(map(str, ds)) + f"+{carry}={wrong}", self._check(ds, carry, wrong)]


@register("mul")
class MulTask(_IntegerAnswer, Task):
    """``digits_a``-digit × ``digits_b``-digit multiplication through partial products (reversed digits)."""

    has_gold_steps = True

    def __init__(self, digits_a: int = 3, digits_b: int = 2):
        if digits_a < 1 or digits_b < 1:
            raise ValueError(f"mul: digits must be >= 1, got digits_a={digits_a}, digits_b={digits_b}")
        self.digits_a, self.digits_b, self.name = digits_a, digits_b, "mul"

    @staticmethod
    def _plan(a: int, b: int) -> list[tuple]:
        """Gold steps as tuples: ('mul', a, factor, product) then ('add', x, y, x+y)."""
        parts = [(a, int(d) * 10**j) for j, d in enumerate(str(b)[::-1])]
        plan = [("mul", a, f, a * f) for a, f in parts]
        total = plan[0][3]
        for _, _, _, p in plan[1:]:
            plan.append(("add", total, p, total + p))
            total += p
        return plan

    def candidates(self, seed: int):
        rng = random.Random(f"mul-{seed}")
        for i in range(10**9):
            a, b = _digits(rng, self.digits_a), _digits(rng, self.digits_b)
            steps = [f"{_rev(x)}{'*' if kind == 'mul' else '+'}{_rev(y)}={_rev(z)}" for kind, x, y, z in self._plan(a, b)]
            yield Problem(f"mul-{seed}-{i}", f"{a}*{b}", str(a * b), steps, {"a": a, "b": b})

    def check_step(self, problem: Problem, index: int, step: str) -> bool:
        plan = self._plan(problem.meta["a"], problem.meta["b"])
        if not 0 <= index < len(plan):
            return False
        kind, x, y, z = plan[index]
        m = re.fullmatch(r"\s*(\d+)([*+])(\d+)=(\d+)\s*", step)
        return bool(m) and m[2] == ("*" if kind == "mul" else "+") and (_unrev(m[1]), _unrev(m[3]), _unrev(m[4])) == (x, y, z)


_PREC = {"+": 1, "-": 1, "*": 2}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _render(node, parent_op: str | None = None, right: bool = False) -> str:
    if isinstance(node, int):
        return str(node)
    op, left, rgt = node
    text = _render(left, op, False) + op + _render(rgt, op, True)
    needs = parent_op is not None and (
        _PREC[op] < _PREC[parent_op] or (right and _PREC[op] == _PREC[parent_op] and parent_op == "-")
    )
    return f"({text})" if needs else text


def _evaluate(node, steps: list[tuple]) -> int:
    """Post-order evaluation, appending (a, op, b, result) per operation."""
    if isinstance(node, int):
        return node
    op, left, rgt = node
    a, b = _evaluate(left, steps), _evaluate(rgt, steps)
    steps.append((a, op, b, _APPLY[op](a, b)))
    return steps[-1][3]


def _operand(x: int) -> str:
    return f"({x})" if x < 0 else str(x)


@register("arith")
class ArithTask(_IntegerAnswer, Task):
    """Multi-step integer expressions with ``ops`` operations (+ - *) on numbers 1..``max_num``."""

    has_gold_steps = True

    def __init__(self, ops: int = 3, max_num: int = 9):
        if ops < 1 or max_num < 1:
            raise ValueError(f"arith: need ops >= 1 and max_num >= 1, got ops={ops}, max_num={max_num}")
        self.ops, self.max_num, self.name = ops, max_num, "arith"

    def _tree(self, rng: random.Random):
        tree = rng.randint(1, self.max_num)
        for _ in range(self.ops):
            path, node = [], tree  # walk to a random leaf, then grow it into an operation
            while not isinstance(node, int):
                side = rng.randint(1, 2)
                path.append(side)
                node = node[side]
            new = (rng.choice("+-*"), node, rng.randint(1, self.max_num))
            if rng.random() < 0.5:
                new = (new[0], new[2], new[1])
            tree = _replace(tree, path, new)
        return tree

    def candidates(self, seed: int):
        rng = random.Random(f"arith-{seed}")
        for i in range(10**9):
            tree, ops = self._tree(rng), []
            value = _evaluate(tree, ops)
            steps = [f"{_operand(a)}{op}{_operand(b)}={r}" for a, op, b, r in ops]
            yield Problem(f"arith-{seed}-{i}", _render(tree), str(value), steps, {"ops": ops})

    def check_step(self, problem: Problem, index: int, step: str) -> bool:
        ops = problem.meta["ops"]
        if not 0 <= index < len(ops):
            return False
        m = re.fullmatch(r"\s*\(?(-?\d+)\)?([+\-*])\(?(-?\d+)\)?=(-?\d+)\s*", step)
        return bool(m) and (_int(m[1]), m[2], _int(m[3]), _int(m[4])) == tuple(ops[index])


def _replace(tree, path: list[int], new):
    if not path:
        return new
    node = list(tree)
    node[path[0]] = _replace(tree[path[0]], path[1:], new)
    return tuple(node)


_ONSETS = ["b", "bl", "d", "f", "gl", "k", "l", "m", "n", "p", "r", "sn", "t", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "oo"]
_CODAS = ["p", "b", "x", "zz", "g", "m", "n", "t", "k"]


def _noun(rng: random.Random) -> str:
    coda = rng.choice(_CODAS)
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + coda + {"zz": "ies", "x": "es"}.get(coda, "s")


def _supersets(premises: list[tuple], a: str) -> set[str]:
    """Every X with 'all a are X' derivable from the 'all' premises (a itself included)."""
    supers, frontier = {a}, [a]
    while frontier:
        x = frontier.pop()
        for k, p, q in premises:
            if k == "all" and p == x and q not in supers:
                supers.add(q)
                frontier.append(q)
    return supers


def _entails(premises: list[tuple], kind: str, a: str, b: str) -> bool:
    """Whether premises (('all'|'no', X, Y)) entail 'all a are b' / 'no a are b' (existential import)."""
    sa = _supersets(premises, a)
    if kind == "all":
        return b in sa
    sb = _supersets(premises, b)
    return any(k == "no" and ((p in sa and q in sb) or (q in sa and p in sb)) for k, p, q in premises)


@register("syllogism")
class SyllogismTask(Task):
    """Chains of ``chain`` categorical premises about nonsense words, answer yes / no / unknown.

    'yes': all A are B, all B are C ⊢ all A are C. 'no': all A are B, no B are C ⊢ no A are C (assuming
    A exist, so not all A are C). 'unknown': one link of the chain is reversed, so nothing follows.
    Phrasings vary (terse, "If … , are all A definitely C?", "Q: …", "Explain step-by-step.").
    """

    has_gold_steps = True

    def __init__(self, chain: int = 2, distractors: int = 1):
        if chain < 2 or distractors < 0:
            raise ValueError(f"syllogism: need chain >= 2 and distractors >= 0, got chain={chain}, distractors={distractors}")
        self.chain, self.distractors, self.name = chain, distractors, "syllogism"

    def candidates(self, seed: int):
        rng = random.Random(f"syllogism-{seed}")
        for i in range(10**9):
            words: list[str] = []
            while len(words) < self.chain + 1 + 2 * self.distractors:
                w = _noun(rng)
                if w not in words:
                    words.append(w)
            terms, extra = words[: self.chain + 1], words[self.chain + 1 :]
            answer = rng.choice(["yes", "no", "unknown"])
            links = [("all", terms[j], terms[j + 1]) for j in range(self.chain)]
            if answer == "no":
                links[-1] = ("no", terms[-2], terms[-1])
            broken = rng.randrange(self.chain) if answer == "unknown" else None
            if broken is not None:
                links[broken] = ("all", terms[broken + 1], terms[broken])
            premises = links + [("all", extra[2 * j], extra[2 * j + 1]) for j in range(self.distractors)]
            shown = premises[:]
            rng.shuffle(shown)
            a, c = terms[0], terms[-1]
            yield Problem(
                f"syllogism-{seed}-{i}",
                self._phrase(rng, shown, a, c),
                answer,
                self._steps(terms, answer, broken),
                {"premises": premises, "subject": a, "object": c},
            )

    @staticmethod
    def _phrase(rng: random.Random, premises: list[tuple], a: str, c: str) -> str:
        facts = [f"{k} {x} are {y}" for k, x, y in premises]
        if rng.random() < 0.5:
            text = ". ".join(facts) + f". are all {a} {c}?"
        else:
            text = "If " + ", ".join(facts[:-1]) + f" and {facts[-1]}, are all {a} definitely {c}?"
        if rng.random() < 0.3:
            text = "Q: " + text
        if rng.random() < 0.3:
            text += " Explain step-by-step."
        return text

    def _steps(self, terms: list[str], answer: str, broken: int | None) -> list[str]:
        a = terms[0]
        reach = {"yes": self.chain, "no": self.chain - 1, "unknown": broken}[answer]
        steps = [f"all {a} are {terms[j]}" for j in range(1, reach + 1)]
        if answer == "no":
            steps.append(f"no {a} are {terms[-1]}")
        return steps + [f"so {answer}"]

    def check_step(self, problem: Problem, index: int, step: str) -> bool:
        m = re.fullmatch(r"\s*(all|no) (\w+) are (\w+)\s*", step)
        if m:
            return _entails(problem.meta["premises"], m[1], m[2], m[3])
        m = re.fullmatch(r"\s*so (yes|no|unknown)\s*", step)
        return bool(m) and m[1] == problem.answer

    def score(self, problem: Problem, answer: str | None) -> float:
        return float(answer is not None and answer.strip().lower().rstrip(".") == problem.answer)
