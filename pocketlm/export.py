"""`pocketlm export`: a model (registry name, .gguf file or folder) -> a Hugging Face folder or a GGUF file.

    export("smollm2", "gguf", "smollm2-q8.gguf", qtype="q8_0")
    export("./pruned", "hf", "./pruned-hf")

Both writers write under a temporary name (OUTPUT.tmpPID) and rename when the whole model is written, so a
kill or a full disk leaves OUTPUT as it was (or absent), never half-written.

Both read the model the way `pocketlm.load` does (a .gguf is dequantized once into the cache folder) and
write through the one writer of each format: formats/hf.py `write_model_folder` and formats/gguf_write.py
`write_gguf`. The model's lineage (config.json's "pocketlm" key: source, quant, teacher, data, recipe,
scores) goes into the output: config.json's "pocketlm" key, or the GGUF's "pocketlm.lineage" (JSON) and
general.* keys.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import torch

from pocketlm.errors import PocketLMError

FORMATS = ("hf", "gguf")
HF_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DEFAULT_TYPE = {"hf": "f32", "gguf": "f16"}  # convert_hf_to_gguf.py's default outtype is f16 too


def read_model(ref: str) -> tuple[Path, Path, dict, dict[str, torch.Tensor], object]:
    """(source, folder, config.json dict, state dict, Tokenizer or None) of a model reference."""
    from pocketlm.formats.hf import checkpoint_tensors
    from pocketlm.load import model_folder, read_config, read_safetensors
    from pocketlm.tokenizer import Tokenizer

    _, source, folder = model_folder(ref)
    hf_config = read_config(folder)
    state_dict = checkpoint_tensors(hf_config, read_safetensors(folder))
    if hf_config.get("tie_word_embeddings") and "lm_head.weight" not in state_dict and "model.embed_tokens.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    tokenizer = Tokenizer.from_hf_dir(folder) if (folder / "tokenizer.json").exists() else None
    return source, folder, hf_config, state_dict, tokenizer


def export(ref: str, fmt: str, output: str | os.PathLike, qtype: str | None = None, progress=None) -> dict:
    """Write model `ref` as `fmt` ("hf" or "gguf") to `output`; returns a small report (path, type, bytes, params).
    progress: a pocketlm.progress.Progress that shows the write (the bytes written so far), or None."""
    from pocketlm.formats.gguf_write import QUANT_TYPES, tensor_nbytes, tensor_type
    from pocketlm.progress import NO_PROGRESS, file_growth

    if fmt not in FORMATS:
        raise PocketLMError(f"unknown export format {fmt!r}: choose hf or gguf")
    qtype = (qtype or DEFAULT_TYPE[fmt]).lower()
    allowed = HF_TYPES if fmt == "hf" else QUANT_TYPES
    if qtype not in allowed:
        hint = " (a Hugging Face folder stores floats: use --format gguf for block quants)" if fmt == "hf" else ""
        raise PocketLMError(f"--type {qtype} is not available for --format {fmt}: choose {', '.join(allowed)}{hint}")
    output = Path(output).expanduser()
    if fmt == "gguf" and output.is_dir():
        raise PocketLMError(f"{output} is a folder: give the .gguf file to write")
    if not output.parent.exists():
        raise PocketLMError(f"{output.parent}: no such folder")

    source, folder, hf_config, state_dict, tokenizer = read_model(ref)
    if output.resolve() in (source.resolve(), folder.resolve()):
        raise PocketLMError(f"{output}: the output would overwrite the model being exported")
    lineage = {**hf_config.get("pocketlm", {}), "exported_from": str(source), "export_format": fmt, "export_type": qtype}
    n_params = sum(t.numel() for k, t in state_dict.items() if not (k == "lm_head.weight" and hf_config.get("tie_word_embeddings")))

    remove_stale_parts(output)
    progress = progress or NO_PROGRESS
    tmp = output.with_name(f"{output.name}.tmp{os.getpid()}")  # the writers' temporary name
    try:
        if fmt == "hf":
            from pocketlm.formats.hf import write_model_folder

            dtype = HF_TYPES[qtype]
            config = {**hf_config, "dtype": DTYPE_NAMES[dtype], "pocketlm": lineage}
            config.pop("torch_dtype", None)
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            progress.step(f"writing {qtype} tensors", poll=file_growth(lambda: tmp / "model.safetensors", total))
            write_model_folder(output, config, tensors, tokenizer)
            size = sum(p.stat().st_size for p in output.iterdir())
        else:
            from pocketlm.formats.gguf_write import write_gguf

            matrix_type = QUANT_TYPES[qtype][0]  # the file grows tensor by tensor, each encoded (block quants: slow) as written
            total = sum(tensor_nbytes(tensor_type(matrix_type, tuple(t.shape)), tuple(t.shape)) for k, t in state_dict.items()
                        if not (k == "lm_head.weight" and hf_config.get("tie_word_embeddings")))  # a tied head is not written
            progress.step(f"encoding {qtype} tensors", poll=file_growth(lambda: tmp, total))
            write_gguf(output, hf_config, state_dict, tokenizer, qtype=qtype, lineage=lineage)
            size = output.stat().st_size
    except Exception as e:
        from pocketlm.cache import out_of_space

        remove(tmp)
        if out_of_space(e, output.parent):
            raise PocketLMError(f"no space left on the device for {output}: free some space and export again "
                                f"({'the folder' if fmt == 'hf' else 'the file'} that was there is as it was)") from None
        raise
    return {"path": str(output), "format": fmt, "type": qtype, "bytes": size, "params": n_params, "source": str(source)}


def remove_stale_parts(output: Path) -> None:
    """OUTPUT.tmpPID left by an export that was killed (its process is gone); never read, only in the way."""
    for part in output.parent.glob(f"{glob.escape(output.name)}.tmp*"):
        pid = part.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            remove(part)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
