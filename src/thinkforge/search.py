"""Test-time compute: ways to spend more inference on a problem, each one function in ``METHODS``.

    s = Search(engine, task, prm=RewardModel.load("runs/prm/model"))
    outcomes = METHODS["prm-beam"](s, problems, 16)      # one Outcome per problem
    outcomes[0].correct, outcomes[0].tokens

| method | what it does with ``n`` | source |
|---|---|---|
| ``greedy`` | one greedy completion (``n`` ignored) | |
| ``sample`` | one sampled completion, the first of the pool (its accuracy is pass@1) | |
| ``maj`` | majority vote over ``n`` samples' extracted answers (ties: first seen) | self-consistency, Wang et al. 2023 |
| ``bon-orm`` | the sample the ORM scores highest | Cobbe et al. 2021 |
| ``bon-prm`` | the sample whose aggregated PRM score is highest (PRM@N) | Lightman et al. 2023 |
| ``wmaj`` | vote weighted by the reward model's score (PRM if given, else ORM) | Uesato et al. 2022; Li et al. 2023 |
| ``prm-greedy`` | step by step: sample ``n`` next steps, keep the best by PRM | HGS-PRM, Ma et al. 2023 |
| ``prm-beam`` | step by step: keep ``beam_width`` partial traces, each expanded ``n / beam_width`` times | Snell et al. 2024 |
| ``budget`` | greedy with at most ``n`` thinking tokens (the engine forces ``</think>``) | |
| ``wait`` | greedy with ``n`` rounds of s1 budget forcing ("Wait" replaces ``</think>``) | Muennighoff et al. 2025 |
| ``effort:<level>`` | ``budget`` at the effort level's budget (``EFFORT_BUDGETS``, shared with the server) | |

Every outcome carries ``tokens``, the policy tokens generated for that problem (every candidate,
kept or not), and ``rm_tokens``, the tokens the reward model read, so methods compare at equal
compute. Sample pools are drawn once per problem set and reused: ``maj`` at n=4 reads the first 4 of
the same pool ``maj`` at n=32 reads, which makes a sweep cost one pool (``evaluate.sweep`` draws it at
the largest n first; asking a larger n than the pool holds draws a new, larger one).

Prompts: ``prompt_style`` ``chat`` (the chat template, for models trained here), ``cot`` (zero-shot:
"Think step by step" plus the output format) or ``few-shot`` (``shots`` solved training problems,
with their gold steps, shown in the user message), for models that were not trained on the format.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from thinkforge import format as fmt
from thinkforge.generation import EFFORT_BUDGETS, Engine, SamplingParams
from thinkforge.metrics import answer_key, majority_answer
from thinkforge.sampling import sample_and_grade
from thinkforge.scorers import aggregate
from thinkforge.tasks import Problem, Task

PROMPT_STYLES = ("chat", "cot", "few-shot")
COT_INSTRUCTION = ("Think step by step, one step per line, inside <think></think>, then give the final answer "
                   "inside <answer></answer>.")


@dataclass
class Candidate:
    text: str
    answer: str | None
    correct: bool
    tokens: int
    rm_scores: dict = field(default_factory=dict)  # "prm" / "orm" -> the reward model's step scores


@dataclass
class Outcome:
    """One problem's result under one method."""

    answer: str | None
    correct: bool
    tokens: int  # policy tokens generated for this problem
    rm_tokens: int = 0  # tokens the reward model read for this problem
    text: str = ""
    candidates: list = field(default_factory=list)  # what the method chose among (Candidates, with any RM scores)
    chosen: int | None = None  # the index of its choice in candidates


@dataclass
class Search:
    """What every method needs: the policy's engine, the task (extraction, scoring), optional reward models
    and the sampling settings. Methods take ``(search, problems, n)`` and return one Outcome per problem."""

    engine: Engine
    task: Task
    prm: object | None = None  # anything with .score(prompts, completions) -> per-step scores
    orm: object | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    aggregate: str = "min"
    beam_width: int = 4
    step_tokens: int = 48  # cap on one step in step search
    prompt_style: str = "chat"
    shots: int = 2
    seed: int = 0
    batch_rows: int = 256
    _pools: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        self._shots = self.task.problems(self.shots, "train", seed=self.seed + 7) if self.prompt_style == "few-shot" else []
        if self._shots and not all(p.steps for p in self._shots):
            raise ValueError(f"few-shot prompts need solved examples: task {self.task.name!r} has no gold steps")

    # ---- shared pieces ------------------------------------------------------------------------------
    def prompt(self, problem: Problem) -> str:
        chat = self.engine.chat
        if self.prompt_style == "chat":
            return chat.prompt(problem.question)
        if self.prompt_style == "cot":
            return chat.prompt(f"{problem.question}\n\n{COT_INSTRUCTION}")
        shown = "\n\n".join(f"Problem: {p.question}\n" + fmt.render_completion(p.answer, "\n".join(p.steps))
                            for p in self._shots)
        return chat.prompt(f"{COT_INSTRUCTION}\n\n{shown}\n\nProblem: {problem.question}")

    def grade(self, problem: Problem, text: str, tokens: int) -> Candidate:
        answer = self.task.extract(text)
        return Candidate(text, answer, self.task.score(problem, answer) >= 1.0, tokens)

    def generate(self, problems: list[Problem], params: SamplingParams, prefill: str = "") -> list[list[Candidate]]:
        """``params.n`` graded candidates per problem (``evaluate.sample_and_grade``); ``prefill`` is text forced
        after the prompt (part of the completion, not counted as generated)."""
        graded = sample_and_grade(self.engine, self.task, problems, params, self.batch_rows,
                                  render=self.prompt, prefill=prefill)
        return [[Candidate(prefill + c.text, a, ok, len(c.ids)) for c, a, ok in zip(g.completions, g.answers, g.correct)]
                for g in graded]

    def pool(self, problems: list[Problem], n: int) -> list[list[Candidate]]:
        """``n`` samples per problem, drawn once and reused by every pool method (a prefix for smaller n)."""
        key = tuple(p.id for p in problems)
        have = self._pools.get(key)
        if have is None or len(have[0]) < n:
            params = SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p,
                                    max_new_tokens=self.max_new_tokens, seed=self.seed)
            have = self._pools[key] = self.generate(problems, params)
        return [c[:n] for c in have]

    def scores(self, which: str, problems: list[Problem], pools: list[list[Candidate]]) -> tuple[list[list[float]], list[int]]:
        """Aggregated ``which`` ("prm" | "orm") scores of every candidate, and the reward-model tokens read per
        problem. A candidate is scored once per reward model, however many methods read it."""
        rm = self.reward_model(which)
        todo = [(i, c) for i, cands in enumerate(pools) for c in cands if which not in c.rm_scores]
        spent = [0] * len(pools)
        if todo:
            before = getattr(rm, "tokens_read", 0)
            steps = rm.score([self.prompt(problems[i]) for i, _ in todo], [c.text for _, c in todo])
            for (i, c), st in zip(todo, steps):
                c.rm_scores[which] = st
            read = getattr(rm, "tokens_read", 0) - before
            for i, _ in todo:  # the reading cost, split by candidates
                spent[i] += read // len(todo)
        return [[aggregate(c.rm_scores[which], self.aggregate) for c in cands] for cands in pools], spent

    def reward_model(self, which: str):
        """The PRM or ORM, or a clear error naming the flag that supplies it."""
        rm = getattr(self, which)
        if rm is None:
            raise ValueError(f"this method needs a{'n' if which == 'orm' else ''} {which.upper()}: pass --{which} "
                             "(train one with `thinkforge train rm`)")
        return rm


def _pick(problem_cands: list[Candidate], index: int | None, rm_tokens: int = 0) -> Outcome:
    tokens = sum(c.tokens for c in problem_cands)
    if index is None:
        return Outcome(None, False, tokens, rm_tokens, candidates=problem_cands)
    c = problem_cands[index]
    return Outcome(c.answer, c.correct, tokens, rm_tokens, c.text, problem_cands, index)


def best_index(scores: list[float]) -> int | None:
    """Index of the highest score, the first one on ties. ``best_index([0.2, 0.9, 0.9]) == 1``."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i)) if scores else None


def weighted_vote(answers: list[str | None], weights: list[float]) -> int | None:
    """Index of the first sample holding the answer with the largest total weight (no answer never wins).

    >>> weighted_vote(["3", "4", "4", "3"], [0.9, 0.3, 0.4, 0.2])   # 3: 1.1, 4: 0.7
    0
    """
    totals: dict = defaultdict(float)
    keys = [answer_key(a) for a in answers]
    for k, w in zip(keys, weights):
        if k is not None:
            totals[k] += w
    if not totals:
        return None
    best = max(totals.values())
    return next(i for i, k in enumerate(keys) if k is not None and totals[k] == best)


# ---- the methods ------------------------------------------------------------------------------------

def greedy(s: Search, problems, n: int) -> list[Outcome]:
    return [_pick(c, 0) for c in s.generate(problems, SamplingParams(temperature=0, max_new_tokens=s.max_new_tokens))]


def sample(s: Search, problems, n: int) -> list[Outcome]:
    return [_pick(c, 0) for c in s.pool(problems, 1)]


def maj(s: Search, problems, n: int) -> list[Outcome]:
    return [_pick(c, majority_answer([x.answer for x in c])) for c in s.pool(problems, n)]


def _best_of(which: str):
    def method(s: Search, problems, n: int) -> list[Outcome]:
        pools = s.pool(problems, n)
        scores, spent = s.scores(which, problems, pools)
        return [_pick(c, best_index(sc), t) for c, sc, t in zip(pools, scores, spent)]

    method.__doc__ = f"Best-of-n by the {which.upper()}'s aggregated score."
    return method


def wmaj(s: Search, problems, n: int) -> list[Outcome]:
    pools = s.pool(problems, n)
    scores, spent = s.scores("prm" if s.prm is not None or s.orm is None else "orm", problems, pools)
    return [_pick(c, weighted_vote([x.answer for x in c], sc), t) for c, sc, t in zip(pools, scores, spent)]


def budget(s: Search, problems, n: int) -> list[Outcome]:
    """Greedy with at most n thinking tokens; n = 0 answers at once after an empty think block."""
    if n == 0:
        params = SamplingParams(temperature=0, max_new_tokens=s.max_new_tokens)
        return [_pick(c, 0) for c in s.generate(problems, params, prefill=s.engine.chat.no_thinking)]
    params = SamplingParams(temperature=0, max_new_tokens=s.max_new_tokens + n, thinking_budget=n)
    return [_pick(c, 0) for c in s.generate(problems, params)]


def wait(s: Search, problems, n: int) -> list[Outcome]:
    params = SamplingParams(temperature=0, max_new_tokens=s.max_new_tokens * (n + 1), wait_rounds=n)
    return [_pick(c, 0) for c in s.generate(problems, params)]


@dataclass
class _Beam:
    text: str  # completion so far, after the forced "<think>\n"
    score: float = 1.0
    done: bool = False
    length: int = 0  # tokens generated along this trace
    steps: list = field(default_factory=list)  # the PRM's step scores at its last scoring


def step_search(s: Search, problems: list[Problem], n: int, width: int) -> list[Outcome]:
    """PRM-guided search over thinking steps (the task's delimiter): each of ``width`` kept partial traces
    is extended by ``n // width`` sampled next steps; every candidate is scored by the PRM (aggregated
    over its steps so far) and the best ``width`` unfinished ones go on. A candidate that closes its
    thinking writes its answer in one go (one sample); one that ends its turn, or reaches
    ``max_new_tokens`` in all, is finished. A problem stops when ``width`` candidates finished or none is
    left; its answer is the best-scored finished candidate's."""
    prm = s.reward_model("prm")
    width = max(1, min(width, n))
    expand = max(1, n // width)
    head = fmt.THINK_OPEN + s.task.step_delimiter  # every trace starts thinking (forced, not sampled)
    beams = {i: [_Beam("")] for i in range(len(problems))}
    finished: dict[int, list[_Beam]] = {i: [] for i in range(len(problems))}
    tokens = [0] * len(problems)
    depth, before = 0, getattr(prm, "tokens_read", 0)
    while any(beams.values()):
        step = SamplingParams(n=expand, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.step_tokens,
                              stop=[s.task.step_delimiter, s.engine.chat.end], seed=s.seed + 1000 * depth)
        cands = _extend(s, problems, [(i, b) for i, bs in beams.items() for b in bs], step, head, tokens)
        answering = [(i, c) for i, c in cands if not c.done and fmt.THINK_CLOSE in c.text]
        answer = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.step_tokens,
                                seed=s.seed + 1000 * depth + 1)
        for (_, c), (_, done) in zip(answering, _extend(s, problems, answering, answer, head, tokens)):
            c.text, c.length, c.done = done.text, done.length, True
        scores = prm.score([s.prompt(problems[i]) for i, _ in cands], [head + c.text for _, c in cands])
        by_problem: dict[int, list[_Beam]] = defaultdict(list)
        for (i, c), sc in zip(cands, scores):
            c.score, c.steps = aggregate(sc, s.aggregate), sc
            (finished[i] if c.done else by_problem[i]).append(c)
        for i in beams:
            alive = sorted(by_problem.get(i, []), key=lambda c: -c.score)  # stable: ties keep sampling order
            beams[i] = alive[:width] if len(finished[i]) < width else []
        depth += 1
    rm_tokens = (getattr(prm, "tokens_read", 0) - before) // max(1, len(problems))  # split evenly over problems
    outcomes = []
    for i, p in enumerate(problems):
        best = best_index([c.score for c in finished[i]])
        graded = [s.grade(p, head + c.text, c.length) for c in finished[i]]
        for g, c in zip(graded, finished[i]):
            g.rm_scores["prm"] = c.steps
        if best is None:
            outcomes.append(Outcome(None, False, tokens[i], rm_tokens))
            continue
        cand = graded[best]
        outcomes.append(Outcome(cand.answer, cand.correct, tokens[i], rm_tokens, cand.text, graded, best))
    return outcomes


def _extend(s: Search, problems, work: list[tuple[int, _Beam]], params: SamplingParams, head: str,
            tokens: list[int]) -> list[tuple[int, _Beam]]:
    """``params.n`` continuations of every (problem, partial trace); adds the generated tokens to ``tokens``."""
    end = s.engine.tok.encode(s.engine.chat.end, add_special_tokens=False)
    out, per_call = [], max(1, s.batch_rows // params.n)
    for start in range(0, len(work), per_call):
        chunk = work[start : start + per_call]
        comps = s.engine.generate([s.prompt(problems[i]) + head + b.text for i, b in chunk], params)
        for j, (i, b) in enumerate(chunk):
            for c in comps[j * params.n : (j + 1) * params.n]:
                tokens[i] += len(c.ids)
                ended = c.ids[-len(end) :] == end
                text = b.text + s.engine.tok.decode(c.ids[: -len(end)] if ended else c.ids)
                length = b.length + len(c.ids)
                out.append((i, _Beam(text, done=ended or length >= s.max_new_tokens, length=length)))
    return out


def prm_greedy(s: Search, problems, n: int) -> list[Outcome]:
    return step_search(s, problems, n, width=1)


def prm_beam(s: Search, problems, n: int) -> list[Outcome]:
    return step_search(s, problems, n, width=s.beam_width)


POOL_METHODS = {"sample", "maj", "bon-orm", "bon-prm", "wmaj"}  # methods that read a shared sample pool
# The reward model a method needs ("any": a PRM or an ORM), checked by the configs before anything loads.
NEEDS = {"bon-prm": "prm", "prm-greedy": "prm", "prm-beam": "prm", "bon-orm": "orm", "wmaj": "any"}


def missing_reward_model(method: str, prm, orm, orm_flag: bool = True) -> str | None:
    """Why ``method`` cannot run with these reward models (None if it can); ``orm_flag`` says whether the
    command takes an ``--orm`` at all (if not, "any" means a PRM)."""
    need = NEEDS.get(method)
    if need == "any" and not orm_flag:
        need = "prm"
    if need == "prm" and not prm:
        return f"method {method} needs a PRM: pass --prm (train one with `thinkforge train rm`)"
    if need == "orm" and not orm:
        return f"method {method} needs an ORM: pass --orm"
    if need == "any" and not (prm or orm):
        return f"method {method} needs a PRM or ORM: pass --prm or --orm"
    return None

METHODS = {
    "greedy": greedy,
    "sample": sample,
    "maj": maj,
    "bon-orm": _best_of("orm"),
    "bon-prm": _best_of("prm"),
    "wmaj": wmaj,
    "prm-greedy": prm_greedy,
    "prm-beam": prm_beam,
    "budget": budget,
    "wait": wait,
}


def run_method(name: str, s: Search, problems: list[Problem], n: int = 1) -> list[Outcome]:
    """Run a method by name; ``effort:<level>`` is ``budget`` at that level's thinking budget."""
    if name.startswith("effort:"):
        level = name.split(":", 1)[1]
        if level not in EFFORT_BUDGETS:
            raise ValueError(f"effort must be one of {list(EFFORT_BUDGETS)}, got {level!r}")
        b = EFFORT_BUDGETS[level]
        return budget(s, problems, b) if b is not None else greedy(s, problems, 1)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {sorted(METHODS)} or effort:<level>")
    if n < 1 and name != "budget":
        raise ValueError(f"n must be >= 1 for {name}, got {n}")
    return METHODS[name](s, problems, n)
