"""Models: load and save any Hugging Face causal LM, and build tiny ones from scratch.

    model, tok = load_model("Qwen/Qwen2.5-0.5B-Instruct")     # a hub id (needs the network) …
    model, tok = load_model("runs/demo/sft-cot")              # … or a local folder
    tok = char_tokenizer(task.sample_text())                   # one token per character + the tags
    model = tiny_model(tok, "small")                           # a LlamaForCausalLM, ~0.8M parameters

Everything is an ordinary HF checkpoint (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``chat_template.jinja``), so a model trained here loads in transformers or vLLM as it is.
A hub tokenizer without a chat template gets thinkforge's (see ``format``).

LoRA (through ``peft``): :func:`add_lora` wraps a model so only adapter weights train; a folder holding
``adapter_config.json`` (a LoRA checkpoint) loads as its base model with the adapter applied;
:func:`base_only` runs the base model with the adapter off (the KL reference, without a second copy);
:func:`save_model` writes the adapter, and :func:`save_merged` a plain HF model with it merged.

:func:`token_logprobs`: log π of each next token, with the output head applied a block of positions at a
time, so (rows × length × vocab) float32 logits never exist at once (every trainer and scorer uses it).
"""
from __future__ import annotations

import contextlib
import functools
import json
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


def keeps_torch_threads(fn):
    """``fn`` may set torch's CPU thread count for its work (a command's ``threads``); it is restored when
    ``fn`` returns or raises, so a library caller (or the next test in the process) keeps its own."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapped


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


def load_model(name: str, device: str = "auto", dtype: torch.dtype | None = None, trainable: bool = False,
               weights: bool = True):
    """(model, tokenizer) from a local folder or a hub id, in eval mode on ``device``. A LoRA folder loads its
    base model (``base_model_name_or_path`` in its adapter config) with the adapter on top (``trainable``:
    the adapter's weights require gradients, to resume training). ``weights=False``: the architecture only,
    its parameters on the meta device (no memory; buffers such as rotary tables real, on the CPU), for a
    process that receives its shard of the weights from another (FSDP2 loading)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (Path(name).expanduser() / "adapter_config.json").is_file():
        return _load_adapter(Path(name).expanduser(), device, dtype, trainable)
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
        if weights:
            model = AutoModelForCausalLM.from_pretrained(
                str(path) if path.exists() else name, dtype=dtype or default_dtype(dev)
            )
        else:
            with _parameters_on_meta():
                config = AutoConfig.from_pretrained(str(path) if path.exists() else name)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype or default_dtype(dev))
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
    return (model.to(dev) if weights else model).eval(), tok


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside keep their parameters on the meta device (each allocated only while it is being
    registered) and their buffers for real: ``torch.device("meta")`` would leave rotary tables unset too."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def add_lora(model, base: str, r: int, alpha: float, targets: str = "all-linear", dropout: float = 0.0,
             keep: tuple[str, ...] = (), task_type: str = "CAUSAL_LM"):
    """``model`` with LoRA adapters (Hu et al. 2021) of rank ``r`` on ``targets`` ("all-linear": every linear
    layer but the output head, or comma-separated module names such as ``q_proj,v_proj``); only the adapters
    (and the modules named in ``keep``, trained whole, e.g. a reward model's head) require gradients.
    ``base``: the folder or hub id the weights came from, recorded so the adapter folder loads alone;
    ``task_type``: peft's name for the model's head (``TOKEN_CLS`` for the reward models)."""
    from peft import LoraConfig, get_peft_model

    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"need lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1; got {r}, {alpha}, {dropout}")
    names = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    if names != "all-linear":
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in names if t not in present]
        if missing or not names:
            raise ValueError(f"lora_targets: {missing or targets!r} not among this model's modules "
                             f"(linear layers: {sorted(n for n, m in _linears(model))[:12]}…)")
    path = Path(base).expanduser()
    where = str(path.resolve()) if path.exists() else base
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, task_type=task_type,
                     modules_to_save=list(keep) or None)
    wrapped = get_peft_model(model, cfg)
    wrapped.peft_config["default"].base_model_name_or_path = where
    return wrapped


def _linears(model):
    seen = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            seen[n.rsplit(".", 1)[-1]] = m
    return seen.items()


def _load_adapter(path: Path, device: str, dtype, trainable: bool):
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{path}: a LoRA adapter without base_model_name_or_path in adapter_config.json")
    model, tok = load_model(base, device, dtype)
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(str(path))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    model = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    return model.eval(), tok


def _sharded(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)] if isinstance(model, FSDPModule) else []


def is_sharded(model) -> bool:
    """Whether ``model`` is sharded with FSDP2 (``fully_shard``)."""
    return bool(_sharded(model))


@contextlib.contextmanager
def full_weights(model):
    """A context in which an FSDP2-sharded model holds its full parameters (all-gathered once, so generation
    needs no collective per step; every process must enter it together); a no-op for other models."""
    mods = _sharded(model)
    for m in mods:
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()


def base_only(model):
    """A context in which ``model`` runs as its base model (LoRA adapters off); a no-op for other models."""
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


def adapted_weight(layer) -> torch.Tensor:
    """A linear layer's effective weight: with LoRA adapters (peft), the base weight plus every active adapter's
    delta s·BA, unless the adapters are disabled (the KL reference) or already merged into the base; the base
    itself is never changed."""
    if not hasattr(layer, "base_layer"):
        return layer.weight
    w = layer.base_layer.weight
    if layer.disable_adapters or layer.merged:
        return w
    for a in layer.active_adapters:
        if a in layer.lora_A:
            w = w + layer.get_delta_weight(a).to(w.dtype)
    return w


def merged_state_dict(model) -> dict:
    """The plain model's weights with every LoRA delta added (W + s·BA), under the base model's own names;
    the adapter itself is left as it is (nothing merged in place)."""
    base = model.get_base_model()
    out = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = value
    for name, module in base.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            out[f"{name}.weight"] = adapted_weight(module).detach()
    return out


def save_merged(model, tokenizer, out: str | Path) -> Path:
    """A plain HF checkpoint of a LoRA model with its adapter merged, written atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(model))
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_model(model, tokenizer, out: str | Path) -> Path:
    """Save an HF checkpoint atomically: written to a temporary sibling folder, then renamed into place (a
    LoRA model writes its adapter: ``adapter_config.json``, ``adapter_model.safetensors``). An FSDP2-sharded
    model is written by every process at once (:func:`write_sharded_weights`): every process must call."""
    out = Path(out)
    if is_sharded(model):
        return _save_sharded(model, tokenizer, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


SAFETENSORS_FILE_BYTES = 2 * 2**30  # a sharded model's weights go to files of about this size (HF's index format)


def shared_tempdir(parent: Path, prefix: str) -> Path:
    """A new temporary folder in ``parent``, made by rank 0 and named to every process (collective)."""
    import torch.distributed as dist

    parent.mkdir(parents=True, exist_ok=True)
    name = [tempfile.mkdtemp(prefix=prefix, dir=parent) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def write_sharded_weights(model, folder: Path) -> None:
    """An FSDP2-sharded model's weights as a plain HF folder (``config.json``, ``model*.safetensors``), gathered
    nowhere: every process writes its own shard of every tensor (torch.distributed.checkpoint's safetensors
    writer), then rank 0 joins the pieces one tensor at a time (its memory grows by the largest tensor, not by
    the model). One copy of a tied weight, as ``save_pretrained`` writes. Collective."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model)  # this process's shards (DTensors), nothing gathered
    if getattr(model.config, "tie_word_embeddings", False):
        for tied in (getattr(model, "all_tied_weights_keys", None) or {}):
            sd.pop(tied, None)
    index, file, size = {}, 1, 0
    for key, value in sd.items():  # files of at most ~SAFETENSORS_FILE_BYTES, in the state dict's order
        nbytes = value.numel() * value.element_size()
        if size and size + nbytes > SAFETENSORS_FILE_BYTES:
            file, size = file + 1, 0
        index[key], size = file, size + nbytes
    dcp.save(sd, storage_writer=dcp.HuggingFaceStorageWriter(
        str(folder), fqn_to_index_mapping=index, save_distributed=True, enable_consolidation=True))
    if dist.get_rank() == 0:
        shutil.rmtree(folder / "sharded", ignore_errors=True)  # the per-process pieces, now joined
        files = sorted(folder.glob("model-*.safetensors"))
        if len(files) == 1:  # one file: the name save_pretrained gives it
            files[0].rename(folder / "model.safetensors")
            (folder / "model.safetensors.index.json").unlink()
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)


def _save_sharded(model, tokenizer, out: Path) -> Path:
    import torch.distributed as dist

    tmp = shared_tempdir(out.parent, f".{out.name}.")
    try:
        write_sharded_weights(model, tmp)
        if dist.get_rank() == 0:
            tokenizer.save_pretrained(tmp)
            replace_dir(tmp, out)
    finally:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()  # no process reads ``out`` before it is in place
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


LOGIT_BLOCK_BYTES = 64 * 2**20  # float32 logits that exist at once: a (rows, V) block of 64 MB, not (N, L, V)


def logit_rows(vocab: int) -> int:
    """Token positions per block of logits: 110 at a 151,936-token vocabulary, the whole batch at a small one.

    >>> logit_rows(151_936), logit_rows(108)
    (110, 155344)
    """
    return max(16, LOGIT_BLOCK_BYTES // (4 * vocab))


def token_logprobs(model, ids: torch.Tensor, temperature: float, with_entropy: bool = False, rows: int | None = None):
    """log π(ids[t+1] | ids[:t+1]) for every t under logits / temperature: (N, L-1) (and the entropy).

    The (N, L, V) float32 logits are never built: the model returns its last hidden states (and the logits
    of one position only), and :class:`_HeadLogprob` applies the output head ``rows`` positions at a time,
    forward and backward (the backward recomputes each block instead of keeping it). A 150k-token vocabulary
    at 8 × 4,096 tokens would otherwise be 20 GB of float32 per forward. Models whose head is not a plain
    linear layer (logit soft-capping, scaling) take the direct path. An FSDP2-sharded model runs the same
    inside :func:`gathered_call`."""
    return gathered_call(model, _token_logprobs, ids, temperature, with_entropy, rows)


def _token_logprobs(model, ids, temperature, with_entropy, rows):
    head = plain_head(model)
    if head is None:
        logits = model(input_ids=ids).logits[:, :-1].float() / temperature  # (N, L-1, V)
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, ids[:, 1:, None])[..., 0]  # (N, L-1)
        return logp, (-(logp_all.exp() * logp_all).sum(-1).detach() if with_entropy else None)
    hidden = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, :-1]  # (N, L-1, H)
    N, L, H = hidden.shape
    entropy = torch.empty(N * L, device=hidden.device) if with_entropy else None
    logp = head_logprobs(head, hidden.reshape(N * L, H), ids[:, 1:].reshape(-1), temperature, rows, entropy=entropy)
    return logp.view(N, L), (entropy.view(N, L) if with_entropy else None)


def head_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, rows: int | None = None,
                  entropy: torch.Tensor | None = None, correct: torch.Tensor | None = None) -> torch.Tensor:
    """log_softmax(hidden @ head.weight.T / T)[targets] for (n, H) hidden states: (n,), a block of ``rows``
    positions at a time (:class:`_HeadLogprob`). Optional outputs, filled without a graph: ``entropy`` (n,)
    and ``correct`` (n,), whether the target is the argmax."""
    rows = rows or logit_rows(head.weight.shape[0])
    return _HeadLogprob.apply(hidden, head.weight, targets, temperature, rows, entropy, correct)


def gathered_call(model, fn, *args):
    """``fn(model, *args)`` with an FSDP2-sharded model's root parameters (embeddings, final norm, output
    head) gathered as in its own forward, and its layers gathering theirs as they run; gradients are
    reduce-scattered in the backward as after a forward. This lets the output head be applied in blocks
    under FSDP too. Collective: every process calls it. A plain call for other models."""
    if not is_sharded(model):
        return fn(model, *args)
    if not hasattr(model, "thinkforge_gathered"):
        import types

        from torch.distributed.fsdp import register_fsdp_forward_method

        model.thinkforge_gathered = types.MethodType(lambda self, f, *a: f(self, *a), model)
        register_fsdp_forward_method(model, "thinkforge_gathered")
    return model.thinkforge_gathered(fn, *args)


def plain_head(model):
    """The output head when logits are exactly ``hidden @ W.T`` (no bias, cap or scale), else None."""
    inner = getattr(model, "module", model)  # DDP
    cfg = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if (cfg is None or not isinstance(head, torch.nn.Linear) or head.bias is not None
            or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
            or type(head.weight) is not torch.nn.Parameter):  # (a sharded weight outside gathered_call: DTensor)
        return None
    return head


class _HeadLogprob(torch.autograd.Function):
    """logp[i] = log_softmax(h[i] @ W.T / T)[y[i]], computed ``rows`` positions at a time; the backward
    recomputes each block's softmax: d logp / d z = onehot(y) - softmax(z)."""

    @staticmethod
    @torch.autocast("cuda", enabled=False)  # the head in fp32 under mixed precision: log-probs feed ratios
    @torch.autocast("cpu", enabled=False)
    def forward(ctx, h, w, y, temperature, rows, entropy, correct):
        out = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        wf = w.float()  # the weight itself when fp32 (trainers keep fp32 master weights)
        for i in range(0, h.shape[0], rows):
            z = (h[i : i + rows].float() @ wf.T) / temperature  # (rows, V)
            lse = torch.logsumexp(z, -1)
            out[i : i + rows] = z.gather(-1, y[i : i + rows, None])[:, 0] - lse
            if entropy is not None:
                p = torch.softmax(z, -1)
                entropy[i : i + rows] = lse - (p * z).sum(-1)
            if correct is not None:
                correct[i : i + rows] = z.argmax(-1) == y[i : i + rows]
        ctx.save_for_backward(h, w, y)
        ctx.temperature, ctx.rows = temperature, rows
        return out

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad):
        h, w, y = ctx.saved_tensors
        gh = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        wf = w.float()
        for i in range(0, h.shape[0], ctx.rows):
            hb = h[i : i + ctx.rows].float()
            z = (hb @ wf.T) / ctx.temperature
            gz = -torch.softmax(z, -1)
            gz.scatter_add_(-1, y[i : i + ctx.rows, None], torch.ones_like(gz[:, :1]))
            gz *= grad[i : i + ctx.rows, None] / ctx.temperature  # (rows, V)
            if gh is not None:
                gh[i : i + ctx.rows] = (gz @ wf).to(h.dtype)
            if gw is not None:
                gw += gz.T @ hb
        return gh, (gw.to(w.dtype) if gw is not None else None), None, None, None, None, None
