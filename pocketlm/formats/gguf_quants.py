"""GGML block formats -> fp32 torch tensors.

Each dequantizer takes the raw bytes of a tensor as a (n_blocks, type_size) uint8 tensor and returns
its values as (n_blocks, block_size) float32. They are vectorized torch ports of gguf-py's
`gguf/quants.py` `dequantize_blocks` (which in turn matches ggml-quants.c `dequantize_row_*`), with the
float operations done in the same order, so the results are bit-identical to `gguf.quants.dequantize`
and therefore to what transformers' GGUF loader produces. Where gguf-py writes `d * q + m` we write
`q.mul_(d).add_(m)`: IEEE multiplication is commutative, and two separate ops means no FMA.

Block layouts (bytes) follow `block_*` structs in ggml-common.h; QK_K = 256 for the K-quants.
"""

from __future__ import annotations

from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

from pocketlm.errors import PocketLMError

# Shift amounts for unpacking sub-byte fields; broadcast against a trailing (..., 1, n) axis.
_NIBBLE_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8).view(2, 1)
_CRUMB_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8).view(8, 1)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian fp16 field at byte `start` of every block, as fp32 of shape (n_blocks, 1)."""
    return blocks[:, start : start + 2].view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, g, w) packed bytes -> (n, 2g, w) 4-bit values: each group of w bytes gives its low nibbles, then its high."""
    n, g, w = qs.shape
    return ((qs.unsqueeze(2) >> _NIBBLE_SHIFTS) & 0x0F).reshape(n, 2 * g, w)


# ---- plain float types -----------------------------------------------------------------------------


def dequantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float32)


def dequantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    # gguf-py: data.view(np.float16).astype(np.float32); fp16 -> fp32 is exact.
    return blocks.view(torch.float16).float()


def dequantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # gguf-py BF16.dequantize_blocks: (int16 as int32) << 16 viewed as float32; c10's bf16 -> fp32 is the same shift.
    return blocks.view(torch.bfloat16).float()


# ---- 32-element blocks: ggml-quants.c dequantize_row_q{4,5,8}_{0,1} --------------------------------


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q8_0: d (f16) | qs[32] (int8).  y = qs * d.  Ref: gguf-py Q8_0.dequantize_blocks.
    d = _f16(blocks, 0)
    return blocks[:, 2:].view(torch.int8).float().mul_(d)


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_0: d (f16) | qs[16]; element j < 16 is the low nibble of qs[j], element j + 16 the high one.
    # y = d * (q - 8).  Ref: gguf-py Q4_0.dequantize_blocks.
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:].unsqueeze(1)).reshape(-1, 32)  # (n, 32)
    return q.float().sub_(8).mul_(d)


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_1: d (f16) | m (f16) | qs[16].  y = d * q + m.  Ref: gguf-py Q4_1.dequantize_blocks.
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:].unsqueeze(1)).reshape(-1, 32)
    return q.float().mul_(d).add_(m)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) with bit j of that uint32 at column j, shifted to bit 4."""
    return (((qh.unsqueeze(2) >> _BIT_SHIFTS.view(8)) & 1) << 4).reshape(-1, 32)


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_0: d (f16) | qh (u32: 5th bit of each element) | qs[16].  y = d * (q - 16).
    # Ref: gguf-py Q5_0.dequantize_blocks.
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 6:].unsqueeze(1)).reshape(-1, 32) | _fifth_bits(blocks[:, 2:6])
    return q.float().sub_(16).mul_(d)


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_1: d (f16) | m (f16) | qh (u32) | qs[16].  y = d * q + m.  Ref: gguf-py Q5_1.dequantize_blocks.
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 8:].unsqueeze(1)).reshape(-1, 32) | _fifth_bits(blocks[:, 4:8])
    return q.float().mul_(d).add_(m)


# ---- 256-element super-blocks: ggml-quants.c dequantize_row_q{4,5,6}_K -------------------------------


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> eight 6-bit scales and eight 6-bit mins, each (n, 8).

    Ref: ggml-quants.c get_scale_min_k4 / gguf-py Q4_K.get_scale_min. Bytes 0-3 hold scales 0-3 (low 6 bits),
    bytes 4-7 mins 0-3; scales/mins 4-7 take their low 4 bits from bytes 8-11 and their top 2 bits from
    the spare high bits of bytes 0-3 / 4-7.
    """
    s = scales.view(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q4_K: d (f16) | dmin (f16) | scales[12] | qs[128]; 8 sub-blocks of 32.
    # y = (d * sc) * q - (dmin * m).  Ref: gguf-py Q4_K.dequantize_blocks.
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float()).unsqueeze(2)  # (n, 8, 1)
    dm = (_f16(blocks, 2) * mn.float()).unsqueeze(2)  # (n, 8, 1)
    q = _nibbles(blocks[:, 16:].view(n, 4, 32))  # (n, 8, 32)
    return q.float().mul_(d).sub_(dm).view(n, QK_K)


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q5_K: d | dmin | scales[12] | qh[32] | qs[128]; sub-block j takes its 5th bit from bit j of qh.
    # Ref: gguf-py Q5_K.dequantize_blocks.
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float()).unsqueeze(2)
    dm = (_f16(blocks, 2) * mn.float()).unsqueeze(2)
    qh = ((blocks[:, 16:48].unsqueeze(1) >> _BIT_SHIFTS) & 1) << 4  # (n, 8, 32)
    q = _nibbles(blocks[:, 48:].view(n, 4, 32)) | qh
    return q.float().mul_(d).sub_(dm).view(n, QK_K)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # block_q6_K: ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales[16] (int8) | d (f16); 16 sub-blocks of 16.
    # y = (d * scale) * (q - 32).  Ref: gguf-py Q6_K.dequantize_blocks.
    n = blocks.shape[0]
    d = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(2)  # (n, 16, 1)
    ql = ((blocks[:, :128].view(n, 2, 1, 64) >> _NIBBLE_SHIFTS) & 0x0F).view(n, 8, 32)
    qh = ((blocks[:, 128:192].view(n, 2, 1, 32) >> _CRUMB_SHIFTS) & 0x03).view(n, 8, 32)
    q = (ql | (qh << 4)).view(n, 16, 16)
    return q.float().sub_(32).mul_(d).view(n, QK_K)


# The registry: one entry per supported GGML type. Block and byte sizes come from gguf's GGML_QUANT_SIZES.
DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.F32: dequantize_f32,
    GGMLQuantizationType.F16: dequantize_f16,
    GGMLQuantizationType.BF16: dequantize_bf16,
    GGMLQuantizationType.Q8_0: dequantize_q8_0,
    GGMLQuantizationType.Q4_0: dequantize_q4_0,
    GGMLQuantizationType.Q4_1: dequantize_q4_1,
    GGMLQuantizationType.Q5_0: dequantize_q5_0,
    GGMLQuantizationType.Q5_1: dequantize_q5_1,
    GGMLQuantizationType.Q4_K: dequantize_q4_k,
    GGMLQuantizationType.Q5_K: dequantize_q5_k,
    GGMLQuantizationType.Q6_K: dequantize_q6_k,
}

# Values per dequantizer call: large enough to amortize torch's per-op overhead, small enough that the
# uint8 and fp32 intermediates of one chunk stay in cache instead of streaming through memory.
_CHUNK_VALUES = 1 << 18


def dequantize(raw: torch.Tensor, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGML bytes (1-D uint8) of a tensor of torch-order `shape` -> fp32 tensor of that shape."""
    fn = DEQUANTIZERS.get(ggml_type)
    if fn is None:
        supported = ", ".join(t.name for t in DEQUANTIZERS)
        name = ggml_type.name if isinstance(ggml_type, GGMLQuantizationType) else str(ggml_type)
        raise PocketLMError(f"GGML type {name} is not supported (supported: {supported})")
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    blocks = raw.view(-1, type_size)  # (n_blocks, type_size)
    # A fresh tensor: the result never aliases the caller's bytes (often a mapping of the file).
    out = torch.empty(blocks.shape[0], block_size, dtype=torch.float32)
    step = max(1, _CHUNK_VALUES // block_size)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = fn(blocks[start : start + step])
    return out.view(shape)
