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


def write_model_folder(folder: Path, hf_config: dict, state_dict: dict[str, torch.Tensor], tokenizer=None) -> Path:
    """hf_config: config.json as a dict (pocketlm's own facts under its "pocketlm" key); tokenizer: a
    pocketlm Tokenizer or None (encoders saved without one). A tied float lm_head is not written twice."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if hf_config.get("tie_word_embeddings") and "model.embed_tokens.weight" in tensors:
        tensors.pop("lm_head.weight", None)  # the same table (a quantized model keeps only its int8 head)
    save_file(tensors, tmp / "model.safetensors")
    if tokenizer is not None:
        tokenizer.save(tmp)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder
