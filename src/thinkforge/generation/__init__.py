"""The generation engine: one sampler for RL roll-outs, evaluation and serving.

    engine = Engine(model, tokenizer)
    outs = engine.generate(["<|im_start|>user\\n347*89<|im_end|>\\n<|im_start|>assistant\\n"],
                           SamplingParams(n=8, temperature=1.0, max_new_tokens=128, thinking_budget=64))
    outs[0].text, outs[0].logprobs, outs[0].mask, outs[0].finish_reason, outs[0].thinking_tokens

What it does per step: one forward of the active rows through a backend (KV cache), sampling
(temperature, top-k, top-p, greedy at temperature 0) from one seeded ``torch.Generator``, then per
sequence: forced tokens, stop rules and the thinking budget. Finished rows leave the batch (their cache
rows are dropped), so they stop costing compute. Identical prompts (GRPO's G samples of one problem)
are prefilled once and their cache rows copied.

Thinking control:
- ``thinking_budget=B``: at most B sampled tokens after ``<think>``; then the engine forces ``</think>`` (and a
  newline) and the model writes its answer. Finish reason ``budget`` marks a completion whose thinking
  was cut and whose answer then ended normally.
- ``wait_rounds=k`` (budget forcing, Muennighoff et al. 2025 "s1"): the first k times the model ends its
  thinking, ``</think>`` is replaced by ``wait_text`` ("\\nWait") so it thinks longer. Needs ``</think>``
  to be one token (true for thinkforge's tokenizers, Qwen3, DeepSeek-R1 distills); checked up front.
- Tags spelled by several tokens (a BPE tokenizer without ``<think>`` as a token): the engine finds them
  in the decoded tail of each sequence instead of matching one id, so budgets, reasoning-token counts and
  the thinking split work the same; a budget that runs out inside a half-written ``</think>`` forces only
  its rest.
- Templates whose generation prompt opens the thinking (``format.ChatFormat.opener``, DeepSeek-R1
  distills): a prompt that ends at the assistant header gets the opener forced as its first tokens.

Forced tokens have ``mask = 0``: trainers exclude them from the loss. ``logprobs`` are those of the
sampling distribution (logits / temperature, before top-k/top-p truncation; raw logits at temperature 0
and 1), which is what an importance ratio in RL needs.

Stop rules match token ids: EOS ids (tokenizer's and generation config's) and the token encodings of
``stop`` strings (default: the chat template's end of turn, ``ChatFormat.end``). A stop string that a BPE
model spells with other tokens is not caught; end-of-turn tokens are single special tokens in every
template family (the server also matches its clients' ``stop`` strings on decoded text).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from thinkforge.format import THINK_CLOSE, THINK_OPEN, ChatFormat, count_reasoning_tokens
from thinkforge.generation.backends import make_backend
from thinkforge.models import full_weights

# Reasoning effort -> thinking budget in tokens: the one table the server (reasoning.effort,
# reasoning_effort) and test-time search share. "none" answers without thinking: the prompt is prefilled
# with an empty think block. "xhigh" has no cap but max_new_tokens. Budgets are sized for the tiny
# models trained here (their traces are 20-60 tokens); a served hub model may want them scaled.
EFFORT_BUDGETS: dict[str, int | None] = {"none": 0, "minimal": 8, "low": 32, "medium": 128, "high": 512, "xhigh": None,
                                          "max": None}
GREEDY_BELOW = 1e-5  # a temperature under this samples greedily (as vLLM): dividing by it overflows to NaN


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 (or anything below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    n: int = 1  # samples per prompt
    seed: int | list[int] | None = 0  # a list: one random stream per prompt (see the module's docstring)
    stop: list[str] | None = None  # None: the chat template's end of turn
    ignore_eos: bool = False  # no stop rule at all (benchmarks: always generate max_new_tokens)
    thinking_budget: int | None = None
    wait_rounds: int = 0
    wait_text: str = "\nWait"

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.n < 1:
            raise ValueError(
                f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0, n >= 1; got temperature={self.temperature}, "
                f"top_p={self.top_p}, top_k={self.top_k}, n={self.n}"
            )
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise ValueError(f"thinking_budget must be >= 0, got {self.thinking_budget}")


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # generated tokens, forced ones included, the stop token included
    logprobs: list[float]
    mask: list[int]  # 1 = sampled by the model, 0 = forced by the engine
    text: str  # decoded ids without the final stop token/string
    finish_reason: str  # "stop" | "length" | "budget"
    thinking_tokens: int
    answer_tokens: int
    waits: int = 0
    forced_spans: list = field(default_factory=list)  # [start, end) character offsets in ``text`` of forced tokens


class _Seq:
    """Per-sequence bookkeeping of one row while it generates."""

    __slots__ = ("ids", "logprobs", "mask", "forced", "opened", "closed", "think", "waits", "budget_hit", "done")

    def __init__(self, forced: list[int] | None = None):
        self.ids, self.logprobs, self.mask, self.forced = [], [], [], list(forced or [])
        self.opened = self.closed = self.budget_hit = False
        self.think = self.waits = 0
        self.done: str | None = None


class Engine:
    def __init__(self, model, tokenizer, backend="auto"):
        """``backend``: "auto" (fast when the architecture allows), "fast", "hf", or a factory
        ``model -> backend`` (tests use a scripted one)."""
        self.model, self.tok = model, tokenizer
        self.backend_name = backend
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        self.open_ids, self.close_ids, self.nl_id = enc(THINK_OPEN), enc(THINK_CLOSE), enc("\n")
        self.one_token_tags = len(self.open_ids) == 1 and len(self.close_ids) == 1
        self.chat = ChatFormat.of(tokenizer)
        self.opener_ids = enc(self.chat.opener) if self.chat.opener else []
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
        self.eos_ids = {e for e in eos if e is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams, on_step=None) -> list[Completion]:
        """Complete every prompt ``params.n`` times; results are grouped by prompt (prompt 0's n first).

        ``on_step(rows)``, if given, is called after every step with ``[(row, token id), …]`` for the rows
        that emitted a token (row = index in the result list): what a streaming server needs. An FSDP2-sharded
        model is unsharded for the call (:func:`models.full_weights`: every process must call, even with no
        prompts)."""
        with full_weights(self.model):
            return self._generate(prompts, params, on_step) if prompts else []

    def _generate(self, prompts, params: SamplingParams, on_step) -> list[Completion]:
        p_ids = [self.tok.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p) for p in prompts]
        if any(len(p) == 0 for p in p_ids):
            raise ValueError("empty prompt")
        if params.wait_rounds and len(self.close_ids) != 1:
            raise ValueError(f"budget forcing needs {THINK_CLOSE} to be one token; this tokenizer uses {len(self.close_ids)}")
        device = next(self.model.parameters()).device
        if isinstance(params.seed, (list, tuple)):
            if len(params.seed) != len(p_ids):
                raise ValueError(f"{len(params.seed)} seeds for {len(p_ids)} prompts: give one seed per prompt")
            gen = [torch.Generator(device=device).manual_seed(s) for s in params.seed]
        else:
            # Unseeded: a fresh seed for this stream only (torch.seed() would reseed the global generator too,
            # on which a caller's torch.manual_seed reproducibility depends).
            gen = torch.Generator(device=device)
            if params.seed is None:
                gen.seed()
            else:
                gen.manual_seed(params.seed)
        stops = self.stop_ids(params)
        wait_ids = self.tok.encode(params.wait_text, add_special_tokens=False)
        watch = self.watch_ids(stops)

        backend = self.backend_name(self.model) if callable(self.backend_name) else make_backend(self.model, self.backend_name)
        rows = [i for i in range(len(p_ids)) for _ in range(params.n)]  # row -> prompt index
        logits = backend.prefill(p_ids, params.n, params.max_new_tokens)  # (B, V)
        seqs = [s for p in p_ids for s in self.new_seqs(p, params.n)]
        active = list(range(len(rows)))  # seqs still generating, in backend row order
        uniforms = _PromptUniforms(gen, params.n, device) if isinstance(gen, list) else None
        for step in range(params.max_new_tokens):
            u = uniforms(step, active) if uniforms is not None else None
            tokens, logps = _sample(logits, params, gen, u)  # (b,), (b,)
            tokens_l, logps_l = tokens.tolist(), logps.tolist()
            for j, s_idx in enumerate(active):
                tokens_l[j] = self._advance(seqs[s_idx], tokens_l[j], logps_l[j], params, stops, wait_ids, watch)
            if on_step is not None:
                on_step([(s_idx, tokens_l[j]) for j, s_idx in enumerate(active)])
            if step == params.max_new_tokens - 1:
                break
            keep = [j for j, s_idx in enumerate(active) if seqs[s_idx].done is None]
            if not keep:
                break
            if len(keep) < len(active):
                # With one stream per prompt a row's draw does not depend on its place in the batch, so the last
                # rows may move into the holes (only they are copied); one shared stream draws in row order.
                order = backend.select(keep, reorder=True) if isinstance(gen, list) else backend.select(keep)
                order = keep if order is None else order  # a backend may move kept rows into the holes
                active = [active[j] for j in order]
                tokens_l = [tokens_l[j] for j in order]
            logits = backend.decode(torch.tensor(tokens_l, device=device))
        return [self._finish(seqs[i], p_ids[rows[i]], params, stops) for i in range(len(rows))]

    def stop_ids(self, params: SamplingParams) -> list[list[int]]:
        stops = [self.tok.encode(x, add_special_tokens=False) for x in (params.stop if params.stop is not None
                                                                          else [self.chat.end])]
        return [x for x in stops if x]

    def watch_ids(self, stops: list[list[int]]) -> frozenset | None:
        """The tokens after which :meth:`_advance` must look at a sequence's tail (tags, EOS, the last token of
        each stop); any other sampled token only appends. None (always look) when the tags are several tokens."""
        if not self.one_token_tags:
            return None
        return frozenset(self.eos_ids | {x[-1] for x in stops} | {self.open_ids[0], self.close_ids[0]})

    def new_seqs(self, prompt_ids: list[int], n: int) -> list[_Seq]:
        """``n`` fresh sequences for a prompt; with the template's thinking opener forced first when the prompt
        ends at the assistant header (see the module docstring)."""
        forced = []
        if self.opener_ids and self.tok.decode(prompt_ids[-8:]).endswith(self.chat.header):
            forced = self.opener_ids
        return [_Seq(forced) for _ in range(n)]

    def _ends_with_tag(self, ids: list[int], tag_ids: list[int], tag: str) -> bool:
        if self.one_token_tags:
            return ids[-1] == tag_ids[0]
        return ids[-1:] != [] and tag in self.tok.decode(ids[-len(tag_ids) - 1 :])

    def _close_rest(self, ids: list[int]) -> list[int]:
        """Forced tokens that end the thinking: the rest of a half-written ``</think>`` if the tail is one."""
        if not self.one_token_tags:
            tail = self.tok.decode(ids[-len(self.close_ids) :])
            for k in range(len(THINK_CLOSE) - 1, 1, -1):
                if tail.endswith(THINK_CLOSE[:k]):
                    return self.tok.encode(THINK_CLOSE[k:], add_special_tokens=False) + self.nl_id
        return ([] if ids[-1] in self.nl_id else list(self.nl_id)) + self.close_ids + self.nl_id

    def _advance(self, s: _Seq, token: int, logp: float, params: SamplingParams, stops, wait_ids,
                 watch: frozenset | None = None) -> int:
        """Record one step of sequence ``s``; returns the token actually emitted (forced or sampled).
        ``watch`` (:meth:`watch_ids`): a sampled token outside it, with nothing forced pending and the thinking
        budget not reached by it, changes no state but the counts (the common step, kept short)."""
        thinking = s.opened and not s.closed
        if (watch is not None and not s.forced and token not in watch
                and (not thinking or params.thinking_budget is None or s.think + 1 < params.thinking_budget)):
            s.ids.append(token)
            s.logprobs.append(logp)
            s.mask.append(1)
            s.think += thinking
            if len(s.ids) >= params.max_new_tokens:
                s.done = "length"
            return token
        forced = bool(s.forced)
        if forced:
            token, logp = s.forced.pop(0), 0.0
        elif s.opened and not s.closed and token == self.close_ids[-1] and s.waits < params.wait_rounds:
            s.waits += 1  # s1 budget forcing: do not let it stop thinking yet
            token, logp, forced = wait_ids[0], 0.0, True
            s.forced = list(wait_ids[1:])
        s.ids.append(token)
        s.logprobs.append(logp)
        s.mask.append(0 if forced else 1)
        if not s.opened and self._ends_with_tag(s.ids, self.open_ids, THINK_OPEN):
            s.opened = True
        elif s.opened and not s.closed:
            if self._ends_with_tag(s.ids, self.close_ids, THINK_CLOSE):
                s.closed = True
            else:
                s.think += not forced  # the budget counts what the model wrote, not what was forced
                if params.thinking_budget is not None and s.think >= params.thinking_budget and not s.forced:
                    s.budget_hit = True
                    s.forced = self._close_rest(s.ids)
        if not s.forced and not params.ignore_eos and (
            token in self.eos_ids or any(s.ids[-len(x) :] == x for x in stops)
        ):
            s.done = "budget" if s.budget_hit else "stop"
        elif len(s.ids) >= params.max_new_tokens:
            s.done = "length"
        return token

    def _finish(self, s: _Seq, prompt_ids: list[int], params: SamplingParams, stops) -> Completion:
        body = s.ids
        if s.done in ("stop", "budget"):
            cut = next((len(x) for x in stops if body[-len(x) :] == x), 1)
            body = body[:-cut]
        think, answer = count_reasoning_tokens(s.ids, self.tok)
        return Completion(prompt_ids, s.ids, s.logprobs, s.mask, self.tok.decode(body), s.done or "length", think,
                          answer, s.waits, self._forced_spans(body, s.mask))

    def _forced_spans(self, body: list[int], mask: list[int]) -> list[list[int]]:
        """Character spans of the decoded ``body`` that runs of forced tokens (mask 0) produced: two prefix
        decodes per run (runs are few: an opener, a budget's close, a wait)."""
        spans, i = [], 0
        while i < len(body):
            if mask[i]:
                i += 1
                continue
            j = i
            while j < len(body) and not mask[j]:
                j += 1
            spans.append([len(self.tok.decode(body[:i])), len(self.tok.decode(body[:j]))])
            i = j
        return spans


class _PromptUniforms:
    """One uniform per active row, from its prompt's own stream: a prompt draws ``n`` numbers per step (one per
    sample, finished ones included), so what it draws at each step depends only on its own rows. Drawn
    ``chunk`` steps at a time: a CPU generator gives the same numbers however its draws are split (tested),
    and one draw per prompt per 64 steps replaces one per step."""

    def __init__(self, streams: list[torch.Generator], n: int, device, chunk: int = 64):
        self.streams, self.n, self.device, self.chunk = streams, n, device, chunk
        self.table, self.start, self.rows, self.at = None, 0, None, None

    def __call__(self, step: int, active: list[int]) -> torch.Tensor:
        n, chunk = self.n, self.chunk
        if self.table is None or step >= self.start + chunk:
            self.start = step
            self.table = torch.stack([torch.rand(chunk * n, generator=g, device=self.device) for g in self.streams])
        if active is not self.rows:  # rows left or moved: where each active row's numbers sit in the table
            self.rows = active
            self.at = torch.tensor([(s // n) * chunk * n + s % n for s in active], device=self.device)
        return self.table.view(-1)[self.at + (step - self.start) * n]  # (b,)


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator, u: torch.Tensor | None = None):
    """Sampled tokens and their logprobs under logits / temperature. logits: (B, V) float. Row i takes the
    token where the cumulative probability first exceeds u[i] (inverse-CDF sampling: the distribution of
    ``torch.multinomial``); ``u`` (B,) uniforms in [0, 1), drawn from ``gen`` when not given."""
    logits = logits.float()
    if params.temperature < GREEDY_BELOW:
        tokens = logits.argmax(-1)  # (B,)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    logp = torch.log_softmax(logits / params.temperature, -1)  # (B, V)
    filtered = logp
    if params.top_k:
        kth = logp.topk(min(params.top_k, logp.shape[-1]), -1).values[:, -1:]  # (B, 1)
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1:
        sorted_lp, order = filtered.sort(-1, descending=True)
        cum = sorted_lp.exp().cumsum(-1)
        drop = cum - sorted_lp.exp() > params.top_p  # keep the smallest prefix whose mass reaches top_p
        filtered = filtered.scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
    if u is None:  # one uniform per row from the shared stream (~4x cheaper than torch.multinomial per step)
        u = torch.rand(logits.shape[0], generator=gen, device=logits.device)
    cum = filtered.exp().cumsum(-1)  # (B, V); right=True skips tokens of zero probability
    tokens = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0].clamp(max=cum.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]
