import contextlib
import time

import pytest
import torch

from thinkforge import format as fmt
from thinkforge.generation import Engine, SamplingParams
from thinkforge.models import tiny_model

PROMPTS = [fmt.render_prompt(q) for q in ["347*89", "12+7", "(3+4)*2-5"]] + ["x"]


@pytest.fixture(scope="module")
def model(char_tok):
    return tiny_model(char_tok, "micro", seed=0).eval()


def full_forward_logprobs(model, c):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([c.prompt_ids + c.ids])).logits[0, :-1].float(), -1)
    return lp[len(c.prompt_ids) - 1 :].gather(-1, torch.tensor(c.ids)[:, None])[:, 0]


@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_greedy_equals_hf_generate_and_logprobs_equal_full_forward(model, char_tok, backend):
    eng = Engine(model, char_tok, backend=backend)
    outs = eng.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))
    for o in outs:  # prompts of different lengths share a batch (left padding)
        ids = torch.tensor([o.prompt_ids])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
        assert ref.tolist() == o.ids
    for o in eng.generate(PROMPTS, SamplingParams(temperature=1.0, n=3, max_new_tokens=24, seed=3)):
        assert (full_forward_logprobs(model, o) - torch.tensor(o.logprobs)).abs().max() < 1e-4
        assert all(m == 1 for m in o.mask)


def test_sampling_is_reproducible_by_seed(model, char_tok):
    eng = Engine(model, char_tok)
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, n=4, max_new_tokens=16, seed=7)
    a, b = eng.generate(PROMPTS, p), eng.generate(PROMPTS, p)
    assert [o.ids for o in a] == [o.ids for o in b] and len(a) == 4 * len(PROMPTS)
    c = eng.generate(PROMPTS, SamplingParams(**{**p.__dict__, "seed": 8}))
    assert [o.ids for o in a] != [o.ids for o in c]


def test_unseeded_sampling_leaves_the_global_random_state_alone(model, char_tok):
    """seed=None draws a fresh seed for its own stream; the caller's torch.manual_seed reproducibility (a
    training run's dropout, data order) must not change because a generation happened in between."""
    eng = Engine(model, char_tok)
    p = SamplingParams(temperature=1.0, n=2, max_new_tokens=8, seed=None)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    first = eng.generate(PROMPTS, p)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(5)
    again = eng.generate(PROMPTS, p)
    assert [o.ids for o in first] != [o.ids for o in again]  # unseeded: a new stream each call


def test_per_prompt_seeds_make_samples_independent_of_the_batch(model, char_tok):
    """With one seed per prompt, a prompt's samples are the same alone or beside others, in any position:
    what lets GRPO split its roll-outs over processes and still sample what one process would."""
    eng = Engine(model, char_tok)
    p = dict(temperature=1.0, top_k=20, n=3, max_new_tokens=24)
    both = eng.generate(PROMPTS[:2], SamplingParams(**p, seed=[11, 12]))
    alone = eng.generate(PROMPTS[1:2], SamplingParams(**p, seed=[12]))
    swapped = eng.generate([PROMPTS[1], PROMPTS[0]], SamplingParams(**p, seed=[12, 11]))
    assert [o.ids for o in both[3:]] == [o.ids for o in alone] == [o.ids for o in swapped[:3]]
    assert [o.ids for o in both[:3]] == [o.ids for o in swapped[3:]]
    assert len({tuple(o.ids) for o in both}) > 1  # really sampled
    for a, b in zip(both[3:], alone):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        eng.generate(PROMPTS[:1], SamplingParams(**p, seed=[1, 2]))


def test_inverse_cdf_sampling_follows_the_distribution():
    from thinkforge.generation import _sample

    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    logits = probs.log().expand(40_000, 4)
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(0))
    tokens, logp = _sample(logits, SamplingParams(temperature=1.0), None, u)
    freq = torch.bincount(tokens, minlength=4).float() / 40_000
    assert freq[1] == 0  # a token of zero probability is never drawn, even at u = 0
    assert freq.tolist() == pytest.approx(probs.tolist(), abs=0.01)  # 4 standard errors at most
    assert torch.allclose(logp, probs.log()[tokens])
    zero = _sample(logits[:1], SamplingParams(temperature=1.0), None, torch.zeros(1))[0]
    assert zero.tolist() == [0]


class Scripted:
    """A backend whose 'model' thinks for ``think`` tokens of 'a', then answers 7. Logits are one-hot."""

    def __init__(self, tok, think: int):
        self.tok, self.think = tok, think
        self.t = {s: tok.convert_tokens_to_ids(s) for s in fmt.SPECIAL_TOKENS}
        self.a, self.seven = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("7")
        self.calls = []

    def _next(self, hist: list[int]) -> int:
        t = self.t
        if t["<think>"] not in hist:
            return t["<think>"]
        if t["</think>"] not in hist:
            thinking = len(hist) - hist.index(t["<think>"]) - 1
            return self.a if thinking < self.think else t["</think>"]
        after = hist[hist.index(t["</think>"]) + 1 :]
        script = [t["<answer>"], self.seven, t["</answer>"], t["<|im_end|>"]]
        done = [x for x in after if x in script]
        return script[min(len(done), 3)]

    def _logits(self):
        out = torch.full((len(self.hist), len(self.tok)), -30.0)
        for i, h in enumerate(self.hist):
            out[i, self._next(h)] = 0.0
        return out

    def prefill(self, prompt_ids, n, max_new):
        self.hist = [[] for _ in range(len(prompt_ids) * n)]
        self.calls.append(len(self.hist))
        return self._logits()

    def decode(self, tokens):
        for h, x in zip(self.hist, tokens.tolist()):
            h.append(x)
        self.calls.append(len(self.hist))
        return self._logits()

    def select(self, rows):
        self.hist = [self.hist[i] for i in rows]


def scripted_engine(model, tok, think):
    backend = Scripted(tok, think)
    return Engine(model, tok, backend=lambda m: backend), backend


def test_stop_and_token_counts(model, char_tok):
    eng, _ = scripted_engine(model, char_tok, think=5)
    o = eng.generate(["q"], SamplingParams(temperature=0, max_new_tokens=50))[0]
    assert o.text == "<think>aaaaa</think><answer>7</answer>" and o.finish_reason == "stop"
    assert (o.thinking_tokens, o.answer_tokens) == (7, 4)  # <think> a*5 </think> | <answer> 7 </answer> <|im_end|>
    o = eng.generate(["q"], SamplingParams(temperature=0, max_new_tokens=4))[0]
    assert o.finish_reason == "length" and len(o.ids) == 4


def test_thinking_budget_forces_the_end_of_thinking(model, char_tok):
    eng, _ = scripted_engine(model, char_tok, think=40)
    o = eng.generate(["q"], SamplingParams(temperature=0, max_new_tokens=80, thinking_budget=6))[0]
    assert o.text == "<think>aaaaaa\n</think>\n<answer>7</answer>"
    assert o.finish_reason == "budget"
    forced = [char_tok.decode([i]) for i, m in zip(o.ids, o.mask) if m == 0]
    assert forced == ["\n", "</think>", "\n"]
    assert o.ids[o.mask.index(0) - 1] == char_tok.convert_tokens_to_ids("a")
    assert [o.text[a:b] for a, b in o.forced_spans] == ["\n</think>\n"]  # where the UI marks them
    assert o.forced_spans == [[len("<think>aaaaaa"), len("<think>aaaaaa\n</think>\n")]]


def test_budget_forcing_appends_wait(model, char_tok):
    eng, _ = scripted_engine(model, char_tok, think=3)
    o = eng.generate(["q"], SamplingParams(temperature=0, max_new_tokens=80, wait_rounds=2))[0]
    assert o.waits == 2 and o.text.count("Wait") == 2 and o.finish_reason == "stop"
    assert o.text.startswith("<think>aaa\nWait") and o.text.endswith("</think><answer>7</answer>")
    assert sum(1 for m in o.mask if m == 0) == 2 * len("\nWait")
    assert "".join(o.text[a:b] for a, b in o.forced_spans) == "\nWait" * 2  # (back to back: one span here)


def test_finished_rows_leave_the_batch(model, char_tok):
    class Mixed(Scripted):  # row 0 ends at once, the other rows think for 30 tokens
        def _logits(self):
            out = super()._logits()
            for i, row in enumerate(self.rows):
                if row == 0:
                    out[i] = -30.0
                    out[i, self.t["<|im_end|>"]] = 0.0
            return out

        def prefill(self, prompt_ids, n, max_new):
            self.rows = list(range(len(prompt_ids) * n))
            return super().prefill(prompt_ids, n, max_new)

        def select(self, rows):
            super().select(rows)
            self.rows = [self.rows[i] for i in rows]

    backend = Mixed(char_tok, think=30)
    eng = Engine(model, char_tok, backend=lambda m: backend)
    outs = eng.generate(["q"], SamplingParams(temperature=0, n=4, max_new_tokens=60))
    assert [len(o.ids) for o in outs][0] == 1 and outs[0].finish_reason == "stop"
    assert backend.calls[0] == 4 and backend.calls[1] == 3  # the finished row costs nothing after step 1


def test_rows_moved_into_holes_sample_what_rows_kept_in_order_do(model, char_tok, monkeypatch):
    """With one stream per prompt the engine lets the backend fill finished rows' holes with the last rows
    (fewer cache copies); every completion must be what in-order compaction gives."""
    from thinkforge.generation.backends import FastBackend

    p = SamplingParams(temperature=1.0, n=4, max_new_tokens=30, seed=[1, 2, 3, 4], stop=["e", "a", "1"])
    moved = []
    select = FastBackend.select

    def watching(self, rows, reorder=False):
        order = select(self, rows, reorder)
        moved.append(order != sorted(order))
        return order

    monkeypatch.setattr(FastBackend, "select", watching)
    holes_filled = Engine(model, char_tok, backend="fast").generate(PROMPTS, p)
    assert any(moved)  # rows did move into holes
    monkeypatch.setattr(FastBackend, "select", lambda self, rows, reorder=False: select(self, rows))
    in_order = Engine(model, char_tok, backend="fast").generate(PROMPTS, p)
    assert [o.ids for o in holes_filled] == [o.ids for o in in_order]
    for a, b in zip(holes_filled, in_order):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_prompt_uniforms_drawn_in_chunks_equal_one_draw_per_step():
    """Each prompt's stream gives a step's n numbers whether drawn per step or many steps at once, across chunk
    boundaries and as rows leave or move."""
    from thinkforge.generation import _PromptUniforms

    n, P, chunk = 3, 4, 4
    seeds = [7, 8, 9, 10]
    draws = _PromptUniforms([torch.Generator().manual_seed(s) for s in seeds], n, "cpu", chunk=chunk)
    ref = [torch.Generator().manual_seed(s) for s in seeds]
    active = list(range(P * n))
    for step in range(11):
        if step in (3, 6):  # rows leave; prompt 1 entirely at step 6; the rest in a new order
            active = [s for s in active if s % 2 == 0 or s // n == 0][::-1] if step == 3 else [s for s in active if s // n != 1]
        per_step = {p: torch.rand(n, generator=ref[p]) for p in sorted({s // n for s in active})}
        expected = torch.stack([per_step[s // n][s % n] for s in active])
        assert torch.equal(draws(step, active), expected), step


def test_bad_params():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_backends_agree_when_rows_finish_early(model, char_tok):
    # stop strings end rows at different steps, so the hf backend must drop rows from its DynamicCache
    p = SamplingParams(temperature=1.0, n=4, max_new_tokens=30, seed=11, stop=["e", "a", "1"])
    fast = Engine(model, char_tok, backend="fast").generate(PROMPTS, p)
    hf = Engine(model, char_tok, backend="hf").generate(PROMPTS, p)
    assert len({len(o.ids) for o in fast}) > 1  # rows did finish at different times
    assert [o.ids for o in fast] == [o.ids for o in hf]
    assert [o.finish_reason for o in fast] == [o.finish_reason for o in hf]


# ---- continuous batching (generation.scheduler) ---------------------------------------------------------


def assert_same_run(got, alone, partings: list, model=None, temperature: float = 1.0) -> None:
    """The scheduler's completions equal the engine's alone, token for token, log-probs within 1e-4. A run may
    part from the engine's at one token only if everything before it agrees and both tokens there carry the
    log-probability a full forward of the shared prefix gives them: the same distribution, a float-rounding
    flip at a sampling boundary (a row's sums depend on where its cache sits among other requests' rows; like
    vLLM, the engine does not promise bitwise batch invariance). Such partings are appended to ``partings``."""
    from thinkforge.models import token_logprobs

    for g, a in zip(got, alone, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(g.ids, a.ids)) if x != y), min(len(g.ids), len(a.ids)))
        assert max((abs(x - y) for x, y in zip(g.logprobs[:k], a.logprobs[:k])), default=0.0) < 1e-4
        if g.ids == a.ids:
            continue
        assert model is not None and k < min(len(g.ids), len(a.ids)), "the runs part in length, not at a token"
        for c in (g, a):
            ids = torch.tensor([c.prompt_ids + c.ids[: k + 1]])
            with torch.no_grad():
                full = token_logprobs(model, ids, temperature)[0][0, -1]
            assert abs(float(full) - c.logprobs[k]) < 1e-4, "a parting token from another distribution"
        partings.append(k)


@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_scheduler_joins_mid_batch_and_matches_the_engine(model, char_tok, backend):
    """Requests that join a running batch at different steps, with different parameters, get exactly the
    tokens (and logprobs) the engine gives each of them alone with the same seed."""
    import time

    from thinkforge.generation.scheduler import Scheduler

    eng = Engine(model, char_tok, backend=backend)
    sched = Scheduler(eng, max_rows=8)
    try:
        cases = [(PROMPTS[0], SamplingParams(n=2, temperature=1.0, max_new_tokens=40, seed=7, ignore_eos=True)),
                 (PROMPTS[1], SamplingParams(n=1, temperature=0.0, max_new_tokens=25, seed=1)),
                 (PROMPTS[2], SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=30, seed=5)),
                 (PROMPTS[3], SamplingParams(n=1, temperature=1.0, top_k=5, max_new_tokens=12, seed=2))]
        reqs = []
        for prompt, params in cases:
            reqs.append(sched.submit(char_tok.encode(prompt, add_special_tokens=False), params))
            time.sleep(0.02)  # later requests join while earlier ones decode
        partings = []
        for (prompt, params), req in zip(cases, reqs):
            alone = eng.generate([prompt], SamplingParams(**{**params.__dict__, "seed": [params.seed]}))
            assert_same_run(req.wait(60), alone, partings)
        assert not partings  # (7 completions, ~180 tokens: none parts here)
        assert sched.steps < sum(p.max_new_tokens for _, p in cases)  # they shared decode steps
    finally:
        sched.close()


class _ScriptedBackend:
    """A backend that counts rows and decodes token 5 forever (tests of the scheduler's bookkeeping)."""

    def __init__(self, vocab, fail_on=None):
        self.rows_, self.vocab, self.fail_on, self.seen = 0, vocab, fail_on, []

    def _logits(self, n):
        out = torch.full((n, self.vocab), -1e9)
        out[:, 5] = 0
        return out

    def join(self, prompt_ids, n):
        if self.fail_on in prompt_ids:
            raise RuntimeError("poisoned prefill")
        new = sum(n) if isinstance(n, list) else len(prompt_ids) * n
        self.rows_ += new
        return self._logits(new)

    def decode(self, tokens):
        self.seen.append(len(tokens))
        return self._logits(len(tokens))

    def select(self, rows, reorder=False):
        self.rows_ = len(rows)

    def trim(self):
        pass


def test_scheduler_short_request_leaves_before_a_long_one_and_faults_stay_isolated(model, char_tok):
    from thinkforge.generation.scheduler import Cancelled, DeadlineExceeded, QueueFull, Scheduler

    backend = _ScriptedBackend(len(char_tok), fail_on=[9, 9])  # (one backend object: no express batch here)
    sched = Scheduler(Engine(model, char_tok, backend=lambda m: backend), max_rows=4, max_waiting=3, express_rows=0)
    try:
        long = sched.submit([1, 2], SamplingParams(max_new_tokens=400, ignore_eos=True))
        short = sched.submit([3], SamplingParams(max_new_tokens=3, ignore_eos=True))
        bad = sched.submit([9, 9], SamplingParams(max_new_tokens=3))
        assert len(short.wait(30)[0].ids) == 3 and not long.done.is_set()  # no waiting for the slowest
        with pytest.raises(RuntimeError, match="poisoned"):
            bad.wait(30)
        assert len(long.wait(30)[0].ids) == 400  # the poisoned prefill did not touch the running request
        gone = sched.submit([4], SamplingParams(max_new_tokens=10_000, ignore_eos=True))
        while not gone.seqs[0].ids:
            time.sleep(0.001)
        gone.cancel()
        with pytest.raises(Cancelled):
            gone.wait(30)
        late = sched.submit([4], SamplingParams(max_new_tokens=10), deadline=time.monotonic() - 1)
        with pytest.raises(DeadlineExceeded):
            late.wait(30)
        assert backend.rows_ == 0
        # the waiting queue is bounded: hold the loop with a full batch, then overfill the queue
        hold = [sched.submit([5], SamplingParams(n=4, max_new_tokens=2000, ignore_eos=True))]
        while backend.rows_ < 4:
            time.sleep(0.001)
        hold += [sched.submit([6], SamplingParams(max_new_tokens=1)) for _ in range(3)]
        with pytest.raises(QueueFull):
            sched.submit([7], SamplingParams(max_new_tokens=1))
        for r in hold:
            r.cancel()
    finally:
        sched.close()


@contextlib.contextmanager
def _full_main_batch(model, char_tok, **express):
    """A scheduler of 4 main rows, all taken by one long request: (engine, scheduler, prompt, its ids, that request)."""
    from thinkforge.generation.scheduler import Scheduler

    eng = Engine(model, char_tok, backend="fast")
    sched = Scheduler(eng, max_rows=4, **express)
    prompt = fmt.render_prompt("qq")
    ids = char_tok.encode(prompt, add_special_tokens=False)
    try:
        long = sched.submit(ids, SamplingParams(n=4, temperature=1.0, max_new_tokens=600, ignore_eos=True, seed=1))
        while len(sched.main.running) < 4:
            time.sleep(0.001)
        yield eng, sched, prompt, ids, long
    finally:
        sched.close()


def test_a_short_request_runs_beside_a_full_batch_of_long_ones(model, char_tok):
    """The main batch is full (4 rows of one long request): a short request does not wait for a free row nor
    for the long request to end — it runs in the express batch — and gets the engine's tokens alone; a long
    request that finds no row waits, and a short one that arrived after it passes it."""
    with _full_main_batch(model, char_tok, express_tokens=16, express_rows=2) as (eng, sched, prompt, ids, long):
        blocked = sched.submit(ids, SamplingParams(n=1, max_new_tokens=40, ignore_eos=True))  # no main row free
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, ignore_eos=True, seed=3)
        short = sched.submit(ids, params)  # 2 x 8 tokens <= 16: express
        got = short.wait(60)
        assert not long.done.is_set() and not blocked.done.is_set() and sched.main.steps < 600
        assert sched.express.steps >= 7  # (its 8th token ends it inside the 8th step, counted after)
        alone = eng.generate([prompt], SamplingParams(**{**params.__dict__, "seed": [params.seed]}))
        assert [c.ids for c in got] == [c.ids for c in alone]
        long.cancel()
        assert len(blocked.wait(60)[0].ids) == 40


def test_a_priority_request_runs_beside_a_full_batch_and_others_do_not(model, char_tok):
    """With no short-request rule (express_tokens 0), only a request submitted with ``priority`` takes the
    express batch: beside a full main batch it runs and ends, with the engine's tokens, while one without
    priority (the same parameters, submitted first) waits for a main row."""
    with _full_main_batch(model, char_tok, express_rows=2) as (eng, sched, prompt, ids, long):
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=30, ignore_eos=True, seed=3)
        plain = sched.submit(ids, params)
        fast = sched.submit(ids, params, priority=True)
        got = fast.wait(60)
        assert fast.batch == "express" and plain.batch is None and not plain.done.is_set() and not long.done.is_set()
        alone = eng.generate([prompt], SamplingParams(**{**params.__dict__, "seed": [params.seed]}))
        assert [c.ids for c in got] == [c.ids for c in alone]
        long.cancel()
        assert plain.wait(60) and plain.batch == "main"


def test_express_steps_take_at_most_their_share_of_the_time_when_both_batches_run(model, char_tok):
    """The loop's choice: the express batch while it has rows and has spent less time since the main batch's
    last step than its share allows (0.5: that step's time); the main batch otherwise; whichever has rows when
    the other has none."""
    from thinkforge.generation.scheduler import Scheduler

    sched = Scheduler(Engine(model, char_tok, backend="fast"), max_rows=4)
    sched.close()  # driven by hand
    row = (object(), 0)
    assert sched._next() is None
    sched.main.running = [row]
    assert sched._next() is sched.main
    sched.express.running = [row]
    sched.main.last_step, sched.express_spent = 0.006, 0.0
    assert sched._next() is sched.express
    sched.express_spent = 0.0059
    assert sched._next() is sched.express
    sched.express_spent = 0.006
    assert sched._next() is sched.main
    sched.main.running = []
    assert sched._next() is sched.express
    third = Scheduler(Engine(model, char_tok, backend="fast"), max_rows=4, express_share=0.25)
    third.close()  # a quarter of the time: a third of the main step's time between main steps
    third.main.running, third.express.running, third.main.last_step = [row], [row], 0.006
    third.express_spent = 0.0019
    assert third._next() is third.express
    third.express_spent = 0.0021
    assert third._next() is third.main


def test_scheduler_under_churn_matches_the_engine(model, char_tok, monkeypatch):
    """Many requests arriving while others run and leave: rows reused after others left, a prompt longer
    than the running time axis (every row shifted), the time axis trimmed once the first half is dead.
    Every request still gets the engine's tokens alone (at most one of 24 requests, ~3,000 tokens, may part at
    a rounding flip: see assert_same_run; one such parting was seen in a full-suite run on 2026-12-02)."""
    import random

    from thinkforge.generation.backends import FastBackend
    from thinkforge.generation.scheduler import Scheduler

    seen = {"trim": 0, "shift": 0, "reuse": 0}
    trim, reshape, join = FastBackend.trim, FastBackend._reshape, FastBackend.join

    def counting_trim(self):
        t = self.t if self.k is not None else 0
        trim(self)
        seen["trim"] += self.k is not None and self.t < t

    def counting_reshape(self, rows, slots, shift=0, start=0):
        seen["shift"] += shift > 0
        reshape(self, rows, slots, shift, start)

    def counting_join(self, prompt_ids, n):
        seen["reuse"] += self.rows() > 0 and self.B < self.k[0].shape[0]
        return join(self, prompt_ids, n)

    monkeypatch.setattr(FastBackend, "trim", counting_trim)
    monkeypatch.setattr(FastBackend, "_reshape", counting_reshape)
    monkeypatch.setattr(FastBackend, "join", counting_join)
    rng = random.Random(0)
    eng = Engine(model, char_tok, backend="fast")
    sched = Scheduler(eng, max_rows=6)
    cases = []
    for k in range(24):
        prompt = fmt.render_prompt("q" * rng.choice([1, 5, 30]) + ("z" * 150 if k == 12 else ""))
        params = SamplingParams(n=rng.choice([1, 2]), temperature=rng.choice([0.0, 1.0]), seed=k,
                                max_new_tokens=rng.choice([5, 40, 160]), ignore_eos=True)
        cases.append((prompt, params))
    try:
        reqs = []
        for prompt, params in cases:
            reqs.append(sched.submit(char_tok.encode(prompt, add_special_tokens=False), params))
            time.sleep(rng.choice([0, 0.005, 0.03]))
        partings = []
        for (prompt, params), req in zip(cases, reqs):
            alone = eng.generate([prompt], SamplingParams(**{**params.__dict__, "seed": [params.seed]}))
            assert_same_run(req.wait(120), alone, partings, model, params.temperature or 1.0)
        assert len(partings) <= 1, partings
        assert sched.backend is None or sched.backend.rows() == 0
    finally:
        sched.close()
    assert seen["trim"] and seen["shift"] and seen["reuse"], seen  # each path of the store was taken


def test_scheduler_memory_is_bounded_by_rows_and_context(model, char_tok):
    """The worst case a server allows — every row busy, prompts near the context, generations to the context
    — never holds more KV cache than max_rows x context (+ the growth chunk), whatever joins and leaves."""
    from thinkforge.generation.scheduler import Scheduler

    context, rows = 300, 6
    sched = Scheduler(Engine(model, char_tok, backend="fast"), max_rows=rows)
    sched.close()  # driven step by step below, so every step can be measured
    per_slot = 2 * len(model.model.layers) * model.config.num_key_value_heads * (
        model.config.hidden_size // model.config.num_attention_heads) * 4  # k and v, float32 bytes
    bound = rows * (3 * context + 16) * per_slot  # dead leading slots are trimmed once half the axis
    reqs = []
    for k in range(10):
        prompt = char_tok.encode(fmt.render_prompt("w" * (20 + 23 * k % 200)), add_special_tokens=False)
        reqs.append(sched.submit(prompt, SamplingParams(n=1 + k % 2, max_new_tokens=context - len(prompt),
                                                        ignore_eos=True, temperature=1.0)))
    peak = 0
    while sched.waiting or sched.running:
        if sched.waiting:
            sched._admit()
        sched._step()
        b = sched.backend
        if b is not None and b.k is not None:
            peak = max(peak, sum(c.numel() * c.element_size() for c in b.k + b.v))
            assert len(sched.running) <= rows and b.k[0].shape[0] <= rows and b.t <= 2 * context
    assert all(r.done.is_set() and r.error is None for r in reqs)
    assert 0 < peak <= bound, (peak, bound)


def test_a_model_with_mlp_biases_is_generated_by_its_own_forward(char_tok):
    """The fast backend fuses the MLP without biases: a Llama with ``mlp_bias`` is refused by name and "auto"
    falls back to the HF forward, so the tokens are the model's own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from thinkforge.generation.backends import FastBackend, HFBackend, make_backend

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(char_tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, mlp_bias=True)).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.bias.fill_(3.0)  # large enough to change the greedy tokens
    assert FastBackend.supports(model) == (False, "MLP biases")
    assert isinstance(make_backend(model), HFBackend)
    with pytest.raises(ValueError, match="MLP biases"):
        make_backend(model, "fast")
    ids = torch.tensor([char_tok.encode("abc", add_special_tokens=False)])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pad_token_id=char_tok.pad_token_id)[0, ids.shape[1]:].tolist()
    got = Engine(model, char_tok).generate(["abc"], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))[0]
    assert got.ids == ref
