"""A decoded token (of one sequence, or of each of a batch's) as a single call into pocketlm's kernels
(cpu.cpp's decode_step).

A SmolLM2 token through the modules is about 200 Python calls (norms, projections, attention, per layer)
that cost about 8 ms of its 18 on this machine's 2 cores; the arithmetic itself is the same kernels either way.
`FusedStep` points cpu.cpp's Model and Layer structs at a model's tensors once; each token is then one call.
llama.cpp does the same with its graph: built once, computed per token with no interpreter in between.

    logits = fused_logits(model, idx, input_pos, slots)  # None where the modules must run
    if logits is None:
        logits = model.logits(model.hidden(idx, input_pos, slots))

The step reads the layers as they are when it is built (at the first decoded token after setup_cache, which
drops it) and holds on to every tensor it points at, so a pointer never outlives its memory. It knows no family:
the model says what the step needs (`model.fused_spec()`: norm offset, activation, attention and embedding scales,
attention and final softcaps; `model.fused_layer(layer)`: RoPE tables, as wide as the rotary part of a head, and
which norms), or raises Unsupported for what cpu.cpp's decode_step does not compute (LayerNorm, a parallel block,
an MLP without a gate, ...): the modules then run.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from pocketlm import kernels
from pocketlm.models import lora

I64, F32, P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
# Tokens of one sequence per call (a speculative verify pass is k + 1, a short prompt chunk); a longer prompt chunk
# runs as matrices through the modules (the int4 kernel up to 1,024 rows, float matmuls on dequantized weights
# beyond: quant/int4.py). SmolLM2 here, 2 threads: a 15-token chunk took 28-31 ms against 52-59 through the modules
# (the server's prompts after a shared prefix), 64 tokens 84-121 against 98-107.
MAX_TOKENS = 64


class Linear(ctypes.Structure):
    _fields_ = [("kind", I64), ("N", I64), ("K", I64), ("g", I64), ("weight", P), ("scales", P), ("bias", P)]


class Layer(ctypes.Structure):
    _fields_ = [
        ("attn_norm", P), ("mlp_norm", P), ("post_attn_norm", P), ("post_mlp_norm", P), ("q_norm", P), ("k_norm", P),
        ("qkv", Linear * 3), ("gate_up", Linear * 2), ("o", Linear), ("down", Linear), ("n_qkv", I64), ("n_gate_up", I64),
        ("k_cache", P), ("v_cache", P), ("cos", P), ("sin", P), ("window", I64),
    ]  # fmt: skip


class Model(ctypes.Structure):
    _fields_ = [
        ("n_layers", I64), ("D", I64), ("nh", I64), ("n_kv", I64), ("hd", I64), ("F", I64), ("S", I64),
        ("eps", F32), ("norm_offset", F32), ("attn_scale", F32), ("embed_scale", F32), ("gelu", I64),
        ("embed", P), ("embed_scales", P), ("final_norm", P), ("head", Linear), ("layers", P), ("kv_half", I64),
        ("attn_softcap", F32), ("rd", I64),
    ]  # fmt: skip


class DraftHeadStruct(ctypes.Structure):
    _fields_ = [("D", ctypes.c_int64), ("F", ctypes.c_int64), ("eps", ctypes.c_float), ("state_norm", ctypes.c_void_p),
                ("token_norm", ctypes.c_void_p), ("gate_up", Linear), ("down", Linear), ("head", Linear),
                ("embed", ctypes.c_void_p), ("embed_scales", ctypes.c_void_p)]


class Unsupported(Exception):
    """A part the fused step has no kernel for (peft's LoRA wrapper, bf16 weights, a family's own arithmetic, ...): the
    modules run instead."""


@dataclass(frozen=True)
class FusedSpec:
    """What a decoder family tells the fused step about itself (DecoderLM.fused_spec): the layer is always
    x += [post_attn_norm](attn(attn_norm(x))); x += [post_mlp_norm](mlp(mlp_norm(x))) with RMSNorms, a gated MLP
    and RoPE on the first rd channels of each head (the tables' width: all of it but for partial rotary), optional
    q/k norms."""

    norm_offset: float  # RMSNorm scales by (norm_offset + w): 0 Llama, 1 Gemma
    gelu: bool  # the gate's activation: GELU-tanh, else SiLU
    attn_scale: float  # softmax(q k^T * attn_scale)
    embed_scale: float = 1.0  # the embedding's rows times this (Gemma: sqrt(D))
    final_softcap: float | None = None  # logits = tanh(logits / cap) * cap
    attn_softcap: float | None = None  # attention scores = tanh(scores / cap) * cap (Gemma 2)


class FusedStep:
    def __init__(self, model: nn.Module):
        self.keep: list[torch.Tensor] = []  # every tensor a struct points at
        self.rope_len = 1 << 62  # positions the RoPE tables cover (the shortest of them)
        self.rd = None  # rotary channels of a head: the tables' width, the same in every layer
        cfg, inner = model.cfg, model.model
        spec = model.fused_spec()  # raises Unsupported for a family the kernels do not compute
        layers = inner.layers
        if not len(layers):
            raise Unsupported("no layers")  # a layer-truncated draft cut to its embedding
        cache = layers[0].self_attn.kv_cache
        self.rows, self.S = cache.k.shape[0], cache.k.shape[2]
        self.vocab = model.lm_head.out_features
        self.softcap = spec.final_softcap
        self.layers = (Layer * len(layers))(*(self.layer(layer, model) for layer in layers))
        embed, embed_scales = self.embedding(inner.embed_tokens)
        self.model = Model(
            n_layers=len(layers), D=cfg.dim, nh=cfg.n_heads, n_kv=cfg.n_kv_heads, hd=cfg.head_dim, F=cfg.intermediate_size,
            S=self.S, eps=inner.norm.eps, norm_offset=spec.norm_offset, attn_scale=spec.attn_scale,
            embed_scale=spec.embed_scale, gelu=int(spec.gelu),
            embed=embed, embed_scales=embed_scales, final_norm=self.vector(inner.norm.weight),
            head=self.linear(model.lm_head), layers=ctypes.addressof(self.layers), kv_half=int(cache.k.dtype == torch.float16),
            attn_softcap=spec.attn_softcap or 0.0, rd=self.rd,
        )  # fmt: skip

    def pointer(self, t: torch.Tensor) -> int:
        if t.dtype not in (torch.float32, torch.float16, torch.int8, torch.uint8, torch.bfloat16) or t.device.type != "cpu" or not t.is_contiguous():
            raise Unsupported(f"a {t.dtype} tensor on {t.device}")
        self.keep.append(t)
        return t.data_ptr()

    def vector(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        if t.dtype != torch.float32:
            raise Unsupported(f"a {t.dtype} norm")
        return self.pointer(t.detach())

    def linear(self, module: nn.Module) -> Linear:
        from pocketlm.models.lora import LoraLinear
        from pocketlm.quant.int4 import Int4Linear
        from pocketlm.quant.int8 import Int8Linear

        if isinstance(module, LoraLinear):  # the shared base layer: fused_logits runs no pass that selects an adapter
            module = module.base_layer
        bias = self.vector(module.bias)
        if isinstance(module, Int4Linear):
            if module.packed is None:
                raise Unsupported("an int4 layer without pocketlm's kernel layout")
            kind = {"zeros": 2, "q4_0": 4, "q4_k": 5}[module.layout]  # cpu.cpp's Linear: int4_pack's layout, a GGUF's
            return Linear(kind, module.out_features, module.in_features, module.group_size, self.pointer(module.packed), None, bias)
        if isinstance(module, Int8Linear) and module.layout == "q6_k":  # a GGUF's Q6_K blocks: int4_linear's layout 3
            return Linear(6, module.out_features, module.in_features, 32, self.pointer(module.packed_weight), None, bias)
        if isinstance(module, Int8Linear) and module.packed_weight is not None:
            return Linear(3, module.out_features, module.in_features, 0, self.pointer(module.packed_weight), self.pointer(module.scales), bias)
        if isinstance(module, Int8Linear):
            return Linear(1, module.out_features, module.in_features, 0, self.pointer(module.weight), self.pointer(module.scales), bias)
        if type(module) is nn.Linear and module.weight.dtype == torch.float32:
            return Linear(0, module.out_features, module.in_features, 0, self.pointer(module.weight.detach()), None, bias)
        raise Unsupported(f"a {type(module).__name__} layer")

    def embedding(self, module: nn.Module) -> tuple[int, int | None]:
        from pocketlm.quant.int8 import Int8Embedding

        if isinstance(module, Int8Embedding):
            head = module.head[0]
            self.tokens = head.out_features
            return self.pointer(head.weight), self.pointer(head.scales)
        if type(module) is nn.Embedding and module.weight.dtype == torch.float32:
            self.tokens = module.num_embeddings
            return self.pointer(module.weight.detach()), None
        raise Unsupported(f"a {type(module).__name__} embedding")

    def layer(self, layer: nn.Module, model: nn.Module) -> Layer:
        attn, mlp, inner = layer.self_attn, layer.mlp, model.model
        qkv = [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
        cache, cfg = attn.kv_cache, inner.cfg
        if cache.k.dtype not in (torch.float32, torch.float16):
            raise Unsupported(f"a {cache.k.dtype} cache")
        shapes = [sum(l.out_features for l in qkv), attn.o_proj.in_features, sum(l.out_features for l in gate_up), mlp.down_proj.in_features]
        shapes += [l.in_features for l in qkv + gate_up] + [attn.o_proj.out_features, mlp.down_proj.out_features]
        expected = [(cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.n_heads * cfg.head_dim, 2 * cfg.intermediate_size, cfg.intermediate_size]
        if shapes != expected + [cfg.dim] * (len(qkv) + len(gate_up) + 2):
            raise Unsupported("layers whose shapes differ from the config's")  # decode_step sizes its buffers by the config
        cos, sin, norms = model.fused_layer(layer)  # norms by the Layer struct's field names
        if cos.shape[-1] % 2 or cos.shape[-1] > cfg.head_dim or self.rd not in (None, cos.shape[-1]):
            raise Unsupported("RoPE tables of another width")  # cpu.cpp turns the first rd channels of every head
        self.rd = cos.shape[-1]
        self.rope_len = min(self.rope_len, cos.shape[0])
        return Layer(
            **{k: self.vector(v) for k, v in norms.items()},
            qkv=(Linear * 3)(*map(self.linear, qkv)), gate_up=(Linear * 2)(*map(self.linear, gate_up)),
            o=self.linear(attn.o_proj), down=self.linear(mlp.down_proj), n_qkv=len(qkv), n_gate_up=len(gate_up),
            k_cache=self.pointer(cache.k), v_cache=self.pointer(cache.v), cos=self.pointer(cos), sin=self.pointer(sin),
            window=cfg.sliding_window if layer.sliding else 0,
        )  # fmt: skip

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, last_only: bool = False, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, pos, rows (n,): token i at position pos[i] of cache row rows[i] -> logits (n, V), or (1, V) of
        the last token with last_only (a prompt chunk: the head's n - 1 other rows would be wasted). Rows in
        distinct cache rows attend in parallel; rows sharing one (a verify pass, a prompt chunk) attend in
        order, each to the keys the ones before it wrote. hidden (n_logits, D): filled with the same rows' final-norm
        hidden states."""
        tokens, pos, rows = (t.to(torch.int64).contiguous() for t in (tokens, pos, rows))
        n_logits = 1 if last_only else len(tokens)
        logits = torch.empty(n_logits, self.vocab)
        kernels.library().decode_step(ctypes.byref(self.model), len(tokens), tokens.data_ptr(), pos.data_ptr(), rows.data_ptr(),
                                      logits.data_ptr(), n_logits, None if hidden is None else hidden.data_ptr(), torch.get_num_threads())
        if self.softcap is not None:  # Gemma3ForCausalLM.logits' final softcapping
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def fused_logits(model: nn.Module, idx: torch.Tensor, input_pos: torch.Tensor | None, slots=None, last_only: bool = False,
                 hidden: torch.Tensor | None = None) -> torch.Tensor | None:
    """model(idx, input_pos, slots)'s logits (B, T, V) through the fused step, for the calls it takes: one token
    per sequence (a decode step, of one sequence or of the server's batch), or a few tokens of one sequence
    (a speculative verify pass, a short prompt chunk: last_only gives (1, 1, V), the last token's), with no
    gradient and an fp32 or fp16 cache; the step is built on first use after setup_cache. None otherwise (a
    long prompt chunk, training, bf16): the modules run, and raise their own errors. hidden: an fp32 tensor of
    (B * T or 1 with last_only, D) that receives the same rows' final-norm hidden states."""
    if input_pos is None or idx.dim() != 2 or torch.is_grad_enabled() or not model.model.has_cache:
        return None
    if lora.selected(model):  # the step computes the base layers only: an adapter's update runs in the modules
        return None
    B, T = idx.shape
    if last_only and B != 1:
        return None
    if slots is not None and B == 1 and 1 < T <= MAX_TOKENS:  # consecutive tokens of one sequence in its cache row
        if input_pos.shape != (1, T) or slots.shape != (1,):
            return None
        rows, pos = slots.expand(T), input_pos[0]
    elif slots is not None:  # one token per sequence, each at its own position in its own cache row
        if T != 1 or input_pos.shape != (B, 1) or slots.shape != (B,):
            return None
        rows, pos = slots, input_pos[:, 0]
    elif T == 1 and input_pos.shape == (1,):  # one token per cache row, all at one position
        rows, pos = torch.arange(B), input_pos.expand(B)
    elif B == 1 and T <= MAX_TOKENS and input_pos.shape == (T,):  # consecutive tokens of one sequence
        rows, pos = torch.zeros(T, dtype=torch.int64), input_pos
    else:
        return None
    if model.decode_step is None:
        if kernels.library() is None:
            return None
        try:
            model.decode_step = FusedStep(model)
        except Unsupported:
            model.decode_step = False
    step = model.decode_step
    if not step or (slots is None and B != step.rows) or int(rows.min()) < 0 or int(rows.max()) >= step.rows:
        return None
    if int(pos.min()) < 0 or int(pos.max()) >= min(step.S, step.rope_len) or int(idx.min()) < 0 or int(idx.max()) >= step.tokens:
        return None  # the modules raise their errors (cpu.cpp would read past the tables)
    logits = step(idx.reshape(-1), pos, rows, last_only, hidden)
    return logits.view(1, 1, -1) if last_only else logits.view(B, T, -1)


class DraftHeadStep(FusedStep):
    """A draft head's step (pocketlm.models.draft_head.DraftHead.step) as one call into the kernels, for a head whose
    layers the kernels read (int4, int8 or fp32) attached to a target whose embedding they read."""

    def __init__(self, head: nn.Module):
        self.keep = []
        embed, embed_scales = self.embedding(head.embed)
        self.n_tokens = head.cfg.n_tokens
        self.struct = DraftHeadStruct(
            D=head.cfg.dim, F=head.cfg.hidden_dim, eps=head.state_norm.eps, state_norm=self.vector(head.state_norm.weight),
            token_norm=self.vector(head.token_norm.weight), gate_up=self.linear(head.gate_up), down=self.linear(head.down),
            head=self.linear(head.head), embed=embed, embed_scales=embed_scales,
        )  # fmt: skip

    def __call__(self, state: torch.Tensor, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """state (1, D), token -> (the next state (1, D), logits (1, n_tokens)); state is not changed."""
        state = state.to(torch.float32, copy=True).contiguous()
        logits = torch.empty(1, self.n_tokens)
        kernels.library().draft_head_step(ctypes.byref(self.struct), int(token), state.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        return state, logits
