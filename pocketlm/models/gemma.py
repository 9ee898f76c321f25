"""Gemma 1 and Gemma 2 decoders in plain PyTorch (Gemma 2B / 7B, Gemma 2 2B / 9B / 27B).

Numerically this is transformers' modeling_gemma.py and modeling_gemma2.py (GemmaModel, Gemma2Model and their
*ForCausalLM). What sets them apart from Llama, each matched to HF below:
  - embeddings scaled by sqrt(D), the scale rounded to the weights' dtype first (GemmaTextScaledWordEmbedding)
  - RMSNorm scales by (1 + weight), all in fp32 (GemmaRMSNorm: Gemma 3's, models/gemma3.py)
  - GELU-tanh gated MLP; Gemma 2B is multi-query (one key/value head) with head_dim 256
Gemma 2 only (config.post_norms):
  - norms after attention and after the MLP too (post_attention_layernorm, pre_ and post_feedforward_layernorm)
  - attention scale query_pre_attn_scalar**-0.5, and the scores soft-capped: tanh(s / cap) * cap
    (Gemma2's eager_attention_forward: SDPA cannot cap, so those layers compute attention op by op)
  - sliding-window layers alternating with global ones, one RoPE for both
  - tanh soft-capping of the final logits
The KV cache, RoPE, attention spans and the wrapper are the shared decoder runtime's (models/decoder.py).

Shapes: B batch, T new tokens, S cache length, D model dim, nh query heads, n_kv key/value heads,
hd head dim, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels
from pocketlm.config import GemmaConfig
from pocketlm.models.decoder import (
    ROPE_TABLE_LEN,
    DecoderLM,
    FusedSpec,
    KVCache,
    apply_rope,
    attend_rows,
    decodes_alone,
    forward_spans,
    rope_at,
    rope_inv_freq,
    rope_tables,
)
from pocketlm.models.gemma3 import MLP, RMSNorm  # Gemma's (1 + w) RMSNorm and GELU-tanh gated MLP: the same in all three


def softcapped_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, softcap=None):
    """SDPA's signature, with Gemma 2's soft-capped scores: transformers' Gemma2 eager_attention_forward.
    q (B, nh, T, hd); k, v (B, n_kv, s, hd); attn_mask None or bool (T, s). -> (B, nh, T, hd)"""
    if enable_gqa:  # HF's repeat_kv
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, nh, T, s)
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        T, s = scores.shape[-2:]
        attn_mask = torch.ones(T, s, dtype=torch.bool, device=q.device).tril(s - T)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar**-0.5  # Gemma 1: head_dim**-0.5
        self.softcap = cfg.attn_logit_softcapping
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.attention_bias)
        # Copied from pocketlm.models.llama.Attention.__init__
        self.qkv_proj: nn.Linear | None = None  # q, k, v in one matmul, made by fuse_projections() for inference
        self.kv_cache: KVCache | None = None

    # Copied from pocketlm.models.llama.Attention.project
    def project(self, x):
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).split([self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2], dim=-1)

    def attend(self, q, k, v, **sdpa):
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale, **sdpa)
        return softcapped_attention(q, k, v, scale=self.scale, softcap=self.softcap, **sdpa)

    def forward(self, x, cos, sin, mask, input_pos, kv_span=None, slots=None):
        # x (B, T, D); cos, sin (T, hd); input_pos None (no cache: causal over x) or (T,);
        # kv_span: the cache positions this chunk can see (slice); mask None or bool (T, len(kv_span)).
        # slots (B,): row b is a sequence of its own in cache row slots[b] (Llama's Attention says more)
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if decodes_alone(x, input_pos, slots, self.kv_cache):
            # one token of one sequence: RoPE, the cache write and (soft-capped) attention in one call (pocketlm/kernels)
            y = kernels.attend_decode(q, k, v, self.n_heads, self.n_kv_heads, self.head_dim, cos, sin, None, None, 0.0,
                                      self.kv_cache, kv_span.stop - 1, kv_span.start, self.scale, self.softcap)
            return self.o_proj(y)  # (1, 1, D)
        # Copied from pocketlm.models.llama.Attention.forward
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if slots is not None:
            y = attend_rows(self.kv_cache, q, k, v, slots, input_pos, kv_span, mask, attend=self.attend, enable_gqa=gqa)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, S, hd)
            k, v = k[:, :, kv_span].to(q.dtype), v[:, :, kv_span].to(q.dtype)  # (B, n_kv, s, hd): what the chunk sees
        y = self.attend(q, k, v, attn_mask=mask, is_causal=mask is None and input_pos is None, enable_gqa=gqa)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


class DecoderLayer(nn.Module):
    """GemmaDecoderLayer (Llama's two residual blocks), or with config.post_norms Gemma2DecoderLayer (each block's
    output normalized before it is added; post_attention_layernorm is then that norm, not the MLP's input norm)."""

    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        # Copied from pocketlm.models.llama.DecoderLayer.__init__
        self.sliding = cfg.window(layer_idx) is not None
        self.post_norms = cfg.post_norms
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.post_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, kv_span, slots=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, kv_span, slots)
        if not self.post_norms:  # Gemma 1
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class GemmaModel(nn.Module):
    """The decoder stack; HF's GemmaModel / Gemma2Model (state_dict prefix "model.")."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        # Copied from pocketlm.models.llama.LlamaModel.__init__ with Llama->Gemma
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.has_sliding = any(layer.sliding for layer in self.layers)
        self.has_cache = False  # set by setup_cache: each layer holds a KVCache
        self.build_buffers(min(cfg.max_position_embeddings, ROPE_TABLE_LEN))

    # Copied from pocketlm.models.llama.LlamaModel.rope_len
    @property
    def rope_len(self) -> int:
        return self.rope_cos.shape[0]

    def build_buffers(self, n: int, device=None):
        """(Re)build the non-persistent buffers: fp32 RoPE tables for positions 0..n-1 and the embedding scale."""
        cos, sin = rope_tables(rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling), n, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (n, hd)
        self.register_buffer("rope_sin", sin, persistent=False)  # (n, hd)
        # GemmaTextScaledWordEmbedding keeps sqrt(D) as an fp32 tensor and casts it to the weights' dtype before
        # multiplying (in bf16, Gemma 2B's sqrt(2048) = 45.255 becomes 45.25): kept as a tensor to match
        self.register_buffer("embed_scale", torch.tensor(self.cfg.dim**0.5, device=device or "cpu"), persistent=False)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        # Copied from pocketlm.models.gemma3.Gemma3TextModel.forward
        T = idx.shape[1]
        x = self.embed_tokens(idx)  # (B, T, D)
        x = x * self.embed_scale.to(x.dtype)
        if input_pos is None and T > self.rope_len:  # uncached long input (eval): grow the tables; never hit in decode
            self.build_buffers(T, self.rope_cos.device)
        window = self.cfg.sliding_window if self.has_sliding else None
        pos, full, sliding = forward_spans(T, input_pos, slots, window, self.has_cache, idx.device)  # pos (T,) or (B, T)
        # Copied from pocketlm.models.llama.LlamaModel.forward
        cos, sin = rope_at(self.rope_cos, self.rope_sin, pos, x.dtype)  # (T, hd) or (B, 1, T, hd)
        for layer in self.layers:
            span, mask = sliding if layer.sliding else full
            x = layer(x, cos, sin, mask, input_pos, span, slots)
        return self.norm(x)  # (B, T, D)


class GemmaForCausalLM(DecoderLM):
    """HF's GemmaForCausalLM / Gemma2ForCausalLM: parameters under "model." plus "lm_head" (tied to the embedding in
    every release). Caches, tying, fusing and forward are DecoderLM's (models/decoder.py)."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__(cfg)
        self.model = GemmaModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    # Copied from pocketlm.models.gemma3.Gemma3ForCausalLM.logits
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)  # (B, T, V)
        if self.cfg.final_logit_softcapping is not None:  # as Gemma2ForCausalLM.forward
            cap = self.cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def fused_spec(self) -> FusedSpec:
        # norms scale by (1 + w); GELU-tanh gate; query_pre_attn_scalar; sqrt(D) embedding scale; both softcaps
        return FusedSpec(norm_offset=1.0, gelu=True, attn_scale=self.cfg.query_pre_attn_scalar**-0.5,
                         embed_scale=float(self.model.embed_scale), final_softcap=self.cfg.final_logit_softcapping,
                         attn_softcap=self.cfg.attn_logit_softcapping)

    def fused_layer(self, layer):
        if not self.cfg.post_norms:  # Gemma 1: Llama's norms
            norms = dict(attn_norm=layer.input_layernorm.weight, mlp_norm=layer.post_attention_layernorm.weight)
        else:
            norms = dict(attn_norm=layer.input_layernorm.weight, mlp_norm=layer.pre_feedforward_layernorm.weight,
                         post_attn_norm=layer.post_attention_layernorm.weight,
                         post_mlp_norm=layer.post_feedforward_layernorm.weight)  # fmt: skip
        return self.model.rope_cos, self.model.rope_sin, norms
