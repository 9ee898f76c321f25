"""GGUF files: read the header and tensors, dequantize them, and convert to a Hugging Face checkpoint.

    f = read_gguf("model.gguf")            # metadata + tensor table; tensor bytes stay in the file mapping
    config, state_dict = gguf_to_hf(f)     # config.json-style dict + fp32 state dict with HF names

Layout (ggml docs/gguf.md): magic "GGUF" | version u32 | n_tensors u64 | n_kv u64 | n_kv key/value pairs |
n_tensors tensor infos | padding to `general.alignment` | tensor data. All little-endian.

Why not gguf-py's GGUFReader: it builds two numpy views per array element, so Gemma 3's 262,144-entry
token list takes ~21 s to open (SmolLM2: ~4 s), and it slices past the end of a cut-off file without
noticing. This reader walks the same layout with `struct` on an mmap (the big string arrays in one
tight loop, numeric arrays with one `np.frombuffer`), bound-checks every read, and reports a bad file
as one `PocketLMError` line. The tests check it against GGUFReader on the same files.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from pocketlm import families
from pocketlm.errors import PocketLMError
from pocketlm.families import GEMMA3_GGUF_NAMES, GGUF_TOP_LEVEL_NAMES, LLAMA_GGUF_NAMES
from pocketlm.formats.gguf_quants import DEQUANTIZERS, dequantize

# ---- file-format constants -------------------------------------------------------------------------

SUPPORTED_VERSIONS = (2, 3)  # the same versions gguf-py's reader accepts; v1 used 32-bit counts
GGML_MAX_DIMS = 4
_MAGIC = struct.pack("<I", GGUF_MAGIC)  # b"GGUF"
_FIXED_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count

# Scalar metadata value types: struct format (little-endian) and numpy dtype for arrays of them.
_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_SCALARS = {t: struct.Struct(f) for t, f in _SCALAR_FORMATS.items()}
_SCALAR_DTYPES = {t: np.dtype(f) for t, f in _SCALAR_FORMATS.items()}
_MAX_ARRAY_NESTING = 8  # GGUF allows arrays of arrays; real files use none, a crafted one could recurse forever
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


# ---- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: ggml's ne[] reversed, so shape[-1] is the contiguous row
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int
    data: np.ndarray = field(repr=False)  # (n_bytes,) uint8, a copy-on-write view of the file mapping

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]  # plain Python values: int, float, bool, str, and lists of them
    tensors: dict[str, TensorInfo]  # in file order
    alignment: int
    data_offset: int  # where the tensor data section starts

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise PocketLMError(f"{self.path}: metadata has no 'general.architecture'")
        return arch


class _Header:
    """A bound-checked cursor over the header bytes; every failure names the file and what was being read."""

    def __init__(self, buf: mmap.mmap, path: Path, pos: int) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, pos, len(buf)

    def error(self, problem: str) -> PocketLMError:
        return PocketLMError(f"{self.path}: {problem}")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.error(
                f"truncated or corrupt header: {what} needs bytes up to {self.pos + n:,} but the file has {self.size:,}"
            )

    def unpack(self, s: struct.Struct, what: str) -> Any:
        self.need(s.size, what)
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def string(self, what: str) -> str:
        n = self.unpack(_U64, what)
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what)
        s = _SCALARS.get(vtype)  # type: ignore[call-overload]
        if s is None:
            raise self.error(f"{what} has unknown value type {vtype}")
        return self.unpack(s, what)

    def array(self, what: str, depth: int = 0) -> list:
        if depth > _MAX_ARRAY_NESTING:
            raise self.error(f"{what} nests arrays more than {_MAX_ARRAY_NESTING} deep")
        etype = self.unpack(_U32, what)
        count = self.unpack(_U64, what)
        dtype = _SCALAR_DTYPES.get(etype)  # type: ignore[call-overload]
        if dtype is not None:  # numeric: one frombuffer for the whole array
            self.need(count * dtype.itemsize, what)
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return values.tolist()
        if etype == GGUFValueType.STRING:
            return self.string_array(count, what)
        if etype == GGUFValueType.ARRAY:
            self.need(count * 12, what)  # each nested array is at least its type and count
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
        raise self.error(f"{what} is an array of unknown value type {etype}")

    def string_array(self, count: int, what: str) -> list[str]:
        # The hot loop for tokenizer vocabularies (262k strings for Gemma): locals only, plain int checks.
        self.need(count * 8, what)  # every string has at least its 8-byte length
        buf, pos, size, unpack_u64 = self.buf, self.pos, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"{what}[{i}]")  # raises
            (n,) = unpack_u64(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.need(n, f"{what}[{i}]")  # raises
            try:
                append(buf[pos : pos + n].decode("utf-8"))
            except UnicodeDecodeError:
                raise self.error(f"{what}[{i}] is not valid UTF-8") from None
            pos += n
        self.pos = pos
        return out


def _open_mapping(path: Path) -> mmap.mmap:
    if not path.is_file():
        raise PocketLMError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise PocketLMError(f"{path}: empty file (0 bytes), not a GGUF model")
    with open(path, "rb") as f:
        head = f.read(_FIXED_HEADER.size)
        if head[:4] != _MAGIC:
            raise PocketLMError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected {_MAGIC!r})")
        if size < _FIXED_HEADER.size:
            raise PocketLMError(f"{path}: truncated: {size:,} bytes, less than a {_FIXED_HEADER.size}-byte GGUF header")
        # ACCESS_COPY (numpy's memmap mode "c"): tensors made from it are writable without a copy,
        # and a write changes private memory, never the file.
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header and map its tensor data. Raises PocketLMError (one line) on a bad file."""
    path = Path(path)
    buf = _open_mapping(path)
    _, version, n_tensors, n_kv = _FIXED_HEADER.unpack_from(buf, 0)
    if version not in SUPPORTED_VERSIONS:
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        if swapped in SUPPORTED_VERSIONS:
            raise PocketLMError(f"{path}: big-endian GGUF files are not supported")
        raise PocketLMError(f"{path}: GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")
    h = _Header(buf, path, _FIXED_HEADER.size)

    # State 1: metadata key/value pairs. The count check stops a corrupt count before a long loop.
    h.need(n_kv * 13, f"{n_kv:,} metadata entries")  # key length (8) + type (4) + at least 1 byte
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = h.string(f"metadata key #{i}")
        vtype = h.unpack(_U32, f"metadata '{key}'")
        if key in metadata:
            raise h.error(f"metadata key '{key}' appears twice")
        metadata[key] = h.value(vtype, f"metadata '{key}'")

    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise h.error(f"general.alignment must be a power of two, got {alignment!r}")

    # State 2: tensor infos (name, dims, type, offset relative to the data section).
    h.need(n_tensors * 24, f"{n_tensors:,} tensor infos")  # name length, n_dims, type, offset
    infos = []
    for i in range(n_tensors):
        name = h.string(f"tensor info #{i}")
        what = f"tensor '{name}'"
        n_dims = h.unpack(_U32, what)
        if n_dims > GGML_MAX_DIMS:
            raise h.error(f"{what} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
        h.need(8 * n_dims, what)
        ne = struct.unpack_from(f"<{n_dims}Q", buf, h.pos)
        h.pos += 8 * n_dims
        raw_type = h.unpack(_U32, what)
        rel_offset = h.unpack(_U64, what)
        infos.append((name, ne, raw_type, rel_offset))

    # State 3: the data section starts at the next multiple of the alignment.
    data_offset = -(-h.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, ne, raw_type, rel_offset in infos:
        tensors[name] = _tensor_info(h, name, ne, raw_type, data_offset + rel_offset, alignment, tensors)
    return GGUFFile(path, version, metadata, tensors, alignment, data_offset)


def _tensor_info(
    h: _Header, name: str, ne: tuple[int, ...], raw_type: int, offset: int, alignment: int, seen: dict
) -> TensorInfo:
    what = f"tensor '{name}'"
    if name in seen:
        raise h.error(f"{what} appears twice")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise h.error(f"{what} has unknown GGML type {raw_type}") from None
    if ggml_type not in GGML_QUANT_SIZES:
        raise h.error(f"{what} has GGML type {ggml_type.name}, which has no known block size")
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if ne and ne[0] % block_size:
        raise h.error(
            f"{what} has rows of {ne[0]} values, not a multiple of the {ggml_type.name} block size {block_size}"
        )
    n_bytes = math.prod(ne) // block_size * type_size
    if offset % alignment:  # llama.cpp's gguf.cpp refuses unaligned tensor data too
        raise h.error(f"{what} starts at byte {offset:,}, not a multiple of the alignment {alignment}")
    if offset + n_bytes > h.size:
        raise h.error(f"truncated: {what} needs bytes up to {offset + n_bytes:,} but the file has {h.size:,}")
    data = np.frombuffer(h.buf, dtype=np.uint8, count=n_bytes, offset=offset)
    return TensorInfo(name, tuple(reversed(ne)), ggml_type, offset, n_bytes, data)


def dequantize_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor's values as fp32, shaped `info.shape` (a new tensor, never a view of the file)."""
    return dequantize(torch.from_numpy(info.data), info.ggml_type, info.shape)


# ---- GGUF names -> Hugging Face names --------------------------------------------------------------
# The tables are each family's (pocketlm/families.py: Gguf.block_names), read in reverse from gguf-py's
# tensor_mapping.py. A GGUF tensor is "<name>.weight" / "<name>.bias"; block tensors are "blk.<i>.<name>" ->
# "model.layers.<i>.<hf name>".

TOP_LEVEL_NAMES = GGUF_TOP_LEVEL_NAMES
LLAMA_BLOCK_NAMES = LLAMA_GGUF_NAMES  # the names other modules and tests import
GEMMA3_BLOCK_NAMES = GEMMA3_GGUF_NAMES

_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_RE = re.compile(r"(\w+)\.(weight|bias)")


def _hf_name(gguf_name: str, block_names: dict[str, str], top_names: dict[str, str] = TOP_LEVEL_NAMES,
             blocks: str = "model.layers") -> str | None:
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, name, suffix = m.groups()
        hf = block_names.get(name)
        return f"{blocks}.{layer}.{hf}.{suffix}" if hf else None
    if m := _TOP_RE.fullmatch(gguf_name):
        hf = top_names.get(m.group(1))
        return f"{hf}.{m.group(2)}" if hf else None
    return None


# ---- config.json from metadata ---------------------------------------------------------------------


class _Meta:
    """`<arch>.<key>` lookups that name the file and the key when a required one is missing."""

    def __init__(self, f: GGUFFile) -> None:
        self.f, self.md, self.arch = f, f.metadata, f.architecture

    def get(self, key: str, default: Any = None) -> Any:
        return self.md.get(f"{self.arch}.{key}", default)

    def required(self, key: str, default: Any = None) -> Any:
        """The key's value (the single value of a per-layer list), or `default`; an error if neither exists."""
        value = self.get(key, default)
        if value is None:
            raise PocketLMError(f"{self.f.path}: metadata '{self.arch}.{key}' is missing")
        if isinstance(value, list):  # a per-layer list; the architectures here need one value for all layers
            if len(set(value)) != 1:
                raise PocketLMError(f"{self.f.path}: per-layer '{self.arch}.{key}' = {value} is not supported")
            value = value[0]
        return value


def _common_config(f: GGUFFile) -> dict[str, Any]:
    """The fields every decoder here shares; names and values as in transformers' GGUF_CONFIG_MAPPING."""
    m = _Meta(f)
    n_heads = m.required("attention.head_count")
    hidden = m.required("embedding_length")
    if "token_embd.weight" not in f.tensors:
        raise PocketLMError(f"{f.path}: no 'token_embd.weight' tensor")
    config = {
        # From the embedding itself: the metadata's vocab_size is optional and the tokenizer list can be padded.
        "vocab_size": f.tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": m.required("feed_forward_length"),
        "num_hidden_layers": m.required("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": m.required("attention.head_count_kv", n_heads),
        # llama.cpp's n_embd_head_k is key_length, else n_embd / n_head; transformers' llama mapping reads
        # rope.dimension_count (n_rot), which equals it for every full-rotary model these names cover.
        "head_dim": m.required("attention.key_length", m.get("rope.dimension_count", hidden // n_heads)),
        "max_position_embeddings": m.required("context_length"),
        "rms_norm_eps": m.get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": m.get("rope.freq_base", 10000.0),  # llama.cpp's default when the key is absent
        "rope_scaling": _rope_scaling(m),
        # convert_hf_to_gguf writes no output.weight when the head is tied to the embedding.
        "tie_word_embeddings": "output.weight" not in f.tensors,
    }
    for hf_key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if (token := f.metadata.get(f"tokenizer.ggml.{gguf_key}_token_id")) is not None:
            config[hf_key] = token
    return config


def _rope_scaling(m: _Meta) -> dict | None:
    kind = m.get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": m.get("rope.scaling.factor")}
    raise PocketLMError(f"{m.f.path}: RoPE scaling type '{kind}' is not supported (only linear)")


# Llama 3.1+ RoPE scaling in a GGUF: llama.cpp's converter writes no rope.scaling.* keys for it, only this
# tensor, one fp32 factor per rotary pair; llama.cpp divides each RoPE frequency by its factor. It is read
# into the config (rope_scaling), never into the state dict.
ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_USUAL = (1.0, 4.0, 8192)  # low_freq_factor, high_freq_factor, original context: Llama 3.1, 3.2, 3.3


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """(head_dim / 2,) fp32: rope_freqs.weight for transformers' llama3 `scaling`, op for op as llama.cpp's
    converter computes it (conversion/llama.py LlamaModel.generate_extra_tensors), defaults included."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = scaling.get("factor", 8.0)
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:  # a 0-d fp32 tensor: the converter's arithmetic below stays in fp32
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _llama3_rope_scaling(f: GGUFFile, head_dim: int, theta: float) -> dict:
    """rope_freqs.weight -> transformers' llama3 rope_scaling dict, the inverse of `llama3_rope_factors`.

    The largest factor is `factor`. Llama 3's usual low 1 / high 4 / 8192 are tried first; else the smooth
    region (factors strictly between 1 and `factor`) gives the rest: there 1/f = (1 - s)/factor + s with
    s = (orig / wavelen - low) / (high - low), a line in 1/wavelen. Its slope and intercept fix only
    orig/low and orig/high, so low = 1 is assumed. The result must reproduce every stored factor.
    """
    info = f.tensors[ROPE_FREQS]
    if info.shape != (head_dim // 2,):
        raise PocketLMError(
            f"{f.path}: {ROPE_FREQS} has shape {info.shape}, not ({head_dim // 2},) for head_dim {head_dim}"
        )
    stored = dequantize_tensor(info).double()  # (head_dim / 2,)
    factor = stored.max().item()
    candidates = [_LLAMA3_USUAL]
    inv_wavelen = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)) / (2 * math.pi)
    mid = (stored > 1 + 1e-6) & (stored < factor * (1 - 1e-6))
    if factor > 1 and mid.sum() >= 2:
        s = (1 / stored[mid] - 1 / factor) / (1 - 1 / factor)  # the smooth fraction of each middle factor
        slope, intercept = np.polyfit(inv_wavelen[mid].numpy(), s.numpy(), 1)  # s = orig/(high-1) x - 1/(high-1)
        if intercept < 0 < slope:
            high, orig = 1 - 1 / intercept, -slope / intercept
            candidates += [(1.0, round(high, 3), round(orig)), (1.0, high, orig)]  # round numbers first
    for low, high, orig in candidates:
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": orig}  # fmt: skip
        if torch.allclose(llama3_rope_factors(head_dim, theta, scaling).double(), stored, rtol=1e-6, atol=0):
            return scaling
    raise PocketLMError(
        f"{f.path}: {ROPE_FREQS} is not Llama 3 RoPE scaling (no factor, low/high_freq_factor and original "
        f"context length reproduce its {len(stored)} values)"
    )


def _rope_parameters(theta: float, scaling: dict | None) -> dict:
    """transformers 5 writes RoPE settings as `rope_parameters`; the flat keys stay for version 4 readers."""
    return {"rope_type": "default", "rope_theta": theta} | (scaling or {})


# config readers, by llama.cpp architecture: a family's row (families.py) names the architecture, its reader is here
_CONFIG_READERS: dict[str, tuple[Callable[[GGUFFile], dict[str, Any]], tuple[str, ...]]] = {}


def _reads(arch: str, config_tensors: tuple[str, ...] = ()):
    """Register the config.json reader of GGUF architecture `arch`; config_tensors: tensors it reads (not weights)."""

    def register(fn):
        _CONFIG_READERS[arch] = (fn, config_tensors)
        return fn

    return register


@_reads("llama", config_tensors=(ROPE_FREQS,))
def _llama_config(f: GGUFFile) -> dict[str, Any]:
    c = _common_config(f)
    if ROPE_FREQS in f.tensors:  # llama.cpp reads rope_freqs for llama only (src/models/llama.cpp)
        if c["rope_scaling"] is not None:  # llama.cpp would apply both; transformers has no such RoPE
            kind = c["rope_scaling"]["rope_type"]
            raise PocketLMError(f"{f.path}: {ROPE_FREQS} together with {kind} RoPE scaling is not supported")
        c["rope_scaling"] = _llama3_rope_scaling(f, c["head_dim"], c["rope_theta"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **c,
        "rope_parameters": _rope_parameters(c["rope_theta"], c["rope_scaling"]),
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in f.tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in f.tensors,
        "dtype": "float32",
    }


@_reads("qwen2")
def _qwen2_config(f: GGUFFile) -> dict[str, Any]:
    c = _common_config(f)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **c,
        "rope_parameters": _rope_parameters(c["rope_theta"], c["rope_scaling"]),
        "hidden_act": "silu",
        "use_sliding_window": False,
        "dtype": "float32",
    }


@_reads("gemma3")
def _gemma3_config(f: GGUFFile) -> dict[str, Any]:
    # Gemma 3 hyper-parameters llama.cpp does not store but hard-codes (llama-model.cpp, LLM_ARCH_GEMMA3):
    # every 6th layer is global (set_swa_pattern(6)), local layers use RoPE base 10,000, and the query scale
    # is 1/sqrt(head_dim) except for the 62-layer 27B, which uses 1/sqrt(hidden / heads).
    m = _Meta(f)
    c = _common_config(f)
    pattern = m.get("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # newer converters: one bool per layer, True = sliding
        layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
        pattern = layer_types.index("full_attention") + 1 if "full_attention" in layer_types else 0
    else:
        layer_types = [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(c["num_hidden_layers"])
        ]
    local_theta = m.get("rope.freq_base_swa", 10000.0)
    if c["num_hidden_layers"] == 62:
        query_pre_attn_scalar = c["hidden_size"] // c["num_attention_heads"]
    else:
        query_pre_attn_scalar = c["head_dim"]
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",  # the GGUF holds only the text decoder
        **c,
        "rope_local_base_freq": local_theta,
        "rope_parameters": {
            "full_attention": _rope_parameters(c["rope_theta"], c["rope_scaling"]),
            "sliding_attention": _rope_parameters(local_theta, None),
        },
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": m.required("attention.sliding_window"),
        "sliding_window_pattern": pattern,
        "layer_types": layer_types,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "final_logit_softcapping": m.get("final_logit_softcapping"),
        "attn_logit_softcapping": m.get("attn_logit_softcapping"),
        "attention_bias": False,
        "dtype": "float32",
    }


@_reads("gemma")
def _gemma_config(f: GGUFFile) -> dict[str, Any]:
    # llama.cpp's gemma (src/models/gemma.cpp) scales queries by 1/sqrt(head_dim) and the embedding by sqrt(D)
    c = _common_config(f)
    return {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        **c,
        "rope_parameters": _rope_parameters(c["rope_theta"], c["rope_scaling"]),
        "hidden_act": "gelu_pytorch_tanh",
        "attention_bias": False,
        "dtype": "float32",
    }


@_reads("gemma2")
def _gemma2_config(f: GGUFFile) -> dict[str, Any]:
    # What llama.cpp hard-codes for gemma2 (src/models/gemma2.cpp): every other layer slides (set_swa_pattern(2):
    # layer 0 sliding), both caps default to 50 (scores) and 30 (logits) and always apply, and the query scale is
    # 1/sqrt(head_dim) except for the 46-layer 27B, which uses 1/sqrt(hidden / heads).
    m = _Meta(f)
    c = _common_config(f)
    pattern = m.get("attention.sliding_window_pattern", 2)
    if isinstance(pattern, list):  # one bool per layer, True = sliding
        layer_types = ["sliding_attention" if s else "full_attention" for s in pattern]
    else:
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(c["num_hidden_layers"])]
    if c["num_hidden_layers"] == 46:
        query_pre_attn_scalar = c["hidden_size"] // c["num_attention_heads"]
    else:
        query_pre_attn_scalar = c["head_dim"]
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        **c,
        "rope_parameters": _rope_parameters(c["rope_theta"], c["rope_scaling"]),
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": m.get("attention.sliding_window", 4096),
        "layer_types": layer_types,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "final_logit_softcapping": m.get("final_logit_softcapping", 30.0),
        "attn_logit_softcapping": m.get("attn_logit_softcapping", 50.0),
        "attention_bias": False,
        "dtype": "float32",
    }


@_reads("phi2")
def _phi2_config(f: GGUFFile) -> dict[str, Any]:
    # convert_hf_to_gguf.py's Phi2Model stores the rotary part as rope.dimension_count and no key_length: the head
    # is hidden / heads, and LayerNorm's epsilon is attention.layer_norm_epsilon
    m = _Meta(f)
    c = _common_config(f)
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    partial = m.required("rope.dimension_count") / head_dim
    del c["head_dim"], c["rms_norm_eps"]
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        **c,
        "partial_rotary_factor": partial,
        "rope_parameters": _rope_parameters(c["rope_theta"], c["rope_scaling"]) | {"partial_rotary_factor": partial},
        "layer_norm_eps": m.required("attention.layer_norm_epsilon"),
        "hidden_act": "gelu_new",
        "dtype": "float32",
    }


@_reads("gpt2")
def _gpt2_config(f: GGUFFile) -> dict[str, Any]:
    # llama.cpp's gpt2 (src/models/gpt2.cpp): learned positions, LayerNorms with biases, GELU's tanh approximation,
    # scores scaled by 1/sqrt(head_dim): GPT2Config's defaults
    m = _Meta(f)
    c = _common_config(f)
    ids = {k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in c}
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c["vocab_size"],
        "n_embd": c["hidden_size"],
        "n_layer": c["num_hidden_layers"],
        "n_head": c["num_attention_heads"],
        "n_inner": c["intermediate_size"],
        "n_positions": c["max_position_embeddings"],
        "layer_norm_epsilon": m.required("attention.layer_norm_epsilon"),
        "activation_function": "gelu_new",
        "tie_word_embeddings": c["tie_word_embeddings"],
        **ids,
        "dtype": "float32",
    }


@_reads("phi3")
def _phi3_config(f: GGUFFile) -> dict[str, Any]:
    # convert_hf_to_gguf.py's Phi3MiniModel: the rotary part of a head as rope.dimension_count (Phi-4 mini: 3/4 of
    # it), no key_length unless the head differs from hidden / heads, a sliding window of 0 for none (Phi-4 mini);
    # LongRoPE's rope_factors_long / _short tensors (the 128k releases) are refused, as from a folder
    m = _Meta(f)
    c = _common_config(f)
    if "rope_factors_long.weight" in f.tensors:
        raise PocketLMError(f"{f.path}: Phi-3 with LongRoPE scaling (rope_factors_long) is not supported")
    c["head_dim"] = m.get("attention.key_length", c["hidden_size"] // c["num_attention_heads"])
    partial = m.get("rope.dimension_count", c["head_dim"]) / c["head_dim"]
    return {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        **c,
        "original_max_position_embeddings": m.get("rope.scaling.original_context_length", c["max_position_embeddings"]),
        "partial_rotary_factor": partial,
        "rope_parameters": _rope_parameters(c["rope_theta"], c["rope_scaling"]) | {"partial_rotary_factor": partial},
        "sliding_window": m.get("attention.sliding_window") or None,
        "hidden_act": "silu",
        "dtype": "float32",
    }


# ---- tensor fixes: undo what convert_hf_to_gguf.py did ---------------------------------------------


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf.py LlamaModel.permute, which interleaves each head's rotary halves for
    llama.cpp's RoPE. Same as transformers' LlamaTensorProcessor._reverse_permute_weights."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _llama_fix(name: str, w: torch.Tensor, config: dict) -> torch.Tensor:
    if ".attn_q." in name:
        return _unpermute(w, config["num_attention_heads"])
    if ".attn_k." in name:
        return _unpermute(w, config["num_key_value_heads"])
    return w


def _gemma3_fix(name: str, w: torch.Tensor, config: dict) -> torch.Tensor:
    # convert_hf_to_gguf.py Gemma3Model adds 1 to every "*norm.weight" (q/k norms too), since llama.cpp's
    # RMSNorm multiplies by w and Gemma's by (1 + w). transformers' Gemma2TensorProcessor subtracts it again.
    return w - 1 if name.endswith("norm.weight") else w


def _no_fix(name: str, w: torch.Tensor, config: dict) -> torch.Tensor:
    return w  # convert_hf_to_gguf.py Qwen2Model does not permute Q/K


@dataclass(frozen=True)
class _Architecture:
    block_names: dict[str, str]  # every block must have each of these as "<name>.weight"; biases are optional...
    config: Callable[[GGUFFile], dict[str, Any]]
    fix: Callable[[str, torch.Tensor, dict], torch.Tensor]
    required_biases: tuple[str, ...] = ()  # ...except these
    config_tensors: tuple[str, ...] = ()  # tensors `config` reads, not weights: they have no Hugging Face name
    top_names: dict[str, str] = field(default_factory=lambda: TOP_LEVEL_NAMES)  # token_embd, output_norm, output
    blocks: str = "model.layers"  # the HF name of the block list (GPT-2: transformer.h)

    def required_block_tensors(self) -> list[str]:
        return [f"{n}.weight" for n in self.block_names] + [f"{n}.bias" for n in self.required_biases]


_CONV1D_WEIGHTS = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")


def _conv1d_fix(name: str, w: torch.Tensor, config: dict) -> torch.Tensor:
    # convert_hf_to_gguf.py GPT2Model transposes GPT-2's Conv1D weights, (in, out), to ggml's (out, in): back
    return w.t().contiguous() if name.endswith(_CONV1D_WEIGHTS) else w


_FIXES = {"none": _no_fix, "permute_qk": _llama_fix, "norm_plus_one": _gemma3_fix, "transpose_conv1d": _conv1d_fix}


def _architecture(g: families.Gguf) -> _Architecture:
    config, config_tensors = _CONFIG_READERS[g.arch]
    return _Architecture(g.block_names, config, _FIXES[g.fix], g.required_biases, config_tensors, g.top_level_names, g.blocks)


# llama.cpp architecture -> how to read it: from each family that a GGUF reads back as (families.gguf_reader)
ARCHITECTURES: dict[str, _Architecture] = {
    f.gguf.arch: _architecture(f.gguf) for f in families.FAMILIES.values() if f.gguf and f.gguf.reads
}


def gguf_to_hf(gguf_file: GGUFFile | str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A GGUF model as (config.json-style dict, fp32 state dict with Hugging Face names).

    The state dict has exactly the keys transformers' `*ForCausalLM` has, `lm_head.weight` only when the
    head is not tied, and values equal to what `from_pretrained(..., gguf_file=...)` loads.
    """
    f = gguf_file if isinstance(gguf_file, GGUFFile) else read_gguf(gguf_file)
    arch, config = model_config(f)
    state_dict = {}
    with _torch_threads(1):
        for name, info in f.tensors.items():
            if name not in arch.config_tensors:  # rope_freqs.weight is in the config, not a weight
                state_dict[_hf_name(name, arch.block_names, arch.top_names, arch.blocks)] = arch.fix(name, dequantize_tensor(info), config)
    return config, state_dict


def model_config(f: GGUFFile) -> tuple[_Architecture, dict[str, Any]]:
    """The file's architecture and config.json-style config, once every tensor the model needs is there with a
    Hugging Face name and a GGML type pocketlm reads (one line otherwise, before any tensor is read)."""
    arch = ARCHITECTURES.get(f.architecture)
    if arch is None:
        raise PocketLMError(
            f"{f.path}: architecture '{f.architecture}' is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    config = arch.config(f)

    required = ["token_embd.weight", "output_norm.weight"]
    n_layers = _Meta(f).required("block_count")  # config.json spells it per family (GPT-2: n_layer)
    required += [f"blk.{i}.{n}" for i in range(n_layers) for n in arch.required_block_tensors()]
    missing = [n for n in required if n not in f.tensors]
    weights = [n for n in f.tensors if n not in arch.config_tensors]
    unnamed = [n for n in weights if _hf_name(n, arch.block_names, arch.top_names, arch.blocks) is None]
    if missing:
        raise PocketLMError(f"{f.path}: {len(missing)} tensors missing for a {f.architecture} model: {_few(missing)}")
    if unnamed:  # refuse rather than silently build a different model
        raise PocketLMError(f"{f.path}: {len(unnamed)} tensors have no Hugging Face name: {_few(unnamed)}")
    unsupported = [f"{n} ({t.ggml_type.name})" for n, t in f.tensors.items() if t.ggml_type not in DEQUANTIZERS]
    if unsupported:  # check all before dequantizing any
        supported = ", ".join(t.name for t in DEQUANTIZERS)
        raise PocketLMError(f"{f.path}: unsupported GGML types in {_few(unsupported)} (supported: {supported})")
    return arch, config


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    # Dequantizing is a long chain of small memory-bound ops. With 2 OpenMP threads on a 2-core machine
    # that other processes share, the barrier after each op stalls whenever a core is taken: SmolLM2 took
    # 0.45 s when the machine was quiet but 4-24 s in 3 of 6 fresh runs; with 1 thread, 0.7-0.8 s every time.
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
