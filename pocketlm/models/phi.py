"""Phi-1, Phi-1.5 and Phi-2 decoders in plain PyTorch (transformers' modeling_phi.py: PhiModel + PhiForCausalLM).

What sets Phi apart from Llama, each matched to HF below:
  - attention and MLP side by side: x + attn(ln(x)) + mlp(ln(x)) with one LayerNorm (with bias) per layer
  - RoPE on the first rotary_dim = int(hd * partial_rotary_factor) channels of each head (Phi-2: 32 of 80)
  - an MLP of two Linears with GELU (tanh) between them, not a gated one
  - biases on q/k/v, on the output projection (`dense`), on both MLP Linears and on the head
  - the final norm is `model.final_layernorm` (a LayerNorm too)
The fused decode step (models/fused_step.py) computes RMSNorm layers with a gated MLP, so Phi runs module by module,
quantized too. The KV cache, RoPE tables, attention spans and the wrapper are the shared decoder runtime's
(models/decoder.py). Dropout (Phi-2's resid_pdrop) is left out: pocketlm runs and fine-tunes without it.

Shapes: B batch, T new tokens, S cache length, D model dim, nh query heads, n_kv key/value heads,
hd head dim, rd rotary dims, F MLP width, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.config import PhiConfig
from pocketlm.models.decoder import (
    ROPE_TABLE_LEN,
    DecoderLM,
    KVCache,
    attend,
    forward_spans,
    rope_at,
    rope_inv_freq,
    rope_tables,
)
from pocketlm.models.phi3 import apply_partial_rope  # Phi-3's: RoPE on the first rd channels of each head


class Attention(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.dense = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim)  # HF's name for the output projection
        # Copied from pocketlm.models.llama.Attention.__init__
        self.qkv_proj: nn.Linear | None = None  # q, k, v in one matmul, made by fuse_projections() for inference
        self.kv_cache: KVCache | None = None

    # Copied from pocketlm.models.llama.Attention.project
    def project(self, x):
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).split([self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2], dim=-1)

    def forward(self, x, cos, sin, mask, input_pos, kv_span=None, slots=None):
        # x (B, T, D); cos, sin (T, rd) or (B, 1, T, rd) with slots; the rest as Llama's Attention.forward
        B, T, _ = x.shape
        q, k, v = self.project(x)
        # Copied from pocketlm.models.llama.Attention.forward
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        y = attend(self.kv_cache, q, k, v, mask, input_pos, kv_span, slots, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.dense(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, D)


class MLP(nn.Module):
    """PhiMLP: fc2(gelu_new(fc1(x))); gelu_new is GELU's tanh approximation."""

    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (B, T, F) -> (B, T, D)


class DecoderLayer(nn.Module):
    """PhiDecoderLayer: one LayerNorm feeds attention and the MLP, and both outputs join the residual."""

    parallel = True  # attention and the MLP read the same norm (AWQ folds no scale into it: quant/calibrate.py)

    def __init__(self, cfg: PhiConfig, layer_idx: int):
        super().__init__()
        self.sliding = False
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, kv_span, slots=None):
        h = self.input_layernorm(x)
        return self.self_attn(h, cos, sin, mask, input_pos, kv_span, slots) + self.mlp(h) + x  # HF's order of sums


class PhiModel(nn.Module):
    """The decoder stack; HF's PhiModel (state_dict prefix "model.")."""

    def __init__(self, cfg: PhiConfig):
        super().__init__()
        # Copied from pocketlm.models.llama.LlamaModel.__init__ with Llama->Phi
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.final_layernorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.has_cache = False  # set by setup_cache: each layer holds a KVCache
        self.build_buffers(min(cfg.max_position_embeddings, ROPE_TABLE_LEN))

    @property
    def norm(self) -> nn.LayerNorm:
        """The final norm under the name the shared runtime reads (its weight's dtype and device)."""
        return self.final_layernorm

    # Copied from pocketlm.models.phi3.Phi3Model.rope_len
    @property
    def rope_len(self) -> int:
        return self.rope_cos.shape[0]

    # Copied from pocketlm.models.phi3.Phi3Model.build_buffers
    def build_buffers(self, n: int, device=None):
        """(Re)build the fp32 cos/sin tables (n, rd) for positions 0..n-1 (non-persistent buffers)."""
        inv_freq = rope_inv_freq(self.cfg.rotary_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        cos, sin = rope_tables(inv_freq, n, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (n, rd)
        self.register_buffer("rope_sin", sin, persistent=False)  # (n, rd)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        # Copied from pocketlm.models.gemma.GemmaModel.forward
        T = idx.shape[1]
        x = self.embed_tokens(idx)  # (B, T, D)
        if input_pos is None and T > self.rope_len:  # uncached long input (eval): grow the tables; never hit in decode
            self.build_buffers(T, self.rope_cos.device)
        pos, (span, mask), _ = forward_spans(T, input_pos, slots, None, self.has_cache, idx.device)  # pos (T,) or (B, T)
        cos, sin = rope_at(self.rope_cos, self.rope_sin, pos, x.dtype)  # (T, rd) or (B, 1, T, rd)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, span, slots)
        return self.final_layernorm(x)  # (B, T, D)


class PhiForCausalLM(DecoderLM):
    """HF's PhiForCausalLM: parameters under "model." plus "lm_head" (with a bias). Caches, tying and forward are
    DecoderLM's; no fused_spec, so the fused step leaves Phi to its modules."""

    def __init__(self, cfg: PhiConfig):
        super().__init__(cfg)
        self.model = PhiModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=True)
        self.tie_weights()
