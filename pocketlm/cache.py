"""Converted-weights cache: dequantizing a GGUF takes seconds, so the result is kept as a Hugging Face
folder under $POCKETLM_HOME/converted/<sha256 prefix>/ and the next start memory-maps it.

The key is the file's sha256 (a file replaced in place gets a new entry); the hash itself is
remembered per (path, size, mtime) so a warm start does not read the whole file again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


FORMAT_VERSION = 1  # bump when the converted layout changes, so old entries are not reused


def home() -> Path:
    """Where pocketlm keeps assembled and converted weights ($POCKETLM_HOME, else ~/.cache/pocketlm)."""
    return Path(os.environ.get("POCKETLM_HOME", Path.home() / ".cache" / "pocketlm"))


def _index_path() -> Path:
    return home() / "converted" / "index.json"


def _read_index() -> dict:
    try:
        return json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path: Path) -> str:
    path = path.resolve()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    index = _read_index()
    hit = index.get(str(path))
    if hit and hit["stamp"] == stamp:
        return hit["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    index[str(path)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    write_atomic(_index_path(), json.dumps(index, indent=1))
    return digest.hexdigest()


def converted_dir(path: Path) -> Path:
    return home() / "converted" / f"{file_sha256(path)[:24]}-v{FORMAT_VERSION}"


def forget(path: Path) -> None:
    """Delete the converted copy of `path`, if any (used by `pocketlm rm`)."""
    if path.is_file():  # a Hugging Face folder is used in place; a missing file was never converted
        folder = converted_dir(path)
        for copy in [folder, *folder.parent.glob(f"{folder.name}-*")]:  # and its quantized copies
            shutil.rmtree(copy, ignore_errors=True)
    index = _read_index()
    if index.pop(str(path.resolve()), None) is not None:
        write_atomic(_index_path(), json.dumps(index, indent=1))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
