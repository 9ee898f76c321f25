"""Training through frozen quantized layers (QLoRA): the input's gradient flows, the weight stays int4 / int8.

QLoRA (Dettmers et al. 2023) trains LoRA adapters beside a base model that stays quantized in memory. The loss
needs dL/dx = dL/dy W through every quantized layer it flows back through; the weight itself gets no gradient.
As bitsandbytes' MatMul4Bit does, the weight is dequantized for the forward product and again for the backward
one: autograd keeps nothing of it (a float copy of every layer held for the backward pass would cost what the
quantized base saves). Int4Linear and Int8Linear route an input that needs a gradient here; inference never
comes here, and their kernels (which record no gradient) stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dequantized_weight(layer) -> torch.Tensor:
    """The fp32 weight (N, K) an Int4Linear or Int8Linear multiplies by."""
    return layer.dequantized()


class DequantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer) -> torch.Tensor:
        ctx.layer = layer  # the module, not its weight: the backward pass dequantizes again
        return F.linear(x, dequantized_weight(layer).to(x.dtype))  # (..., K) -> (..., N)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ dequantized_weight(ctx.layer).to(grad.dtype), None  # (..., N) -> (..., K); no weight gradient


def linear_with_grad(x: torch.Tensor, layer) -> torch.Tensor:
    """x (..., K) -> (..., N) through a quantized layer, differentiable in x (and in the bias, if it trains)."""
    y = DequantizedLinear.apply(x, layer)
    return y + layer.bias if layer.bias is not None else y
