"""Tokenizers in the style of the main model families, built here (no hub access): a small byte-level BPE
trained on task text, each family's special tokens, and a chat template written after the family's own.

- ``qwen3``: ChatML, ``<think>``/``</think>`` single added tokens, the ``enable_thinking`` switch (off:
  the generation prompt carries an empty think block), earlier turns' thinking dropped by the template.
- ``llama3``: ``<|start_header_id|>role<|end_header_id|>`` headers, ``<|eot_id|>`` ends a turn, content
  trimmed by the template (``| trim``), a BOS token in the text; tags are several BPE tokens.
- ``r1distill``: DeepSeek-R1-Distill's ``<｜User｜>``/``<｜Assistant｜>`` markers, the generation prompt opens
  ``<think>\\n``, ``<｜end▁of▁sentence｜>`` ends a turn, the template drops earlier thinking itself; tags
  are several BPE tokens.
"""
from __future__ import annotations

QWEN3 = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)
LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
R1DISTILL = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- m['content'] -}}"
    "{%- elif m['role'] == 'user' -%}{{- '<｜User｜>' + m['content'] -}}"
    "{%- else -%}{%- set content = m['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)

FAMILIES = {
    # name: (template, special tokens, added non-special tokens, bos, eos, pad)
    "qwen3": (QWEN3, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>"], None, "<|im_end|>",
              "<|endoftext|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                        "<|finetune_right_pad_id|>"], [], "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
    "r1distill": (R1DISTILL, ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜▁pad▁｜>"],
                  [], "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"),
}


def family_tokenizer(name: str, texts: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer of family ``name`` trained on ``texts``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, special, added, bos, eos, pad = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in added])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    hf.chat_template = template
    return hf
