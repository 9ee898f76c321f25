"""Weight-only int4, group-wise: swap each nn.Linear for Int4Linear (gpt-fast's WeightOnlyInt4QuantHandler).

Each row of the weight is cut into groups of `group_size` input channels; a group keeps 4-bit codes
q in 0..15 with its own bf16 scale and zero point, and w = (q - 8) * scale + zero (the layout of aten's
`_weight_int4pack_mm_for_cpu`, which takes bf16 activations). A group already on a 4-bit grid (a GGUF
Q4_0/Q4_1/Q4_K source) keeps it exactly; others round to nearest between their min and max, as gpt-fast's
`group_quantize_tensor` (see quantize_groups).

The codes are stored plainly (two per byte, low nibble first, shape (out, in/2)) so a saved model does not
depend on a kernel's layout. A decode step (a few rows) multiplies them with pocketlm's int4 kernel
(pocketlm/kernels/cpu.cpp: llama.cpp's integer dot products with activations rounded to 16 bits, on every CPU
target the kernels build for; bench/bench_kernels.py), laid out for it when the layer is built, or, without
pocketlm's kernels or with POCKETLM_INT4_KERNEL=0, with aten's `_weight_int4pack_mm_for_cpu` (bf16 activations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels
from pocketlm.quant.grad import linear_with_grad

GROUP_SIZES = (32, 64, 128)
# From this many input rows on, multiply by the weight dequantized in float. pocketlm's int4 kernel costs about
# 20 us per row of a 3072 x 576 layer, linear in rows; dequantizing costs a fixed ~0.5 s per SmolLM2 forward
# before the float matmul. Whole SmolLM2 prompts, finetune paused, best of 3 (the two paths alternated twice):
# 128 tokens 175-270 ms with the kernel against 580-710 ms dequantized, 512 tokens 825-990 ms against
# 890-1135 ms. So every prompt chunk (generate.PREFILL_CHUNK, 512) takes the kernel; long training and
# evaluation batches still dequantize (break-even near 1,000 rows by the same numbers).
DEQUANTIZE_ROWS = 1024


def quantize_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """w (N, K) float -> codes (N, K) uint8 in 0..15, scales_and_zeros (K/g, N, 2) bf16, and whether every
    group was already on a 4-bit grid (then nothing is lost but the bf16 rounding of scale and zero).

    A group whose values lie on an evenly spaced grid of at most 16 levels (a dequantized GGUF Q4_0, Q4_1
    or Q4_K block: w = step * q + offset) keeps that grid exactly. Any other group is rounded to 16 levels
    between its min and max (gpt-fast's group_quantize_tensor). Min/max alone would move a Q4_K group
    whose codes do not reach both 0 and 15 onto another grid: +24% perplexity on Gemma 3 270M."""
    N, K = w.shape
    groups = w.float().reshape(N, K // group_size, group_size)  # (N, K/g, g)
    lo, scale, on_grid = group_grid(groups)  # (N, K/g, 1) each
    codes = ((groups - lo) / scale).round().clamp(0, 15).to(torch.uint8).reshape(N, K)
    zero = lo + 8 * scale  # so that w = (q - 8) * scale + zero
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (K/g, N, 2)
    return codes, scales_and_zeros.to(torch.bfloat16), bool(on_grid.all())


def group_grid(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """groups (N, K/g, g) float -> each group's lowest level, step and whether it was already on a 4-bit grid,
    (N, K/g, 1) each (quantize_groups' rule; pocketlm.quant.calibrate starts its clipping search from it)."""
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)  # (N, K/g, 1)
    # the smallest gap between distinct values is the grid step, or a multiple of it when codes are unused
    gaps = groups.sort(-1).values.diff(dim=-1)  # (N, K/g, g-1)
    gaps = gaps.masked_fill(gaps <= 1e-6 * (hi - lo), float("inf"))
    smallest = gaps.amin(-1, keepdim=True)
    flat = smallest.isinf()  # every value equal: any step does
    step, on_grid = torch.ones_like(lo), flat.clone()
    for divisor in (1, 2, 3):
        candidate = torch.where(flat, 1.0, smallest / divisor)
        q = (groups - lo) / candidate
        fits = ((q - q.round()).abs() < 0.02).all(-1, keepdim=True) & (q.round().amax(-1, keepdim=True) <= 15)
        step = torch.where(fits & ~on_grid, candidate, step)
        on_grid |= fits
    scale = torch.where(on_grid, step, (hi - lo).clamp(min=1e-8) / 15)  # (N, K/g, 1)
    return lo, scale, on_grid


def dequantize_groups(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The float weight (N, K) the kernel multiplies by (for tests and export)."""
    N, K = codes.shape
    n_groups = scales_and_zeros.shape[0]
    sz = scales_and_zeros.float().transpose(0, 1)  # (N, K/g, 2)
    q = codes.float().reshape(N, n_groups, K // n_groups)
    return ((q - 8) * sz[..., :1] + sz[..., 1:]).reshape(N, K)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, element 2i in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, dtype=torch.uint8) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) codes in `dtype`."""
    codes = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype)
    codes[:, 0::2] = packed & 0xF
    codes[:, 1::2] = packed >> 4
    return codes


def unpack_kernel_layout(packed: torch.Tensor, N: int, K: int, g: int, layout: str = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """cpu.cpp's int4_unpack in torch (for a layer packed while the kernels were on, read after they were switched
    off): blocks of 16 rows, each group [16 scales | 16 zeros (bf16) | g/8 steps of 16 rows x 4 bytes], byte j of a
    step holding codes k + j (low nibble) and k + 4 + j (high) -> qweight (N, K/2), scales_and_zeros (K/g, N, 2).
    A GGUF's layouts ("q4_0", "q4_k"): their scales and zeros rounded to bf16."""
    B, G = -(-N // 16), K // g
    header, groups = kernel_layout_groups(packed, B, G, g, layout)
    if layout == "zeros":
        sz = header.contiguous().view(torch.bfloat16).view(B, G, 2, 16)  # (B, G, scale/zero, row)
    else:
        scale, offset = kernel_layout_scales(packed, N, K, g, layout, rows=B * 16)  # (B 16, G) each, w = scale q + offset
        sz = torch.stack([scale, offset + 8 * scale], -1).view(B, 16, G, 2).permute(0, 2, 3, 1).to(torch.bfloat16)
    steps = groups.reshape(B, G, g // 8, 16, 4)  # (B, G, step, row, byte)
    codes = torch.stack([steps & 0x0F, steps >> 4], dim=-2)  # (B, G, step, row, low/high, byte): 8 codes a step
    codes = codes.permute(0, 3, 1, 2, 4, 5).reshape(B * 16, K)[:N]  # (N, K)
    scales_and_zeros = sz.permute(1, 0, 3, 2).reshape(G, B * 16, 2)[:, :N].contiguous()  # (G, N, 2)
    return pack_nibbles(codes), scales_and_zeros


def kernel_layout_groups(packed: torch.Tensor, B: int, G: int, g: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout of B blocks of 16 rows -> each group's header (B, G, 64 or 32) and codes (B, G, g 8),
    uint8 (a Q4_K layout's super-block d and dmin left out)."""
    header = 64 if layout == "zeros" else 32
    if layout == "q4_k":  # each super-block of 8 groups: [d, dmin: 64 bytes | 8 groups]
        supers = packed.view(B, G // 8, 64 + 8 * (header + g * 8))[:, :, 64:]
        groups = supers.reshape(B, G, header + g * 8)
    else:
        groups = packed.view(B, G, header + g * 8)
    return groups[:, :, :header], groups[:, :, header:]


def kernel_layout_scales(packed: torch.Tensor, N: int, K: int, g: int, layout: str, rows: int | None = None):
    """A GGUF's layout ("q4_0", "q4_k") -> each group's scale and offset (N, K/g) fp32, w = scale q + offset, as the
    kernel computes them (Q4_0: d, -8 d; Q4_K: d sc, -dmin m): the file's weights exactly."""
    B, G = -(-N // 16), K // g
    header, _ = kernel_layout_groups(packed, B, G, g, layout)
    if layout == "q4_0":
        scale = header.contiguous().view(torch.float16).float()  # (B, G, row)
        offset = -8 * scale
    else:
        d = packed.view(B, G // 8, -1)[:, :, :64].contiguous().view(torch.float16).float().view(B, G // 8, 1, 2, 16)
        sc_m = header.reshape(B, G // 8, 8, 2, 16).float()  # (B, super, group, scale/min, row)
        scale, offset = d[:, :, :, 0] * sc_m[:, :, :, 0], -(d[:, :, :, 1] * sc_m[:, :, :, 1])  # (B, super, group, row)
        scale, offset = scale.reshape(B, G, 16), offset.reshape(B, G, 16)
    rows = N if rows is None else rows
    return (scale.permute(0, 2, 1).reshape(B * 16, G)[:rows].contiguous(), offset.permute(0, 2, 1).reshape(B * 16, G)[:rows].contiguous())


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of the group size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.kernel_weight: torch.Tensor | None = None  # aten's packed layout, made by pack() without pocketlm's kernels
        self.packed: torch.Tensor | None = None  # pocketlm's kernel's layout (kernels.int4_pack), made by pack()
        self.layout = "zeros"  # packed's layout (kernels.INT4_LAYOUTS); "q4_0", "q4_k": a GGUF's blocks as they are
        # What a checkpoint holds: plain nibbles and bf16 scales/zeros, buffers read through the properties below
        # (set into _buffers: register_buffer refuses a name a property has).
        self._buffers["qweight"] = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        self._buffers["scales_and_zeros"] = torch.zeros(in_features // group_size, out_features, 2, dtype=torch.bfloat16)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    # Where pocketlm's kernel runs, the layer keeps only the kernel's layout (`packed` holds the same codes, scales
    # and zeros) and its buffers stay empty: an int4 model's memory is its codes once, not twice (a 7B model's
    # 3.6 GB). qweight and scales_and_zeros unpack them again when read: saving, training, aten's path.
    @property
    def qweight(self) -> torch.Tensor:  # (N, K/2) uint8, element 2j in the low nibble of byte j
        return self._plain()[0]

    @property
    def scales_and_zeros(self) -> torch.Tensor:  # (K/g, N, 2) bf16
        return self._plain()[1]

    def _plain(self) -> tuple[torch.Tensor, torch.Tensor]:
        qweight, scales_and_zeros = self._buffers["qweight"], self._buffers["scales_and_zeros"]
        if qweight.numel() or self.packed is None:
            return qweight, scales_and_zeros
        if kernels.library() is not None:
            return kernels.int4_unpack(self.packed, self.out_features, self.in_features, self.group_size, self.layout)
        return unpack_kernel_layout(self.packed, self.out_features, self.in_features, self.group_size, self.layout)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"], destination[prefix + "scales_and_zeros"] = self._plain()

    @classmethod
    def from_packed(cls, packed: torch.Tensor, in_features: int, out_features: int, group_size: int, bias=None,
                    layout: str = "zeros") -> Int4Linear:
        """A layer that holds only the kernel's layout (kernels.int4_pack's, or int4_pack_gguf's from a GGUF's blocks;
        in `layout`, kernels.INT4_LAYOUTS)."""
        with torch.device("meta"):  # no buffers to fill
            q = cls(in_features, out_features, group_size, bias=bias is not None)
        q._buffers["qweight"], q._buffers["scales_and_zeros"] = torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.bfloat16)
        q.packed, q.layout = packed, layout
        if bias is not None:
            q.bias = nn.Parameter(bias.float(), requires_grad=False)
        return q

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, quantized=None) -> Int4Linear:
        """quantized: quantize_groups' result for this weight, if already computed."""
        q = cls(linear.in_features, linear.out_features, group_size, bias=linear.bias is not None)
        codes, q.scales_and_zeros, _ = quantized or quantize_groups(linear.weight.detach(), group_size)
        q.qweight = pack_nibbles(codes)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().float().clone())
        return q.pack()

    def pack(self) -> Int4Linear:
        """Make what the decode kernel reads (call again after loading a state dict): the codes, scales and zeros
        laid out for pocketlm's kernel (the plain buffers then emptied), or, where it is not built, the codes in
        aten's packed layout."""
        qweight, scales_and_zeros = self._plain()
        self.kernel_weight = self.packed = None
        self.layout = "zeros"
        self._buffers["qweight"], self._buffers["scales_and_zeros"] = qweight, scales_and_zeros
        if kernels.int4_kernel_on() and self.group_size in GROUP_SIZES and qweight.device.type == "cpu":
            self.packed = kernels.int4_pack(qweight, scales_and_zeros, self.group_size)
            self._buffers["qweight"] = torch.empty(0, dtype=torch.uint8)
            self._buffers["scales_and_zeros"] = torch.empty(0, dtype=torch.bfloat16)
        else:
            self.aten_weight()
        return self

    def aten_weight(self) -> torch.Tensor:
        """The codes in aten's packed layout, made on first use: where pocketlm's kernel is not built, or for
        inputs it does not take (bf16, or ones autograd records)."""
        if self.kernel_weight is None:
            self.kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.qweight, torch.int32), 1)
        return self.kernel_weight

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight (N, K), made in a few vectorized passes (dequantize_groups' arithmetic)."""
        N, K, g = self.out_features, self.in_features, self.group_size
        qweight, scales_and_zeros = self._plain()
        q = torch.empty(N, K // g, g)
        pairs = q.view(N, K // g, g // 2, 2)
        packed = qweight.view(N, K // g, g // 2)
        pairs[..., 0], pairs[..., 1] = packed & 0xF, packed >> 4
        if self.layout != "zeros":  # a GGUF's blocks: the kernel's scales exactly (the bf16 buffers round them)
            scale, offset = kernel_layout_scales(self.packed, N, K, g, self.layout)  # (N, K/g) each
            return torch.addcmul(offset[..., None], q, scale[..., None]).view(N, K)  # scale q + offset
        sz = scales_and_zeros.float().transpose(0, 1).contiguous()  # (N, K/g, 2)
        return torch.addcmul(sz[..., 1:], q.sub_(8), sz[..., :1]).view(N, K)  # (q - 8) * scale + zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., out)
        if x.requires_grad and torch.is_grad_enabled():  # training through the frozen weight (QLoRA): quant/grad.py
            return linear_with_grad(x, self)
        shape = x.shape
        if x.numel() // shape[-1] >= DEQUANTIZE_ROWS:
            # many rows (a long training or evaluation batch): past about 1,000 rows a float matmul on the weight
            # dequantized for this call beats the kernel's cost per row (DEQUANTIZE_ROWS' numbers)
            return F.linear(x, self.dequantized().to(x.dtype), self.bias)
        if self.packed is not None and kernels.usable(x):
            return kernels.int4_linear(x, self.packed, self.out_features, self.group_size, self.bias, self.layout)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).to(torch.bfloat16), self.aten_weight(), self.group_size, self.scales_and_zeros
        )
        y = y.view(*shape[:-1], self.out_features).to(x.dtype)
        return y + self.bias if self.bias is not None else y
