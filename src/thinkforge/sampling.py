"""Sample many problems with the engine and grade every completion with the task's verifier.

    graded = sample_and_grade(Engine(model, tok), task, problems, SamplingParams(n=8))
    graded[0].correct        # [True, False, …]: one verdict per completion of the first problem

The one batched sample-then-grade loop that evaluation, test-time search, rejection sampling and
reward-model labelling share: prompts go to the engine in chunks of ``batch_rows`` rows, each chunk
with its own seed, and every completion is graded on ``format.parse_completion``'s answer (through
``task.extract``), the answer the server would show.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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


