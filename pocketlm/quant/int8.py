"""Weight-only int8 linear layer (gpt-fast's WeightOnlyInt8QuantHandler); pocketlm.quant.quantize swaps it in. One symmetric scale per output channel, round to nearest.

Decode on a CPU reads every weight once per token, so a quarter of fp32's bytes is most of the gain. The
matmul for a few rows is aten's `_weight_int8pack_mm`, which wants bf16 activations (with fp32 ones it is
slow, see ../shared/docs/FINDINGS.md); its bf16 result needs the head's `refine` (below).

Where pocketlm's kernels are built (pocketlm/kernels), a few rows go through them instead: `int8_linear`
multiplies the int8 weight by exact fp32 activations; a layer as large as an output head (PACK_MIN_WEIGHTS)
gets a second copy of its weight laid out for `int8_packed_linear`, which multiplies in integers with the int4
kernel's 16-bit activations: a batch of 8 rows through SmolLM2's head (a server's 8
streams) then costs 3.6 ms instead of 5.9, one row 0.85 ms instead of 1.19 (AVX-512 VNNI; bench/bench_kernels.py's last table).

Without pocketlm's kernels, a layer as large as an output head uses fbgemm (`quantized::linear_dynamic`,
the x86 engine of torch.ao's dynamic quantization): int8 weights times uint8 activations with VNNI, 1.3-1.5x
faster than aten's for one row and 1.3-1.7x for eight (bench/bench_int8.py). Its activations are 8-bit, which
alone costs SmolLM2 3.7% perplexity (all layers), and it picks one grid for the whole (M, in) block, which
would make a row's result depend on the rows batched with it. So each row x is sent on a grid of its own,
as two rows:
    v = x / p, p = max|x| / 127      v in [-127, 127]: its integer part is what an int8 grid holds
    r = (v - round(v)) * 254         the rounding error, blown up to the same range
plus one row [127.5, -127.5, 0, ...] that pins fbgemm's grid to steps of 1 for every block. Then
W x = p (W round(v) + W round(r) / 254): activations with about 15 bits (10x closer to the exact product
than bf16's), and a row's result is the same alone or in a batch. The extra rows cost little: a one-row
matmul is bound by reading the weight.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels

# From this many input rows on, multiply by the weight dequantized in float (MKL). aten's int8 kernel costs
# about 0.7 ms per row of a 3072 x 576 layer, converting the weight a few ms once; fbgemm breaks even with
# the conversion at about 128 rows (4.2 ms against 3.4 ms there, 6.4 ms against 0.9 ms at 16 rows).
DEQUANTIZE_ROWS = 16
FBGEMM_DEQUANTIZE_ROWS = 128

FINE = 254  # r's magnification: (v - round(v)) in [-0.5, 0.5] -> [-127, 127]

# fbgemm's path costs 100-170 us a call beyond the matmul itself (its ten small ops, and the switch into and
# out of its AVX-512 VNNI code: the ops right after it run slower), so it pays only where reading the weight
# dominates: output heads (SmolLM2 28M weights: 1.3x, Gemma 3 168M: 1.5x at one row, 1.7x at eight).
# Layers of 0.3-2.6M weights are 2-4x faster on aten's kernel (bench/bench_int8.py). The same size decides where
# pocketlm's packed int8 kernel gets its copy: the heads, whose batches it speeds up.
PACK_MIN_WEIGHTS = 8 * 2**20
PACK_ROWS = 32768  # output rows per fbgemm block (see pack)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        self.packed: list | None = None  # fbgemm's copy of the weight in blocks of PACK_ROWS rows, made by pack()
        self.packed_weight: torch.Tensor | None = None  # or the weight in int8_packed_linear's layout, made by pack()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()  # (out, in)
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device)
        q.weight.copy_((w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        q.scales.copy_(scales.to(torch.bfloat16))
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone())
        return q.pack()

    def pack(self) -> Int8Linear:
        """Give a layer as large as an output head its kernel's copy of the weight (call again after loading a state
        dict): int8_packed_linear's layout where that kernel is on, else fbgemm's where pocketlm's kernels are not
        built (they read the int8 weight as it is, with exact fp32 activations). A small layer does without."""
        self.packed = self.packed_weight = None
        if self.weight.device.type != "cpu" or self.weight.numel() < PACK_MIN_WEIGHTS:
            return self
        if kernels.int8_kernel_on() and self.in_features % 32 == 0:  # the kernel's activations come in blocks of 32
            self.packed_weight = kernels.int8_pack(self.weight)
            return self
        if "x86" not in torch.backends.quantized.supported_engines or kernels.library() is not None:
            return self

        def pack_rows(begin: int):
            end = min(begin + PACK_ROWS, self.out_features)
            zero_points = torch.zeros(end - begin, dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(self.weight[begin:end], self.scales[begin:end].double(), zero_points, 0)
            return torch.ops.quantized.linear_prepack(qweight, None)  # forward adds the bias

        # fbgemm packs one matrix on one thread, and slower than linearly in its rows (Gemma 3's 262k-row head:
        # 5 s whole, 0.8 s as 8 blocks on 2 threads); the blocks' matmuls are as fast as the whole one's
        with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated; torch is pinned (pyproject)
            warnings.simplefilter("ignore")
            with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
                self.packed = list(pool.map(pack_rows, range(0, self.out_features, PACK_ROWS)))
        self.grid_row = torch.zeros(1, self.in_features)
        self.grid_row[0, :2] = torch.tensor([127.5, -127.5])  # fbgemm's grid: min -127.5, max 127.5, step 1
        return self

    def _fbgemm(self, x2: torch.Tensor) -> torch.Tensor:
        # x2 (M, in) -> (M, out), see the module docstring
        M = x2.size(0)
        p = torch.linalg.vector_norm(x2, float("inf"), dim=-1, keepdim=True).clamp_(min=1e-30).div_(127)  # (M, 1)
        v = x2.float() / p  # (M, in), in [-127, 127]
        r = (v - v.round()).mul_(FINE)  # (M, in)
        rows = torch.cat([v, r, self.grid_row])  # (2M + 1, in)
        y = torch.cat([torch.ops.quantized.linear_dynamic(rows, block, False) for block in self.packed], dim=1)  # (2M + 1, out)
        return torch.add(y[:M], y[M : 2 * M], alpha=1 / FINE).mul_(p)  # (M, out)

    # An output head sets this for aten's kernel, which returns bf16: its steps at logits of 16-32 are 0.125,
    # enough to tie the two most likely tokens (SmolLM2 then answered "L'Étoile..." instead of "The capital
    # of France is Paris"). The head's `refine` most likely outputs are recomputed in fp32, so greedy picks and
    # top-k/top-p sampling see exact values. fbgemm's fp32 result needs no refining.
    refine: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., out)
        shape = x.shape
        rows = x.numel() // shape[-1]
        fbgemm = self.packed is not None and x.device.type == "cpu"
        if rows >= (FBGEMM_DEQUANTIZE_ROWS if fbgemm else DEQUANTIZE_ROWS):
            # a prompt: float matmul on the dequantized weight (as Int4Linear)
            w = self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
            return F.linear(x, w, self.bias)
        if kernels.usable(x):  # fp32 results: no refining
            if self.packed_weight is not None:
                return kernels.int8_packed_linear(x, self.packed_weight, self.scales, self.bias)
            return kernels.int8_linear(x, self.weight, self.scales, self.bias)
        x2 = x.reshape(rows, shape[-1])  # (M, in)
        if fbgemm:
            y = self._fbgemm(x2).to(x.dtype)  # (M, out)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales).to(x.dtype)  # (M, out)
            if self.refine:
                top = y.topk(min(self.refine, self.out_features), dim=-1).indices  # (M, R)
                top_rows = self.weight[top].to(x.dtype) * self.scales[top].to(x.dtype)[..., None]  # (M, R, in)
                y.scatter_(-1, top, torch.einsum("mi,mri->mr", x2, top_rows))
        y = y.view(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class Int8Embedding(nn.Module):
    """The token embedding read from a tied int8 output head: one int8 table serves both ends of the model
    (Gemma 3 270M's 262k x 640 table is 671 MB in fp32, 168 MB in int8). A looked-up row is
    weight[i] * scales[i], in `dtype`."""

    def __init__(self, head: Int8Linear, dtype=torch.float32):
        super().__init__()
        self.head = [head]  # a list, so the head's buffers are not registered (and saved) twice
        self.dtype = dtype

    @property
    def weight(self) -> torch.Tensor:  # for code that reads embed_tokens.weight.dtype / .device
        return self.head[0].weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        rows = head.weight[idx].to(self.dtype)  # (..., D)
        return rows * head.scales[idx].to(self.dtype).unsqueeze(-1)
