"""GPT-Neo decoder in plain PyTorch (transformers' modeling_gpt_neo.py: GPTNeoModel + GPTNeoForCausalLM).

GPT-2's model (models/gpt2.py: learned positions, LayerNorms with biases, a plain GELU MLP, HF's module names
under the runtime's aliases; its stack and wrapper are used as they are) with GPT-Neo's own blocks, each matched
to HF below:
  - q, k and v as separate Linears without bias, out_proj with one, under attn.attention (GPTNeoAttention wraps
    GPTNeoSelfAttention); nn.Linear weights, not GPT-2's transposed Conv1D
  - attention scores NOT scaled by 1/sqrt(hd): GPTNeoSelfAttention._attn is softmax(q k^T) v
  - "local" layers (config.attention_layers) that see the last window_size positions, alternating with "global"
    (causal) ones: HF's bias XOR tril(bias, -window_size), attention_spans' sliding window
The fused decode step (cpu.cpp) has no LayerNorm, learned positions or plain MLP: the modules run.

Shapes: B batch, T new tokens, S cache length, D model dim, nh heads, hd head dim, V vocab.
"""

from __future__ import annotations

from torch import nn

from pocketlm.config import GPTNeoConfig
from pocketlm.models.decoder import Aliased, KVCache, attend
from pocketlm.models.gpt2 import GPT2LMHeadModel, activation


class SelfAttention(nn.Module):
    """GPTNeoSelfAttention: softmax(q k^T) v, unscaled, over the whole causal past or a local window."""

    def __init__(self, cfg: GPTNeoConfig):
        super().__init__()
        self.n_heads = self.n_kv_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)
        self.qkv_proj: nn.Linear | None = None  # q, k, v in one matmul, made by fuse_projections() for inference
        self.kv_cache: KVCache | None = None

    def project(self, x):
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).chunk(3, dim=-1)

    def forward(self, x, mask, input_pos, kv_span=None, slots=None):
        # x (B, T, D); the rest as Llama's Attention.forward (models/llama.py)
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in self.project(x))  # (B, nh, T, hd)
        y = attend(self.kv_cache, q, k, v, mask, input_pos, kv_span, slots, scale=1.0)  # (B, nh, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class Attention(nn.Module):
    """GPTNeoAttention: the self-attention under `.attention`, as the checkpoints name it."""

    def __init__(self, cfg: GPTNeoConfig):
        super().__init__()
        self.attention = SelfAttention(cfg)

    def forward(self, *args):
        return self.attention(*args)


# Copied from pocketlm.models.gpt2.MLP with GPT2->GPTNeo (nn.Linear, no Conv1D layout)
class MLP(nn.Module):
    """GPTNeoMLP: c_proj(act(c_fc(x))), nn.Linear layers."""

    def __init__(self, cfg: GPTNeoConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.dim, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.dim)
        self.act = activation(cfg.activation)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(Aliased):
    ALIASES = {"self_attn": "attn.attention"}

    def __init__(self, cfg: GPTNeoConfig, layer_idx: int):
        super().__init__()
        self.sliding = cfg.window(layer_idx) is not None
        # Copied from pocketlm.models.gpt2.Block.__init__
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    # Copied from pocketlm.models.gpt2.Block.forward
    def forward(self, x, mask, input_pos, kv_span, slots=None):
        x = x + self.attn(self.ln_1(x), mask, input_pos, kv_span, slots)
        return x + self.mlp(self.ln_2(x))


class GPTNeoForCausalLM(GPT2LMHeadModel):
    """HF's GPTNeoForCausalLM: GPT-2's stack and wrapper (models/gpt2.py: "transformer." with wte, wpe, h, ln_f, plus
    "lm_head" tied to wte) over GPT-Neo's blocks; the stack gives local blocks their window."""

    def __init__(self, cfg: GPTNeoConfig):
        super().__init__(cfg, Block)
