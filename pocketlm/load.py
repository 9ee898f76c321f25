"""A registry name or a local path -> a ready model: config, native torch module, tokenizer.

Two sources, one path: a Hugging Face folder (config.json, *.safetensors, tokenizer.json) loads
directly; a .gguf file is converted once into such a folder in the cache (dequantizing takes seconds)
and every later start memory-maps that folder. Weights load gpt-fast style: the model is built on
the meta device and `load_state_dict(assign=True)` hands it the mmap'd tensors, with no copy.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pocketlm import cache, registry
from pocketlm.config import config_from_hf
from pocketlm.errors import PocketLMError
from pocketlm.models import model_class_for
from pocketlm.models.draft_head import DraftHead, DraftHeadConfig, is_draft_head
from pocketlm.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    name: str
    path: Path  # the folder the weights were loaded from (the converted cache folder for a .gguf)
    source: Path  # what the user named: a .gguf file or a folder
    config: object
    model: torch.nn.Module
    tokenizer: Tokenizer | None
    meta: dict = field(default_factory=dict)  # quant, source file, lineage (the "pocketlm" key of config.json)
    load_s: float = 0.0

    @property
    def context_length(self) -> int:
        return getattr(self.config, "max_position_embeddings", 0)  # 0: a draft head, which reads no positions

    @property
    def is_encoder(self) -> bool:
        return getattr(self.config, "model_type", "") == "bert"


def load(name_or_path: str, dtype: torch.dtype = torch.float32, quant: str = "none") -> LoadedModel:
    """quant "int8", "int4", "int4-g64", ...: weight-only quantized Linear layers (pocketlm.quant), made at
    load time; "auto": the bits of the source file (`auto_quant`). A folder written by `pocketlm quantize`
    loads its quantized weights as they are."""
    from pocketlm.quant import QuantScheme, finish_loading, quantize, quantized_skeleton

    start = time.perf_counter()
    name, source, folder = model_folder(name_or_path)
    hf_config = read_config(folder)
    config = config_from_hf(hf_config)
    saved_quant = hf_config.get("pocketlm", {}).get("quantization")
    if saved_quant and quant not in ("none", "auto"):  # auto: a saved quantized folder runs as it is
        raise PocketLMError(f"{source} is already quantized ({QuantScheme.from_dict(saved_quant).name}): load it without --quant")
    if quant == "auto":
        quant = "none" if saved_quant else auto_quant(hf_config.get("pocketlm", {}).get("quant"))
    scheme = None if quant == "none" else QuantScheme.parse(quant)
    if scheme is not None and source.is_file():
        # A GGUF's quantized copy is kept beside its converted folder: quantizing takes seconds, every
        # later start only memory-maps it (a folder the user gave is quantized in memory each time, or once
        # with `pocketlm quantize`).
        quantized = folder.with_name(f"{folder.name}-{scheme.name}")
        if not (quantized / "config.json").exists():
            from pocketlm.quant import write_quantized

            write_quantized(load(str(folder)), scheme, quantized)
        lm = load(str(quantized), dtype=dtype)
        lm.name, lm.source, lm.load_s = name, source, time.perf_counter() - start
        return lm
    state_dict = read_safetensors(folder)
    with torch.device("meta"), skip_init():
        model = model_class_for(config)(config)
        if saved_quant:
            quantized_skeleton(model, QuantScheme.from_dict(saved_quant), state_dict.keys())
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as e:  # shapes that disagree with config.json
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise PocketLMError(f"{folder}: weights do not fit config.json: {detail}") from None
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise PocketLMError(f"{folder}: weights do not fit a {config.model_type} model: {problem} tensors")
    if not saved_quant:
        model.tie_weights()
    model.init_buffers("cpu")
    model = model.to(dtype).eval()
    if saved_quant:
        finish_loading(model)
    elif scheme is not None:
        quantize(model, scheme)
    decoder = hasattr(model, "kv_dtype")  # an encoder (BERT) keeps no KV cache
    if decoder and (saved_quant or scheme is not None) and dtype == torch.float32 and os.environ.get("POCKETLM_KV_FP16", "1") != "0":
        # Quantized weights: keys and values kept in fp16 too, as llama.cpp keeps them (its f16 cache). A decoded
        # token reads half the cache bytes: at 600 cached positions SmolLM2's fp32 cache is 27 MB a token beside
        # 81 MB of weights. Float models keep an fp32 cache, equal to transformers' (POCKETLM_KV_FP16=0: fp32 here too).
        model.kv_dtype = torch.float16
    tokenizer = Tokenizer.from_hf_dir(folder) if (folder / "tokenizer.json").exists() else None
    if tokenizer is None and config.model_type != "bert":
        raise PocketLMError(f"{folder}: no tokenizer.json beside the weights")
    return LoadedModel(
        name=name,
        path=folder,
        source=source,
        config=config,
        model=model,
        tokenizer=tokenizer,
        meta={
            **hf_config.get("pocketlm", {}),
            "runtime_quant": quant,
            # what the matmuls read: "int8", "int4", "int4-g64", ... or the float dtype
            "weights": QuantScheme.from_dict(saved_quant).name if saved_quant else scheme.name if scheme else str(dtype).removeprefix("torch."),
            "kv_cache": str(model.kv_dtype or dtype).removeprefix("torch.") if decoder else None,
        },
        load_s=time.perf_counter() - start,
    )


DRAFT_HEAD_GROUP = 32  # its weights' int4 groups: it reads 4.6 MB a step, not 9.1 (int8) or 37 (fp32)


def load_draft(name_or_path: str, target: LoadedModel, dtype: torch.dtype = torch.float32, quant: str = "none") -> LoadedModel:
    """A draft for speculative decoding of `target`: a draft head (pocketlm train-draft) or a smaller model."""
    name, source, folder = model_folder(name_or_path)
    hf_config = read_config(folder)
    if not is_draft_head(hf_config):
        return load(name_or_path, dtype=dtype, quant=quant)
    from pocketlm.quant.int4 import Int4Linear

    start = time.perf_counter()
    cfg = DraftHeadConfig.from_hf(hf_config)
    trained_for = hf_config.get("pocketlm", {}).get("lineage", {}).get("target", "?")
    if (cfg.dim, cfg.target_vocab_size) != (target.config.dim, target.config.vocab_size):
        raise PocketLMError(f"{source} is a draft head for {trained_for} (hidden size {cfg.dim}, {cfg.target_vocab_size} tokens), "
                            f"not for {target.name} ({target.config.dim}, {target.config.vocab_size}): train one with pocketlm train-draft --target {target.name}")
    head = DraftHead(cfg)
    try:
        head.load_state_dict(read_safetensors(folder))
    except RuntimeError as e:
        raise PocketLMError(f"{folder}: weights do not fit its config.json: {str(e).splitlines()[-1].strip()}") from None
    for name_ in ("gate_up", "down", "head"):  # int4: a draft's step must cost a few percent of its target's
        setattr(head, name_, Int4Linear.from_linear(getattr(head, name_), DRAFT_HEAD_GROUP))
    head.eval().attach(target.model)
    meta = {**hf_config.get("pocketlm", {}), "weights": f"int4-g{DRAFT_HEAD_GROUP}", "draft_head_for": trained_for}
    return LoadedModel(name=name, path=folder, source=source, config=cfg, model=head, tokenizer=target.tokenizer, meta=meta,
                       load_s=time.perf_counter() - start)


def model_folder(name_or_path: str) -> tuple[str, Path, Path]:
    """(name, what the user named, the Hugging Face folder to read): a .gguf is converted once into the cache."""
    name, source = registry.resolve(name_or_path)
    if source.is_file() and source.suffix != ".gguf":
        raise PocketLMError(f"{source}: not a .gguf file or a model folder (give the folder that holds config.json)")
    return name, source, convert_gguf(source) if source.is_file() else source


def auto_quant(source_quant: str | None) -> str:
    """The runtime quantization with the bits of the file the model came from, so a GGUF runs at the
    precision it was published at (as llama.cpp runs it). A 2-4-bit file runs "int4-mixed": its Q4_0, Q4_1
    and Q4_K tensors are 32-wide groups with a scale and an offset, the grid our int4 kernel takes, so they
    stay int4 exactly; the tensors such a file keeps at 5-6 bits (Q4_K_M's Q6_K) run int8. 5-8-bit files
    run int8, float files in float."""
    name = (source_quant or "").upper()
    if name.startswith(("Q2", "Q3", "Q4", "IQ2", "IQ3", "IQ4")):
        return "int4-mixed"
    if name.startswith(("Q5", "Q6", "Q8")):
        return "int8"
    return "none"


@contextmanager
def skip_init():
    """Skip random initialization while building on the meta device: the checkpoint replaces every
    weight, and nn.Embedding's normal_ on meta goes through torch._refs, which imports torch._dynamo
    (about 2 s of a 2.5 s start)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise PocketLMError(f"{folder}: no config.json (a model folder needs config.json, *.safetensors, tokenizer.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise PocketLMError(f"{path}: not valid JSON ({e})") from None


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" ({', '.join(pickles)} are pickle files, which pocketlm never loads: convert them to safetensors)" if pickles else ""
        raise PocketLMError(f"{folder}: no *.safetensors weights{hint}")
    state_dict = {}
    for path in files:
        try:
            state_dict.update(load_file(path))  # memory-mapped
        except (SafetensorError, OSError) as e:
            raise PocketLMError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return state_dict


def convert_gguf(path: Path) -> Path:
    """Dequantize a .gguf once into a Hugging Face folder in the cache; return that folder."""
    folder = cache.converted_dir(path)
    if (folder / "config.json").exists():
        return folder
    # imported only to convert: the gguf package (with numpy and yaml) costs 0.15 s of every warm start otherwise
    from pocketlm.formats.gguf import gguf_to_hf, read_gguf
    from pocketlm.formats.hf import write_model_folder

    gguf_file = read_gguf(path)
    hf_config, state_dict = gguf_to_hf(gguf_file)
    tokenizer = Tokenizer.from_gguf_metadata(gguf_file.metadata)
    hf_config["pocketlm"] = {
        # a GGUF written by `pocketlm export` carries its lineage (teacher, data, recipe, scores) as JSON
        **_gguf_lineage(gguf_file.metadata),
        "source": str(path.resolve()),
        "source_format": "gguf",
        "quant": gguf_quant_name(gguf_file.metadata),
        "license": gguf_file.metadata.get("general.license"),
        "name": gguf_file.metadata.get("general.name"),
    }
    write_model_folder(folder, hf_config, state_dict, tokenizer)
    return folder


def _gguf_lineage(metadata: dict) -> dict:
    try:
        lineage = json.loads(metadata.get("pocketlm.lineage") or "{}")
    except ValueError:
        return {}
    return lineage if isinstance(lineage, dict) else {}


def gguf_quant_name(metadata: dict) -> str | None:
    """general.file_type as llama.cpp names it: 3 -> "Q4_1", 15 -> "Q4_K_M"."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(metadata.get("general.file_type")).name.removeprefix("MOSTLY_")
    except ValueError:
        return None
