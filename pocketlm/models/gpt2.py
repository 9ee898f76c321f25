"""GPT-2 decoder in plain PyTorch (transformers' modeling_gpt2.py: GPT2Model + GPT2LMHeadModel).

What GPT-2 does its own way, each matched to HF below:
  - learned absolute positions: x = wte(idx) + wpe(pos), no RoPE
  - pre-LayerNorm blocks with biases everywhere (ln_1, ln_2, ln_f; c_attn, c_proj, c_fc)
  - q, k and v in one projection (c_attn: the D query columns, then the key ones, then the value ones)
  - a plain MLP: c_proj(gelu_new(c_fc(x))), gelu_new being GELU's tanh approximation
  - transformers' Conv1D layers, which store a Linear's weight transposed, (in, out): here they are nn.Linear
    (so quantization, LoRA and the kernels take them as any other) and `conv1d_layout` transposes at the
    state_dict boundary, so load_state_dict / state_dict speak the checkpoint's layout
  - HF's module names (transformer.wte, transformer.h.<i>.attn, ...), which `Aliased` also offers under the
    shared runtime's names (model.embed_tokens, model.layers, layer.self_attn, model.norm)
The KV cache, attention spans and the wrapper are the shared decoder runtime's (models/decoder.py). The fused
decode step (cpu.cpp) computes RMSNorm, gated MLPs and RoPE, none of which GPT-2 has: the modules run.

Shapes: B batch, T new tokens, S cache length, D model dim, nh heads, hd head dim, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.config import GPT2Config
from pocketlm.errors import PocketLMError
from pocketlm.models.decoder import Aliased, DecoderLM, KVCache, Unsupported, attend, forward_spans


def activation(name: str):
    """transformers' ACT2FN for the GPT family's activation_function names (config.GPT_ACTIVATIONS)."""
    if name == "relu":
        return F.relu
    approximate = "none" if name == "gelu" else "tanh"  # gelu_new: NewGELUActivation, GELU's tanh approximation
    return lambda x: F.gelu(x, approximate=approximate)


def conv1d_layout(module: nn.Module, *names: str) -> None:
    """transformers' Conv1D keeps a Linear's weight as (in, out); the children `names` of `module` are nn.Linear,
    (out, in). Transpose on load_state_dict and back on state_dict, so the parameter names and shapes equal the
    checkpoint's. A child that is no longer a float nn.Linear (Int8Linear, a LoRA wrapper) keeps its own layout."""

    def keys(state_dict, prefix):
        for name in names:
            key = f"{prefix}{name}.weight"
            if key in state_dict and type(getattr(module, name)) is nn.Linear:
                yield key

    def load(_, state_dict, prefix, *args):
        for key in list(keys(state_dict, prefix)):
            state_dict[key] = state_dict[key].t().contiguous()  # (in, out) -> (out, in)

    def save(_, state_dict, prefix, local_metadata):
        for key in list(keys(state_dict, prefix)):
            state_dict[key] = state_dict[key].t()  # (out, in) -> (in, out)

    module.register_load_state_dict_pre_hook(load)
    module.register_state_dict_post_hook(save)


class Attention(nn.Module):
    """GPT2Attention: softmax(q k^T * scale) v with scale 1/sqrt(hd) (scale_attn_weights), and / (layer + 1) more
    with scale_attn_by_inverse_layer_idx."""

    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_heads = self.n_kv_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim)
        self.scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)
        self.kv_cache: KVCache | None = None
        conv1d_layout(self, "c_attn", "c_proj")

    def forward(self, x, mask, input_pos, kv_span=None, slots=None):
        # x (B, T, D); the rest as Llama's Attention.forward (models/llama.py)
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(D, dim=-1))
        y = attend(self.kv_cache, q, k, v, mask, input_pos, kv_span, slots, scale=self.scale)  # (B, nh, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """GPT2MLP: c_proj(act(c_fc(x)))."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.dim, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.dim)
        self.act = activation(cfg.activation)
        conv1d_layout(self, "c_fc", "c_proj")

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(Aliased):
    ALIASES = {"self_attn": "attn"}

    def __init__(self, cfg: GPT2Config, layer_idx: int):
        super().__init__()
        self.sliding = False
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, input_pos, kv_span, slots=None):
        x = x + self.attn(self.ln_1(x), mask, input_pos, kv_span, slots)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(Aliased):
    """The decoder stack; HF's GPT2Model (state_dict prefix "transformer."). GPT-Neo's is the same over its own
    blocks, some of them local (block.sliding: they see the last cfg.sliding_window positions)."""

    ALIASES = {"embed_tokens": "wte", "layers": "h", "norm": "ln_f"}

    def __init__(self, cfg, block: type[nn.Module] = Block):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.dim)
        self.h = nn.ModuleList(block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.has_cache = False  # set by setup_cache: each layer holds a KVCache

    @property
    def rope_len(self) -> int:
        return self.cfg.max_position_embeddings  # no RoPE tables: positions are wpe's rows

    def build_buffers(self, n: int, device=None):
        pass  # no non-persistent buffers

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        pos, full, local = forward_spans(idx.shape[1], input_pos, slots, self.cfg.sliding_window, self.has_cache, idx.device)
        if int(pos.max()) >= self.cfg.max_position_embeddings:
            raise PocketLMError(f"position {int(pos.max())} is past the model's {self.cfg.max_position_embeddings} learned positions")
        x = self.wte(idx) + self.wpe(pos)  # (B, T, D)
        for layer in self.h:
            span, mask = local if layer.sliding else full
            x = layer(x, mask, input_pos, span, slots)
        return self.ln_f(x)  # (B, T, D)


class GPT2LMHeadModel(Aliased, DecoderLM):
    """HF's GPT2LMHeadModel: parameters under "transformer." plus "lm_head" (tied to wte). Caches, tying and forward
    are DecoderLM's; `model` is the stack under the runtime's name. (GPT-Neo's wrapper is this one over its blocks.)"""

    ALIASES = {"model": "transformer"}

    def __init__(self, cfg, block: type[nn.Module] = Block):
        super().__init__(cfg)
        self.transformer = GPT2Model(cfg, block)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def fused_spec(self):
        raise Unsupported("LayerNorms, learned positions and a plain GELU MLP")  # cpu.cpp's decode_step has none of them
