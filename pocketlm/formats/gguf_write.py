"""Hugging Face checkpoint -> GGUF file: the exact inverse of gguf.py's `gguf_to_hf`.

    write_gguf(path, hf_config, state_dict, tokenizer, qtype="q8_0", lineage={...})

What llama.cpp's convert_hf_to_gguf.py does, for the architectures gguf.py reads back (each family with a GGUF
in pocketlm/families.py): HF tensor names -> GGUF names (the family's tables, inverted), Q/K rows permuted for
llama.cpp's RoPE (LlamaModel.permute), Gemma's norm weights + 1 (Gemma*Model.modify_tensors), llama3 RoPE scaling as
the rope_freqs tensor (LlamaModel.generate_extra_tensors), the architecture's hyper-parameters under
"<arch>.*" and the tokenizer under "tokenizer.ggml.*" (the inverse of Tokenizer.from_gguf_metadata).
Matrices are stored in the chosen type through gguf-py's own quantizers (`gguf.quants.quantize`, bit for
bit what llama.cpp's reference C code makes); 1-D tensors stay F32.

The file is written as gguf-py's writer state machine walks it -- EMPTY -> HEADER -> KV_DATA -> TI_DATA ->
WEIGHTS -- with every tensor's type and byte size planned up front, so tensors are converted and
quantized one at a time and a 1 GB model never needs a second copy in memory. The file appears whole or
not at all (written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFValueType, GGUFWriter, Keys, LlamaFileType, TokenType
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize as gguf_quantize

from pocketlm import families
from pocketlm.config import (
    FULL, GPT_ACTIVATIONS, SLIDING, GPT2Config, Gemma3Config, GemmaConfig, LlamaConfig, Phi3Config, PhiConfig, config_from_hf,
)
from pocketlm.errors import PocketLMError
from pocketlm.formats.gguf import ROPE_FREQS, TOP_LEVEL_NAMES, llama3_rope_factors

# ---- tensor types ----------------------------------------------------------------------------------

# --type NAME -> the GGML type of every matrix, and general.file_type (llama.cpp's llama_ftype).
QUANT_TYPES: dict[str, tuple[T, LlamaFileType]] = {
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_k": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),  # every matrix Q4_K: what llama-quantize calls Q4_K_S, roughly
}

# A matrix whose rows are not a whole number of blocks falls back, as llama.cpp does: K-quants as in
# llama-quant.cpp llama_tensor_get_type (Q4_K -> Q5_0; SmolLM2's 576-wide rows are 2.25 super-blocks),
# 32-blocks as convert_hf_to_gguf.py on a QuantError (-> F16).
FALLBACK: dict[T, T] = {T.Q4_K: T.Q5_0, T.Q5_0: T.F16, T.Q8_0: T.F16, T.Q4_0: T.F16}


def tensor_type(qtype: T, shape: tuple[int, ...]) -> T:
    if len(shape) < 2:  # norms and biases: F32, as convert_hf_to_gguf.py keeps 1-D tensors
        return T.F32
    while shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = FALLBACK[qtype]
    return qtype


def tensor_nbytes(qtype: T, shape: tuple[int, ...]) -> int:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block_size * type_size


def encode_tensor(w: torch.Tensor, qtype: T) -> np.ndarray:
    """fp32 (rows, cols) -> the bytes (or float array) GGUFWriter stores for type qtype."""
    a = w.detach().to(torch.float32).contiguous().numpy()
    if qtype == T.F32:
        return a
    if qtype == T.F16:
        return a.astype(np.float16)
    if qtype == T.Q4_K:
        return quantize_q4_k(a)
    return gguf_quantize(a, qtype)  # BF16, Q8_0, Q4_0: gguf-py's ports of ggml-quants.c quantize_row_*_ref


def quantize_q4_k(a: np.ndarray) -> np.ndarray:
    """(rows, cols) fp32 -> Q4_K blocks (rows, cols / 256 * 144) uint8. gguf-py has no Q4_K quantizer.

    Layout as ggml-common.h block_q4_K: d (f16) | dmin (f16) | scales[12] (six-bit scale and min of each of
    8 sub-blocks of 32) | qs[128] (4-bit values, sub-block pairs sharing bytes as low and high nibbles).
    Values are y = d * sc * q - dmin * m. This is a plain round-to-nearest quantizer: the sub-block range
    is [min(0, x_min), x_max] and the 4-bit codes are rounded against the already-rounded six-bit scales.
    ggml's quantize_row_q4_K_ref also searches each sub-block's scale (make_qkx2_quants), so its bytes differ
    and its error is a little lower; any valid Q4_K bytes load the same in llama.cpp and dequantize here.
    """
    rows, cols = a.shape
    x = a.reshape(-1, 8, 32).astype(np.float32)  # (n, 8 sub-blocks, 32)
    lo = np.minimum(x.min(axis=2), 0.0)  # (n, 8): the min is stored as a positive offset m = -lo
    hi = x.max(axis=2)
    scale = (hi - lo) / 15.0  # (n, 8) per sub-block step
    offset = -lo
    d = scale.max(axis=1, keepdims=True) / 63.0  # super-block scale of the six-bit sub-block scales
    dmin = offset.max(axis=1, keepdims=True) / 63.0
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    d, dmin = d16.astype(np.float32), dmin16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d > 0, np.rint(scale / d), 0).clip(0, 63).astype(np.uint8)  # (n, 8)
        mn = np.where(dmin > 0, np.rint(offset / dmin), 0).clip(0, 63).astype(np.uint8)
        step = (d * sc)[:, :, None]  # (n, 8, 1) the step the decoder will use
        base = (dmin * mn)[:, :, None]
        q = np.where(step > 0, np.rint((x + base) / step), 0).clip(0, 15).astype(np.uint8)  # (n, 8, 32)
    n = x.shape[0]
    # scales[12]: ggml-quants.c get_scale_min_k4 read backwards (gguf_quants._k_scale_min)
    packed = np.empty((n, 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    # qs[128]: byte j of group g holds sub-block 2g (low nibble) and 2g + 1 (high nibble), element j
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    out = np.concatenate([d16.view(np.uint8), dmin16.view(np.uint8), packed, qs], axis=1)  # (n, 144)
    return out.reshape(rows, cols // 256 * 144)


# ---- Hugging Face names -> GGUF names: gguf.py's tables read the other way ----------------------------


def _invert(table: dict[str, str]) -> dict[str, str]:
    inverse = {hf: name for name, hf in table.items()}
    assert len(inverse) == len(table), "a name table must be one to one to be inverted"
    return inverse


TOP_LEVEL_GGUF = _invert(TOP_LEVEL_NAMES)  # "model.embed_tokens" -> "token_embd"
_HF_TOP_RE = re.compile(r"(.+)\.(weight|bias)")


def gguf_name(hf_name: str, block_names: dict[str, str], top_names: dict[str, str] = TOP_LEVEL_GGUF,
              blocks: str = "model.layers") -> str | None:
    """"model.layers.3.self_attn.q_proj.weight" -> "blk.3.attn_q.weight" (block_names, top_names: HF -> GGUF;
    blocks: the HF name of the block list)."""
    if m := re.fullmatch(rf"{re.escape(blocks)}\.(\d+)\.(.+)\.(weight|bias)", hf_name):
        layer, name, suffix = m.groups()
        gg = block_names.get(name)
        return f"blk.{layer}.{gg}.{suffix}" if gg else None
    if m := _HF_TOP_RE.fullmatch(hf_name):
        gg = top_names.get(m.group(1))
        return f"{gg}.{m.group(2)}" if gg else None
    return None


# ---- tensor fixes: what convert_hf_to_gguf.py does, the inverse of gguf.py's *_fix --------------------


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute: each head's rotary halves interleaved for llama.cpp's RoPE.
    (out, in) or (out,) -> same shape; the inverse of gguf.py's _unpermute."""
    rest = w.shape[1:]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *rest).transpose(1, 2).reshape(w.shape)


def _llama_fix(name: str, w: torch.Tensor, cfg) -> torch.Tensor:
    if ".attn_q." in name:
        return permute(w, cfg.n_heads)
    if ".attn_k." in name:
        return permute(w, cfg.n_kv_heads)
    return w


def _gemma3_fix(name: str, w: torch.Tensor, cfg) -> torch.Tensor:
    # Gemma3Model.modify_tensors: llama.cpp's RMSNorm multiplies by w, Gemma's by (1 + w)
    return w + 1 if name.endswith("norm.weight") else w


def _no_fix(name: str, w: torch.Tensor, cfg) -> torch.Tensor:
    return w


# ---- architecture metadata -------------------------------------------------------------------------


def _f32(x: float) -> tuple[float, GGUFValueType]:
    return (float(x), GGUFValueType.FLOAT32)


def _u32(x: int) -> tuple[int, GGUFValueType]:
    return (int(x), GGUFValueType.UINT32)


# metadata writers and extra tensors, by llama.cpp architecture (a family's row in families.py names it)
_WRITERS: dict[str, tuple[Any, Any]] = {}


def _writes(*archs: str, extra_tensors=None):
    """Register the metadata writer of GGUF architectures `archs`; extra_tensors(cfg): tensors made from the config."""

    def register(fn):
        for arch in archs:
            _WRITERS[arch] = (fn, extra_tensors or _no_extra_tensors)
        return fn

    return register


def _no_extra_tensors(cfg) -> dict[str, torch.Tensor]:
    return {}


def _llama_extra_tensors(cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """LlamaModel.generate_extra_tensors: llama3 RoPE scaling as the rope_freqs tensor (F32), no metadata."""
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "llama3":
        return {ROPE_FREQS: llama3_rope_factors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)}
    return {}


@_writes("llama", extra_tensors=_llama_extra_tensors)
@_writes("qwen2")
def _llama_metadata(cfg: LlamaConfig, arch: str) -> dict[str, tuple]:
    """LlamaModel / Qwen2Model.set_gguf_parameters in convert_hf_to_gguf.py."""
    rope_type = cfg.rope_scaling and cfg.rope_scaling["rope_type"]
    if rope_type not in (None, "linear") and not (rope_type == "llama3" and arch == "llama"):
        # llama3 RoPE is the rope_freqs tensor (_llama_extra_tensors), which llama.cpp reads for llama only
        raise PocketLMError(f"GGUF export of {rope_type} RoPE scaling is not supported for {arch} (only linear)")
    if cfg.sliding_window is not None:
        raise PocketLMError(f"GGUF export of a {cfg.model_type} model with sliding-window attention is not supported")
    md = _common_metadata(cfg, arch)
    md[Keys.Rope.DIMENSION_COUNT.format(arch=arch)] = _u32(cfg.head_dim)
    if cfg.head_dim != cfg.dim // cfg.n_heads:  # e.g. after pruning heads: llama.cpp's n_embd_head_k
        md[Keys.Attention.KEY_LENGTH.format(arch=arch)] = _u32(cfg.head_dim)
        md[Keys.Attention.VALUE_LENGTH.format(arch=arch)] = _u32(cfg.head_dim)
    return md


@_writes("gemma3")
def _gemma3_metadata(cfg: Gemma3Config, arch: str) -> dict[str, tuple]:
    """Gemma3Model.set_gguf_parameters. llama.cpp hard-codes what it does not store (see gguf.py _gemma3_config)."""
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] != "linear":
        kind = cfg.rope_scaling["rope_type"]
        raise PocketLMError(f"GGUF export of Gemma 3 with {kind} RoPE scaling is not supported (only linear)")
    derived = cfg.dim // cfg.n_heads if cfg.n_layers == 62 else cfg.head_dim
    if cfg.query_pre_attn_scalar != derived:
        raise PocketLMError(
            f"Gemma 3 with query_pre_attn_scalar {cfg.query_pre_attn_scalar} cannot be stored in GGUF: "
            f"llama.cpp derives it from the shapes ({derived})"
        )
    if cfg.rope_local_scaling:
        raise PocketLMError("GGUF export of Gemma 3 with RoPE scaling on local layers is not supported")
    md = _common_metadata(cfg, arch)
    md[Keys.Attention.KEY_LENGTH.format(arch=arch)] = _u32(cfg.head_dim)
    md[Keys.Attention.VALUE_LENGTH.format(arch=arch)] = _u32(cfg.head_dim)
    md[Keys.Attention.SLIDING_WINDOW.format(arch=arch)] = _u32(cfg.sliding_window)
    if cfg.rope_local_base_freq != 10000.0:  # llama.cpp's default for local layers
        md[Keys.Rope.FREQ_BASE_SWA.format(arch=arch)] = _f32(cfg.rope_local_base_freq)
    if cfg.layer_types != [SLIDING if (i + 1) % 6 else FULL for i in range(cfg.n_layers)]:
        # not the every-6th-layer-global pattern llama.cpp assumes (e.g. after dropping layers): one bool per
        # layer, True = sliding, as newer converters write it and gguf.py reads it
        md[Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)] = (
            [t == SLIDING for t in cfg.layer_types], GGUFValueType.ARRAY, GGUFValueType.BOOL
        )
    for key, value in ((Keys.LLM.FINAL_LOGIT_SOFTCAPPING, cfg.final_logit_softcapping),
                       (Keys.LLM.ATTN_LOGIT_SOFTCAPPING, cfg.attn_logit_softcapping)):  # fmt: skip
        if value is not None:
            md[key.format(arch=arch)] = _f32(value)
    return md


@_writes("gemma", "gemma2")
def _gemma_metadata(cfg: GemmaConfig, arch: str) -> dict[str, tuple]:
    """GemmaModel.set_gguf_parameters. llama.cpp's gemma reads its head from token_embd (always tied)."""
    if not cfg.tie_word_embeddings:
        raise PocketLMError("GGUF export of Gemma with an untied head is not supported: llama.cpp's gemma has no output tensor")
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] != "linear":
        raise PocketLMError(f"GGUF export of Gemma with {cfg.rope_scaling['rope_type']} RoPE scaling is not supported (only linear)")
    md = _common_metadata(cfg, arch)
    md[Keys.Attention.KEY_LENGTH.format(arch=arch)] = _u32(cfg.head_dim)
    md[Keys.Attention.VALUE_LENGTH.format(arch=arch)] = _u32(cfg.head_dim)
    if cfg.post_norms:  # Gemma2Model.set_gguf_parameters: and what gguf.py's _gemma2_config reads back
        derived = cfg.dim // cfg.n_heads if cfg.n_layers == 46 else cfg.head_dim
        if cfg.query_pre_attn_scalar != derived:
            raise PocketLMError(f"Gemma 2 with query_pre_attn_scalar {cfg.query_pre_attn_scalar} cannot be stored in GGUF: "
                                f"llama.cpp derives it from the shapes ({derived})")
        if cfg.attn_logit_softcapping is None or cfg.final_logit_softcapping is None:
            raise PocketLMError("GGUF export of Gemma 2 without soft-capping is not supported: llama.cpp's gemma2 always caps")
        md[Keys.LLM.ATTN_LOGIT_SOFTCAPPING.format(arch=arch)] = _f32(cfg.attn_logit_softcapping)
        md[Keys.LLM.FINAL_LOGIT_SOFTCAPPING.format(arch=arch)] = _f32(cfg.final_logit_softcapping)
        md[Keys.Attention.SLIDING_WINDOW.format(arch=arch)] = _u32(cfg.sliding_window or cfg.max_position_embeddings)
        sliding = [cfg.window(i) is not None for i in range(cfg.n_layers)]
        if sliding != [bool((i + 1) % 2) for i in range(cfg.n_layers)]:  # not llama.cpp's every-other-layer pattern
            md[Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)] = (sliding, GGUFValueType.ARRAY, GGUFValueType.BOOL)
    return md


@_writes("phi2")
def _phi2_metadata(cfg: PhiConfig, arch: str) -> dict[str, tuple]:
    """Phi2Model.set_gguf_parameters: LayerNorm's epsilon, the rotary part of a head as rope.dimension_count."""
    if cfg.tie_word_embeddings:
        raise PocketLMError("GGUF export of Phi with a tied head is not supported: llama.cpp's phi2 reads output.weight")
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] != "linear":
        raise PocketLMError(f"GGUF export of Phi with {cfg.rope_scaling['rope_type']} RoPE scaling is not supported (only linear)")
    if cfg.n_heads * cfg.head_dim != cfg.dim:  # llama.cpp's phi2.cpp: wq and wo are (n_embd, n_embd)
        raise PocketLMError(
            f"GGUF export of Phi with {cfg.n_heads} heads of {cfg.head_dim} in a hidden size of {cfg.dim} is not supported: "
            "llama.cpp's phi2 sizes q and the output projection by the hidden size (a model pruned by heads or hidden "
            "channels: export it as hf)"
        )
    md = _common_metadata(cfg, arch)
    del md[Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch)]
    md[Keys.Attention.LAYERNORM_EPS.format(arch=arch)] = _f32(cfg.norm_eps)
    md[Keys.Rope.DIMENSION_COUNT.format(arch=arch)] = _u32(cfg.rotary_dim)
    return md


@_writes("gpt2")
def _gpt2_metadata(cfg: GPT2Config, arch: str) -> dict[str, tuple]:
    """GPT2Model.set_gguf_parameters: what llama.cpp's gpt2 reads. It computes GELU's tanh approximation and scores
    scaled by 1/sqrt(head_dim) (src/models/gpt2.cpp): a model that differs is refused."""
    if GPT_ACTIVATIONS[cfg.activation] != "tanh":
        raise PocketLMError(f"GGUF export of GPT-2 with activation {cfg.activation!r} is not supported: llama.cpp's gpt2 uses gelu_new")
    if not cfg.scale_attn_weights or cfg.scale_attn_by_inverse_layer_idx:
        raise PocketLMError("GGUF export of GPT-2 with other attention scaling than 1/sqrt(head_dim) is not supported")
    md = {
        Keys.LLM.CONTEXT_LENGTH: _u32(cfg.max_position_embeddings),
        Keys.LLM.EMBEDDING_LENGTH: _u32(cfg.dim),
        Keys.LLM.BLOCK_COUNT: _u32(cfg.n_layers),
        Keys.LLM.FEED_FORWARD_LENGTH: _u32(cfg.intermediate_size),
        Keys.Attention.HEAD_COUNT: _u32(cfg.n_heads),
        Keys.Attention.LAYERNORM_EPS: _f32(cfg.norm_eps),
    }
    return {k.format(arch=arch): v for k, v in md.items()}


@_writes("phi3")
def _phi3_metadata(cfg: Phi3Config, arch: str) -> dict[str, tuple]:
    """Phi3MiniModel.set_gguf_parameters: the rotary part of a head as rope.dimension_count, the original context,
    the sliding window (0: none). llama.cpp runs Phi-3's window as full attention (its phi3 disables SWA)."""
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] != "linear":
        raise PocketLMError(f"GGUF export of Phi-3 with {cfg.rope_scaling['rope_type']} RoPE scaling is not supported (only linear)")
    if cfg.n_heads * cfg.head_dim != cfg.dim:
        raise PocketLMError(
            f"GGUF export of Phi-3 with {cfg.n_heads} heads of {cfg.head_dim} in a hidden size of {cfg.dim} is not supported: "
            "llama.cpp's phi3 sizes q/k/v by the hidden size (a model pruned by heads or hidden channels: export it as hf)"
        )
    md = _common_metadata(cfg, arch)
    md[Keys.Rope.DIMENSION_COUNT.format(arch=arch)] = _u32(cfg.rotary_dim)
    md[Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch)] = _u32(cfg.original_max_position_embeddings)
    md[Keys.Attention.SLIDING_WINDOW.format(arch=arch)] = _u32(cfg.sliding_window or 0)
    return md


def _common_metadata(cfg, arch: str) -> dict[str, tuple]:
    """TextModel.set_gguf_parameters: the keys gguf.py's _common_config reads back."""
    md = {
        Keys.LLM.CONTEXT_LENGTH: _u32(cfg.max_position_embeddings),
        Keys.LLM.EMBEDDING_LENGTH: _u32(cfg.dim),
        Keys.LLM.BLOCK_COUNT: _u32(cfg.n_layers),
        Keys.LLM.FEED_FORWARD_LENGTH: _u32(cfg.intermediate_size),
        Keys.Attention.HEAD_COUNT: _u32(cfg.n_heads),
        Keys.Attention.HEAD_COUNT_KV: _u32(cfg.n_kv_heads),
        Keys.Attention.LAYERNORM_RMS_EPS: _f32(cfg.norm_eps),
        Keys.Rope.FREQ_BASE: _f32(cfg.rope_theta),
        Keys.LLM.VOCAB_SIZE: _u32(cfg.vocab_size),
    }
    md = {k.format(arch=arch): v for k, v in md.items()}
    if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "linear":  # llama3: a tensor, not keys
        md[Keys.Rope.SCALING_TYPE.format(arch=arch)] = ("linear", GGUFValueType.STRING)
        md[Keys.Rope.SCALING_FACTOR.format(arch=arch)] = _f32(cfg.rope_scaling["factor"])
    return md


@dataclass(frozen=True)
class _Architecture:
    gguf_arch: str
    block_names: dict[str, str]  # HF block module name -> GGUF name
    metadata: Any
    fix: Any
    extra_tensors: Any = _no_extra_tensors  # GGUF tensors made from the config, written before the weights
    top_names: dict[str, str] = field(default_factory=lambda: TOP_LEVEL_GGUF)  # HF top-level name -> GGUF name
    blocks: str = "model.layers"  # the HF name of the block list (GPT-2: transformer.h)

    def fixed_shape(self, gguf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A tensor's shape after `fix` (GPT-2's Conv1D weights turn; every other fix keeps the shape)."""
        return shape[::-1] if self.fix is _conv1d_fix and gguf_name.endswith(_CONV1D_WEIGHTS) else shape


_CONV1D_WEIGHTS = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")


def _conv1d_fix(name: str, w: torch.Tensor, cfg) -> torch.Tensor:
    # GPT2Model.modify_tensors: GPT-2's Conv1D weights, (in, out), transposed to ggml's (out, in)
    return w.t().contiguous() if name.endswith(_CONV1D_WEIGHTS) else w


_FIXES = {"none": _no_fix, "permute_qk": _llama_fix, "norm_plus_one": _gemma3_fix, "transpose_conv1d": _conv1d_fix}


def _architecture(g: families.Gguf) -> _Architecture:
    metadata, extra_tensors = _WRITERS[g.arch]
    return _Architecture(g.arch, _invert(g.block_names), metadata, _FIXES[g.fix], extra_tensors, _invert(g.top_level_names), g.blocks)


# model_type -> how it is stored, from each family's row (llama.cpp's convert_hf_to_gguf.py writes Mistral as "llama")
ARCHITECTURES: dict[str, _Architecture] = {f.model_type: _architecture(f.gguf) for f in families.FAMILIES.values() if f.gguf}


# ---- the tokenizer: the inverse of Tokenizer.from_gguf_metadata ---------------------------------------


def tokenizer_metadata(tokenizer, gguf_arch: str, n_vocab: int = 0) -> dict[str, tuple]:
    """A pocketlm Tokenizer -> tokenizer.ggml.* keys, the way convert_hf_to_gguf.py's _set_vocab_gpt2 (byte-level
    BPE) and _set_vocab_sentencepiece (SentencePiece BPE) write them. Tokenizer.from_gguf_metadata of the result
    gives the same ids for every text. n_vocab: the embedding's rows, when it has more than the tokenizer
    (the extra ids become "[PADi]" tokens, as convert_hf_to_gguf.py pads them)."""
    from pocketlm import tokenizer as tk

    data = json.loads(tokenizer.backend.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise PocketLMError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')!r}")
    n = max(tokenizer.vocab_size, n_vocab)
    tokens: list[str | None] = [None] * n
    for text, i in model["vocab"].items():
        tokens[i] = text
    added = {t["id"]: t for t in data.get("added_tokens") or []}
    for i, t in added.items():
        tokens[i] = t["content"]
    types = [TokenType.NORMAL] * n
    for i, t in added.items():
        types[i] = TokenType.CONTROL if t["special"] else TokenType.USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:  # convert_hf_to_gguf.py fills holes in the id range the same way
            tokens[i], types[i] = f"[PAD{i}]", TokenType.UNUSED

    S, A = GGUFValueType.STRING, GGUFValueType.ARRAY
    md: dict[str, tuple] = {}
    if model.get("byte_fallback"):  # SentencePiece BPE: "▁" for spaces, <0xNN> byte tokens
        gemma = tk.is_gemma_architecture(gguf_arch)
        if gemma:  # undo from_gguf_metadata's respelling of Gemma's all-space tokens, user-defined in its file
            for i, t in enumerate(tokens):
                if len(t) > 1 and set(t) == {"\u2581"}:
                    tokens[i], types[i] = " " * len(t), TokenType.USER_DEFINED
        byte_tokens = {f"<0x{b:02X}>" for b in range(256)}
        for i, t in enumerate(tokens):
            if types[i] == TokenType.NORMAL and t in byte_tokens:
                types[i] = TokenType.BYTE
        # llama.cpp's SentencePiece tokenizer merges the best-scored pair first; both pocketlm and transformers
        # rank Gemma's merges by token order, and a SentencePiece BPE model's scores fall with the token id.
        # So the scores are the token order, as in Gemma 3's own file: normal tokens 0, -1, -2, ...; control and
        # user-defined tokens -1000; bytes 0.
        scores, rank = [], 0
        for kind in types:
            if kind == TokenType.NORMAL:
                scores.append(float(-rank))
                rank += 1
            else:
                scores.append(0.0 if kind == TokenType.BYTE else -1000.0)
        md["tokenizer.ggml.model"] = ("llama", S)
        md["tokenizer.ggml.pre"] = ("default", S)
        md["tokenizer.ggml.tokens"] = (tokens, A, S)
        md["tokenizer.ggml.scores"] = (scores, A, GGUFValueType.FLOAT32)
        md["tokenizer.ggml.token_type"] = ([int(t) for t in types], A, GGUFValueType.INT32)
        prefix = False if gemma else _metaspace_prefix(data.get("pre_tokenizer"))
        md["tokenizer.ggml.add_space_prefix"] = (prefix, GGUFValueType.BOOL)
    else:  # byte-level BPE (GPT-2 style)
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        md["tokenizer.ggml.model"] = ("gpt2", S)
        md["tokenizer.ggml.pre"] = (_pre_name(data.get("pre_tokenizer")), S)
        md["tokenizer.ggml.tokens"] = (tokens, A, S)
        md["tokenizer.ggml.token_type"] = ([int(t) for t in types], A, GGUFValueType.INT32)
        md["tokenizer.ggml.merges"] = (merges, A, S)
    for key, value in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("unknown", tokenizer.unk_id),
                       ("padding", tokenizer.pad_id)):  # fmt: skip
        if value is not None:
            md[f"tokenizer.ggml.{key}_token_id"] = _u32(value)
    md["tokenizer.ggml.add_bos_token"] = (bool(tokenizer.add_bos), GGUFValueType.BOOL)
    md["tokenizer.ggml.add_eos_token"] = (bool(tokenizer.add_eos), GGUFValueType.BOOL)
    if tokenizer.chat_template:
        md["tokenizer.chat_template"] = (tokenizer.chat_template, S)
    return md


def _pre_name(pre: dict | None) -> str:
    """A byte-level tokenizer.json pre-tokenizer -> the tokenizer.ggml.pre name that rebuilds it (tokenizer.py's tables)."""
    from pocketlm import tokenizer as tk

    steps = (pre.get("pretokenizers") if pre and pre.get("type") == "Sequence" else [pre]) or []
    kinds = [s.get("type") for s in steps if s]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in (("llama-bpe", tk._LLAMA3_SPLIT), ("qwen2", tk._QWEN2_SPLIT)):
            if regex == split:
                return name
    raise PocketLMError(
        f"cannot tell which llama.cpp pre-tokenizer matches this tokenizer.json ({' + '.join(map(str, kinds)) or 'none'})"
    )


def _metaspace_prefix(pre: dict | None) -> bool:
    return not (pre and pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "never")


# ---- writing ---------------------------------------------------------------------------------------


def write_gguf(
    path: str | os.PathLike,
    hf_config: dict,
    state_dict: dict[str, torch.Tensor],
    tokenizer,
    qtype: str = "f32",
    lineage: dict | None = None,
) -> Path:
    """Write a decoder (config.json dict + HF-named state dict + pocketlm Tokenizer) as a GGUF file.

    lineage: the model's history (config.json's "pocketlm" key: source, quant, teacher, data, recipe, scores);
    stored as JSON under "pocketlm.lineage", with its name/license also under general.*."""
    if qtype not in QUANT_TYPES:
        raise PocketLMError(f"unknown GGUF type {qtype!r}: choose one of {', '.join(QUANT_TYPES)}")
    cfg = config_from_hf(hf_config)
    arch = ARCHITECTURES.get(cfg.model_type)
    if arch is None:
        raise PocketLMError(
            f"GGUF export of model_type {cfg.model_type!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    if tokenizer is None:
        raise PocketLMError("GGUF export needs the model's tokenizer (no tokenizer.json beside the weights)")
    matrix_type, file_type = QUANT_TYPES[qtype]
    lineage = dict(lineage or {})

    # Plan: (GGUF name, HF name, GGML type, torch shape) for every tensor, checked before any byte is written;
    # the tensors made from the config (HF name None) come first, as convert_hf_to_gguf.py writes them.
    names = {k: gguf_name(k, arch.block_names, arch.top_names, arch.blocks) for k in state_dict}
    if cfg.tie_word_embeddings:  # convert_hf_to_gguf.py writes no output.weight for a tied head
        names.pop("lm_head.weight", None)
    unnamed = sorted(k for k, v in names.items() if v is None)
    if unnamed:
        raise PocketLMError(f"{len(unnamed)} tensors have no GGUF name for {arch.gguf_arch}: {', '.join(unnamed[:4])}")
    extra = arch.extra_tensors(cfg)
    plan = [(gg, None, T.F32, tuple(t.shape)) for gg, t in extra.items()]
    shapes = {hf: arch.fixed_shape(gg, tuple(state_dict[hf].shape)) for hf, gg in names.items()}  # as the fix leaves them
    plan += [(gg, hf, tensor_type(matrix_type, shapes[hf]), shapes[hf]) for hf, gg in names.items()]

    metadata = {
        Keys.General.TYPE: ("model", GGUFValueType.STRING),
        Keys.General.NAME: (str(lineage.get("name") or "pocketlm model"), GGUFValueType.STRING),
        Keys.General.FILE_TYPE: _u32(file_type),
        Keys.General.QUANTIZATION_VERSION: _u32(2),  # GGML_QNT_VERSION
    }
    if lineage.get("license"):
        metadata[Keys.General.LICENSE] = (str(lineage["license"]), GGUFValueType.STRING)
    metadata |= arch.metadata(cfg, arch.gguf_arch)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise PocketLMError(f"the tokenizer has {tokenizer.vocab_size} tokens but the embedding only {cfg.vocab_size} rows")
    metadata |= tokenizer_metadata(tokenizer, arch.gguf_arch, cfg.vocab_size)
    metadata["pocketlm.lineage"] = (json.dumps(lineage, sort_keys=True, default=str), GGUFValueType.STRING)

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    writer = GGUFWriter(tmp, arch.gguf_arch)
    try:
        for key, (value, vtype, *sub) in metadata.items():  # state EMPTY: key/values and tensor infos collected
            writer.add_key_value(key, value, vtype, sub[0] if sub else None)
        for gg, _, gtype, shape in plan:
            writer.add_tensor_info(gg, shape, np.dtype(np.float32), tensor_nbytes(gtype, shape), raw_dtype=gtype)
        writer.write_header_to_file()  # -> HEADER
        writer.write_kv_data_to_file()  # -> KV_DATA
        writer.write_ti_data_to_file()  # -> TI_DATA
        for gg, hf, gtype, _ in plan:  # -> WEIGHTS, one tensor at a time, in the order of the infos
            w = extra[gg] if hf is None else arch.fix(gg, state_dict[hf].detach().to(torch.float32), cfg)
            writer.write_tensor_data(encode_tensor(w, gtype))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
