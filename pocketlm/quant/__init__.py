"""Weight-only quantization: nn.Linear layers swapped for int8 or int4 ones; the model code does not change.

A scheme is named by a short string, used by `--quant`, `pocketlm quantize --to` and a saved model's
config.json ("pocketlm": {"quantization": {...}}):
    "int8"          int8, one scale per output channel
    "int4"          int4 in groups of 32 input channels (also "int4-g64", "int4-g128")
    "int4-mixed"    int4 in groups of 32 for layers whose weights already lie on 4-bit grids (a Q4 GGUF's
                    Q4_0/Q4_1/Q4_K tensors: kept exactly), int8 for the others (its Q6_K ones): what
                    `--quant auto` picks for a 4-bit GGUF
In every scheme the output head is int8: with int4 it is the layer whose error shows most in perplexity
(docs/BENCHMARKS.md). When the head is tied to the token embedding, the embedding reads the same int8
table (Int8Embedding), so the model holds one int8 copy instead of a float one.

Models that can fuse q/k/v and gate/up projections (`fuse_projections`) are fused first: fewer, larger
matmuls per token. A quantized model is for inference only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from pocketlm.errors import PocketLMError


HEAD_REFINE = 64  # an int8 output head recomputes its 64 largest logits in fp32 (see Int8Linear.refine)


@dataclass(frozen=True)
class QuantScheme:
    weights: str  # "int8" | "int4"
    group_size: int = 0  # int4 only
    head: str = "int8"  # the output head (lm_head)
    off_grid: str = "int4"  # int4 schemes: what a layer whose weights are not on 4-bit grids becomes

    @property
    def name(self) -> str:
        if self.weights == "int8":
            return "int8"
        if self.off_grid == "int8":
            return "int4-mixed"
        return "int4" if self.group_size == 32 else f"int4-g{self.group_size}"

    @classmethod
    def parse(cls, name: str) -> QuantScheme:
        from pocketlm.quant.int4 import GROUP_SIZES

        if name == "int8":
            return cls("int8")
        if name == "int4":
            return cls("int4", 32)
        if name == "int4-mixed":
            return cls("int4", 32, off_grid="int8")
        if name.startswith("int4-g") and name[6:].isdigit() and int(name[6:]) in GROUP_SIZES:
            return cls("int4", int(name[6:]))
        raise PocketLMError(f"unknown quantization {name!r}: choose int8, int4 (groups of 32), int4-g64, int4-g128 or int4-mixed")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantScheme:
        return cls(**d)


def quantize(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """Quantize the float weights of `model` in place."""
    return _swap(model, scheme, saved_names=None)


def quantized_skeleton(model: nn.Module, scheme: QuantScheme, saved_names) -> nn.Module:
    """Give `model` (built on the meta device) the quantized layers a saved quantized model holds, empty,
    for `load_state_dict(assign=True)`; then call `finish_loading`. saved_names: the state dict's keys
    (a layer saved with "qweight" is int4, else int8)."""
    return _swap(model, scheme, saved_names=set(saved_names))


def finish_loading(model: nn.Module) -> None:
    """After a quantized state dict was assigned (and the model cast to its compute dtype): lay int4 codes
    out for the kernel, give the scales back the bf16 the kernels take, re-tie the embedding."""
    import torch

    from pocketlm.quant.int4 import Int4Linear
    from pocketlm.quant.int8 import Int8Linear

    def aligned(t: torch.Tensor) -> torch.Tensor:
        # Tensors memory-mapped from a safetensors file sit at whatever offset the file gives them; aten's
        # int8 kernel reads with aligned AVX-512 loads and crashes on an unaligned weight (seen with
        # batches of 8 rows), so such a tensor gets a fresh, aligned copy.
        return t.clone() if t.data_ptr() % 64 else t

    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.scales_and_zeros = aligned(module.scales_and_zeros.to(torch.bfloat16))  # saved as bf16: lossless
            module.pack()
        elif isinstance(module, Int8Linear):
            module.weight = aligned(module.weight)
            module.scales = aligned(module.scales.to(torch.bfloat16))
            module.pack()
    _tie_embedding(model)


def _swap(model: nn.Module, scheme: QuantScheme, saved_names: set[str] | None) -> nn.Module:
    from pocketlm.quant.int4 import Int4Linear, quantize_groups
    from pocketlm.quant.int8 import Int8Linear

    if hasattr(model, "fuse_projections"):
        model.fuse_projections()

    def make(linear: nn.Linear, name: str) -> nn.Module:
        shape, bias = (linear.in_features, linear.out_features), linear.bias is not None
        if saved_names is not None:  # an empty layer of the kind the file holds
            if f"{name}.qweight" in saved_names:
                return Int4Linear(*shape, scheme.group_size, bias=bias)
            return Int8Linear(*shape, bias=bias, device=linear.weight.device)
        kind = scheme.head if name == "lm_head" else scheme.weights
        if kind == "int4" and linear.in_features % scheme.group_size == 0:  # int4 needs whole groups
            quantized = quantize_groups(linear.weight.detach(), scheme.group_size)
            if quantized[2] or scheme.off_grid == "int4":
                return Int4Linear.from_linear(linear, scheme.group_size, quantized)
        return Int8Linear.from_linear(linear)

    def walk(module: nn.Module, prefix: str):
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child, full))
                if full == "lm_head" and isinstance(getattr(module, name), Int8Linear):
                    getattr(module, name).refine = HEAD_REFINE
            else:
                walk(child, f"{full}.")

    walk(model, "")
    _tie_embedding(model)
    return model


def _tie_embedding(model: nn.Module) -> None:
    """A tied float embedding becomes a view of the int8 head (Int8Embedding)."""
    from pocketlm.quant.int8 import Int8Embedding, Int8Linear

    cfg = getattr(model, "cfg", None)
    head = getattr(model, "lm_head", None)
    if cfg is None or not getattr(cfg, "tie_word_embeddings", False) or not isinstance(head, Int8Linear):
        return
    dtype = model.model.norm.weight.dtype
    model.model.embed_tokens = Int8Embedding(head, dtype=dtype)


def write_quantized(lm, scheme: QuantScheme, out) -> None:
    """Quantize a loaded float model (pocketlm.load.LoadedModel) and write it as a model folder that
    `load` reads back as it is: config.json says the scheme, model.safetensors holds the codes."""
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.load import read_config

    if lm.meta.get("quantization"):
        raise PocketLMError(f"{lm.source} is already quantized; quantize the float model it came from")
    quantize(lm.model, scheme)
    hf_config = read_config(lm.path)
    hf_config["pocketlm"] = {
        **hf_config.get("pocketlm", {}),
        "quantization": scheme.to_dict(),
        "quantized_from": str(lm.source),
    }
    write_model_folder(out, hf_config, lm.model.state_dict(), lm.tokenizer)
