"""QLoRA's LoRA layer: peft's LoRA beside a frozen Int4Linear / Int8Linear (see lora.py). Imported only for a
quantized base, so that plain fine-tuning does not pay for peft's import."""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from pocketlm.errors import PocketLMError


def register(config) -> None:
    """Tell a peft LoraConfig to wrap pocketlm's quantized layers in QuantLoraLinear (peft's custom-module API)."""
    from pocketlm.quant.int4 import Int4Linear
    from pocketlm.quant.int8 import Int8Linear

    config._register_custom_module({Int4Linear: QuantLoraLinear, Int8Linear: QuantLoraLinear})


class QuantLoraLinear(nn.Module, LoraLayer):
    """LoRA beside a frozen Int4Linear / Int8Linear (peft's custom-module hook; the shape of peft's bitsandbytes
    Linear4bit): y = base(x) + B(A(dropout(x))) * scaling. The base computes as in inference (its kernels) when x
    needs no gradient, else through quant/grad.py; peft's disable_adapter() (DPO's reference) leaves it alone."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module):
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config, **kwargs):
        if config.use_dora:
            raise PocketLMError("DoRA is not supported on a quantized base")
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name in self.lora_A:
                A, B = self.lora_A[name], self.lora_B[name]
                result = result + B(A(self.lora_dropout[name](x.to(A.weight.dtype)))).to(result.dtype) * self.scaling[name]
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]  # (N, K)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """Into the dequantized weight: the base becomes an fp32 nn.Linear."""
        from pocketlm.quant.grad import dequantized_weight

        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
            dense.weight = nn.Parameter(dequantized_weight(base), requires_grad=False)
            if base.bias is not None:
                dense.bias = nn.Parameter(base.bias.detach().float().clone(), requires_grad=False)
            self.base_layer = dense
        for name in adapter_names or self.active_adapters:
            if name in self.lora_A:
                self.base_layer.weight.data += self.get_delta_weight(name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self.base_layer.weight.data -= self.get_delta_weight(self.merged_adapters.pop())
