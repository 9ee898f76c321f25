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

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels
from pocketlm.config import LlamaConfig
from pocketlm.models.decoder import (
    ROPE_TABLE_LEN,
    DecoderLM,
    FusedSpec,
    KVCache,
    RMSNorm,
    apply_rope,
    attend,
    decodes_alone,
    forward_spans,
    rope_at,
    rope_inv_freq,
    rope_tables,
)

# ------------------------------------------------------------------------------------------- blocks


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
        # through the cache, only the positions the chunk can see (kv_span): attention over the whole preallocated
        # cache with a mask costs up to 30x more for one decoded token (docs/BENCHMARKS.md). enable_gqa lets SDPA
        # broadcast the n_kv heads instead of copying them nh/n_kv times (HF's repeat_kv)
        y = attend(self.kv_cache, q, k, v, mask, input_pos, kv_span, slots, enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, nh, T, hd) -> (B, T, nh*hd)
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
        self.build_buffers(min(cfg.max_position_embeddings, ROPE_TABLE_LEN))

    @property
    def rope_len(self) -> int:
        return self.rope_cos.shape[0]

    def build_buffers(self, n: int, device=None):
        """(Re)build the fp32 cos/sin tables for positions 0..n-1 (non-persistent buffers)."""
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        cos, sin = rope_tables(inv_freq, n, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (n, hd)
        self.register_buffer("rope_sin", sin, persistent=False)  # (n, hd)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.shape[1]
        x = self.embed_tokens(idx)  # (B, T, D)
        if input_pos is None and T > self.rope_len:  # uncached long input (eval): grow the tables; never hit in decode
            self.build_buffers(T, self.rope_cos.device)
        window = self.cfg.sliding_window if self.has_sliding else None
        pos, full, sliding = forward_spans(T, input_pos, slots, window, self.has_cache, idx.device)  # pos (T,) or (B, T)
        cos, sin = rope_at(self.rope_cos, self.rope_sin, pos, x.dtype)  # (T, hd) or (B, 1, T, hd)
        for layer in self.layers:
            span, mask = sliding if layer.sliding else full
            x = layer(x, cos, sin, mask, input_pos, span, slots)
        return self.norm(x)  # (B, T, D)


class LlamaForCausalLM(DecoderLM):
    """HF's LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM: parameters under "model." plus "lm_head".
    Caches, tying, fusing and forward are DecoderLM's (models/decoder.py)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg)
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def fused_spec(self) -> FusedSpec:
        return FusedSpec(norm_offset=0.0, gelu=False, attn_scale=self.cfg.head_dim**-0.5, embed_scale=1.0)

    def fused_layer(self, layer):
        norms = dict(attn_norm=layer.input_layernorm.weight, mlp_norm=layer.post_attention_layernorm.weight)
        return self.model.rope_cos, self.model.rope_sin, norms
