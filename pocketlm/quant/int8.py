"""Weight-only int8 linear layer (gpt-fast's WeightOnlyInt8QuantHandler); pocketlm.quant.quantize swaps it in. One symmetric scale per output channel, round to nearest.

Decode on a CPU reads every weight once per token, so a quarter of fp32's bytes is most of the gain. The
matmul for a few rows is aten's `_weight_int8pack_mm`, which wants bf16 activations (with fp32 ones it is
slow, see ../shared/docs/FINDINGS.md); its bf16 result needs the head's `refine` (below).

Where pocketlm's kernels are built (pocketlm/kernels), a few rows go through them instead: every layer (whose
input width is a multiple of 32) is laid out for `int8_packed_linear`, which multiplies in integers with the int4
kernel's 16-bit activations, and keeps only that layout (a tied head keeps its plain rows too, for the embedding):
a batch of 8 rows through SmolLM2's head (a server's 8 streams) costs 3.6 ms instead of 5.9 with `int8_linear`'s
exact fp32 activations, one row 0.85 ms instead of 1.19 (AVX-512 VNNI; bench/bench_kernels.py's last table), and
Gemma 3's int8 layers (its Q4_K_M file's 5-8-bit tensors) make a decoded token 1.3-1.4x faster than with
int8_linear (docs/BENCHMARKS.md).

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
from pocketlm.quant.grad import linear_with_grad

# From this many input rows on, multiply by the weight dequantized in float (MKL). aten's int8 kernel costs
# about 0.7 ms per row of a 3072 x 576 layer, converting the weight a few ms once; fbgemm breaks even with
# the conversion at about 128 rows (4.2 ms against 3.4 ms there, 6.4 ms against 0.9 ms at 16 rows).
DEQUANTIZE_ROWS = 16
FBGEMM_DEQUANTIZE_ROWS = 128

FINE = 254  # r's magnification: (v - round(v)) in [-0.5, 0.5] -> [-127, 127]

# fbgemm's path costs 100-170 us a call beyond the matmul itself (its ten small ops, and the switch into and
# out of its AVX-512 VNNI code: the ops right after it run slower), so it pays only where reading the weight
# dominates: output heads (SmolLM2 28M weights: 1.3x, Gemma 3 168M: 1.5x at one row, 1.7x at eight).
# Layers of 0.3-2.6M weights are 2-4x faster on aten's kernel (bench/bench_int8.py).
PACK_MIN_WEIGHTS = 8 * 2**20
PACK_ROWS = 32768  # output rows per fbgemm block (see pack)


def q6_k_layout_weight(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """cpu.cpp's INT4_Q6_K layout (a GGUF's Q6_K blocks as they are) -> the weight (N, K) fp32, w = d sc (q - 32) as
    ggml-quants.c's dequantize_row_q6_K computes it (every product exact in fp32). Blocks of 16 rows, each super-block
    of 256 columns [d fp16 (16 rows) | 8 groups of 32 columns], a group [sc + 128 (2 sub-blocks, 16 rows) | 4 steps
    of 16 rows x 4 bytes (codes' low 4 bits) | 2 planes of 16 rows x 4 bytes (their high 2 bits)]."""
    B, S = -(-N // 16), K // 256
    supers = packed.view(B, S, 32 + 8 * 416)
    d = supers[:, :, :32].contiguous().view(torch.float16).float()  # (B, S, row)
    groups = supers[:, :, 32:].reshape(B, S, 8, 416)
    sc = groups[..., :32].reshape(B, S, 8, 2, 16).float() - 128  # (B, S, group, sub-block, row)
    steps = groups[..., 32:288].reshape(B, S, 8, 4, 16, 4)  # (B, S, group, step, row, byte)
    planes = groups[..., 288:].reshape(B, S, 8, 2, 16, 4).repeat_interleave(2, dim=3)  # each step's plane
    shift = torch.tensor([0, 4, 0, 4], dtype=torch.uint8).view(4, 1, 1)  # steps 2P: bits 0-3, 2P + 1: bits 4-7
    low = (steps & 0x0F) | (((planes >> shift) & 3) << 4)  # columns 8 step + byte
    high = (steps >> 4) | (((planes >> (shift + 2)) & 3) << 4)  # columns 8 step + 4 + byte
    codes = torch.stack([low, high], dim=-2).permute(0, 4, 1, 2, 3, 5, 6).reshape(B * 16, K)  # (row, S, group, step, half, byte)
    scale = d.permute(0, 2, 1)[..., None, None] * sc.permute(0, 4, 1, 2, 3)  # (B, row, S, group, sub-block): d sc
    scale = scale.reshape(B * 16, K // 16).repeat_interleave(16, dim=1)  # (B 16, K)
    return (scale * (codes.float() - 32))[:N]


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> (weight (out, in) int8, scales (out,) bf16): each row rounded to nearest on its own
    symmetric grid, max |w| / 127 (rounded with the fp32 scale, kept as bf16)."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
    return (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales.to(torch.bfloat16)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.packed: list | None = None  # fbgemm's copy of the weight in blocks of PACK_ROWS rows, made by pack()
        self.packed_weight: torch.Tensor | None = None  # or the weight in int8_packed_linear's layout, made by pack()
        self.keep_rows = False  # a tied head: the embedding reads its plain rows (Int8Embedding), kept beside the layout
        # packed_weight's layout: "rows", int8_pack's of the int8 rows; "q6_k", a GGUF's Q6_K blocks as they are
        # (int4_pack_gguf's, multiplied by kernels.int4_linear: 6.56 bits a weight where int8 rows take 8, and the
        # file's weights exactly). Saved as int8 rows either way.
        self.layout = "rows"
        self.rows_only = False  # an untied embedding's table: rows looked up, never multiplied, so never packed
        # set into _buffers: register_buffer refuses the name of the `weight` property below
        self._buffers["weight"] = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    # Where pocketlm's int8 kernel runs, a layer keeps only its layout (`packed_weight`), as an int4 layer does, and
    # `weight` unpacks the plain (out, in) int8 rows again when read: saving, a prompt's float matmul.
    @property
    def weight(self) -> torch.Tensor:  # (out, in) int8
        plain = self._buffers["weight"]
        if plain.numel() or self.packed_weight is None:
            return plain
        if self.layout == "q6_k":
            return self.rows()[0]
        if kernels.library() is not None:
            return kernels.int8_unpack(self.packed_weight, self.out_features, self.in_features)
        # int8_pack's layout in torch (the kernels switched off since): blocks of 16 rows, K/4 steps of 16 rows x 4
        blocks = self.packed_weight.view(-1, self.in_features // 4, 16, 4).permute(0, 2, 1, 3)  # (B, row, step, byte)
        return (blocks.reshape(-1, self.in_features)[: self.out_features].to(torch.int16) - 128).to(torch.int8)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"], destination[prefix + "scales"] = self.rows()

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain int8 rows (out, in) and their bf16 scales (out,): a "q6_k" layer's made from its weights
        (int8_rows), where it holds none."""
        if self.layout == "q6_k" and not self.scales.numel():
            return int8_rows(self.dequantized())
        return self.weight, self.scales

    def keep_plain_rows(self) -> None:
        """Keep the plain rows beside the kernel's layout (a tied head: the embedding looks its rows up)."""
        self.keep_rows = True
        self._buffers["weight"], self.scales = self.rows()

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight (N, K) the kernel multiplies by."""
        if self.layout == "q6_k":
            return q6_k_layout_weight(self.packed_weight, self.out_features, self.in_features)
        return self.weight.float() * self.scales.float()[:, None]

    @classmethod
    def of_rows(cls, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """A layer of int8 rows (N, K) and their bf16 scales (N,), laid out for its kernel (pack)."""
        q = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        q._buffers["weight"], q.scales = weight, scales
        if bias is not None:
            q.bias = nn.Parameter(bias, requires_grad=False)
        return q.pack()

    @classmethod
    def of_q6_k(cls, packed: torch.Tensor, in_features: int, out_features: int, bias: torch.Tensor | None = None,
                rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> Int8Linear:
        """A layer holding a GGUF's Q6_K blocks in the kernel's "q6_k" layout (kernels.int4_pack_gguf's), and `rows`,
        its int8 rows and scales, where they are made already (a tied head's embedding looks them up)."""
        q = cls(in_features, out_features, bias=bias is not None, device="meta")
        q._buffers["weight"], q.scales = rows or (torch.empty(0, dtype=torch.int8), torch.empty(0, dtype=torch.bfloat16))
        q.packed_weight, q.layout = packed, "q6_k"
        if bias is not None:
            q.bias = nn.Parameter(bias, requires_grad=False)
        return q

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device)
        q.weight, q.scales = int8_rows(linear.weight.detach())
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone())
        return q.pack()

    def pack(self) -> Int8Linear:
        """Lay the weight out for the kernel that multiplies it (call again after loading a state dict): every layer
        int8_packed_linear's layout where that kernel is on (the plain rows then dropped, unless keep_rows), else a
        layer as large as an output head fbgemm's where pocketlm's kernels are not built."""
        if self.layout == "q6_k":
            return self  # the file's blocks, laid out already
        plain = self.weight
        self.packed = self.packed_weight = None
        self._buffers["weight"] = plain
        if plain.device.type != "cpu" or self.rows_only:
            return self
        if kernels.int8_kernel_on() and self.in_features % 32 == 0:  # the kernel's activations come in blocks of 32
            self.packed_weight = kernels.int8_pack(plain)
            if not self.keep_rows:
                self._buffers["weight"] = torch.empty(0, dtype=torch.int8)
            return self
        if plain.numel() < PACK_MIN_WEIGHTS or "x86" not in torch.backends.quantized.supported_engines or kernels.library() is not None:
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
        if x.requires_grad and torch.is_grad_enabled():  # training through the frozen weight (QLoRA): quant/grad.py
            return linear_with_grad(x, self)
        shape = x.shape
        rows = x.numel() // shape[-1]
        if self.packed_weight is not None and kernels.usable(x):
            # any number of rows: a 512-token prompt through Llama 3.2 3B's down projection took 360 ms here against
            # 1,145 ms for the weight dequantized and MKL's fp32 matmul (bench/bench_kernels.py, "prompt rows")
            if self.layout == "q6_k":
                return kernels.int4_linear(x, self.packed_weight, self.out_features, 32, self.bias, "q6_k")
            return kernels.int8_packed_linear(x, self.packed_weight, self.scales, self.bias)
        if self.layout == "q6_k":  # bf16 inputs, or the kernels switched off since
            return F.linear(x, self.dequantized().to(x.dtype), self.bias)
        fbgemm = self.packed is not None and x.device.type == "cpu"
        if rows >= (FBGEMM_DEQUANTIZE_ROWS if fbgemm else DEQUANTIZE_ROWS):
            # a prompt: float matmul on the dequantized weight (as Int4Linear)
            w = self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
            return F.linear(x, w, self.bias)
        if kernels.usable(x):  # fp32 results: no refining
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

    def __init__(self, head: Int8Linear, dtype=torch.float32, own: bool = False):
        super().__init__()
        self.head = [head]  # a list, so the head's buffers are not registered (and saved) twice
        if own:  # an untied model's embedding: a table of its own (never multiplied as a layer), registered
            self.table = head
        self.dtype = dtype

    @classmethod
    def of_rows(cls, weight: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> Int8Embedding:
        """An untied embedding held as int8 rows (int8_rows' weight and scales), a quarter of its fp32 bytes (a GGUF
        read directly: pocketlm/quant/from_gguf.py)."""
        with torch.device("meta"):
            table = Int8Linear(weight.shape[1], weight.shape[0])
        table.weight, table.scales = weight, scales
        table.rows_only = True
        return cls(table, dtype, own=True)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads embed_tokens.weight.dtype / .device
        return self.head[0].weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        rows = head.weight[idx].to(self.dtype)  # (..., D)
        return rows * head.scales[idx].to(self.dtype).unsqueeze(-1)
