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

Shapes: B batch, T new tokens, S cache length, D model dim, nh query heads, n_kv key/value heads,
hd head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.config import LlamaConfig
from pocketlm.errors import PocketLMError

# RoPE tables cover this many positions until a cache or a longer input asks for more: a table for the full
# max_position_embeddings would cost 67 MB for Llama 3.2's 131k positions.
ROPE_TABLE_LEN = 4096


class KVCache(nn.Module):
    """Keys and values of one attention layer, preallocated for max_seq_len positions and written in place."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos (T,); k, v (B, n_kv, T, hd) -> the whole cache (B, n_kv, S, hd)
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, nh, T, hd); cos, sin (T, hd) in x's dtype. HF: (x * cos) + (rotate_half(x) * sin)
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
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos):
        # x (B, T, D); cos, sin (T, hd); mask None (causal, no cache) or bool (T, S); input_pos None or (T,)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, S, hd)
        # enable_gqa lets SDPA broadcast the n_kv heads instead of copying them nh/n_kv times (HF's repeat_kv)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
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

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.sliding = cfg.window(layer_idx) is not None
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
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
        self.register_buffer("kv_pos", None, persistent=False)  # arange(S) while a cache is set up
        self.build_rope(min(cfg.max_position_embeddings, ROPE_TABLE_LEN))

    def build_rope(self, n: int, device=None):
        """(Re)build the fp32 cos/sin tables for positions 0..n-1 (non-persistent buffers)."""
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        cos, sin = rope_tables(inv_freq, n, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (n, hd)
        self.register_buffer("rope_sin", sin, persistent=False)  # (n, hd)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.shape[1]
        x = self.embed_tokens(idx)  # (B, T, D)
        if input_pos is None:
            if T > self.rope_cos.shape[0]:  # uncached long input (eval): grow the tables; never hit in decode
                self.build_rope(T, self.rope_cos.device)
            pos = kv_pos = torch.arange(T, device=idx.device)
            full_mask = None  # SDPA's is_causal
        else:
            if self.kv_pos is None:
                raise PocketLMError("input_pos given but no KV cache: call setup_cache() first")
            pos, kv_pos = input_pos, self.kv_pos
            full_mask = pos[:, None] >= kv_pos[None, :]  # (T, S): attend to cached positions <= own
        cos = self.rope_cos[pos].to(x.dtype)  # (T, hd); HF casts cos/sin to the activations' dtype too
        sin = self.rope_sin[pos].to(x.dtype)
        sliding_mask = None
        if self.has_sliding:  # HF's sliding_window_overlay on top of causal: kv_idx > q_idx - window
            dist = pos[:, None] - kv_pos[None, :]  # (T, S)
            sliding_mask = (dist >= 0) & (dist < self.cfg.sliding_window)
        for layer in self.layers:
            x = layer(x, cos, sin, sliding_mask if layer.sliding else full_mask, input_pos)
        return self.norm(x)  # (B, T, D)


class LlamaForCausalLM(nn.Module):
    """HF's LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM: parameters under "model." plus "lm_head"."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        """Share the embedding with the output head when the checkpoint does (SmolLM2, Llama 3.2, Qwen2.5 small)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self, device="cpu"):
        """Rebuild the non-persistent buffers (RoPE tables), e.g. after construction on the meta device."""
        n = self.model.rope_cos.shape[0]
        self.model.build_rope(n, device)
        if self.model.kv_pos is not None:
            self.model.kv_pos = torch.arange(self.model.kv_pos.shape[0], device=device)

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None):
        """Allocate a KVCache per layer (B, n_kv, max_seq_len, hd). dtype (default: the parameters') must be the
        activations' dtype: SDPA takes q, k, v of one dtype."""
        cfg, ref = self.cfg, self.model.norm.weight  # norms stay floating point when Linears are quantized
        dtype = dtype or ref.dtype
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, max_seq_len, cfg.n_kv_heads, cfg.head_dim, dtype, ref.device)
        self.model.kv_pos = torch.arange(max_seq_len, device=ref.device)
        if self.model.rope_cos.shape[0] < max_seq_len:
            self.model.build_rope(max_seq_len, ref.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.model.kv_pos = None

    def hidden(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) -> final-norm hidden states (B, T, D)."""
        return self.model(idx, input_pos)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)  # (B, T, V)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden(idx, input_pos))
