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

from pocketlm import cache, named, registry
from pocketlm.config import config_from_hf
from pocketlm.errors import PocketLMError
from pocketlm.families import is_encoder
from pocketlm.formats.hf import checkpoint_tensors, read_config
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
    # what requests and flags leave unset: generation_config.json's and a created model's (pocketlm/named.py)
    defaults: named.Defaults = field(default_factory=named.Defaults)
    adapter: int = 0  # the LoRA adapter of `model` this runs with (load_adapters; pocketlm/models/lora.py), 0: none

    @property
    def context_length(self) -> int:
        return getattr(self.config, "max_position_embeddings", 0)  # 0: a draft head, which reads no positions

    @property
    def is_encoder(self) -> bool:
        return is_encoder(self.config)


def load(name_or_path: str, dtype: torch.dtype = torch.float32, quant: str = "none", head: str = "int8") -> LoadedModel:
    """quant "int8", "int4", "int4-g64", ...: weight-only quantized Linear layers (pocketlm.quant), made at
    load time; "auto": the bits of the source file (`auto_quant`). A folder written by `pocketlm quantize`
    loads its quantized weights as they are. A quantized run of a GGUF reads its blocks straight into the
    quantized layers (pocketlm/quant/from_gguf.py); only a float run converts it once into a float folder.
    head: a quantized model's output head and token embedding, int8 or "float" (a QLoRA base's)."""
    from pocketlm.quant import QuantScheme

    start = time.perf_counter()
    name, source = registry.resolve(name_or_path)
    if source.is_file() and source.suffix == ".gguf":
        gguf_file, hf_config = read_gguf_model(source)
        if quant == "auto":
            quant = auto_quant(hf_config["pocketlm"]["quant"])
        if quant != "none":  # a quantized run reads the file's blocks directly: no float copy of the model anywhere
            from pocketlm.quant.from_gguf import quantized_state_dict

            scheme = QuantScheme.parse(quant, head)
            check_fits(quantized_bytes(gguf_file, scheme), source)
            hf_config["pocketlm"]["quantization"] = scheme.to_dict()
            state_dict, layers = quantized_state_dict(gguf_file, scheme, hf_config)
            tokenizer = Tokenizer.from_gguf_metadata(gguf_file.metadata)
            lm = build(name, source, source, hf_config, state_dict, tokenizer, dtype, quant, layers)
            lm.load_s = time.perf_counter() - start
            return with_defaults(lm, name_or_path)
        check_fits(sum(t.n_elements for t in gguf_file.tensors.values()) * torch.finfo(dtype).bits // 8, source)
    name, source, folder = model_folder(name_or_path)
    hf_config = read_config(folder)
    saved_quant = hf_config.get("pocketlm", {}).get("quantization")
    if saved_quant and quant not in ("none", "auto"):  # auto: a saved quantized folder runs as it is
        raise PocketLMError(f"{source} is already quantized ({QuantScheme.from_dict(saved_quant).name}): load it without --quant")
    if quant == "auto":
        quant = "none" if saved_quant else auto_quant(hf_config.get("pocketlm", {}).get("quant"))
    check_fits(sum(p.stat().st_size for p in folder.glob("*.safetensors")) * torch.finfo(dtype).bits // 32, source)
    state_dict = checkpoint_tensors(hf_config, read_safetensors(folder))
    tokenizer = Tokenizer.from_hf_dir(folder) if (folder / "tokenizer.json").exists() else None
    lm = build(name, folder, source, hf_config, state_dict, tokenizer, dtype, quant, head=head)
    lm.load_s = time.perf_counter() - start
    return with_defaults(lm, name_or_path)


def with_defaults(lm: LoadedModel, name_or_path: str) -> LoadedModel:
    """A created model's settings (pocketlm/named.py) and the folder's generation_config.json on lm; a created
    model's chat template replaces the base's."""
    lm.defaults = named.defaults_for(name_or_path, lm.source)
    if lm.defaults.template is not None and lm.tokenizer is not None:
        lm.tokenizer.chat_template = lm.defaults.template
    if lm.defaults.adapter:  # a created model's LoRA adapter (create --adapter), applied unmerged
        return load_adapters(lm, {lm.name: lm.defaults.adapter})[lm.name]
    return lm


def available_memory() -> int:
    """Bytes this process can still take: /proc/meminfo's MemAvailable (POCKETLM_MEMORY_LIMIT, e.g. "6GB", in its
    place: a test's, or a user's who keeps room for other work)."""
    limit = os.environ.get("POCKETLM_MEMORY_LIMIT")
    if limit:
        units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "K": 1e3, "M": 1e6, "G": 1e9}
        number = limit.upper().rstrip("B") if limit.upper().endswith(("KB", "MB", "GB")) else limit.upper()
        unit = next((u for u in ("K", "M", "G") if number.endswith(u)), "")
        try:
            return int(float(number.removesuffix(unit)) * units.get(unit, 1))
        except ValueError:
            raise PocketLMError(f"POCKETLM_MEMORY_LIMIT={limit!r} is not a size: give bytes or e.g. 6GB") from None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return 1 << 62  # not Linux: no check
    return int(meminfo.split("MemAvailable:")[1].split()[0]) * 1024


def check_fits(model_bytes: int, source: Path) -> None:
    """Refuse, in one line and before loading anything, a model larger than the memory there is (the weights the
    model will hold, without the KV cache, which grows with each request)."""
    available = available_memory()
    if model_bytes > available:
        size = lambda n: f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"  # noqa: E731
        raise PocketLMError(f"{source.name} needs about {size(model_bytes)} of memory for its weights, but only "
                            f"{size(available)} is available: close other programs, or use a smaller or more "
                            f"quantized model (e.g. a Q4 GGUF)")


def quantized_bytes(gguf_file, scheme) -> int:
    """About what a GGUF's weights hold once quantized by `scheme`: 4-bit tensors as in the file (codes plus a
    bf16 scale and zero per 32), others at a byte per weight (int8) or four (norms, float layers)."""
    total = 0
    tied = "output.weight" not in gguf_file.tensors
    for name, info in gguf_file.tensors.items():
        if len(info.shape) == 1 or (scheme.head == "float" and name in ("token_embd.weight", "output.weight")):
            total += info.n_elements * 4
        elif scheme.weights == "int4" and info.ggml_type.name in ("Q4_0", "Q4_1", "Q4_K"):
            total += info.n_elements // 2 + info.n_elements // 32 * 4
            if tied and name == "token_embd.weight":  # a tied head kept in 4 bits: the embedding's own int8 rows too
                total += info.n_elements
        else:
            total += info.n_elements
    return total


def build(name: str, path: Path, source: Path, hf_config: dict, state_dict: dict, tokenizer: Tokenizer | None,
          dtype: torch.dtype, quant: str, layers: dict[str, torch.nn.Module] | None = None, head: str = "int8") -> LoadedModel:
    """The model `hf_config` describes, given `state_dict` (float, or a quantized folder's: config's
    "pocketlm"/"quantization" says), quantized at load time by `quant` ("none" or a QuantScheme name, its output
    head `head`). layers:
    modules made ready elsewhere (a GGUF's int4 layers in the kernels' layout), put in by name (None: a fused
    projection left out, its parts among them)."""
    layers = layers or {}
    from pocketlm.quant import QuantScheme, finish_loading, quantize, quantized_skeleton
    from pocketlm.quant.int4 import Int4Linear

    folder = path
    config = config_from_hf(hf_config)
    saved_quant = hf_config.get("pocketlm", {}).get("quantization")
    scheme = None if quant == "none" or saved_quant else QuantScheme.parse(quant, head)
    with torch.device("meta"), skip_init():
        model = model_class_for(config)(config)
        if saved_quant:
            ready = [f"{n}.qweight" if isinstance(m, Int4Linear) else f"{n}.weight" for n, m in layers.items()]  # int4 or int8
            quantized_skeleton(model, QuantScheme.from_dict(saved_quant), [*state_dict, *ready])
    for module_name, module in layers.items():
        if module is None:  # a fused projection whose parts are in `layers` each on its own (quant/from_gguf.py)
            parent, _, leaf = module_name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, None)
        else:
            model.set_submodule(module_name, module)
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as e:  # shapes that disagree with config.json
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise PocketLMError(f"{folder}: weights do not fit config.json: {detail}") from None
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    missing = [k for k in missing if not any(k.startswith(f"{name}.") for name in layers)]  # their tensors are in them
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
    decoder = not is_encoder(config)  # an encoder keeps no KV cache
    if decoder and (saved_quant or scheme is not None) and dtype == torch.float32 and os.environ.get("POCKETLM_KV_FP16", "1") != "0":
        # Quantized weights: keys and values kept in fp16 too, as llama.cpp keeps them (its f16 cache). A decoded
        # token reads half the cache bytes: at 600 cached positions SmolLM2's fp32 cache is 27 MB a token beside
        # 81 MB of weights. Float models keep an fp32 cache, equal to transformers' (POCKETLM_KV_FP16=0: fp32 here too).
        model.kv_dtype = torch.float16
    if tokenizer is None and decoder:
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
    )


def load_adapters(lm: LoadedModel, adapters: dict[str, str | Path]) -> dict[str, LoadedModel]:
    """LoRA adapters by name (PEFT folders, as `pocketlm finetune --lora-r` writes them) over lm's model, unmerged
    (pocketlm/models/lora.py): the base stays as it is, quantized too, and shared. -> per name, a LoadedModel that runs
    lm's model with that adapter (the same model, tokenizer and KV cache; `adapter` says which); lm still runs the base.
    An adapter that is not there, or is for another model, is a PocketLMError in one line, before anything changes."""
    from dataclasses import replace

    from pocketlm.models import lora

    if lm.is_encoder:
        raise PocketLMError(f"{lm.name} is an embedding model: LoRA adapters run on generative models")
    read = [lora.read_adapter(path, name) for name, path in adapters.items()]
    indices = lora.attach(lm.model, read, lm.name)
    return {a.name: replace(lm, name=a.name, adapter=i, meta={**lm.meta, "adapter": str(a.path), "base": lm.name})
            for a, i in zip(read, indices)}


def check_adapters(name_or_path: str, adapters: dict[str, str | Path]) -> None:
    """What load_adapters would refuse (an adapter folder that is not one, or one made for another model), found
    without reading the weights: each adapter is attached to the model built on the meta device (`serve --lora`
    checks at its start what would otherwise fail at the first request)."""
    from pocketlm.models import lora

    name, source = registry.resolve(name_or_path)
    read = [lora.read_adapter(path, adapter) for adapter, path in adapters.items()]
    if source.is_file() and source.suffix == ".gguf":
        hf_config = read_gguf_model(source)[1]
    elif (source / "config.json").exists():
        hf_config = read_config(source)
    else:
        return  # a model known some other way (a created model): checked when it loads
    config = config_from_hf(hf_config)
    if is_encoder(config):
        raise PocketLMError(f"{name} is an embedding model: LoRA adapters run on generative models")
    with torch.device("meta"), skip_init():
        model = model_class_for(config)(config)
    lora.attach(model, read, name)


def load_with_adapter(name_or_path: str, adapter: str | Path, dtype: torch.dtype = torch.float32, quant: str = "none") -> LoadedModel:
    """`run --lora` / `chat --lora` (llama.cpp's --lora): the model with one LoRA adapter, unmerged, in every pass."""
    lm = load(name_or_path, dtype=dtype, quant=quant)
    name = Path(adapter).expanduser().resolve().name
    return load_adapters(lm, {name: adapter})[name]


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
    stay int4 exactly; the tensors such a file keeps at 5-6 bits run int8 (Q4_K_M's Q6_K ones in their own
    blocks, pocketlm/quant/from_gguf.py). 5-8-bit files run int8, float files in float."""
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

    with cache.building(folder, f"converting {path.name} for its first use") as progress:
        if progress is None:  # another process converted it while this one waited
            return folder
        gguf_file = read_gguf(path)
        float_bytes = sum(t.n_elements for t in gguf_file.tensors.values()) * 4
        progress.step("dequantizing", cache.anonymous_memory_growth(float_bytes))
        hf_config, state_dict = gguf_to_hf(gguf_file)
        progress.step("reading the tokenizer")
        tokenizer = Tokenizer.from_gguf_metadata(gguf_file.metadata)
        hf_config["pocketlm"] = gguf_lineage(path, gguf_file.metadata)
        progress.step("writing the float32 copy", cache.folder_write(folder, float_bytes))
        write_model_folder(folder, hf_config, state_dict, tokenizer)
    return folder


def read_gguf_model(path: Path):
    """(the parsed GGUF, its config.json-style config with the "pocketlm" key a converted folder gets), checked
    (formats/gguf.py's model_config) before any tensor is read."""
    from pocketlm.formats.gguf import model_config, read_gguf

    gguf_file = read_gguf(path)
    hf_config = model_config(gguf_file)[1]
    hf_config["pocketlm"] = gguf_lineage(path, gguf_file.metadata)
    return gguf_file, hf_config


def gguf_lineage(path: Path, metadata: dict) -> dict:
    """What a model read from a GGUF keeps of it under config.json's "pocketlm" key."""
    return {
        # a GGUF written by `pocketlm export` carries its lineage (teacher, data, recipe, scores) as JSON
        **_gguf_lineage(metadata),
        "source": str(path.resolve()),
        "source_format": "gguf",
        "quant": gguf_quant_name(metadata),
        "license": metadata.get("general.license"),
        "name": metadata.get("general.name"),
    }


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
