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


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render messages exactly as CHAT_TEMPLATE does (no Jinja needed on the hot path).

    >>> render_chat([{"role": "user", "content": "2+2?"}])
    '<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n'
    """
    parts = []
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] == "assistant" and i < len(messages) - 1:
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
    """A completion split into its parts. ``answer`` is the text inside the answer tags (or after
    ``</think>`` when there are none); ``well_formed`` is the R1 format rule: exactly one think block
    at the start, closed, then exactly one ``<answer>…</answer>`` (or ``\\boxed{}``) and nothing else."""

    thinking: str | None
    answer_text: str
    well_formed: bool
    truncated_thinking: bool  # <think> opened but never closed


_WELL_FORMED = re.compile(
    r"^<think>\n?(?P<think>(?:(?!<think>|</think>).)*?)\n?</think>\s*"
    r"(?P<ans><answer>(?:(?!<answer>|</answer>).)*?</answer>|[^<]*\\boxed\{.*\}[^<]*)\s*$",
    re.DOTALL,
)


def parse_completion(text: str) -> Parsed:
    """Split a completion into thinking and answer text.

    >>> p = parse_completion("<think>\\n2+2=4\\n</think>\\n<answer>4</answer><|im_end|>")
    >>> (p.thinking, p.answer_text, p.well_formed)
    ('2+2=4', '<answer>4</answer>', True)
    >>> parse_completion("<think>\\nhmm").truncated_thinking
    True
    """
    text = text.split(IM_END)[0]
    m = _WELL_FORMED.match(text.strip())
    if m:
        return Parsed(m.group("think"), m.group("ans").strip(), True, False)
    if THINK_CLOSE in text:
        before, after = text.rsplit(THINK_CLOSE, 1)
        thinking = before.rsplit(THINK_OPEN, 1)[-1].strip("\n")
        return Parsed(thinking, after.strip(), False, False)
    if THINK_OPEN in text:
        return Parsed(text.split(THINK_OPEN, 1)[1].strip("\n"), "", False, True)
    return Parsed(None, text.strip(), False, False)


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
