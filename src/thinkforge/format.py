"""The reasoning format: how a prompt is rendered and how a completion splits into thinking and answer.

A completion in thinkforge's format reads

    <think>
    …step by step…
    </think>
    <answer>42</answer><|im_end|>

(the answer may also be given as ``\\boxed{42}``). Prompts use ChatML; the Jinja chat template below is
stored with every tokenizer thinkforge saves, so ``tokenizer.apply_chat_template`` in transformers,
vLLM or any OpenAI-compatible stack renders exactly the text that :func:`render_chat` renders here.

Like DeepSeek-R1's template, thinking is dropped from *earlier* assistant turns: the model never sees
its old chains of thought in the history. :func:`strip_thinking` is the one function that decides this;
the template does the same split (on the last ``</think>``) and a test checks that the two agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
IM_START, IM_END, PAD, UNK = "<|im_start|>", "<|im_end|>", "<|pad|>", "<|unk|>"
# Tokens a from-scratch tokenizer keeps whole. A hub tokenizer may split the tags; the code never relies on that.
SPECIAL_TOKENS = [PAD, UNK, IM_START, IM_END, THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]
STOP_STRINGS = [IM_END]
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n"  # prefilled after the prompt to answer without thinking

CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and not loop.last and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip() -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def strip_thinking(content: str) -> str:
    """What the model sees of an earlier assistant turn: the text after the last ``</think>``."""
    return content.split(THINK_CLOSE)[-1].lstrip() if THINK_CLOSE in content else content


def render_chat(messages: list[dict], add_generation_prompt: bool = True, keep_thinking: bool = False) -> str:
    """Render messages exactly as CHAT_TEMPLATE does (no Jinja needed on the hot path). ``keep_thinking``:
    earlier assistant turns keep their think block (a client asked for all turns' reasoning).

    >>> render_chat([{"role": "user", "content": "2+2?"}])
    '<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n'
    """
    parts = []
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] == "assistant" and i < len(messages) - 1 and not keep_thinking:
            content = strip_thinking(content)
        parts.append(f"{IM_START}{m['role']}\n{content}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def render_prompt(question: str, system: str | None = None) -> str:
    """The prompt text for one question (optionally with a system message)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return render_chat(messages)


@dataclass(frozen=True)
class ChatFormat:
    """How one tokenizer's chat template frames a conversation: what every prompt, training target and
    stop rule is built from. ``ChatFormat.of(tokenizer)`` reads it from the tokenizer's own template.

    - ``template``: None for thinkforge's ChatML (rendered by :func:`render_chat`, no Jinja), else the
      tokenizer's template, rendered by ``apply_chat_template`` with ``enable_thinking`` when it has that
      switch (Qwen3-style);
    - ``end``: the text an assistant turn ends with (``<|im_end|>``, ``<|eot_id|>``, ``</s>``…), read off the
      template: the stop string of generation and the last token of an SFT target;
    - ``header``: the text a generation prompt ends with (``<|im_start|>assistant\\n``);
    - ``opener``: what the template writes after the header to open the thinking (DeepSeek-R1 distills:
      ``<think>\\n``), else "". thinkforge keeps that opener in the *completion*: :meth:`render` ends at the
      header and the engine forces the opener as the completion's first tokens (mask 0), so prompt + the
      completion text is the template's text exactly and every completion reads ``<think>…`` whatever the
      template;
    - ``no_thinking``: what follows the header to answer without thinking (the template's own
      ``enable_thinking=False`` text when it has the switch, else an empty think block).

    Earlier assistant turns lose their thinking (:meth:`history`), unless ``keep_thinking``: a template that
    drops it itself (``drops_thinking``, found by rendering a probe history) does it its own way; for the
    others thinkforge cuts it before the template sees the messages."""

    template: str | None
    end: str
    header: str
    opener: str = ""
    no_thinking: str = EMPTY_THINK
    switch: bool = False
    drops_thinking: bool = True
    tokenizer: object = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, tokenizer) -> ChatFormat:
        """The tokenizer's format (cached on the tokenizer; thinkforge's ChatML when it has no template)."""
        cached = getattr(tokenizer, "_thinkforge_chat", None)
        template = getattr(tokenizer, "chat_template", None)
        if cached is not None and cached.template == (None if template in (None, CHAT_TEMPLATE) else template):
            return cached
        if template in (None, CHAT_TEMPLATE):
            made = cls(None, IM_END, f"{IM_START}assistant\n", tokenizer=tokenizer)
        else:
            made = cls._read(tokenizer, template)
        tokenizer._thinkforge_chat = made
        return made

    @classmethod
    def _read(cls, tok, template: str) -> ChatFormat:
        switch = "enable_thinking" in template
        kw = {"enable_thinking": True} if switch else {}
        apply = lambda msgs, gen, **k: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **k)  # noqa: E731
        user = [{"role": "user", "content": "\ue000"}]
        bare, gen = apply(user, False, **kw), apply(user, True, **kw)
        if not gen.startswith(bare) or gen == bare:
            raise ValueError("this tokenizer's chat template adds no assistant header for add_generation_prompt=True; "
                             "thinkforge renders prompts by it, so it must (see ChatFormat)")
        header = gen[len(bare):]
        opener = ""
        if header.rstrip().endswith(THINK_OPEN):
            cut = header.rfind(THINK_OPEN)
            header, opener = header[:cut], header[cut:]
        turn = apply(user + [{"role": "assistant", "content": "\ue001"}], False, **kw)
        end = turn[turn.rfind("\ue001") + 1 :].strip() if "\ue001" in turn else ""
        end = end or getattr(tok, "eos_token", None) or ""
        if not end:
            raise ValueError("cannot tell how this chat template ends an assistant turn, and the tokenizer has no "
                             "eos_token: set tokenizer.eos_token to the end-of-turn token")
        no_thinking = EMPTY_THINK
        if switch:
            off = apply(user, True, enable_thinking=False)
            no_thinking = off[len(bare) + len(header):] if off.startswith(bare + header) else EMPTY_THINK
        probe = [*user, {"role": "assistant", "content": f"{THINK_OPEN}\n\ue002\n{THINK_CLOSE}\nok"}, *user]
        drops = "\ue002" not in apply(probe, True, **kw)
        return cls(template, end, header, opener, no_thinking or EMPTY_THINK, switch, drops, tok)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, keep_thinking: bool = False,
               thinking: bool = True) -> str:
        """The prompt text of a conversation, ending at the assistant header (see the class docstring);
        ``thinking=False`` adds :attr:`no_thinking` so the model answers at once."""
        if self.template is None:
            text = render_chat(messages, add_generation_prompt, keep_thinking)
        else:
            kw = {"enable_thinking": True} if self.switch else {}
            text = self.tokenizer.apply_chat_template(self.history(messages, keep_thinking), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kw)
            if add_generation_prompt and self.opener and text.endswith(self.opener):
                text = text[: -len(self.opener)]
        return text + self.no_thinking if add_generation_prompt and not thinking else text

    def history(self, messages: list[dict], keep_thinking: bool = False) -> list[dict]:
        """``messages`` as the template gets them: earlier assistant turns cut after their last ``</think>``
        (:func:`strip_thinking`) unless the template drops thinking its own way or ``keep_thinking``."""
        if keep_thinking or (self.template is not None and self.drops_thinking):
            return messages
        return [{**m, "content": strip_thinking(m["content"])} if m["role"] == "assistant" and i < len(messages) - 1
                else m for i, m in enumerate(messages)]

    def prompt(self, question: str, system: str | None = None, thinking: bool = True) -> str:
        """The prompt for one question (optionally with a system message)."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        return self.render(messages, thinking=thinking)

    def as_prompt(self, text: str) -> str:
        """``text`` if it is a rendered prompt already (it ends at the assistant header), else its rendering as
        one user message: what a data file's ``prompt`` field means."""
        return text if text.rstrip().endswith(self.header.rstrip()) else self.prompt(text)

    def completion(self, answer: str, thinking: str | None = None) -> str:
        """A training target: :func:`render_completion` and the end of the turn."""
        return render_completion(answer, thinking) + self.end


def render_completion(answer: str, thinking: str | None = None) -> str:
    """The target text of a completion, without the end-of-turn token.

    >>> render_completion("42", "6*7=42")
    '<think>\\n6*7=42\\n</think>\\n<answer>42</answer>'
    >>> render_completion("42")
    '<answer>42</answer>'
    """
    body = f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"
    return body if thinking is None else f"{THINK_OPEN}\n{thinking}\n{THINK_CLOSE}\n{body}"


@dataclass
class Parsed:
    """A completion split into its parts — the one split every module uses (grader, server, rewards,
    reward models), so what is scored is what is shown.

    - ``thinking``: the text between ``<think>`` and the *first* ``</think>`` (None without a think
      block; the first close is the one a left-to-right reader, a stream and a token count see);
    - ``answer``: what the grader scores and the server shows: the content of the *last*
      ``<answer>`` block of the text after the thinking (to ``</answer>`` or the end), else that whole
      text; stray tags removed, surrounding white space stripped; ``""`` while the thinking is open;
    - ``tagged``: the answer came from ``<answer>`` tags (else from free text, where a grader looks
      for ``\\boxed{}`` or the last number);
    - ``well_formed``: the R1 format rule: exactly one think block at the start, closed, then exactly
      one ``<answer>…</answer>`` (or ``\\boxed{}``) and nothing else;
    - ``thinking_start`` / ``answer_start``: offsets into the text (cut at ``<|im_end|>``) where the
      thinking content and the text after ``</think>`` begin, for code that must cut, not rewrite."""

    thinking: str | None
    answer: str
    tagged: bool
    well_formed: bool
    truncated_thinking: bool  # <think> opened but never closed
    thinking_start: int = 0
    answer_start: int = 0

    @property
    def thinking_closed(self) -> bool:
        return not self.truncated_thinking


_WELL_FORMED = re.compile(
    r"^<think>\n?(?P<think>(?:(?!<think>|</think>).)*?)\n?</think>\s*"
    r"(?P<ans><answer>(?:(?!<answer>|</answer>).)*?</answer>|[^<]*\\boxed\{.*\}[^<]*)\s*$",
    re.DOTALL,
)
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, IM_END)


def hold_back(s: str) -> str:
    """``s`` without a trailing partial tag (``"42</ans"`` -> ``"42"``), so streamed text never shows half a tag."""
    for tag in TAGS:
        for k in range(len(tag) - 1, 0, -1):
            if s.endswith(tag[:k]):
                return s[:-k]
    return s


def parse_completion(text: str, thinking_open: bool = False, partial: bool = False) -> Parsed:
    """Split a completion into thinking and answer (see :class:`Parsed`).

    ``thinking_open``: the prompt already opened ``<think>`` (templates that prefill it), so the
    completion starts inside the thinking. ``partial``: an unfinished completion being streamed; a
    trailing partial tag is held back.

    >>> p = parse_completion("<think>\\n2+2=4\\n</think>\\n<answer>4</answer><|im_end|>")
    >>> (p.thinking, p.answer, p.well_formed)
    ('2+2=4', '4', True)
    >>> parse_completion("<think>x</think><answer>a <answer>b</answer>").answer
    'b'
    >>> parse_completion("<think>\\nhmm \\\\boxed{3}").truncated_thinking, parse_completion("<think>\\nhmm").answer
    (True, '')
    """
    text = text.split(IM_END)[0]
    if partial:
        text = hold_back(text)
    well = bool(_WELL_FORMED.match((THINK_OPEN if thinking_open else "") + text.strip()))
    close = text.find(THINK_CLOSE)
    opened = text.find(THINK_OPEN, 0, close if close >= 0 else len(text))
    if close < 0 and opened < 0 and not thinking_open:
        return Parsed(None, *_answer(text), well, False, 0, 0)
    start = opened + len(THINK_OPEN) if opened >= 0 else 0
    if close < 0:
        return Parsed(text[start:].strip("\n"), "", False, well, True, start, len(text))
    answer, tagged = _answer(text[close + len(THINK_CLOSE):])
    return Parsed(text[start:close].strip("\n"), answer, tagged, well, False, start, close + len(THINK_CLOSE))


def _answer(region: str) -> tuple[str, bool]:
    """(answer, tagged) of the text after the thinking."""
    tagged = ANSWER_OPEN in region
    if tagged:
        region = region.rsplit(ANSWER_OPEN, 1)[1].split(ANSWER_CLOSE, 1)[0]
    for tag in TAGS:  # a confused model may repeat tags inside its answer: they are never graded or shown
        region = region.replace(tag, "")
    return region.strip(), tagged


def split_at_subsequence(ids: list[int], marker: list[int]) -> int | None:
    """Index just past the first occurrence of ``marker`` in ``ids`` (None if absent)."""
    n = len(marker)
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == marker:
            return i + n
    return None


def count_reasoning_tokens(completion_ids: list[int], tokenizer) -> tuple[int, int]:
    """(thinking tokens, answer tokens) of a completion: thinking runs up to and including ``</think>``.

    A completion that opens ``<think>`` and never closes it is all thinking; one without tags is all answer.
    Tags a BPE tokenizer spells in several pieces (and may merge with their neighbours) are found in the
    decoded text: the first prefix of the ids whose text holds the tag.
    """
    close = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)
    cut = split_at_subsequence(completion_ids, close)
    if cut is None and len(close) > 1:
        cut = _first_prefix_with(completion_ids, tokenizer, THINK_CLOSE)
    if cut is not None:
        return cut, len(completion_ids) - cut
    opener = tokenizer.encode(THINK_OPEN, add_special_tokens=False)
    head = completion_ids[: len(opener) + 2]
    if split_at_subsequence(head, opener) is not None or (len(opener) > 1 and THINK_OPEN in tokenizer.decode(head)):
        return len(completion_ids), 0
    return 0, len(completion_ids)


def _first_prefix_with(ids: list[int], tokenizer, tag: str) -> int | None:
    """The smallest k with ``tag`` in ``decode(ids[:k])`` (None if the whole text lacks it): a binary search."""
    if tag not in tokenizer.decode(ids):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if tag in tokenizer.decode(ids[:mid]) else (mid + 1, hi)
    return lo
