"""GPT-J decoder in plain PyTorch (transformers' modeling_gptj.py: GPTJModel + GPTJForCausalLM).

What GPT-J does its own way, each matched to HF below:
  - a parallel block: one LayerNorm (ln_1) feeds both attention and the MLP, x + attn(h) + mlp(h)
  - RoPE on the first rotary_dim channels of each head, in GPT-J's interleaved layout: channel pairs (2i, 2i + 1)
    turn together (rotate_every_two), not Llama's halves; the rest of the head passes through
  - no position embeddings, q/k/v/out_proj without biases, a plain GELU MLP (fc_in, fc_out) with biases
  - an untied head with a bias (lm_head.bias)
  - HF's module names (transformer.wte, transformer.h.<i>.attn, ...), which `Aliased` also offers under the
    shared runtime's names (model.embed_tokens, model.layers, layer.self_attn, model.norm)
The fused decode step (cpu.cpp) computes pre-norm RMSNorm blocks with gated MLPs and full-width half-split RoPE;
GPT-J has none of these: the modules run.

Shapes: B batch, T new tokens, S cache length, D model dim, nh heads, hd head dim, rd rotary dims, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from pocketlm.config import GPTJConfig
from pocketlm.models.decoder import (
    ROPE_TABLE_LEN,
    Aliased,
    DecoderLM,
    KVCache,
    Unsupported,
    attend,
    forward_spans,
    rope_at,
    rope_inv_freq,
)
from pocketlm.models.gpt2 import activation


def apply_rope_every_two(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's GPT-J apply_rotary_pos_emb on the first rd channels (cos, sin (..., rd), each frequency repeated for
    its pair): (x * cos) + (rotate_every_two(x) * sin); the rest of the head unchanged. x (B, nh, T, hd)."""
    rd = cos.shape[-1]
    rot = x[..., :rd]
    x1, x2 = rot[..., ::2], rot[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)  # rotate_every_two
    return torch.cat((rot * cos + rotated * sin, x[..., rd:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTJConfig):
        super().__init__()
        # Copied from pocketlm.models.gpt_neo.SelfAttention.__init__
        self.n_heads = self.n_kv_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.qkv_proj: nn.Linear | None = None  # q, k, v in one matmul, made by fuse_projections() for inference
        self.kv_cache: KVCache | None = None

    # Copied from pocketlm.models.gpt_neo.SelfAttention.project
    def project(self, x):
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).chunk(3, dim=-1)

    def forward(self, x, cos, sin, mask, input_pos, kv_span=None, slots=None):
        # x (B, T, D); cos, sin (T, rd) or (B, 1, T, rd) with slots; the rest as Llama's Attention.forward
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in self.project(x))  # (B, nh, T, hd)
        q, k = apply_rope_every_two(q, cos, sin), apply_rope_every_two(k, cos, sin)
        y = attend(self.kv_cache, q, k, v, mask, input_pos, kv_span, slots)  # (B, nh, T, hd), scale 1/sqrt(hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


# Copied from pocketlm.models.gpt2.MLP with GPT2->GPTJ, c_fc->fc_in, c_proj->fc_out (nn.Linear, no Conv1D layout)
class MLP(nn.Module):
    """GPTJMLP: fc_out(act(fc_in(x)))."""

    def __init__(self, cfg: GPTJConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.dim, cfg.intermediate_size)
        self.fc_out = nn.Linear(cfg.intermediate_size, cfg.dim)
        self.act = activation(cfg.activation)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class Block(Aliased):
    """GPTJBlock: attention and the MLP side by side on one LayerNorm."""

    ALIASES = {"self_attn": "attn"}

    def __init__(self, cfg: GPTJConfig):
        super().__init__()
        self.sliding = False
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, input_pos, kv_span, slots=None):
        h = self.ln_1(x)
        return self.attn(h, cos, sin, mask, input_pos, kv_span, slots) + self.mlp(h) + x  # HF's order of the sum


class GPTJModel(Aliased):
    """The decoder stack; HF's GPTJModel (state_dict prefix "transformer.")."""

    ALIASES = {"embed_tokens": "wte", "layers": "h", "norm": "ln_f"}

    def __init__(self, cfg: GPTJConfig):
        super().__init__()
        # Copied from pocketlm.models.llama.LlamaModel.__init__ with Llama->GPTJ
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.has_cache = False  # set by setup_cache: each layer holds a KVCache
        self.build_buffers(min(cfg.max_position_embeddings, ROPE_TABLE_LEN))

    # Copied from pocketlm.models.llama.LlamaModel.rope_len
    @property
    def rope_len(self) -> int:
        return self.rope_cos.shape[0]

    def build_buffers(self, n: int, device=None):
        """(Re)build the fp32 cos/sin tables (n, rd) for positions 0..n-1, as create_sinusoidal_positions (base
        10,000) with each frequency repeated for its channel pair (apply_rotary_pos_emb's repeat_interleave)."""
        inv_freq = rope_inv_freq(self.cfg.rotary_dim, self.cfg.rope_theta, None)  # (rd/2,)
        pos = torch.arange(n, device=device or "cpu").float()
        freqs = (pos[:, None] * inv_freq.to(pos.device)[None, :]).repeat_interleave(2, dim=-1)  # (n, rd)
        self.register_buffer("rope_cos", freqs.cos(), persistent=False)
        self.register_buffer("rope_sin", freqs.sin(), persistent=False)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.shape[1]
        x = self.wte(idx)  # (B, T, D)
        if input_pos is None and T > self.rope_cos.shape[0]:  # uncached long input (eval): grow the tables
            self.build_buffers(T, self.rope_cos.device)
        pos, (span, mask), _ = forward_spans(T, input_pos, slots, None, self.has_cache, idx.device)
        cos, sin = rope_at(self.rope_cos, self.rope_sin, pos, x.dtype)  # (T, rd) or (B, 1, T, rd)
        for layer in self.h:
            x = layer(x, cos, sin, mask, input_pos, span, slots)
        return self.ln_f(x)  # (B, T, D)


class GPTJForCausalLM(Aliased, DecoderLM):
    """HF's GPTJForCausalLM: parameters under "transformer." plus "lm_head" (weight and bias). Caches and forward
    are DecoderLM's; `model` is the stack under the runtime's name."""

    ALIASES = {"model": "transformer"}

    def __init__(self, cfg: GPTJConfig):
        super().__init__(cfg)
        self.transformer = GPTJModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size)
        self.tie_weights()

    def fused_spec(self):
        raise Unsupported("GPT-J's parallel LayerNorm block, interleaved partial RoPE and plain GELU MLP")
