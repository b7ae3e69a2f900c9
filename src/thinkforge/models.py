"""Models: load and save any Hugging Face causal LM, and build tiny ones from scratch.

    model, tok = load_model("Qwen/Qwen2.5-0.5B-Instruct")     # a hub id (needs the network) …
    model, tok = load_model("runs/demo/sft-cot")              # … or a local folder
    tok = char_tokenizer(task.sample_text())                   # one token per character + the tags
    model = tiny_model(tok, "small")                           # a LlamaForCausalLM, ~0.8M parameters

Everything is an ordinary HF checkpoint (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``chat_template.jinja``), so a model trained here loads in transformers or vLLM as it is.
A hub tokenizer without a chat template gets thinkforge's (see ``format``).
"""
from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from thinkforge import format as fmt

# Llama-class sizes; "small" is the probe model of the first demo (hidden 128, 3 layers, 0.79M parameters).
TINY_SIZES = {
    "micro": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192),
    "small": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512),
    "base": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
}


class ModelLoadError(RuntimeError):
    pass


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA if present, else CPU. Under torchrun, plain ``cuda`` means this process's own GPU
    (``cuda:$LOCAL_RANK``), made the current device so NCCL collectives use it."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (no native bf16 on most CPUs: ~100x slower matmuls), bf16 on GPUs that support it."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def char_tokenizer(texts: list[str] = ()):
    """A character-level tokenizer: printable ASCII, newline, every character of ``texts``, and the
    format's tags as single tokens. Unknown characters map to ``<|unk|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) | {ch for t in texts for ch in t})
    vocab = {tok: i for i, tok in enumerate(fmt.SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=fmt.UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(fmt.SPECIAL_TOKENS)  # or "<|im_start|>" would be split into characters
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=fmt.IM_END, pad_token=fmt.PAD, unk_token=fmt.UNK)
    hf.chat_template = fmt.CHAT_TEMPLATE
    return hf


def tiny_model(tokenizer, size: str = "small", seed: int = 0, **overrides):
    """A randomly initialised LlamaForCausalLM sized by ``TINY_SIZES[size]`` (fields overridable)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in TINY_SIZES:
        raise ValueError(f"tiny model size must be one of {sorted(TINY_SIZES)}, got {size!r}")
    defaults = dict(vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=True,
                    bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg = LlamaConfig(**{**defaults, **TINY_SIZES[size], **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _looks_local(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def load_model(name: str, device: str = "auto", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local folder or a hub id, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a model folder (no config.json)")
        if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise ModelLoadError(f"{path}: no tokenizer (expected tokenizer.json or tokenizer_config.json)")
    elif _looks_local(name):
        raise ModelLoadError(f"{name}: no such model folder")
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path) if path.exists() else name, dtype=dtype or default_dtype(dev)
        )
    except OSError as e:
        if path.exists():
            raise ModelLoadError(f"{path}: cannot load the model ({e})") from None
        raise ModelLoadError(
            f"no local folder {name!r}, and cannot load it from the Hugging Face hub ({str(e).splitlines()[0]}). "
            "Offline? Download it elsewhere and pass the local folder instead."
        ) from None
    except ValueError as e:  # e.g. an architecture that is not a causal LM
        raise ModelLoadError(f"{name}: not a causal language model transformers can load ({e})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = fmt.CHAT_TEMPLATE
    if model.get_input_embeddings().num_embeddings < len(tok):
        raise ModelLoadError(
            f"{name}: tokenizer has {len(tok)} tokens but the model's embedding has "
            f"{model.get_input_embeddings().num_embeddings}"
        )
    return model.to(dev).eval(), tok


def save_model(model, tokenizer, out: str | Path) -> Path:
    """Save an HF checkpoint atomically: written to a temporary sibling folder, then renamed into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing it; a crash at any point leaves a complete ``dst`` or ``src``."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)
