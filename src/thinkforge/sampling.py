"""Sample many problems with the engine and grade every completion with the task's verifier.

    graded = sample_and_grade(Engine(model, tok), task, problems, SamplingParams(n=8))
    graded[0].correct        # [True, False, …]: one verdict per completion of the first problem

The one batched sample-then-grade loop that evaluation, test-time search, rejection sampling and
reward-model labelling share: prompts go to the engine in chunks of ``batch_rows`` rows, each chunk
with its own seed, and every completion is graded on ``format.parse_completion``'s answer (through
``task.extract``), the answer the server would show.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from thinkforge import format as fmt
from thinkforge.generation import Engine, SamplingParams
from thinkforge.tasks import Problem, Task


@dataclass
class Graded:
    """Completions of one problem with their extracted answers and verdicts."""

    problem: Problem
    completions: list = field(default_factory=list)
    answers: list = field(default_factory=list)
    correct: list = field(default_factory=list)


def sample_and_grade(engine: Engine, task: Task, problems: list[Problem], params: SamplingParams,
                     batch_rows: int = 256, render=None, prefill: str = "") -> list[Graded]:
    """``params.n`` completions per problem, each graded by the task's scorer (score 1.0 = correct);
    ``render(problem)`` is the prompt text (the chat template by default); ``prefill`` is text forced after
    it, graded as the start of the completion (the server parses a prefilled answer the same way)."""
    render = render or (lambda q: engine.chat.prompt(q.question))
    per_call = max(1, batch_rows // params.n)
    graded = []
    for start in range(0, len(problems), per_call):
        chunk = problems[start : start + per_call]
        p = SamplingParams(**{**params.__dict__, "seed": (params.seed or 0) + start})
        outs = engine.generate([render(q) + prefill for q in chunk], p)
        for i, prob in enumerate(chunk):
            g = Graded(prob)
            for c in outs[i * params.n : (i + 1) * params.n]:
                ans = task.extract(prefill + c.text)
                g.completions.append(c)
                g.answers.append(ans)
                g.correct.append(task.score(prob, ans) >= 1.0)
            graded.append(g)
    return graded




def trace_rows(graded: list[Graded], **tags) -> list[dict]:
    """One documented trace row per completion (what evaluation and training save and ``thinkforge ui``
    shows), with ``tags`` (e.g. ``method``, ``step``) on every row:

    ``problem_id``, ``question``, ``gold`` (the reference answer), ``sample`` (index within the problem),
    ``completion`` (the text as generated), ``thinking`` (``format.parse_completion``'s, None without a think
    block), ``answer`` (what the grader extracted; None if nothing), ``correct``, ``well_formed``, ``majority``
    (the problem's most common extracted answer), ``finish_reason``, ``tokens``, ``thinking_tokens``,
    ``forced_tokens`` (tokens the engine forced: a thinking budget's close, a template's opener),
    ``forced_spans`` (``[start, end)`` character offsets in ``completion`` of the text those tokens make)."""
    out = []
    for g in graded:
        votes = Counter(a for a in g.answers if a is not None)
        majority = votes.most_common(1)[0][0] if votes else None
        for i, (c, a, ok) in enumerate(zip(g.completions, g.answers, g.correct)):
            p = fmt.parse_completion(c.text)
            out.append({**tags, "problem_id": g.problem.id, "question": g.problem.question, "gold": g.problem.answer,
                        "sample": i, "completion": c.text, "thinking": p.thinking, "answer": a, "correct": bool(ok),
                        "well_formed": p.well_formed, "majority": majority, "finish_reason": c.finish_reason,
                        "tokens": len(c.ids), "thinking_tokens": c.thinking_tokens,
                        "forced_tokens": len(c.mask) - sum(c.mask), "forced_spans": getattr(c, "forced_spans", [])})
    return out
