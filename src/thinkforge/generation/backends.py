"""Backends: how the engine runs a model forward with a KV cache. The engine only calls

    prefill(prompt_ids, n, max_new) -> logits (B, V)   # B = len(prompt_ids) * n, rows grouped by prompt
    decode(tokens (B,))             -> logits (B, V)   # one new token per active row
    select(rows) -> order                               # keep only these rows (finished ones leave); order[p]
                                                        # = the old index of the row now at p (None: rows)

and, for continuous batching (``generation.scheduler``), ``join(prompt_ids, n) -> logits of the new rows`` (``n``: one count, or one per prompt):
new prompts are prefilled on their own and their cache rows appended to the running batch, both sides
left-padded to a common length. The cache grows by chunks as rows decode (nothing is preallocated for a
request's ``max_tokens``) and leading slots no row uses any more are trimmed when rows leave.

``FastBackend`` runs the weights of Llama-family models (llama, qwen2, qwen3, mistral) directly: q/k/v
and gate/up projections fused into one matmul each (LoRA adapters on them merged into the fused weights
for the call, the base left untouched), a preallocated cache, one SDPA call per layer. On
a tiny model a decode step is dominated by per-call overhead, which is why HF ``generate`` spends
~23 ms per step here where the arithmetic needs ~4 ms; this path removes most of that overhead.
``HFBackend`` calls the model's own ``forward`` with a ``DynamicCache`` and works for any causal LM.
A vLLM backend for GPUs would implement the same three calls.

Prompts are left-padded; each row's positions start at 0 at its first real token, and pad slots are
masked out of attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from thinkforge.models import adapted_weight as _weight

FAST_TYPES = {"llama", "qwen2", "qwen3", "mistral"}
_CAUSAL = "causal"  # attention-mask sentinel: SDPA's own causal path (prefill without padding)
# The cache's time axis grows by max(GROW, capacity // 8) slots when full (nothing is preallocated for
# max_new_tokens). A decode step reads only slots [lo, t]: from the first slot any active row uses to the
# newest, neither the growth chunk ahead nor the leading slots of rows that left (under serving load 6% and
# 22% of the time axis: python bench/engine_ab.py --serve); the batched GEMMs take the slice as a view.
GROW = 16


def make_backend(model, name: str = "auto"):
    if name not in ("auto", "fast", "hf"):
        raise ValueError(f"backend must be auto, fast or hf, got {name!r}")
    fast_ok, why = FastBackend.supports(model)
    if name == "fast" and not fast_ok:
        raise ValueError(f"the fast backend cannot run this model: {why}")
    return FastBackend(model) if name != "hf" and fast_ok else HFBackend(model)


def _left_pad(prompt_ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), T), pad, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), T), dtype=torch.bool)
    for i, p in enumerate(prompt_ids):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = True
    return ids.to(device), mask.to(device)  # (P, T), (P, T)


def _repeats(P: int, n: int | list[int], device) -> torch.Tensor:
    """Row -> prompt index: prompt i repeated n (or n[i]) times."""
    counts = torch.tensor(n, device=device) if isinstance(n, list) else n
    return torch.arange(P, device=device).repeat_interleave(counts)


def _merge(a: torch.Tensor, have_a: int, b: torch.Tensor, have_b: int, t: int, cap: int) -> torch.Tensor:
    """Rows of a then rows of b in one zeroed cache of ``cap`` slots, each side's first ``have`` slots
    right-aligned at slot t (dim 2 for k/v, dim 1 for a (B, S) mask)."""
    dim = 2 if a.dim() == 4 else 1
    shape = list(a.shape)
    shape[0], shape[dim] = a.shape[0] + b.shape[0], cap
    out = a.new_zeros(shape)
    out.narrow(0, 0, a.shape[0]).narrow(dim, t - have_a, have_a).copy_(a.narrow(dim, 0, have_a))
    out.narrow(0, a.shape[0], b.shape[0]).narrow(dim, t - have_b, have_b).copy_(b.narrow(dim, 0, have_b))
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x * cos + rotate_half(x) * sin, with rotate_half's sign folded into ``sin_signed``
    (its first half negated) so that the halves are only swapped: one kernel fewer per call."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin_signed)


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with the first half of its last dimension negated: rotate_half's sign, for :func:`_rotate`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), -1)


def _residual(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x + h @ w.T, the add done by the GEMM itself (addmm) when there is no bias: one kernel, not two."""
    if bias is not None:
        return x + F.linear(h, w, bias)
    return torch.addmm(x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]), w.t()).view(x.shape)


_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _unwrap(model):
    """The transformers model under a peft wrapper (its LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _bias(p):
    return getattr(p, "base_layer", p).bias


class FastBackend:
    @staticmethod
    def supports(model) -> tuple[bool, str]:
        model = _unwrap(model)
        cfg = model.config
        if cfg.model_type not in FAST_TYPES:
            return False, f"model type {cfg.model_type!r} is not one of {sorted(FAST_TYPES)}"
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return False, f"activation {cfg.hidden_act!r}"
        if getattr(cfg, "mlp_bias", False):
            return False, "MLP biases"
        if getattr(cfg, "use_sliding_window", False) or (
            getattr(cfg, "sliding_window", None) and cfg.model_type == "mistral"
        ):
            return False, "sliding-window attention"
        adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A") or hasattr(m, "modules_to_save")}
        if adapted - _PROJECTIONS:
            return False, f"adapters on {sorted(adapted - _PROJECTIONS)} (only the attention and MLP projections are fused)"
        return True, ""

    def __init__(self, model):
        model = _unwrap(model)
        self.model, cfg = model, model.config
        self.k = None  # no running batch yet
        self.lo: int | None = None  # the first slot an active row uses (None: not known since rows changed)
        self.row_limit: int | None = None  # the most rows a scheduler will ever join (caps the store's growth)
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.embed_tokens = inner.embed_tokens  # called as a module, so its forward hooks (soft tokens) apply
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.head = model.lm_head.weight
        self.eps = cfg.rms_norm_eps
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.layers = []
        # Fused weights are rebuilt on every call, so a trainer's latest parameters are always used.
        for layer in inner.layers:
            a, mlp = layer.self_attn, layer.mlp
            projs = (a.q_proj, a.k_proj, a.v_proj)
            bias = None
            if any(_bias(p) is not None for p in projs):
                bias = torch.cat([_bias(p) if _bias(p) is not None else _weight(p).new_zeros(p.out_features) for p in projs])
            self.layers.append(
                dict(
                    ln1=layer.input_layernorm.weight,
                    ln2=layer.post_attention_layernorm.weight,
                    qkv=torch.cat([_weight(p) for p in projs]),
                    qkv_bias=bias,
                    o=_weight(a.o_proj),
                    o_bias=_bias(a.o_proj),
                    gate_up=torch.cat([_weight(mlp.gate_proj), _weight(mlp.up_proj)]),
                    down=_weight(mlp.down_proj),
                    q_norm=getattr(getattr(a, "q_norm", None), "weight", None),
                    k_norm=getattr(getattr(a, "k_norm", None), "weight", None),
                    scale=getattr(a, "scaling", self.head_dim**-0.5),
                )
            )

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, attn_mask) -> torch.Tensor:
        """ids, pos: (B, T); writes k/v at cache slots [self.t, self.t + T); returns last hidden (B, H)."""
        B, T = ids.shape
        x = self.embed_tokens(ids)  # (B, T, H)
        cos, sin = self._rotary(pos)  # (B, T, 1, hd)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        nq = nh * hd
        t0, t1 = self.t, self.t + T
        for i, L in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), L["ln1"], self.eps)
            heads = F.linear(h, L["qkv"], L["qkv_bias"]).view(B, T, nh + 2 * nkv, hd)
            qk = heads[:, :, : nh + nkv]
            if L["q_norm"] is not None:
                qk = torch.cat([F.rms_norm(qk[:, :, :nh], (hd,), L["q_norm"], self.eps),
                                F.rms_norm(qk[:, :, nh:], (hd,), L["k_norm"], self.eps)], dim=2)
            qk = _rotate(qk, cos, sin)  # queries and keys in one go: (B, T, nh + nkv, hd)
            q, k = qk[:, :, :nh].transpose(1, 2), qk[:, :, nh:].transpose(1, 2)  # (B, nh|nkv, T, hd)
            v = heads[:, :, nh + nkv :].transpose(1, 2)
            self.k[i][:B, :, t0:t1] = k  # rows past B are free slots of the store
            self.v[i][:B, :, t0:t1] = v
            if t0 == 0:  # a prefill (the store is fresh): every key is in this call's k, v
                att = self._attend(q, k, v, attn_mask, L["scale"])  # (B, nh, T, hd)
            else:  # a decode step: the slots [lo, t] rows use, those of other rows masked (see GROW)
                att = self._attend(q, self.k[i][:B, :, self.lo : t1], self.v[i][:B, :, self.lo : t1], attn_mask,
                                   L["scale"])
            x = _residual(x, att.transpose(1, 2).reshape(B, T, nq), L["o"], L["o_bias"])
            h = F.rms_norm(x, (x.shape[-1],), L["ln2"], self.eps)
            gate, up = F.linear(h, L["gate_up"]).chunk(2, dim=-1)  # (B, T, I) each
            x = _residual(x, F.silu(gate) * up, L["down"])
        self.t = t1
        return F.rms_norm(x[:, -1], (x.shape[-1],), self.norm.weight, self.eps)  # (B, H)

    def _rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see _rotate), (B, T, 1, hd), for positions ``pos`` (B, T): rows of a table the model's
        own rotary module computes once per length (doubling), instead of its ~6 kernels on every decode step."""
        if "dynamic" in str(getattr(self.rotary, "rope_type", "")):  # its frequencies depend on the length seen
            cos, sin = self.rotary(self.embed[:1, None], pos)
            return cos[:, :, None], _signed(sin)[:, :, None]
        need = int(pos.max()) + 1
        if getattr(self, "_rope_len", 0) < need:
            n = max(need, 2 * getattr(self, "_rope_len", 0), 256)
            at = torch.arange(n, device=pos.device)[None]
            cos, sin = self.rotary(self.embed[:1, None], at)  # (1, n, hd)
            self._cos, self._sin, self._rope_len = cos[0], _signed(sin[0]), n
        return self._cos[pos][:, :, None], self._sin[pos][:, :, None]

    def _attend(self, q, k, v, mask, scale):
        """q: (B, nh, T, hd); k, v: (B, nkv, S, hd); mask: (B, 1, T, S) bool, None, or _CAUSAL for a prefill;
        None or an additive (B * nkv, 1, S) bias (0 or -inf) for a decode step."""
        if mask is _CAUSAL and q.shape[2] == 1:  # a one-token prompt: nothing to mask
            mask = None
        if q.shape[2] > 1:  # prefill: SDPA's fused kernel
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if mask is _CAUSAL else mask, is_causal=mask is _CAUSAL,
                scale=scale, enable_gqa=self.n_kv != self.n_heads,
            )
        # One query per row: two plain batched matmuls beat SDPA's CPU kernel ~1.8x here (measured); the
        # scale and the mask go into the first one (baddbmm).
        B, nh, _, hd = q.shape
        nkv, S = self.n_kv, k.shape[2]
        q = q.reshape(B * nkv, nh // nkv, hd)  # the g query heads sharing one kv head
        kt = k.reshape(B * nkv, S, hd).transpose(1, 2)
        if mask is None:
            scores = torch.bmm(q, kt).mul_(scale)
        else:  # mask: (B * nkv, 1, S)
            scores = torch.baddbmm(mask, q, kt, alpha=scale)  # (B * nkv, g, S)
        return torch.bmm(torch.softmax(scores, -1), v.reshape(B * nkv, S, hd)).view(B, nh, 1, hd)

    def prefill(self, prompt_ids: list[list[int]], n: int, max_new: int) -> torch.Tensor:
        device, dtype = self.embed.device, self.embed.dtype
        ids, valid = _left_pad(prompt_ids, 0, device)  # (P, T)
        P, T = ids.shape
        self.capacity = T + min(max_new, GROW)
        self.t = 0
        shape = (P, self.n_kv, self.capacity, self.head_dim)
        # zeros, not empty: a decode step reads unused slots too (masked, but 0 * NaN would still be NaN)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers]
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (P, T)
        self.padded = not bool(valid.all())
        mask = _CAUSAL
        if self.padded:
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            # A pad query row with no valid key would give NaN: let it see itself (its output is unused).
            mask = ((causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device))[:, None]
        h = self._forward(ids, pos, mask)  # mask: (P, 1, T, T) or causal
        self.lo = None
        # Expand every prompt's cache to its n rows.
        rep = _repeats(P, n, device)
        self.k = [c.index_select(0, rep) for c in self.k]
        self.v = [c.index_select(0, rep) for c in self.v]
        self.valid = torch.zeros((len(rep), self.capacity), dtype=torch.bool, device=device)
        self.valid[:, :T] = valid.index_select(0, rep)
        self.next_pos = pos[:, -1].index_select(0, rep) + 1  # (B,)
        self.B = len(rep)
        return F.linear(h.index_select(0, rep), self.head)  # (B, V)

    def join(self, prompt_ids: list[list[int]], n: int | list[int]) -> torch.Tensor:
        """Prefill new prompts on their own, then write their rows into free rows of the store (rows past B)
        at slots [t - T_new, t): the running rows are neither copied nor touched unless the store grows."""
        if not self.rows():
            return self.prefill(prompt_ids, n, 16)
        state = {k: getattr(self, k) for k in ("k", "v", "valid", "next_pos", "t", "capacity", "padded", "B")}
        try:
            logits = self.prefill(prompt_ids, n, 0)
        finally:  # the running batch comes back whether the prefill worked or not
            new = {k: getattr(self, k) for k in state}
            self.__dict__.update(state)
        kn, T = new["B"], new["t"]
        if T > self.t:  # a prompt longer than the time axis so far: shift every row right (rare)
            self._reshape(self.k[0].shape[0], max(self.capacity + T - self.t, T + 16), shift=T - self.t)
        if self.B + kn > self.k[0].shape[0]:  # doubling, but never past the scheduler's row limit
            self._reshape(max(min(2 * self.k[0].shape[0], self.row_limit or 1 << 30), self.B + kn), self.capacity)
        b0, b1, t0 = self.B, self.B + kn, self.t - T
        for store, fresh in zip(self.k + self.v, new["k"] + new["v"]):
            store[b0:b1, :, : self.t].zero_()  # a reused row must not carry its last owner's values
            store[b0:b1, :, t0 : self.t] = fresh[:, :, :T]
        self.valid[b0:b1] = False
        self.valid[b0:b1, t0 : self.t] = new["valid"][:, :T]
        self.next_pos[b0:b1] = new["next_pos"]
        self.B, self.padded, self.lo = b1, True, None
        return logits

    def rows(self) -> int:
        return 0 if self.k is None else self.B

    def _reshape(self, rows: int, slots: int, shift: int = 0, start: int = 0) -> None:
        """A zeroed store of ``rows`` × ``slots`` holding the active rows' slots [start, t), moved to begin at
        slot ``shift``."""
        n = self.t - start

        def move(c):
            shape = list(c.shape)
            shape[0], shape[-1 if c.dim() == 2 else 2] = rows, slots
            if c.dim() == 2:  # valid: (rows, slots)
                out = c.new_zeros(shape)
                out[: self.B, shift : shift + n] = c[: self.B, start : self.t]
                return out
            out = c.new_empty(shape)  # k / v: zero only what the copy does not write (decode reads it, masked)
            out[self.B :].zero_()
            out[: self.B, :, :shift].zero_()
            out[: self.B, :, shift + n :].zero_()
            out[: self.B, :, shift : shift + n] = c[: self.B, :, start : self.t]
            return out

        self.k, self.v, self.valid = [move(c) for c in self.k], [move(c) for c in self.v], move(self.valid)
        pos = self.next_pos.new_zeros(rows)
        pos[: self.B] = self.next_pos[: self.B]
        self.next_pos, self.t, self.capacity, self.lo = pos, shift + n, slots, None

    def _first_used(self, end: int) -> int:
        """The first slot before ``end`` that an active row uses (``end`` when none does)."""
        used = self.valid[: self.B, :end].any(0)
        return int(used.float().argmax()) if bool(used.any()) else end

    def trim(self) -> None:
        """When the first half of the time axis is slots no active row uses, drop them: the active rows move
        left into a store sized to what they use (a copy paid once per halving: constant per decoded token)."""
        if not self.rows():
            self.k = None
            return
        first = self._first_used(self.t)
        if first >= max(64, self.t // 2):
            self._reshape(self.k[0].shape[0], self.t - first + GROW, start=first)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.t >= self.capacity:
            self._reshape(self.k[0].shape[0], self.capacity + max(GROW, self.capacity // 8))
        B = self.B
        self.valid[:B, self.t] = True
        if self.lo is None:
            self.lo = self._first_used(self.t + 1)
        mask = None
        if self.padded:  # one additive bias for every layer and kv head: 0 where a slot is valid, -inf elsewhere
            valid = self.valid[:B, self.lo : self.t + 1]
            mask = torch.zeros(valid.shape, dtype=self.embed.dtype, device=self.embed.device)
            mask = mask.masked_fill_(~valid, float("-inf")).repeat_interleave(self.n_kv, 0)[:, None]
        h = self._forward(tokens[:, None], self.next_pos[:B, None], mask)
        self.next_pos[:B] += 1
        return F.linear(h, self.head)  # (B, V)

    def select(self, rows: list[int], reorder: bool = False) -> list[int]:
        """Keep these rows (ascending old indices); returns the old index of each row in its new place.
        In order by default (the engine's seeded sampling depends on row order); with ``reorder`` the kept
        rows past the new end move into the holes, so only they are copied (continuous batching)."""
        if not rows:
            self.k = None
            return []
        nb, kept = len(rows), set(rows)
        if reorder:
            dst = [j for j in range(nb) if j not in kept]
            src = [j for j in rows if j >= nb]
            order = list(range(nb))
            for h, m in zip(dst, src):
                order[h] = m
        else:
            first = next((j for j, r in enumerate(rows) if r != j), nb)
            dst, src, order = list(range(first, nb)), rows[first:], rows
        if dst:
            d = torch.tensor(dst, device=self.embed.device)
            i = torch.tensor(src, device=self.embed.device)
            for c in self.k + self.v:
                c[d] = c[i]
            self.valid[d] = self.valid[i]
            self.next_pos[d] = self.next_pos[i]
        self.B, self.lo = nb, None
        return order


class HFBackend:
    """Any HF causal LM through its own forward and cache (slower per step, works for everything)."""

    def __init__(self, model):
        self.model = model

    def prefill(self, prompt_ids: list[list[int]], n: int, max_new: int) -> torch.Tensor:
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        ids, valid = _left_pad(prompt_ids, 0, device)
        rep = _repeats(len(prompt_ids), n, device)
        ids, valid = ids.index_select(0, rep), valid.index_select(0, rep)
        self.mask = valid.long()  # (B, T)
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=self.pos,
                         past_key_values=self.cache, use_cache=True)
        self.pos = self.pos[:, -1:] + 1
        return out.logits[:, -1].float()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos,
                         past_key_values=self.cache, use_cache=True)
        self.pos = self.pos + 1
        return out.logits[:, -1].float()

    def rows(self) -> int:
        return 0 if getattr(self, "mask", None) is None else self.mask.shape[0]

    def join(self, prompt_ids: list[list[int]], n: int | list[int]) -> torch.Tensor:
        old = (self.cache, self.mask, self.pos) if self.rows() else None
        try:
            logits = self.prefill(prompt_ids, n, 0)
        except BaseException:  # the running rows are untouched by a prefill that failed
            if old is not None:
                self.cache, self.mask, self.pos = old
            raise
        if old is None:
            return logits
        cache, mask, pos = old
        s_old, s_new = mask.shape[1], self.mask.shape[1]
        t = max(s_old, s_new)
        for a, b in zip(cache.layers, self.cache.layers):  # DynamicLayer: keys/values (B, h, S, d)
            a.keys, a.values = _merge(a.keys, s_old, b.keys, s_new, t, t), _merge(a.values, s_old, b.values, s_new, t, t)
        self.mask = _merge(mask, s_old, self.mask, s_new, t, t)
        self.pos, self.cache = torch.cat([pos, self.pos]), cache
        return logits

    def trim(self) -> None:
        if self.rows() == 0:
            self.mask = None

    def select(self, rows: list[int], reorder: bool = False) -> list[int]:
        if not rows:
            self.mask = None
            return []
        idx = torch.tensor(rows, device=self.mask.device)
        self.cache.reorder_cache(idx)  # index_select along the batch: drops the finished rows
        self.mask, self.pos = self.mask.index_select(0, idx), self.pos.index_select(0, idx)
        return rows
