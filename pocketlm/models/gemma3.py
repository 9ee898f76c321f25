"""Gemma 3 text decoder in plain PyTorch (Gemma 3 270M, 1B, and the language model of the larger ones).

Numerically this is transformers' modeling_gemma3.py (Gemma3TextModel + Gemma3ForCausalLM). What sets it
apart from Llama, each matched to HF below:
  - embeddings scaled by sqrt(D), the scale rounded to the weights' dtype first (Gemma3TextScaledWordEmbedding)
  - RMSNorm scales by (1 + weight), all in fp32, cast back at the end (Gemma3RMSNorm)
  - RMSNorm on q and k over head_dim (q_norm, k_norm), before RoPE
  - norms after attention and after the MLP too (post_attention_layernorm, post_feedforward_layernorm)
  - GELU-tanh gated MLP
  - attention scale query_pre_attn_scalar**-0.5 instead of hd**-0.5
  - local layers: sliding-window mask and RoPE base rope_local_base_freq; global layers: full causal mask
    and RoPE base rope_theta with rope_scaling
  - optional tanh softcapping of the final logits
The KV cache, RoPE, attention-span and projection-fusing helpers and the wrapper are the shared decoder runtime's
(models/decoder.py: same layout, same HF conventions).

Shapes: B batch, T new tokens, S cache length, D model dim, nh query heads, n_kv key/value heads,
hd head dim, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels
from pocketlm.config import Gemma3Config
from pocketlm.models.decoder import (
    ROPE_TABLE_LEN,
    DecoderLM,
    FusedSpec,
    KVCache,
    apply_rope,
    attend,
    decodes_alone,
    forward_spans,
    rope_at,
    rope_inv_freq,
    rope_tables,
)


class RMSNorm(nn.Module):
    """Gemma3RMSNorm: unlike Llama's, the (1 + weight) scale is applied in fp32 before casting back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # zeros: (1 + weight) starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            if kernels.usable(x, self.weight):
                return kernels.rms_norm(x, self.weight, self.eps, unit_offset=1.0)  # one call
            # the same arithmetic in one call (F.rms_norm: rsqrt(mean(x^2) + eps) * x * w) instead of ten
            # dispatched ops: a decode step runs 6 norms per layer
            return F.rms_norm(x, self.weight.shape, 1.0 + self.weight, self.eps)
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # attn_logit_softcapping is deliberately unused: HF's Gemma3Attention keeps it but never passes it to
        # the attention function (Gemma 2 did; Gemma 3 replaced it with q_norm/k_norm), and every release sets None.
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        # Copied from pocketlm.models.llama.Attention.__init__
        self.qkv_proj: nn.Linear | None = None  # q, k, v in one matmul, made by fuse_projections() for inference
        self.kv_cache: KVCache | None = None

    # Copied from pocketlm.models.llama.Attention.project
    def project(self, x):
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).split([self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2], dim=-1)

    def forward(self, x, cos, sin, mask, input_pos, kv_span=None, slots=None):
        # x (B, T, D); cos, sin (T, hd); input_pos None (no cache: causal over x) or (T,);
        # kv_span: the cache positions this chunk can see (slice); mask None or bool (T, len(kv_span)).
        # slots (B,): row b is a sequence of its own in cache row slots[b] (Llama's Attention says more)
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if decodes_alone(x, input_pos, slots, self.kv_cache):
            # one token of one sequence: q/k norms, RoPE, the cache write and attention in one call (pocketlm/kernels)
            y = kernels.attend_decode(q, k, v, self.n_heads, self.n_kv_heads, self.head_dim, cos, sin, self.q_norm.weight,
                                      self.k_norm.weight, self.q_norm.eps, self.kv_cache, kv_span.stop - 1, kv_span.start,
                                      self.scale)
            return self.o_proj(y)  # (1, 1, D)
        # Copied from pocketlm.models.llama.Attention.forward
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(self.kv_cache, q, k, v, mask, input_pos, kv_span, slots, scale=self.scale,
                   enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, nh, T, hd) -> (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """Gemma3MLP: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        # Copied from pocketlm.models.llama.MLP.__init__
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # made by fuse_projections()

    # Copied from pocketlm.models.llama.MLP.forward with silu->gelu_tanh
    def forward(self, x):
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate_up = self.gate_up_proj(x)  # (B, T, 2F)
            if kernels.usable(gate_up):  # every row count, so a row's numbers never depend on its chunk
                return self.down_proj(kernels.gated_act(gate_up, gelu=True))  # gelu_tanh(gate) * up in one call
            gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer_idx: int):
        super().__init__()
        # Copied from pocketlm.models.llama.DecoderLayer.__init__
        self.sliding = cfg.window(layer_idx) is not None
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, kv_span, slots=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, kv_span, slots)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma3TextModel(nn.Module):
    """The decoder stack; HF's Gemma3TextModel (state_dict prefix "model.")."""

    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        # Copied from pocketlm.models.llama.LlamaModel.__init__ with Llama->Gemma3
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.has_cache = False  # set by setup_cache: each layer holds a KVCache
        self.build_buffers(min(cfg.max_position_embeddings, ROPE_TABLE_LEN))

    @property
    def rope_len(self) -> int:
        return self.global_cos.shape[0]

    def build_buffers(self, n: int, device=None):
        """(Re)build the non-persistent buffers: fp32 RoPE tables for positions 0..n-1, one pair per layer
        kind (HF's Gemma3RotaryEmbedding keeps sliding_attention_inv_freq / full_attention_inv_freq),
        and the embedding scale."""
        cfg = self.cfg
        for name, theta, scaling in (
            ("global", cfg.rope_theta, cfg.rope_scaling),
            ("local", cfg.rope_local_base_freq, cfg.rope_local_scaling),
        ):
            cos, sin = rope_tables(rope_inv_freq(cfg.head_dim, theta, scaling), n, device)
            self.register_buffer(f"{name}_cos", cos, persistent=False)  # (n, hd)
            self.register_buffer(f"{name}_sin", sin, persistent=False)  # (n, hd)
        # Gemma3TextScaledWordEmbedding keeps sqrt(D) as an fp32 tensor and casts it to the weights' dtype
        # before multiplying: in bf16, sqrt(640) = 25.298 becomes 25.25. Kept as a tensor to match that.
        self.register_buffer("embed_scale", torch.tensor(cfg.dim**0.5, device=device or "cpu"), persistent=False)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        # Copied from pocketlm.models.llama.LlamaModel.forward
        T = idx.shape[1]
        x = self.embed_tokens(idx)  # (B, T, D)
        x = x * self.embed_scale.to(x.dtype)
        if input_pos is None and T > self.rope_len:  # uncached long input (eval): grow the tables; never hit in decode
            self.build_buffers(T, self.global_cos.device)
        pos, full, sliding = forward_spans(T, input_pos, slots, self.cfg.sliding_window, self.has_cache, idx.device)
        rope = {  # (T, hd) each, or (B, 1, T, hd) with slots
            True: rope_at(self.local_cos, self.local_sin, pos, x.dtype),
            False: rope_at(self.global_cos, self.global_sin, pos, x.dtype),
        }
        for layer in self.layers:
            cos, sin = rope[layer.sliding]
            span, mask = sliding if layer.sliding else full
            x = layer(x, cos, sin, mask, input_pos, span, slots)
        return self.norm(x)  # (B, T, D)


class Gemma3ForCausalLM(DecoderLM):
    """HF's Gemma3ForCausalLM: parameters under "model." plus "lm_head" (tied to the embedding in every release).
    Caches, tying, fusing and forward are DecoderLM's (models/decoder.py)."""

    def __init__(self, cfg: Gemma3Config):
        super().__init__(cfg)
        self.model = Gemma3TextModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)  # (B, T, V)
        if self.cfg.final_logit_softcapping is not None:  # as Gemma3ForCausalLM.forward
            cap = self.cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def fused_spec(self) -> FusedSpec:
        # norms scale by (1 + w); GELU-tanh gate; query_pre_attn_scalar; sqrt(D) embedding scale; the final softcap
        return FusedSpec(norm_offset=1.0, gelu=True, attn_scale=self.cfg.query_pre_attn_scalar**-0.5,
                         embed_scale=float(self.model.embed_scale), final_softcap=self.cfg.final_logit_softcapping)

    def fused_layer(self, layer):
        inner, attn = self.model, layer.self_attn
        cos, sin = (inner.local_cos, inner.local_sin) if layer.sliding else (inner.global_cos, inner.global_sin)
        norms = dict(attn_norm=layer.input_layernorm.weight, mlp_norm=layer.pre_feedforward_layernorm.weight,
                     post_attn_norm=layer.post_attention_layernorm.weight,
                     post_mlp_norm=layer.post_feedforward_layernorm.weight, q_norm=attn.q_norm.weight,
                     k_norm=attn.k_norm.weight)  # fmt: skip
        return cos, sin, norms
