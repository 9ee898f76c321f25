"""LoRA through the `peft` library on pocketlm's native models, and gradient checkpointing.

The native models use Hugging Face's parameter names (model.layers.N.self_attn.q_proj, ...), so peft's
`get_peft_model` finds the target Linears by name exactly as on a transformers model, swaps in its LoRA
Linear, and `save_pretrained` writes the adapter in PEFT's own format (adapter_config.json +
adapter_model.safetensors) that peft / transformers load onto the same base model. The model code
does not change (variants by swapping modules in).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pocketlm.errors import PocketLMError


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: list[str], base_name: str | None = None):
    """Freeze `model` and wrap it in a peft PeftModel with LoRA on the `targets` Linears. Returns the PeftModel;
    `unwrap(peft_model)` is the native model with the LoRA layers inside (what the loop calls)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise PocketLMError(f"LoRA targets {missing} are not Linear layers of this model; it has: {', '.join(sorted(present))}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    peft_model = get_peft_model(model, config)
    # set afterwards: get_peft_model replaces it with the model's `name_or_path`, which a native model lacks
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


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
    """W + (alpha/r) B A folded into every target Linear; returns the plain native model."""
    return peft_model.merge_and_unload()


def load_adapter(model: nn.Module, folder: Path):
    """A saved adapter back onto its (native) base model: a PeftModel."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder))


# ------------------------------------------------------------------------------ gradient checkpointing


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a native model: decoder layers, or BERT's encoder layers."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return list(inner.layers)
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layer"):
        return list(encoder.layer)
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
