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
from dataclasses import dataclass

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
    """
    close = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)
    cut = split_at_subsequence(completion_ids, close)
    if cut is not None:
        return cut, len(completion_ids) - cut
    opener = tokenizer.encode(THINK_OPEN, add_special_tokens=False)
    if split_at_subsequence(completion_ids[: len(opener) + 2], opener) is not None:
        return len(completion_ids), 0
    return 0, len(completion_ids)
