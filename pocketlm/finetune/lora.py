"""LoRA through the `peft` library on pocketlm's native models (QLoRA on quantized ones), and gradient checkpointing.

The native models use Hugging Face's parameter names (model.layers.N.self_attn.q_proj, ...), so peft's
`get_peft_model` finds the target Linears by name exactly as on a transformers model, swaps in its LoRA
Linear, and `save_pretrained` writes the adapter in PEFT's own format (adapter_config.json +
adapter_model.safetensors) that peft / transformers load onto the same base model. The model code
does not change (variants by swapping modules in).

QLoRA (Dettmers et al. 2023): on an int4 or int8 model (pocketlm.quant) the base stays quantized in memory and
frozen. Its fused q/k/v and gate/up layers are split back into Hugging Face's names (exact: quantization runs
along rows), peft wraps each target Int4Linear / Int8Linear in QuantLoraLinear (peft's custom-layer hook, as
its bitsandbytes Linear4bit), and the quantized layers pass gradients to their inputs by dequantizing on the fly
(pocketlm/quant/grad.py). The adapter is the same PEFT file a float base's would be. Merging folds it into the
dequantized base: a float model folder.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pocketlm.errors import PocketLMError


def is_quantized(model: nn.Module) -> bool:
    from pocketlm.quant.int4 import Int4Linear
    from pocketlm.quant.int8 import Int8Linear

    return any(isinstance(m, (Int4Linear, Int8Linear)) for m in model.modules())


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: list[str], base_name: str | None = None):
    """Freeze `model` and wrap it in a peft PeftModel with LoRA on the `targets` Linears (quantized ones too:
    QLoRA). Returns the PeftModel; `unwrap(peft_model)` is the native model with the LoRA layers inside (what the
    loop calls)."""
    from peft import LoraConfig, get_peft_model

    from pocketlm.quant.int4 import Int4Linear
    from pocketlm.quant.int8 import Int8Linear

    targets = family_targets(model, targets)
    quantized = is_quantized(model)
    if quantized:
        from pocketlm.quant import unfuse_projections

        unfuse_projections(model)  # q/k/v and gate/up by Hugging Face's names again: LoRA targets them by name
    kinds = (nn.Linear, Int4Linear, Int8Linear)
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, kinds) and name != "lm_head"}
    missing = [t for t in targets if t not in present]
    if missing:
        raise PocketLMError(f"LoRA targets {missing} are not Linear layers of this model; it has: {', '.join(sorted(present))}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    if quantized:
        from pocketlm.finetune.qlora import register

        register(config)
    peft_model = get_peft_model(model, config)
    # set afterwards: get_peft_model replaces it with the model's `name_or_path`, which a native model lacks
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def family_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The default targets (Llama's Linear names, finetune.config.DEFAULT_LORA_TARGETS) read as the model's family's
    own (pocketlm/families.py: Phi-3's fused qkv_proj and gate_up_proj, BERT's query/key/value/dense)."""
    from pocketlm.families import LLAMA_LORA, lookup

    row = lookup(getattr(getattr(model, "cfg", None), "model_type", None))
    return list(row.lora) if row is not None and tuple(targets) == LLAMA_LORA else list(targets)


def unwrap(model: nn.Module) -> nn.Module:
    """A PeftModel -> the native model it wraps (LoRA layers injected); anything else unchanged."""
    base = getattr(model, "base_model", None)
    return base.model if base is not None and hasattr(base, "model") and hasattr(model, "peft_config") else model


def save_adapter(peft_model, folder: Path) -> None:
    """adapter_config.json + adapter_model.safetensors (PEFT's format) in `folder`."""
    # save_embedding_layers=False: with "auto", PEFT looks the base model's name up on the Hugging Face hub to see
    # whether its vocabulary grew, and warns twice when offline; LoRA here never targets the embeddings
    peft_model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)


def merge(peft_model) -> nn.Module:
    """W + (alpha/r) B A folded into every target Linear; returns the plain native model. A quantized base is
    dequantized first (QuantLoraLinear.merge, pocketlm.quant.dequantize_model): the merged model is float."""
    model = peft_model.merge_and_unload()
    if is_quantized(model):
        from pocketlm.quant import dequantize_model

        dequantize_model(model)
    return model


def load_adapter(model: nn.Module, folder: Path):
    """A saved adapter back onto its (native) base model, float or quantized: a PeftModel."""
    from peft import LoraConfig, PeftModel

    if not is_quantized(model):
        return PeftModel.from_pretrained(model, str(folder))
    from pocketlm.finetune.qlora import register
    from pocketlm.quant import unfuse_projections

    unfuse_projections(model)
    config = LoraConfig.from_pretrained(str(folder))
    register(config)
    return PeftModel.from_pretrained(model, str(folder), config=config)


# ------------------------------------------------------------------------------ gradient checkpointing


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a native model: decoder layers, or an encoder's (models/encoder.py, `blocks`)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return list(inner.layers)
    if hasattr(model, "blocks"):
        return list(model.blocks)
    raise PocketLMError(f"gradient checkpointing: no decoder/encoder layers found in {type(model).__name__}")


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them: memory per block
    falls to its input, at about one extra forward. Done by wrapping each block instance's forward, so the
    model files carry no training switch and the parameter names stay the same."""
    for block in decoder_blocks(model):
        original = block.forward

        @functools.wraps(original)
        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():  # evaluation and generation: nothing to save memory for
                return _original(*args, **kwargs)
            # non-reentrant: works with inputs that need no grad (frozen embeddings under LoRA) and with DDP
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates, by name (shared tensors once): what a checkpoint stores."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
