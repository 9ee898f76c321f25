"""The runtime every decoder family shares: KV cache, cache set-up and prefix copies, attention spans, RoPE
tables, projection fusing, Llama's RMSNorm, and `DecoderLM`, the *ForCausalLM wrapper each family's model class
builds on (tie, fuse, cache, hidden, logits, forward through the fused step).

A family's model file (models/llama.py, gemma3.py, phi3.py, ...) keeps what is its own -- attention, MLP,
norms, the layer, the stack -- and imports the rest from here; nothing here knows any family. The stack a
family builds (`self.model`) offers: embed_tokens, layers (each with self_attn.kv_cache), norm, has_cache,
rope_len and build_buffers(n, device) (its RoPE tables and other non-persistent buffers).

Shapes: B batch, T new tokens, S cache length, D model dim, nh query heads, n_kv key/value heads,
hd head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels
from pocketlm.errors import PocketLMError
from pocketlm.models.fused_step import FusedSpec, FusedStep, Unsupported, fused_logits

# RoPE tables cover this many positions until a cache or a longer input asks for more: a table for the full
# max_position_embeddings would cost 67 MB for Llama 3.2's 131k positions.
ROPE_TABLE_LEN = 4096


class KVCache(nn.Module):
    """Keys and values of one attention layer, preallocated for max_seq_len positions and written in place. Its
    dtype may be narrower than the activations' (fp16 under fp32 activations: a quantized model's cache, as
    llama.cpp's f16 one): keys and values are rounded as they are written and widened as attention reads them."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None, keep=None):
        """keep: a smaller KVCache whose contents this one starts with (a cache that grows)."""
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        if keep is not None:
            S = keep.k.shape[2]
            self.k[:, :, :S], self.v[:, :, :S] = keep.k, keep.v

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos (T,); k, v (B, n_kv, T, hd) -> the whole cache (B, n_kv, S, hd)
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v

    def update_rows(self, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # slots (n,) cache rows; pos (n, T) each row's positions; k, v (n, n_kv, T, hd)
        rows = slots[:, None]  # (n, 1), broadcast against pos
        self.k[rows, :, pos] = k.transpose(1, 2).to(self.k.dtype)  # indexed (n, T, n_kv, hd): the advanced indices' dims come first
        self.v[rows, :, pos] = v.transpose(1, 2).to(self.v.dtype)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Row dst's first n positions := row src's (a shared prompt prefix is copied, not computed again)."""
        self.k[dst, :, :n] = self.k[src, :, :n]
        self.v[dst, :, :n] = self.v[src, :, :n]


def setup_caches(model: nn.Module, batch_size: int, max_seq_len: int, dtype, keep: bool) -> torch.device:
    """A KVCache (B, n_kv, max_seq_len, hd) for each layer of model.model (DecoderLM.setup_cache). dtype: the activations' (default: the norms', which stay floating point when
    Linears are quantized); under fp32 activations, model.kv_dtype when set. keep: grow the caches there are,
    keeping what they hold. -> the device, for the RoPE tables"""
    cfg, ref = model.cfg, model.model.norm.weight
    dtype = dtype or ref.dtype
    if dtype == torch.float32 and model.kv_dtype is not None:
        dtype = model.kv_dtype
    for layer in model.model.layers:
        old = layer.self_attn.kv_cache if keep else None
        layer.self_attn.kv_cache = KVCache(batch_size, max_seq_len, cfg.n_kv_heads, cfg.head_dim, dtype, ref.device, old)
    model.model.has_cache = True
    model.decode_step = None  # points at the caches: built again for the new ones
    return ref.device


def attend_rows(cache: KVCache, q, k, v, slots, pos, spans, masks, attend=F.scaled_dot_product_attention, **sdpa) -> torch.Tensor:
    """Attention for n sequences at their own positions, each in its own cache row (continuous batching).
    q (n, nh, T, hd); k, v (n, n_kv, T, hd) new keys and values; slots (n,); pos (n, T); spans, masks: one per
    row, as attention_spans gives them; attend: SDPA, or a family's own with its signature (Gemma 2's soft-capped
    scores). -> (n, nh, T, hd)"""
    cache.update_rows(slots, pos, k, v)
    # One SDPA call per row on a view of its own cache row: no gather copy, no padding to the longest row, and
    # each row computes exactly what the same sequence decoded alone computes.
    out = [
        attend(q[i : i + 1], cache.k[s : s + 1, :, span].to(q.dtype), cache.v[s : s + 1, :, span].to(q.dtype),
               attn_mask=mask, **sdpa)
        for i, (s, span, mask) in enumerate(zip(slots.tolist(), spans, masks))
    ]  # n x (1, nh, T, hd)
    return torch.cat(out)


def attend(cache: KVCache | None, q, k, v, mask, input_pos, kv_span, slots, **sdpa) -> torch.Tensor:
    """Causal attention of the new queries q (B, nh, T, hd) with their keys and values k, v (B, n_kv, T, hd):
    uncached (input_pos None: causal over the new tokens, or `mask`), through the cache at positions input_pos
    (attending to the kv_span it can see), or each row in its own cache row (slots). sdpa: SDPA's scale, enable_gqa.
    -> (B, nh, T, hd)"""
    if slots is not None:
        return attend_rows(cache, q, k, v, slots, input_pos, kv_span, mask, **sdpa)
    if input_pos is not None:
        k, v = cache.update(input_pos, k, v)  # (B, n_kv, S, hd)
        k, v = k[:, :, kv_span].to(q.dtype), v[:, :, kv_span].to(q.dtype)  # (B, n_kv, s, hd): what the chunk sees
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and input_pos is None, **sdpa)


def decodes_alone(x: torch.Tensor, input_pos, slots, cache: KVCache | None) -> bool:
    """Whether an attention call is one token of one sequence with an fp32 or fp16 cache: the case
    kernels.attend_decode fuses."""
    return (
        slots is None and input_pos is not None and x.shape[0] == x.shape[1] == 1 and cache.k.shape[0] == 1
        and cache.k.dtype in (torch.float32, torch.float16) and kernels.usable(x)
    )


# ---------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (hd/2,) in fp32, op for op as transformers' modeling_rope_utils computes them.

    scaling None: `compute_default_rope_parameters`; "linear": `_compute_linear_scaling_rope_parameters`;
    "llama3": `_compute_llama3_parameters` (Llama 3.1 / 3.2's smooth long-context interpolation).
    """
    # on the CPU even inside a torch.device("meta") block: tiny, and meta math would import torch._dynamo (2 s)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate in between
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / scaling["low_freq_factor"]
    high_freq_wavelen = old_context_len / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"]
    )
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rope_tables(inv_freq: torch.Tensor, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (n, hd) in fp32 for positions 0..n-1, laid out as HF's LlamaRotaryEmbedding.forward does:
    the hd/2 frequencies twice (cat(freqs, freqs)), the NeoX half-split layout HF checkpoints expect."""
    pos = torch.arange(n, device=device or "cpu").float()
    freqs = pos[:, None] * inv_freq.to(pos.device)[None, :]  # (n, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (n, hd)
    return emb.cos(), emb.sin()


def rope_at(cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables' rows for positions pos (T,) -> (T, hd); per sequence, pos (n, T) -> (n, 1, T, hd), which
    broadcasts over the heads. Cast to the activations' dtype, as HF does."""
    cos, sin = cos[pos].to(dtype), sin[pos].to(dtype)
    if pos.dim() == 2:
        cos, sin = cos[:, None], sin[:, None]
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, nh, T, hd); cos, sin (T, hd) or (B, 1, T, hd) in x's dtype. HF: (x * cos) + (rotate_half(x) * sin)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin



# ------------------------------------------------------------------------------------ spans and norms


def attention_spans(pos: torch.Tensor, window: int | None):
    """For a chunk of consecutive positions pos (T,): the slice of the cache each kind of layer attends to,
    and the bool mask (T, s) over that slice (None when every query sees all of it, as in decoding).
    Causal: position p sees 0..p. Sliding (HF's sliding_window_overlay): p sees p-window+1..p."""
    first, last = int(pos[0]), int(pos[-1])
    kv = torch.arange(last + 1, device=pos.device)  # (s,)
    causal = pos[:, None] >= kv[None, :]  # (T, s)
    full = (slice(0, last + 1), None if len(pos) == 1 else causal)
    if window is None:
        return full, None
    begin = max(0, first - window + 1)
    dist = pos[:, None] - kv[None, begin:]  # (T, s)
    mask = (dist >= 0) & (dist < window)
    return full, (slice(begin, last + 1), None if len(pos) == 1 else mask)


def row_spans(pos: torch.Tensor, window: int | None):
    """attention_spans for sequences at their own positions pos (n, T): for each kind of layer,
    (the n slices, the n masks)."""
    per_row = [attention_spans(p, window) for p in pos]
    full = tuple(zip(*(f for f, _ in per_row)))
    return full, None if window is None else tuple(zip(*(s for _, s in per_row)))


def forward_spans(T: int, input_pos, slots, window: int | None, has_cache: bool, device=None):
    """A stack's forward pass of T new tokens -> (their positions, (span, mask) of full layers, of sliding ones).
    Uncached (input_pos None): positions 0..T-1, full layers causal by SDPA's is_causal (None, None), sliding ones
    their window's mask. Cached: attention_spans of input_pos (T,), or row_spans of each row's (B, T) with slots."""
    if input_pos is None:
        pos = torch.arange(T, device=device)
        return pos, (None, None), attention_spans(pos, window)[1]
    if not has_cache:
        raise PocketLMError("input_pos given but no KV cache: call setup_cache() first")
    full, sliding = attention_spans(input_pos, window) if slots is None else row_spans(input_pos, window)
    return input_pos, full, sliding


class RMSNorm(nn.Module):
    """LlamaRMSNorm: normalize in fp32, cast back, then scale (the weight multiplies in the input dtype)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            if kernels.usable(x, self.weight):
                return kernels.rms_norm(x, self.weight, self.eps)  # one call, not aten's ten ops
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the same arithmetic in one call
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Aliased(nn.Module):
    """A module that keeps transformers' names for its parts (GPT-2's `transformer.wte`, `h`, `ln_f`, a block's `attn`)
    and also answers to the names this runtime reads (`model.embed_tokens`, `layers`, `norm`, `self_attn`): ALIASES
    maps a runtime name to the module's own attribute path. Reading and assigning an alias reach the part under its
    own name, so state_dict keys stay transformers' and quantization's swaps (an Int8Embedding for a tied embedding)
    land where the checkpoint has them."""

    ALIASES: dict[str, str] = {}

    def __getattr__(self, name: str):
        path = type(self).ALIASES.get(name)
        if path is None:
            return super().__getattr__(name)
        module = self
        for part in path.split("."):
            module = getattr(module, part)
        return module

    def __setattr__(self, name: str, value) -> None:
        path = type(self).ALIASES.get(name, name)
        owner, _, attr = path.rpartition(".")
        nn.Module.__setattr__(self.get_submodule(owner) if owner else self, attr, value)


# ------------------------------------------------------------------------------------------- the wrapper


class DecoderLM(nn.Module):
    """What every family's *ForCausalLM shares: parameters under "model." (the stack) plus "lm_head".

    A subclass builds self.model and self.lm_head in its __init__ and then calls self.tie_weights(); it overrides
    `logits` where its head differs (Gemma's softcapping) and `fused_spec` / `fused_layer` where the fused decode
    step (models/fused_step.py) can run it.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.decode_step: FusedStep | bool | None = None  # built at the first decoded token after setup_cache
        self.kv_dtype: torch.dtype | None = None  # a KV cache narrower than fp32 activations (load(): fp16 when quantized)

    def tie_weights(self):
        """Share the embedding with the output head when the checkpoint does (SmolLM2, Llama 3.2, Gemma, ...)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self):
        """For inference: q/k/v and gate/up become one Linear each (fewer, larger matmuls per token).
        The parameter names then differ from HF's, so fuse after loading and never before saving."""
        fuse_layer_projections(self.model.layers)

    def init_buffers(self, device="cpu"):
        """Rebuild the non-persistent buffers (RoPE tables, ...), e.g. after construction on the meta device."""
        self.model.build_buffers(self.model.rope_len, device)

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, keep: bool = False):
        """Allocate a KVCache per layer (B, n_kv, max_seq_len, hd). dtype: the activations' (default: the
        parameters'); under fp32 activations, kv_dtype when set. keep: grow the caches there are, keeping what they
        hold (the server's slots grow with their longest sequence). Sliding layers get a full-length cache too and
        attend to the window's slice of it: simpler than HF's ring buffer, at the cost of memory."""
        device = setup_caches(self, batch_size, max_seq_len, dtype, keep)
        if self.model.rope_len < max_seq_len:
            self.model.build_buffers(max_seq_len, device)

    def copy_cache_prefix(self, src: int, dst: int, n: int):
        for layer in self.model.layers:
            layer.self_attn.kv_cache.copy_prefix(src, dst, n)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.model.has_cache = False
        self.decode_step = None

    def hidden(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> final-norm hidden states (B, T, D). With slots (B,), row b is its own sequence in cache
        row slots[b] at positions input_pos[b] (input_pos (B, T))."""
        return self.model(idx, input_pos, slots)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)  # (B, T, V)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        logits = fused_logits(self, idx, input_pos, slots)  # decoded tokens: one call into the kernels
        if logits is not None:
            return logits  # (B, T, V)
        return self.logits(self.hidden(idx, input_pos, slots))

    # ---- what the fused decode step needs to know (models/fused_step.py); a family it cannot run says so

    def fused_spec(self) -> FusedSpec:
        """The model-wide numbers cpu.cpp's decode_step reads. Raise Unsupported where the kernels would compute
        something else than the modules (the modules then run)."""
        raise Unsupported(f"{type(self).__name__} has no fused decode step")

    def fused_layer(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One layer's (RoPE cos, RoPE sin, norms by cpu.cpp's Layer field: attn_norm, mlp_norm, post_attn_norm,
        post_mlp_norm, q_norm, k_norm; those a family lacks left out)."""
        raise Unsupported(f"{type(self).__name__} has no fused decode step")


def fuse_layer_projections(layers) -> None:
    """In each decoder layer with HF's separate self_attn.q/k/v_proj and mlp.gate/up_proj, set qkv_proj and
    gate_up_proj and drop the separate Linears (a family whose checkpoints fuse them, as Phi-3, has nothing to do)."""
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn, "qkv_proj", None) is None and hasattr(attn, "q_proj"):
            attn.qkv_proj = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
            del attn.q_proj, attn.k_proj, attn.v_proj
        if getattr(mlp, "gate_up_proj", None) is None and hasattr(mlp, "gate_proj"):
            mlp.gate_up_proj = fuse_linears(mlp.gate_proj, mlp.up_proj)
            del mlp.gate_proj, mlp.up_proj


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the outputs of `linears` side by side."""

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        if tensors[0].is_meta:  # a skeleton to load into: shapes only (cat on meta imports torch._dynamo, 1.3 s)
            return torch.empty(sum(t.shape[0] for t in tensors), *tensors[0].shape[1:], dtype=tensors[0].dtype, device="meta")
        return torch.cat(tensors)

    w = cat([l.weight for l in linears])  # (sum of out, in)
    fused = nn.Linear(w.shape[1], w.shape[0], bias=linears[0].bias is not None, device=w.device, dtype=w.dtype)
    fused.weight = nn.Parameter(w, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(cat([l.bias for l in linears]), requires_grad=False)
    return fused
