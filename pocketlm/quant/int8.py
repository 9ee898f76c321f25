"""Weight-only int8: swap each nn.Linear for Int8Linear, the model code does not change (gpt-fast's
WeightOnlyInt8QuantHandler). One symmetric scale per output channel, round to nearest.

Decode on a CPU reads every weight once per token, so a quarter of fp32's bytes is most of the gain;
the matmul is aten's `_weight_int8pack_mm`, which wants bf16 activations (with fp32 ones it is slow,
see ../shared/docs/FINDINGS.md), so the layer casts in and out and the rest of the model keeps its dtype.
"""

from __future__ import annotations

import torch
from torch import nn


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., out)
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight, self.scales)
        y = y.view(*shape[:-1], self.out_features).to(x.dtype)
        return y + self.bias if self.bias is not None else y


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in place (a tied output head gets its own int8 copy; the embedding
    table stays in float, it is only indexed)."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear.from_linear(child))
        else:
            quantize_int8(child)
    return model
