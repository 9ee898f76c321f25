"""Weight-only int8 linear layer (gpt-fast's WeightOnlyInt8QuantHandler); pocketlm.quant.quantize swaps it in. One symmetric scale per output channel, round to nearest.

Decode on a CPU reads every weight once per token, so a quarter of fp32's bytes is most of the gain;
the matmul is aten's `_weight_int8pack_mm`, which wants bf16 activations (with fp32 ones it is slow,
see ../shared/docs/FINDINGS.md), so the layer casts in and out and the rest of the model keeps its dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# From this many input rows on, multiply by the weight dequantized in float (the int8 kernel costs about
# 0.7 ms per row of a 3072 x 576 layer, converting the weight a few ms once)
DEQUANTIZE_ROWS = 16


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()  # (out, in)
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device)
        q.weight.copy_((w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        q.scales.copy_(scales.to(torch.bfloat16))
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone())
        return q

    # An output head sets this: aten's kernel returns bf16, whose steps at logits of 16-32 are 0.125, enough
    # to tie the two most likely tokens (SmolLM2 then answered "L'Étoile..." instead of "The capital of
    # France is Paris"). The head's `refine` most likely outputs are recomputed in fp32, so greedy picks and
    # top-k/top-p sampling see exact values; the rest keep the kernel's bf16 precision.
    refine: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., out)
        shape = x.shape
        if x.numel() // shape[-1] >= DEQUANTIZE_ROWS:  # a prompt: float matmul on the dequantized weight (as Int4Linear)
            w = self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
            return F.linear(x, w, self.bias)
        x2 = x.reshape(-1, shape[-1])  # (M, in)
        y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales).to(x.dtype)  # (M, out)
        if self.refine:
            top = y.topk(min(self.refine, self.out_features), dim=-1).indices  # (M, R)
            rows = self.weight[top].to(x.dtype) * self.scales[top].to(x.dtype)[..., None]  # (M, R, in)
            y.scatter_(-1, top, torch.einsum("mi,mri->mr", x2, rows))
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
