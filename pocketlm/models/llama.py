"""Llama-family decoder in plain PyTorch: Llama 2/3/3.2, TinyLlama, SmolLM2, Mistral, Qwen2.

Numerically this is transformers' modeling_llama.py (and modeling_mistral.py / modeling_qwen2.py, which
differ only in biases and sliding-window masks), rewritten gpt-fast style: one file, no Cache classes, a
preallocated KV cache per layer and positions passed in explicitly. Parameter names equal HF's
state_dict keys, so `model.load_state_dict(hf_state_dict)` works as is.

Usage:
    model = LlamaForCausalLM(cfg)
    logits = model(idx)                                   # no cache: causal attention over idx
    model.setup_cache(batch_size=1, max_seq_len=512)
    logits = model(prompt, input_pos=torch.arange(T))     # prefill
    logits = model(next_tok, input_pos=torch.tensor([T])) # decode one token

    # continuous batching: cache rows are slots; n sequences at their own positions in one pass
    model.setup_cache(batch_size=8, max_seq_len=512)
    model(prompt, input_pos=torch.arange(T)[None], slots=torch.tensor([3]))     # prefill slot 3
    logits = model(tokens, input_pos=torch.tensor([[T], [9]]), slots=torch.tensor([3, 5]))  # (2, 1) tokens

Shapes: B batch, T new tokens, S cache length, D model dim, nh query heads, n_kv key/value heads,
hd head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels
from pocketlm.config import LlamaConfig
from pocketlm.errors import PocketLMError
from pocketlm.models.fused_step import FusedStep, fused_logits

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
    """A KVCache (B, n_kv, max_seq_len, hd) for each layer of model.model (LlamaForCausalLM's and
    Gemma3ForCausalLM's setup_cache). dtype: the activations' (default: the norms', which stay floating point when
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


def attend_rows(cache: KVCache, q, k, v, slots, pos, spans, masks, **sdpa) -> torch.Tensor:
    """Attention for n sequences at their own positions, each in its own cache row (continuous batching).
    q (n, nh, T, hd); k, v (n, n_kv, T, hd) new keys and values; slots (n,); pos (n, T); spans, masks: one per
    row, as attention_spans gives them. -> (n, nh, T, hd)"""
    cache.update_rows(slots, pos, k, v)
    # One SDPA call per row on a view of its own cache row: no gather copy, no padding to the longest row, and
    # each row computes exactly what the same sequence decoded alone computes.
    out = [
        F.scaled_dot_product_attention(q[i : i + 1], cache.k[s : s + 1, :, span].to(q.dtype), cache.v[s : s + 1, :, span].to(q.dtype),
                                       attn_mask=mask, **sdpa)
        for i, (s, span, mask) in enumerate(zip(slots.tolist(), spans, masks))
    ]  # n x (1, nh, T, hd)
    return torch.cat(out)


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


# ------------------------------------------------------------------------------------------- blocks


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


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.qkv_proj: nn.Linear | None = None  # q, k, v in one matmul, made by fuse_projections() for inference
        self.kv_cache: KVCache | None = None

    def project(self, x):
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).split([self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2], dim=-1)

    def forward(self, x, cos, sin, mask, input_pos, kv_span=None, slots=None):
        # x (B, T, D); cos, sin (T, hd); input_pos None (no cache: causal over x) or (T,);
        # kv_span: the cache positions this chunk can see (slice); mask None or bool (T, len(kv_span)).
        # slots (B,): row b is a sequence of its own in cache row slots[b], at positions input_pos[b] (B, T);
        # cos, sin are then (B, 1, T, hd) and kv_span, mask one per row.
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if decodes_alone(x, input_pos, slots, self.kv_cache):
            # one token of one sequence: RoPE, the cache write and attention in one call (pocketlm/kernels)
            y = kernels.attend_decode(q, k, v, self.n_heads, self.n_kv_heads, self.head_dim, cos, sin, None, None, 0.0,
                                      self.kv_cache, kv_span.stop - 1, kv_span.start, self.head_dim**-0.5)
            return self.o_proj(y)  # (1, 1, D)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if slots is not None:
            y = attend_rows(self.kv_cache, q, k, v, slots, input_pos, kv_span, mask, enable_gqa=self.n_kv_heads != self.n_heads)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, S, hd)
            # only the positions the chunk can see: attention over the whole preallocated cache with a
            # mask costs up to 30x more for one decoded token (docs/BENCHMARKS.md)
            k, v = k[:, :, kv_span].to(q.dtype), v[:, :, kv_span].to(q.dtype)  # (B, n_kv, s, hd)
        # enable_gqa lets SDPA broadcast the n_kv heads instead of copying them nh/n_kv times (HF's repeat_kv)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and input_pos is None, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), as LlamaMLP."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Linear | None = None  # made by fuse_projections()

    def forward(self, x):
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate_up = self.gate_up_proj(x)  # (B, T, 2F)
            if kernels.usable(gate_up):  # every row count, so a row's numbers never depend on its chunk
                return self.down_proj(kernels.gated_act(gate_up, gelu=False))  # silu(gate) * up in one call
            gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.sliding = cfg.window(layer_idx) is not None
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, kv_span, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, kv_span, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack; HF's LlamaModel (state_dict prefix "model.")."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.has_sliding = any(layer.sliding for layer in self.layers)
        self.has_cache = False  # set by setup_cache: each layer holds a KVCache
        self.build_rope(min(cfg.max_position_embeddings, ROPE_TABLE_LEN))

    def build_rope(self, n: int, device=None):
        """(Re)build the fp32 cos/sin tables for positions 0..n-1 (non-persistent buffers)."""
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        cos, sin = rope_tables(inv_freq, n, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (n, hd)
        self.register_buffer("rope_sin", sin, persistent=False)  # (n, hd)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.shape[1]
        x = self.embed_tokens(idx)  # (B, T, D)
        window = self.cfg.sliding_window if self.has_sliding else None
        if input_pos is None:
            if T > self.rope_cos.shape[0]:  # uncached long input (eval): grow the tables; never hit in decode
                self.build_rope(T, self.rope_cos.device)
            pos = torch.arange(T, device=idx.device)
            full, sliding = attention_spans(pos, window)
            full = (None, None)  # SDPA's is_causal; sliding layers keep their window mask
        else:
            if not self.has_cache:
                raise PocketLMError("input_pos given but no KV cache: call setup_cache() first")
            pos = input_pos  # (T,), or (B, T) with slots
            full, sliding = attention_spans(pos, window) if slots is None else row_spans(pos, window)
        cos, sin = rope_at(self.rope_cos, self.rope_sin, pos, x.dtype)  # (T, hd) or (B, 1, T, hd)
        for layer in self.layers:
            span, mask = sliding if layer.sliding else full
            x = layer(x, cos, sin, mask, input_pos, span, slots)
        return self.norm(x)  # (B, T, D)


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


class LlamaForCausalLM(nn.Module):
    """HF's LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM: parameters under "model." plus "lm_head"."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.decode_step: FusedStep | bool | None = None  # built at the first decoded token after setup_cache
        self.kv_dtype: torch.dtype | None = None  # a KV cache narrower than fp32 activations (load(): fp16 when quantized)
        self.tie_weights()

    def tie_weights(self):
        """Share the embedding with the output head when the checkpoint does (SmolLM2, Llama 3.2, Qwen2.5 small)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self):
        """For inference: q/k/v and gate/up become one Linear each (fewer, larger matmuls per token).
        The parameter names then differ from HF's, so fuse after loading and never before saving."""
        fuse_layer_projections(self.model.layers)

    def init_buffers(self, device="cpu"):
        """Rebuild the non-persistent buffers (RoPE tables), e.g. after construction on the meta device."""
        n = self.model.rope_cos.shape[0]
        self.model.build_rope(n, device)

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, keep: bool = False):
        """Allocate a KVCache per layer (B, n_kv, max_seq_len, hd). dtype: the activations' (default: the
        parameters'); under fp32 activations, kv_dtype when set. keep: grow the caches there are, keeping what they
        hold (the server's slots grow with their longest sequence)."""
        device = setup_caches(self, batch_size, max_seq_len, dtype, keep)
        if self.model.rope_cos.shape[0] < max_seq_len:
            self.model.build_rope(max_seq_len, device)

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


def fuse_layer_projections(layers) -> None:
    """In each decoder layer (HF names: self_attn.q/k/v_proj, mlp.gate/up_proj; Gemma 3's too), set
    qkv_proj and gate_up_proj and drop the separate Linears."""
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
        mlp.gate_up_proj = fuse_linears(mlp.gate_proj, mlp.up_proj)
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj


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
