"""Weight-only quantization: nn.Linear layers swapped for int8 or int4 ones; the model code does not change.

A scheme is named by a short string, used by `--quant`, `pocketlm quantize --to` and a saved model's
config.json ("pocketlm": {"quantization": {...}}):
    "int8"          int8, one scale per output channel
    "int4"          int4 in groups of 32 input channels (also "int4-g64", "int4-g128")
    "int4-mixed"    int4 in groups of 32 for layers whose weights already lie on 4-bit grids (a Q4 GGUF's
                    Q4_0/Q4_1/Q4_K tensors: kept exactly), int8 for the others (a GGUF's Q6_K ones keep their
                    blocks, int8 in the rows they save as): what `--quant auto` picks for a 4-bit GGUF
    "mixed-bits"    a kind per linear layer ("int4-g32", "int4-g64", "int4-g128", "int8" or "float"), listed in
                    the scheme's `layers`: what `pocketlm quantize --budget KL` writes (pocketlm.quant.calibrate)
In every scheme the output head is int8: with int4 it is the layer whose error shows most in perplexity
(docs/BENCHMARKS.md). When the head is tied to the token embedding, the embedding reads the same int8
table (Int8Embedding), so the model holds one int8 copy instead of a float one. A QLoRA base keeps both float
(head "float"), as bitsandbytes' 4-bit models do: the embedding's int8 rows had cost banking77 QLoRA 1.5-2.6 of
its points against LoRA (docs/BENCHMARKS.md).

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
    head: str = "int8"  # the output head (lm_head): int8, or float (with the token embedding: a QLoRA base's)
    off_grid: str = "int4"  # int4 schemes: what a layer whose weights are not on 4-bit grids becomes
    layers: dict[str, str] | None = None  # a kind per linear layer by name (a --budget plan); the head stays `head`

    @property
    def name(self) -> str:
        if self.layers:
            return "mixed-bits"
        if self.weights == "int8":
            return "int8"
        if self.off_grid == "int8":
            return "int4-mixed"
        return "int4" if self.group_size == 32 else f"int4-g{self.group_size}"

    @classmethod
    def parse(cls, name: str, head: str = "int8") -> QuantScheme:
        """The scheme `name` stands for, its output head `head` (int8, or float: a QLoRA base's)."""
        from dataclasses import replace

        return replace(cls._named(name), head=head)

    @classmethod
    def _named(cls, name: str) -> QuantScheme:
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

    def layer_kind(self, name: str, in_features: int) -> str:
        """"int4-g32" | "int4-g64" | "int4-g128" | "int8" | "float": what the linear layer `name` becomes (int8 where
        the int4 groups do not divide its input width; a layer on no 4-bit grid under int4-mixed is decided later)."""
        if self.layers and name in self.layers:
            return self.layers[name]
        kind = self.head if name == "lm_head" else self.weights
        if kind == "int4" and in_features % self.group_size == 0:
            return f"int4-g{self.group_size}"
        return "float" if kind == "float" else "int8"

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["layers"] is None:
            del d["layers"]  # the folders written before plans existed read the same
        return d

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
            if module.packed is not None:
                continue  # made in the kernels' layout already (pocketlm/quant/from_gguf.py)
            module.scales_and_zeros = aligned(module.scales_and_zeros.to(torch.bfloat16))  # saved as bf16: lossless
            module.pack()
        elif isinstance(module, Int8Linear):
            module.scales = aligned(module.scales.to(torch.bfloat16))
            if module.packed_weight is None:  # else made in the kernel's layout already (pocketlm/quant/from_gguf.py)
                module.weight = aligned(module.weight)
                module.pack()
    _tie_embedding(model)


def _swap(model: nn.Module, scheme: QuantScheme, saved_names: set[str] | None) -> nn.Module:
    from pocketlm.quant.int4 import Int4Linear, quantize_groups
    from pocketlm.quant.int8 import Int8Linear

    if hasattr(model, "fuse_projections") and not any(getattr(m, "qkv_proj", None) is not None for m in model.modules()):
        model.fuse_projections()  # (pocketlm.quant.calibrate fuses before it quantizes the layers)

    def make(linear: nn.Linear, name: str) -> nn.Module:
        shape, bias = (linear.in_features, linear.out_features), linear.bias is not None
        if name == "lm_head" and scheme.head == "float":
            return linear
        if scheme.layers and name in scheme.layers:  # a per-layer plan: empty (to load into) or quantized now
            kind = scheme.layers[name]
            if kind == "float":
                return linear
            if kind == "int8":
                return Int8Linear(*shape, bias=bias, device=linear.weight.device) if saved_names is not None else Int8Linear.from_linear(linear)
            group = int(kind.removeprefix("int4-g"))
            return Int4Linear(*shape, group, bias=bias) if saved_names is not None else Int4Linear.from_linear(linear, group)
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
    head.keep_plain_rows()  # the embedding looks rows up in it
    model.model.embed_tokens = Int8Embedding(head, dtype=dtype)


def write_quantized(lm, scheme: QuantScheme, out, calibration: dict | None = None) -> None:
    """Quantize a loaded float model (pocketlm.load.LoadedModel) and write it as a model folder that
    `load` reads back as it is: config.json says the scheme, model.safetensors holds the codes. A model
    pocketlm.quant.calibrate has quantized already only gets its head done; `calibration` says how."""
    from pocketlm.formats.hf import read_config, write_model_folder

    if lm.meta.get("quantization"):
        raise PocketLMError(f"{lm.source} is already quantized; quantize the float model it came from")
    quantize(lm.model, scheme)
    hf_config = read_config(lm.path)
    hf_config["pocketlm"] = {
        **hf_config.get("pocketlm", {}),
        "quantization": scheme.to_dict(),
        "quantized_from": str(lm.source),
        **({"calibration": calibration} if calibration else {}),
    }
    write_model_folder(out, hf_config, lm.model.state_dict(), lm.tokenizer)


def unfuse_projections(model: nn.Module) -> None:
    """The inverse of fuse_projections on a quantized (or float) model: q/k/v and gate/up as separate layers again,
    with Hugging Face's names (what LoRA targets by name). Rows split exactly: int4 groups and int8 scales run along
    each row, so a fused layer's rows are the separate layers' rows."""
    for module in model.modules():
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if getattr(attn, "qkv_proj", None) is not None:
            q_rows, kv_rows = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
            attn.q_proj, attn.k_proj, attn.v_proj = split_rows(attn.qkv_proj, [q_rows, kv_rows, kv_rows])
            attn.qkv_proj = None
        if getattr(mlp, "gate_up_proj", None) is not None:
            half = mlp.gate_up_proj.out_features // 2
            mlp.gate_proj, mlp.up_proj = split_rows(mlp.gate_up_proj, [half, half])
            mlp.gate_up_proj = None


def split_rows(layer: nn.Module, sizes: list[int]) -> list[nn.Module]:
    """A linear layer (float, Int4Linear or Int8Linear) -> one layer of its kind per consecutive block of `sizes` rows."""
    from pocketlm.quant.int4 import Int4Linear
    from pocketlm.quant.int8 import Int8Linear

    parts, begin = [], 0
    for n in sizes:
        rows = slice(begin, begin + n)
        bias = None if layer.bias is None else nn.Parameter(layer.bias.detach()[rows].clone(), requires_grad=False)
        if isinstance(layer, Int4Linear):
            part = Int4Linear(layer.in_features, n, layer.group_size, bias=bias is not None)
            part.qweight, part.scales_and_zeros = layer.qweight[rows].clone(), layer.scales_and_zeros[:, rows].contiguous()
            part.pack()
        elif isinstance(layer, Int8Linear):
            part = Int8Linear(layer.in_features, n, bias=bias is not None)
            weight, scales = layer.rows()  # a GGUF's Q6_K layout: its int8 rows
            part.weight, part.scales = weight[rows].clone(), scales[rows].clone()
            part.refine = layer.refine
            part.pack()
        else:
            part = nn.Linear(layer.in_features, n, bias=bias is not None, device="meta")
            part.weight = nn.Parameter(layer.weight.detach()[rows].clone(), requires_grad=layer.weight.requires_grad)
        if bias is not None:
            part.bias = bias
        parts.append(part)
        begin += n
    return parts


def dequantize_model(model: nn.Module) -> nn.Module:
    """Every Int4Linear / Int8Linear back to an fp32 nn.Linear holding its dequantized weight, a tied Int8Embedding
    back to a float embedding shared with the head: the float model the quantized one computes (a QLoRA run's
    adapters merge into it)."""
    from pocketlm.quant.grad import dequantized_weight
    from pocketlm.quant.int4 import Int4Linear
    from pocketlm.quant.int8 import Int8Embedding, Int8Linear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (Int4Linear, Int8Linear)):
                dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                dense.weight = nn.Parameter(dequantized_weight(child), requires_grad=False)
                if child.bias is not None:
                    dense.bias = nn.Parameter(child.bias.detach().float().clone(), requires_grad=False)
                setattr(parent, name, dense)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if isinstance(embed, Int8Embedding):
        table = nn.Embedding(*model.lm_head.weight.shape, device="meta")
        table.weight = model.lm_head.weight  # tied, as the float model's
        model.model.embed_tokens = table
    return model
