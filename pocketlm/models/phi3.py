"""Phi-3 / Phi-4 mini decoder in plain PyTorch (transformers' modeling_phi3.py: Phi3Model + Phi3ForCausalLM).

Llama's block (models/llama.py) with what Phi-3 does its own way, each matched to HF below:
  - q, k and v in one Linear (qkv_proj: the nh * hd query rows, then the n_kv * hd key rows, then the value rows)
    and gate and up in one (gate_up_proj: gate rows, then up rows), as the checkpoints store them
  - RoPE on the first rotary_dim = int(hd * partial_rotary_factor) channels of each head, the rest passed through
  - a sliding window on every layer when config.json sets one (Phi-3 mini: 2047)
The KV cache, RoPE tables, attention spans and the wrapper are the shared decoder runtime's (models/decoder.py).

Shapes: B batch, T new tokens, S cache length, D model dim, nh query heads, n_kv key/value heads,
hd head dim, rd rotary dims, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels
from pocketlm.config import Phi3Config
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


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's Phi3 apply_rotary_pos_emb: RoPE on the first rd channels (cos, sin (..., rd)), the rest unchanged."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return apply_rope(x, cos, sin)
    return torch.cat((apply_rope(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)  # (B, nh, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    # Copied from pocketlm.models.llama.Attention.project
    def project(self, x):
        if self.qkv_proj is None:  # split into q/k/v_proj by pocketlm.quant.unfuse_projections (QLoRA)
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).split([self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2], dim=-1)

    def forward(self, x, cos, sin, mask, input_pos, kv_span=None, slots=None):
        # x (B, T, D); cos, sin (T, rd) or (B, 1, T, rd) with slots; the rest as Llama's Attention.forward
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if decodes_alone(x, input_pos, slots, self.kv_cache):
            # one token of one sequence: RoPE (on cos' rd channels), the cache write and attention in one call
            y = kernels.attend_decode(q, k, v, self.n_heads, self.n_kv_heads, self.head_dim, cos, sin, None, None, 0.0,
                                      self.kv_cache, kv_span.stop - 1, kv_span.start, self.head_dim**-0.5)
            return self.o_proj(y)  # (1, 1, D)
        # Copied from pocketlm.models.llama.Attention.forward
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        y = attend(self.kv_cache, q, k, v, mask, input_pos, kv_span, slots, enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, nh, T, hd) -> (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """Phi3MLP: gate, up = gate_up_proj(x).chunk(2); down(silu(gate) * up)."""

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x):
        if self.gate_up_proj is None:  # split by pocketlm.quant.unfuse_projections (QLoRA)
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # Copied from pocketlm.models.llama.MLP.forward
        gate_up = self.gate_up_proj(x)  # (B, T, 2F)
        if kernels.usable(gate_up):  # every row count, so a row's numbers never depend on its chunk
            return self.down_proj(kernels.gated_act(gate_up, gelu=False))  # silu(gate) * up in one call
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# Copied from pocketlm.models.llama.DecoderLayer with Llama->Phi3
class DecoderLayer(nn.Module):
    def __init__(self, cfg: Phi3Config, layer_idx: int):
        super().__init__()
        self.sliding = cfg.window(layer_idx) is not None
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos, kv_span, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, kv_span, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3Model(nn.Module):
    """The decoder stack; HF's Phi3Model (state_dict prefix "model.")."""

    def __init__(self, cfg: Phi3Config):
        super().__init__()
        # Copied from pocketlm.models.llama.LlamaModel.__init__ with Llama->Phi3
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.has_cache = False  # set by setup_cache: each layer holds a KVCache
        self.build_buffers(min(cfg.max_position_embeddings, ROPE_TABLE_LEN))

    # Copied from pocketlm.models.llama.LlamaModel.rope_len
    @property
    def rope_len(self) -> int:
        return self.rope_cos.shape[0]

    # Copied from pocketlm.models.llama.LlamaModel.build_buffers with head_dim->rotary_dim
    def build_buffers(self, n: int, device=None):
        """(Re)build the fp32 cos/sin tables (n, rd) for positions 0..n-1 (non-persistent buffers)."""
        inv_freq = rope_inv_freq(self.cfg.rotary_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        cos, sin = rope_tables(inv_freq, n, device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (n, rd)
        self.register_buffer("rope_sin", sin, persistent=False)  # (n, rd)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        # Copied from pocketlm.models.llama.LlamaModel.forward
        T = idx.shape[1]
        x = self.embed_tokens(idx)  # (B, T, D)
        if input_pos is None and T > self.rope_len:  # uncached long input (eval): grow the tables; never hit in decode
            self.build_buffers(T, self.rope_cos.device)
        pos, full, sliding = forward_spans(T, input_pos, slots, self.cfg.sliding_window, self.has_cache, idx.device)
        cos, sin = rope_at(self.rope_cos, self.rope_sin, pos, x.dtype)  # (T, rd) or (B, 1, T, rd)
        for layer in self.layers:
            span, mask = sliding if layer.sliding else full
            x = layer(x, cos, sin, mask, input_pos, span, slots)
        return self.norm(x)  # (B, T, D)


class Phi3ForCausalLM(DecoderLM):
    """HF's Phi3ForCausalLM: parameters under "model." plus "lm_head". Caches, tying and forward are DecoderLM's."""

    def __init__(self, cfg: Phi3Config):
        super().__init__(cfg)
        self.model = Phi3Model(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def fused_spec(self) -> FusedSpec:
        # the RoPE tables' width (rotary_dim) is the part of each head cpu.cpp's decode_step turns
        return FusedSpec(norm_offset=0.0, gelu=False, attn_scale=self.cfg.head_dim**-0.5)

    def fused_layer(self, layer):
        norms = dict(attn_norm=layer.input_layernorm.weight, mlp_norm=layer.post_attention_layernorm.weight)
        return self.model.rope_cos, self.model.rope_sin, norms
