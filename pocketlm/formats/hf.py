"""Read a Hugging Face folder's config.json; write a model as such a folder (config.json, model.safetensors,
tokenizer files).

The one writer every producer of a model uses: GGUF conversion, `quantize`, `finetune`, `prune`,
`distill` and `export --format hf`. The folder appears whole or not at all: it is written beside the
target under a temporary name and renamed, so a killed job never leaves half a model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pocketlm.errors import PocketLMError
from pocketlm.families import lookup


def read_config(folder: Path) -> dict:
    """folder/config.json as a dict; one line when it is missing or not JSON. (Here, below load.py and quant/, so
    both read it without importing each other.)"""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise PocketLMError(f"{folder}: no config.json (a model folder needs config.json, *.safetensors, tokenizer.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise PocketLMError(f"{path}: not valid JSON ({e})") from None


def checkpoint_tensors(hf_config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by the names the family's model class has: a file saved from the base model (GPT-2's
    own: "h.0.attn.c_attn.weight", no "transformer.") gets the stack's prefix, and an older file's causal-mask buffers
    (h.0.attn.bias) are left out (pocketlm/families.py: base_prefix, stale). Other families' tensors as they are."""
    row = lookup(hf_config.get("model_type"))
    if row is None or row.base_prefix is None:
        return tensors
    out = {}
    for name, t in tensors.items():
        if name.endswith(row.stale):
            continue
        if not name.startswith((f"{row.base_prefix}.", "lm_head.")):
            name = f"{row.base_prefix}.{name}"
        out[name] = t
    return out


def write_model_folder(folder: Path, hf_config: dict, state_dict: dict[str, torch.Tensor], tokenizer=None) -> Path:
    """hf_config: config.json as a dict (pocketlm's own facts under its "pocketlm" key); tokenizer: a
    pocketlm Tokenizer or None (encoders saved without one). A tied float lm_head is not written twice."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    head = tensors.get("lm_head.weight")
    shared = head is not None and any(k != "lm_head.weight" and v.data_ptr() == head.data_ptr() for k, v in tensors.items())
    if hf_config.get("tie_word_embeddings") and ("model.embed_tokens.weight" in tensors or shared):
        tensors.pop("lm_head.weight", None)  # the same table (GPT-2's transformer.wte; a quantized model keeps only its int8 head)
    save_file(tensors, tmp / "model.safetensors")
    if tokenizer is not None:
        tokenizer.save(tmp)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder
