"""LoRA adapters served unmerged, several over one shared base: llama.cpp's `--lora`, vLLM's multi-LoRA.

An adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors), as `pocketlm finetune --lora-r`
writes it (pocketlm/finetune/lora.py). Attaching adapters wraps each Linear one of them targets in a `LoraLinear`:
its base layer stays as it was (int4, int8 or float, shared by every adapter and by the base itself), and the
adapter's low-rank update is added on the fly, as peft's LoRA Linear computes it:

    y = base(x) + B(A(x)) * scale          scale = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r))

Which adapter a forward pass uses is chosen per batch row (`select`), as vLLM's Punica kernels do: in the server's
continuous batch, rows of different adapters and of the base decode together; each row gets its own adapter's
update, and the base's matmul runs once for all of them. Whoever drives the model selects before every pass (the
server's Batch, engine/generate.py's Generation); index 0 is the base.

A quantized model fuses q/k/v and gate/up into one layer each (pocketlm.quant): an adapter's q_proj update then adds
into the rows of qkv_proj that are q's (the rows split exactly: pocketlm.quant.unfuse_projections).

The fused decode step (models/fused_step.py) reads the base layers under the wrappers: it runs the passes whose rows
all use the base, and `fused_logits` sends any pass with an adapter selected through the modules.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pocketlm.errors import PocketLMError

# A quantized model's fused layers: (the fused layer's name, which of its row blocks)
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")  # PEFT's names ("default" dropped on save)


@dataclass
class Adapter:
    """One PEFT LoRA adapter as read from its folder: per target module (its name in the model), (A (r, in), B (out, r), scale)."""

    name: str
    path: Path
    base: str | None  # base_model_name_or_path: what it was trained on (for messages)
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def read_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """A PEFT LoRA folder -> Adapter, or a PocketLMError naming what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    name = name or path.name
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not path.is_dir():
        raise PocketLMError(f"LoRA adapter {name}: {path} is not a folder; give the adapter folder "
                            f"(adapter_config.json + adapter_model.safetensors, as `pocketlm finetune --lora-r` writes it)")
    if not config_file.exists():
        raise PocketLMError(f"LoRA adapter {name}: {path} has no adapter_config.json: not a PEFT adapter folder "
                            f"(`pocketlm finetune --lora-r` writes one under OUTPUT/adapter)")
    if not weights_file.exists():
        pickles = [p.name for p in path.glob("adapter_model.bin")]
        hint = " (adapter_model.bin is a pickle file, which pocketlm never loads: save it with safe_serialization=True)" if pickles else ""
        raise PocketLMError(f"LoRA adapter {name}: {path} has no adapter_model.safetensors{hint}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise PocketLMError(f"LoRA adapter {name}: {config_file} is not JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise PocketLMError(f"LoRA adapter {name}: {path} is a {config.get('peft_type')} adapter; only LoRA adapters run here")
    unsupported = [k for k in ("use_dora", "modules_to_save") if config.get(k)] + (["bias"] if config.get("bias", "none") != "none" else [])
    if unsupported:
        raise PocketLMError(f"LoRA adapter {name}: {', '.join(unsupported)} in its adapter_config.json is not supported unmerged; "
                            f"merge it instead (pocketlm finetune --merge)")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise PocketLMError(f"LoRA adapter {name}: {weights_file} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            raise PocketLMError(f"LoRA adapter {name}: {weights_file.name} holds {key}, which is no LoRA A or B matrix of a Linear layer")
        pairs.setdefault(match[1], {})[match[2]] = tensor
    if not pairs:
        raise PocketLMError(f"LoRA adapter {name}: {weights_file} holds no LoRA weights")
    layers = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["A"].shape[0] != ab["B"].shape[1]:
            raise PocketLMError(f"LoRA adapter {name}: {module}'s A and B matrices are missing or do not fit each other")
        r = pattern(config.get("rank_pattern"), module, config.get("r", ab["A"].shape[0]))
        alpha = pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r  # peft's LoraLayer.update_layer
        A, B = ab["A"].float(), ab["B"].float()
        if config.get("fan_in_fan_out"):  # GPT-2's Conv1D layout: stored transposed
            A, B = A.T.contiguous(), B.T.contiguous()
        layers[module] = (A, B, scale)
    return Adapter(name, path, config.get("base_model_name_or_path"), layers)


def pattern(patterns: dict | None, module: str, default):
    """peft's rank_pattern / alpha_pattern: the value of the first key that matches the module name's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class AdapterTable:
    """The adapters attached to one model (index 1, 2, ...; 0 is the base) and the next pass's choice: `index` for
    every row, or `rows` (B,), an index per batch row."""

    def __init__(self):
        self.names: list[str] = []
        self.index = 0
        self.rows: torch.Tensor | None = None

    def selected(self) -> bool:
        """Whether any row of the next pass uses an adapter."""
        return bool(self.index) if self.rows is None else bool(self.rows.any())


class LoraLinear(nn.Module):
    """A Linear layer (float, Int4Linear or Int8Linear), unchanged, plus each attached adapter's update of it:
    updates[i] = (A^T (in, r), B^T (r, out), scale) of adapter i, or None where it leaves the layer alone. A fused layer's
    update is its projections' side by side: their A matrices stacked, their B matrices on a block diagonal (each
    block in its projection's output rows), so that it is still two matmuls."""

    def __init__(self, base_layer: nn.Module, table: AdapterTable):
        super().__init__()
        self.base_layer = base_layer
        self.table = table  # shared by every LoraLinear of the model (a plain attribute: no parameters of its own)
        self.updates: list[tuple[torch.Tensor, torch.Tensor, float] | None] = [None]  # [0]: the base

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (B, T, out)
        rows = self.table.rows
        if rows is None:
            return self.add_update(y, x, self.table.index)
        for i in rows.unique().tolist():
            if self.updates[i] is not None:
                take = (rows == i).nonzero()[:, 0]
                y[take] = self.add_update(y[take], x[take], i)
        return y

    def add_update(self, y: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """y += adapter i's B(A(x)) * scale, in place: peft's LoRA Linear.forward, with the product by B, the scale and
        the sum in one addmm where y is fp32 (a decoded token runs 4 of these a layer: each op costs)."""
        if self.updates[i] is None:
            return y
        A_t, B_t, scale = self.updates[i]  # transposed: (in, r), (r, out), contiguous for the matmuls of one row
        h = x.reshape(-1, x.shape[-1]).to(A_t.dtype) @ A_t  # (n, r)
        if y.dtype == B_t.dtype and y.is_contiguous():
            y.view(-1, y.shape[-1]).addmm_(h, B_t, alpha=scale)
        else:
            y += ((h @ B_t) * scale).to(y.dtype).view(y.shape)
        return y


def side_by_side(out_features: int, parts: list[tuple[slice, torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One adapter's updates of a layer's output rows (rows, A, B, scale) -> one (A, B, scale) for the whole layer."""
    if len(parts) == 1 and parts[0][0] == slice(0, out_features):
        return parts[0][1:]
    scales = {scale for *_, scale in parts}
    A = torch.cat([a for _, a, _, _ in parts])  # (sum of r, in)
    B = torch.zeros(out_features, A.shape[0])  # (out, sum of r): each part's B in its rows and its own columns
    col = 0
    for rows, a, b, scale in parts:
        B[rows, col : col + a.shape[0]] = b if len(scales) == 1 else b * scale
        col += a.shape[0]
    return A, B, scales.pop() if len(scales) == 1 else 1.0


def attach(model: nn.Module, adapters: list[Adapter], base_name: str) -> list[int]:
    """Wrap the Linears the adapters target in LoraLinears (once) and add the adapters to them: -> their indices in
    model.adapters. Checks every adapter against the model before changing anything; one that does not fit is a
    PocketLMError naming it and the layer."""
    table = getattr(model, "adapters", None) or AdapterTable()
    names = set(table.names)
    plans = []
    for adapter in adapters:
        if adapter.name in names:
            raise PocketLMError(f"two LoRA adapters are named {adapter.name}: give each its own name (NAME=PATH)")
        names.add(adapter.name)
        plans.append([(target(model, module, adapter, base_name), A, B, scale) for module, (A, B, scale) in adapter.layers.items()])
    model.adapters = table
    indices = []
    for adapter, plan in zip(adapters, plans):
        table.names.append(adapter.name)
        index = len(table.names)
        parts: dict[LoraLinear, list] = {}
        for (parent, attr, rows), A, B, scale in plan:
            layer = getattr(parent, attr)
            if not isinstance(layer, LoraLinear):
                layer = LoraLinear(layer, table)
                setattr(parent, attr, layer)
            parts.setdefault(layer, []).append((rows, A, B, scale))
        for layer, layer_parts in parts.items():
            layer.updates += [None] * (index + 1 - len(layer.updates))
            A, B, scale = side_by_side(layer.out_features, layer_parts)
            layer.updates[index] = (A.T.contiguous(), B.T.contiguous(), scale)
        indices.append(index)
    for module in model.modules():  # every wrapper has an entry (None: no update) for every adapter
        if isinstance(module, LoraLinear):
            module.updates += [None] * (len(table.names) + 1 - len(module.updates))
    if hasattr(model, "decode_step"):
        model.decode_step = None  # built again over the wrappers' base layers
    return indices


def target(model: nn.Module, module: str, adapter: Adapter, base_name: str) -> tuple[nn.Module, str, slice]:
    """Where adapter's update of `module` (a float model's name) goes: (parent, attribute, output rows)."""
    from pocketlm.quant.int4 import Int4Linear
    from pocketlm.quant.int8 import Int8Linear

    parent_name, _, attr = module.rpartition(".")
    trained_for = f" (it was trained for {adapter.base})" if adapter.base else ""
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        raise PocketLMError(f"LoRA adapter {adapter.name} targets {module}, which {base_name} does not have: "
                            f"it is an adapter for another model{trained_for}") from None
    rows = None
    if getattr(parent, attr, None) is None and attr in FUSED and getattr(parent, FUSED[attr][0], None) is not None:
        attr, block = FUSED[attr]
        fused = getattr(parent, attr)
        fused = fused.base_layer if isinstance(fused, LoraLinear) else fused
        if attr == "qkv_proj":
            sizes = [parent.n_heads * parent.head_dim] + [parent.n_kv_heads * parent.head_dim] * 2
        else:
            sizes = [fused.out_features // 2] * 2
        begin = sum(sizes[:block])
        rows = slice(begin, begin + sizes[block])
    layer = getattr(parent, attr, None)
    layer = layer.base_layer if isinstance(layer, LoraLinear) else layer
    if not isinstance(layer, (nn.Linear, Int4Linear, Int8Linear)):
        raise PocketLMError(f"LoRA adapter {adapter.name} targets {module}, which is not a Linear layer of {base_name}{trained_for}")
    rows = rows or slice(0, layer.out_features)
    A, B, _ = adapter.layers[module]
    want = (layer.in_features, rows.stop - rows.start)
    if (A.shape[1], B.shape[0]) != want:
        raise PocketLMError(f"LoRA adapter {adapter.name} does not fit {base_name}: its {module} maps {A.shape[1]} -> {B.shape[0]} "
                            f"features, the model's {want[0]} -> {want[1]}; it is an adapter for another model{trained_for}")
    return parent, attr, rows


def select(model: nn.Module, which: int | list[int]) -> None:
    """The adapter the next forward passes use: one index for every row, or one per batch row (0: the base)."""
    table = getattr(model, "adapters", None)
    if table is None:
        if any(which) if isinstance(which, list) else which:
            raise PocketLMError("this model has no LoRA adapters attached")
        return
    if isinstance(which, list) and len(set(which)) > 1:
        table.index, table.rows = 0, torch.tensor(which)
    else:
        table.index, table.rows = (which[0] if isinstance(which, list) else which), None


def selected(model: nn.Module) -> bool:
    """Whether the next pass of model uses an adapter in any row (the fused decode step then leaves it to the modules)."""
    table = getattr(model, "adapters", None)
    return table is not None and table.selected()
