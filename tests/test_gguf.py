"""GGUF reader, block dequantizers and GGUF -> Hugging Face conversion.

References: gguf-py's own reader and `gguf.quants.dequantize` (bit for bit), llama.cpp's
convert_hf_to_gguf.py for what a conversion does to the weights, and transformers' GGUF loader
for the end result. Every fixture is written here with gguf.GGUFWriter; the real-model tests
are marked slow.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType as V

from pocketlm import registry
from conftest import hf_from_gguf, smollm2_path
from pocketlm.errors import PocketLMError
from pocketlm.formats import gguf_quants
from pocketlm.formats.gguf import dequantize_tensor, gguf_to_hf, read_gguf

# ---- dequantization, block by block, against gguf-py -----------------------------------------------

# Byte offsets of the fp16 scale fields in each block (ggml-common.h); everything else is payload.
F16_FIELDS = {
    T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}  # fmt: skip


def finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random fp16 bit patterns, subnormals included, with inf/NaN (exponent 31) remapped to finite ones."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    return np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits).astype(np.uint16)


def random_blocks(qtype: T, n_blocks: int, seed: int = 0) -> np.ndarray:
    """(n_blocks, type_size) random bytes whose float fields are finite."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if qtype == T.F32:
        bits = rng.integers(0, 1 << 32, size=n_blocks, dtype=np.uint32)
        bits = np.where((bits & 0x7F800000) == 0x7F800000, bits & 0x807FFFFF, bits).astype(np.uint32)
        return bits.view(np.uint8).reshape(n_blocks, 4)
    if qtype == T.F16:
        return finite_f16_bits(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    if qtype == T.BF16:
        bits = rng.integers(0, 1 << 16, size=n_blocks, dtype=np.uint16)
        bits = np.where((bits & 0x7F80) == 0x7F80, bits & 0x807F, bits).astype(np.uint16)
        return bits.view(np.uint8).reshape(n_blocks, 2)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        blocks[:, off : off + 2] = finite_f16_bits(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("qtype", list(gguf_quants.DEQUANTIZERS), ids=lambda t: t.name)
def test_dequantize_random_blocks_matches_gguf_py(qtype):
    block_size, _ = GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 48, 3  # 144 blocks: several rows, and more than one block per row
    raw = random_blocks(qtype, rows * blocks_per_row).reshape(rows, -1)
    expected = gguf.quants.dequantize(raw, qtype)  # (rows, blocks_per_row * block_size) float32
    got = gguf_quants.dequantize(torch.from_numpy(raw.reshape(-1)), qtype, (rows, blocks_per_row * block_size))
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(expected)))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.BF16], ids=lambda t: t.name)
def test_dequantize_quantized_floats_matches_gguf_py(qtype):
    # Realistic blocks: what gguf-py's own quantizer makes from normal weights.
    weights = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    raw = gguf.quants.quantize(weights, qtype)
    expected = gguf.quants.dequantize(raw, qtype)
    got = gguf_quants.dequantize(torch.from_numpy(raw.reshape(-1)), qtype, weights.shape)
    assert torch.equal(got, torch.from_numpy(expected))


def test_dequantize_spans_several_chunks(monkeypatch):
    monkeypatch.setattr(gguf_quants, "_CHUNK_VALUES", 1000)  # 3 blocks of 256 per chunk; 10 blocks -> 4 chunks
    raw = random_blocks(T.Q6_K, 10, seed=3)
    got = gguf_quants.dequantize(torch.from_numpy(raw.reshape(-1)), T.Q6_K, (10, 256))
    assert torch.equal(got, torch.from_numpy(gguf.quants.dequantize(raw, T.Q6_K)))


def test_dequantize_unsupported_type_names_it_and_the_supported_ones():
    with pytest.raises(PocketLMError, match=r"Q2_K is not supported \(supported: F32, .*Q4_K"):
        gguf_quants.dequantize(torch.zeros(84, dtype=torch.uint8), T.Q2_K, (256,))


# ---- reading a file written by gguf.GGUFWriter ----------------------------------------------------

METADATA = {  # key: (value, GGUF type, array element type)
    "test.u8": (200, V.UINT8, None),
    "test.i8": (-100, V.INT8, None),
    "test.u16": (60000, V.UINT16, None),
    "test.i16": (-30000, V.INT16, None),
    "test.u32": (4_000_000_000, V.UINT32, None),
    "test.i32": (-2_000_000_000, V.INT32, None),
    "test.u64": (2**63 + 5, V.UINT64, None),
    "test.i64": (-(2**62), V.INT64, None),
    "test.f32": (0.1, V.FLOAT32, None),
    "test.f64": (0.1, V.FLOAT64, None),
    "test.bool": (True, V.BOOL, None),
    "test.string": ("héllo ▁wörld", V.STRING, None),
    "test.strings": (["<s>", "", "▁the", "日本"], V.ARRAY, V.STRING),
    "test.ints": ([3, -1, 7], V.ARRAY, V.INT32),
    "test.floats": ([0.5, -2.25], V.ARRAY, V.FLOAT32),
    "test.bools": ([True, False, True], V.ARRAY, V.BOOL),
}


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict[str, tuple[np.ndarray, T]]) -> Path:
    """tensors: name -> (values, type). F32/F16 values are stored as given, other types are quantized by
    gguf-py, and uint8 values are taken as already-packed blocks of that type."""
    w = gguf.GGUFWriter(path, arch)
    for key, (value, vtype, sub_type) in metadata.items():
        w.add_key_value(key, value, vtype, sub_type)
    for name, (values, qtype) in tensors.items():
        if qtype in (T.F32, T.F16) or values.dtype == np.uint8:
            w.add_tensor(name, values, raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def small_tensors() -> dict[str, tuple[np.ndarray, T]]:
    rng = np.random.default_rng(2)
    return {
        "a.weight": (rng.standard_normal((3, 5)).astype(np.float32), T.F32),
        "b.weight": (rng.standard_normal((4, 64)).astype(np.float16), T.F16),
        "c.weight": (rng.standard_normal((2, 96)).astype(np.float32), T.Q8_0),
        "d.weight": (random_blocks(T.Q4_K, 4, seed=4).reshape(2, 2 * 144), T.Q4_K),
    }


@pytest.fixture
def small_gguf(tmp_path) -> Path:
    return write_gguf(tmp_path / "small.gguf", "llama", METADATA, small_tensors())


def test_read_metadata_matches_what_was_written(small_gguf):
    f = read_gguf(small_gguf)
    assert f.architecture == "llama" and f.version == 3 and f.alignment == 32
    for key, (value, vtype, sub_type) in METADATA.items():
        if V.FLOAT32 in (vtype, sub_type):
            value = np.asarray(value, dtype=np.float32).tolist()  # what a float32 field holds
        assert f.metadata[key] == value, key
        assert type(f.metadata[key]) is type(value), key


def test_read_metadata_matches_gguf_py_reader(small_gguf):
    reader = gguf.GGUFReader(small_gguf)
    ours = read_gguf(small_gguf).metadata
    theirs = {k: field.contents() for k, field in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours == theirs


def test_read_tensors(small_gguf):
    f = read_gguf(small_gguf)
    reader = gguf.GGUFReader(small_gguf)
    assert list(f.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = f.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist()))  # torch order
        assert info.ggml_type == t.tensor_type and info.n_bytes == t.n_bytes and info.offset == t.data_offset
        assert info.data.tobytes() == t.data.tobytes()
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(info.shape)
        assert torch.equal(dequantize_tensor(info), torch.from_numpy(np.array(expected, dtype=np.float32)))


def test_dequantized_tensor_does_not_alias_the_file(small_gguf):
    info = read_gguf(small_gguf).tensors["a.weight"]
    t = dequantize_tensor(info)
    t.zero_()
    assert not np.all(info.data == 0)
    assert small_gguf.read_bytes().count(info.data.tobytes()) == 1


def test_long_string_array_reads_fast(tmp_path):
    import time

    tokens = [f"tok{i}" for i in range(262_144)]  # Gemma 3's vocabulary size
    path = write_gguf(tmp_path / "vocab.gguf", "llama", {"tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING)}, {})
    start = time.perf_counter()
    f = read_gguf(path)
    assert time.perf_counter() - start < 2.0
    assert f.metadata["tokenizer.ggml.tokens"] == tokens


# ---- bad files ------------------------------------------------------------------------------------


def expect_error(path: Path, match: str = "") -> str:
    with pytest.raises(PocketLMError) as info:
        read_gguf(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert match in message, message
    return message


def test_missing_empty_and_bad_magic(tmp_path):
    expect_error(tmp_path / "nope.gguf", "no such file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    expect_error(tmp_path / "empty.gguf", "empty file")
    (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    expect_error(tmp_path / "zip.gguf", "not a GGUF file")
    (tmp_path / "short.gguf").write_bytes(b"GG")
    expect_error(tmp_path / "short.gguf", "not a GGUF file")


def test_unsupported_version(tmp_path, small_gguf):
    data = bytearray(small_gguf.read_bytes())
    data[4:8] = struct.pack("<I", 1)
    (bad := tmp_path / "v1.gguf").write_bytes(data)
    expect_error(bad, "version 1 is not supported")
    data[4:8] = struct.pack(">I", 3)
    bad.write_bytes(data)
    expect_error(bad, "big-endian")


def test_every_cut_in_the_header_is_reported(tmp_path, small_gguf):
    data = small_gguf.read_bytes()
    data_offset = read_gguf(small_gguf).data_offset
    bad = tmp_path / "cut.gguf"
    for n in range(4, data_offset):
        bad.write_bytes(data[:n])
        expect_error(bad, "truncated")


def test_cut_in_tensor_data_names_the_tensor(tmp_path, small_gguf):
    data = small_gguf.read_bytes()
    last = read_gguf(small_gguf).tensors["d.weight"]
    (bad := tmp_path / "cut.gguf").write_bytes(data[: last.offset + 10])
    message = expect_error(bad, "truncated: tensor 'd.weight' needs bytes up to")
    assert f"{last.offset + last.n_bytes:,}" in message and f"{last.offset + 10:,}" in message


def tensor_info_position(data: bytes, name: str) -> int:
    """Byte offset just after a tensor info's name (where n_dims starts)."""
    encoded = struct.pack("<Q", len(name)) + name.encode()
    return data.index(encoded) + len(encoded)


def test_tensor_offset_past_the_end(tmp_path, small_gguf):
    data = bytearray(small_gguf.read_bytes())
    pos = tensor_info_position(data, "b.weight")
    n_dims = struct.unpack_from("<I", data, pos)[0]
    struct.pack_into("<Q", data, pos + 4 + 8 * n_dims + 4, 1 << 40)
    (bad := tmp_path / "offset.gguf").write_bytes(data)
    expect_error(bad, "truncated: tensor 'b.weight' needs bytes up to 1,099,")


def test_corrupt_fields(tmp_path, small_gguf):
    good = small_gguf.read_bytes()
    bad = tmp_path / "corrupt.gguf"

    data = bytearray(good)
    struct.pack_into("<Q", data, 16, 1 << 60)  # metadata count
    bad.write_bytes(data)
    expect_error(bad, "metadata entries")

    data = bytearray(good)
    pos = tensor_info_position(data, "c.weight")
    struct.pack_into("<I", data, pos + 4 + 16, 99)  # 2 dims, then the type
    bad.write_bytes(data)
    expect_error(bad, "tensor 'c.weight' has unknown GGML type 99")

    data = bytearray(good)
    struct.pack_into("<I", data, pos, 7)
    bad.write_bytes(data)
    expect_error(bad, "tensor 'c.weight' has 7 dimensions")

    data = bytearray(good)
    struct.pack_into("<Q", data, pos + 4, 95)  # row of 95 values: not whole Q8_0 blocks
    bad.write_bytes(data)
    expect_error(bad, "not a multiple of the Q8_0 block size 32")


def test_random_header_corruption_never_escapes_as_another_exception(tmp_path, small_gguf):
    good = small_gguf.read_bytes()
    data_offset = read_gguf(small_gguf).data_offset
    rng = np.random.default_rng(5)
    bad = tmp_path / "fuzz.gguf"
    for _ in range(300):
        data = bytearray(good)
        for pos in rng.integers(4, data_offset, size=rng.integers(1, 4)):
            data[pos] = rng.integers(0, 256)
        bad.write_bytes(data)
        try:
            read_gguf(bad)
        except PocketLMError as e:
            assert str(bad) in str(e) and "\n" not in str(e)


# ---- GGUF -> Hugging Face on tiny models ----------------------------------------------------------
# The test plays convert_hf_to_gguf.py: a random HF-named state dict is renamed with gguf-py's own
# TensorNameMap, Q/K permuted (llama) or norms shifted by +1 (gemma3), and written; gguf_to_hf must
# give the original back exactly. Values are k/1024, so they survive F16 storage and the +1 shift.

TINY = dict(vocab=96, hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=512, layers=2)


def tiny_hf_state_dict(arch: str, tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(6)
    h, q, kv, ffn = TINY["hidden"], TINY["heads"] * TINY["head_dim"], TINY["kv_heads"] * TINY["head_dim"], TINY["ffn"]
    shapes = {"model.embed_tokens.weight": (TINY["vocab"], h), "model.norm.weight": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (TINY["vocab"], h)
    layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }
    if arch == "gemma3":
        layer |= {
            "self_attn.q_norm.weight": (TINY["head_dim"],),
            "self_attn.k_norm.weight": (TINY["head_dim"],),
            "pre_feedforward_layernorm.weight": (h,),
            "post_feedforward_layernorm.weight": (h,),
        }
    if arch == "qwen2":
        layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    for i in range(TINY["layers"]):
        shapes |= {f"model.layers.{i}.{k}": s for k, s in layer.items()}
    return {k: (rng.integers(-512, 512, size=s) / 1024).astype(np.float32) for k, s in shapes.items()}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_metadata(arch: str) -> dict:
    md = {
        f"{arch}.block_count": (TINY["layers"], V.UINT32, None),
        f"{arch}.context_length": (512, V.UINT32, None),
        f"{arch}.embedding_length": (TINY["hidden"], V.UINT32, None),
        f"{arch}.feed_forward_length": (TINY["ffn"], V.UINT32, None),
        f"{arch}.attention.head_count": (TINY["heads"], V.UINT32, None),
        f"{arch}.attention.head_count_kv": (TINY["kv_heads"], V.UINT32, None),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-6, V.FLOAT32, None),
        f"{arch}.rope.freq_base": (50000.0, V.FLOAT32, None),
        f"{arch}.vocab_size": (TINY["vocab"], V.UINT32, None),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, V.UINT32, None),
        "tokenizer.ggml.padding_token_id": (0, V.UINT32, None),
    }
    if arch in ("llama", "qwen2"):
        md[f"{arch}.rope.dimension_count"] = (TINY["head_dim"], V.UINT32, None)
    if arch == "gemma3":
        md[f"{arch}.attention.key_length"] = (TINY["head_dim"], V.UINT32, None)
        md[f"{arch}.attention.value_length"] = (TINY["head_dim"], V.UINT32, None)
        md[f"{arch}.attention.sliding_window"] = (128, V.UINT32, None)
    return md


def to_gguf_tensors(arch: str, hf: dict[str, np.ndarray], types: dict[str, T]) -> dict[str, tuple[np.ndarray, T]]:
    """HF state dict -> GGUF tensors as convert_hf_to_gguf.py would write them; `types` by GGUF name fragment."""
    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(model_arch, TINY["layers"])
    out = {}
    for hf_name, w in hf.items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if arch == "llama" and ".attn_q." in name:
            w = permute(w, TINY["heads"])
        if arch == "llama" and ".attn_k." in name:
            w = permute(w, TINY["kv_heads"])
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1
        qtype = next((t for frag, t in types.items() if frag in name), T.F32) if w.ndim == 2 else T.F32
        out[name] = (w.astype(np.float16) if qtype == T.F16 else w, qtype)
    return out


@pytest.mark.parametrize("arch, tied", [("llama", True), ("llama", False), ("qwen2", True), ("gemma3", True)])
def test_tiny_round_trip(tmp_path, arch, tied):
    hf = tiny_hf_state_dict(arch, tied)
    gguf_tensors = to_gguf_tensors(arch, hf, {"ffn_": T.F16, "attn_v": T.F16})
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, tiny_metadata(arch), gguf_tensors)
    threads = torch.get_num_threads()
    config, state_dict = gguf_to_hf(path)
    assert torch.get_num_threads() == threads  # dequantizes single-threaded, then restores the setting
    assert set(state_dict) == set(hf)
    for name, expected in hf.items():
        assert state_dict[name].dtype == torch.float32
        assert torch.equal(state_dict[name], torch.from_numpy(expected)), name
    expected_config = {
        "vocab_size": 96, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 512,
        "rope_theta": 50000.0, "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    assert {k: config[k] for k in expected_config} == expected_config
    assert config["rms_norm_eps"] == np.float32(1e-6).item()
    if arch == "gemma3":
        assert config["model_type"] == "gemma3_text" and config["sliding_window"] == 128
        assert config["layer_types"] == ["sliding_attention", "sliding_attention"]
        assert config["rope_local_base_freq"] == 10000.0 and config["query_pre_attn_scalar"] == 64
    if arch == "qwen2":
        assert config["model_type"] == "qwen2"


def test_unknown_tensor_is_refused(tmp_path):
    tensors = to_gguf_tensors("llama", tiny_hf_state_dict("llama", True), {})
    tensors["blk.0.attn_rot_embd.weight"] = (np.ones(32, dtype=np.float32), T.F32)
    path = write_gguf(tmp_path / "extra.gguf", "llama", tiny_metadata("llama"), tensors)
    with pytest.raises(PocketLMError, match=r"extra\.gguf: 1 tensors have no Hugging Face name: blk\.0\.attn_rot_embd"):
        gguf_to_hf(path)
    # llama.cpp reads rope_freqs for llama only: elsewhere it is a tensor pocketlm cannot place
    tensors = to_gguf_tensors("qwen2", tiny_hf_state_dict("qwen2", True), {})
    tensors["rope_freqs.weight"] = (np.ones(32, dtype=np.float32), T.F32)
    path = write_gguf(tmp_path / "qwen2.gguf", "qwen2", tiny_metadata("qwen2"), tensors)
    with pytest.raises(PocketLMError, match=r"qwen2\.gguf: 1 tensors have no Hugging Face name: rope_freqs\.weight"):
        gguf_to_hf(path)


# ---- Llama 3.1+ RoPE scaling: the rope_freqs tensor ----------------------------------------------


def converter_rope_factors(head_dim: int, base: float, rope_params: dict) -> np.ndarray:
    """llama.cpp's conversion/llama.py LlamaModel.generate_extra_tensors, copied: rope_freqs.weight (fp32)."""
    import math

    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope_params.get("factor", 8.0)
    low_freq_factor = rope_params.get("low_freq_factor", 1.0)
    high_freq_factor = rope_params.get("high_freq_factor", 4.0)
    old_context_len = rope_params.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32).numpy()


def llama3(factor, low, high, original) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": original}  # fmt: skip


# (written, read back). head_dim 64 and rope base 50,000 (tiny_metadata): each puts 2+ of the 32 rotary pairs
# in the smooth band, between the kept high frequencies and the divided low ones.
LLAMA3_CASES = {
    "llama-3.2": (llama3(32.0, 1.0, 4.0, 8192), llama3(32.0, 1.0, 4.0, 8192)),
    "llama-3.1": (llama3(8.0, 1.0, 4.0, 8192), llama3(8.0, 1.0, 4.0, 8192)),
    "solved": (llama3(16.0, 1.0, 3.0, 4096), llama3(16.0, 1.0, 3.0, 4096)),  # not the usual: from the smooth band
    # only original/low and original/high reach the factors: low 2, high 8, 16384 is Llama 3's 1, 4, 8192
    "scaled": (llama3(32.0, 2.0, 8.0, 16384), llama3(32.0, 1.0, 4.0, 8192)),
}


@pytest.mark.parametrize("written, expected", LLAMA3_CASES.values(), ids=LLAMA3_CASES.keys())
def test_rope_freqs_from_the_converter_becomes_llama3_rope_scaling(tmp_path, written, expected):
    hf = tiny_hf_state_dict("llama", True)
    tensors = {"rope_freqs.weight": (converter_rope_factors(TINY["head_dim"], 50000.0, written), T.F32)}
    tensors |= to_gguf_tensors("llama", hf, {"ffn_": T.F16})  # rope_freqs first, as the converter writes it
    path = write_gguf(tmp_path / "llama3.gguf", "llama", tiny_metadata("llama"), tensors)
    assert not any("rope.scaling" in k for k in read_gguf(path).metadata)  # the converter writes no keys for it
    config, state_dict = gguf_to_hf(path)
    assert config["rope_scaling"] == expected
    assert config["rope_parameters"] == {**expected, "rope_theta": 50000.0}
    assert set(state_dict) == set(hf)  # the factors are config, not a weight
    assert all(torch.equal(state_dict[k], torch.from_numpy(v)) for k, v in hf.items())
    if written == expected:  # pocketlm's own writer computes the same bytes
        from pocketlm.formats.gguf import llama3_rope_factors

        factors = llama3_rope_factors(TINY["head_dim"], 50000.0, expected).numpy()
        assert factors.tobytes() == tensors["rope_freqs.weight"][0].tobytes()


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    tensors = to_gguf_tensors("llama", tiny_hf_state_dict("llama", True), {})
    factors = converter_rope_factors(TINY["head_dim"], 50000.0, llama3(32.0, 1.0, 4.0, 8192))
    bad = {
        "random": np.random.default_rng(7).uniform(1, 8, size=32).astype(np.float32),
        "bent": np.where(np.arange(32) == 19, factors * 1.01, factors).astype(np.float32),  # one smooth factor off
        "short": factors[:16],
    }
    for name, values in bad.items():
        path = write_gguf(tmp_path / f"{name}.gguf", "llama", tiny_metadata("llama"),
                          {**tensors, "rope_freqs.weight": (values, T.F32)})  # fmt: skip
        with pytest.raises(PocketLMError) as info:
            gguf_to_hf(path)
        message = str(info.value)
        assert message.startswith(f"{path}: rope_freqs.weight ") and "\n" not in message, message
        assert ("not Llama 3 RoPE scaling" if name != "short" else "has shape (16,), not (32,)") in message


def test_missing_tensor_and_unsupported_type_and_arch(tmp_path):
    tensors = to_gguf_tensors("llama", tiny_hf_state_dict("llama", True), {})
    del tensors["blk.1.ffn_up.weight"]
    path = write_gguf(tmp_path / "missing.gguf", "llama", tiny_metadata("llama"), tensors)
    with pytest.raises(PocketLMError, match=r"missing\.gguf: 1 tensors missing for a llama model: blk\.1\.ffn_up"):
        gguf_to_hf(path)

    tensors["blk.1.ffn_up.weight"] = (np.zeros((512, 84), dtype=np.uint8), T.Q2_K)  # one 84-byte block per row
    path = write_gguf(tmp_path / "q2k.gguf", "llama", tiny_metadata("llama"), tensors)
    with pytest.raises(PocketLMError, match=r"q2k\.gguf: .*blk\.1\.ffn_up\.weight \(Q2_K\).*supported: F32, .*Q6_K"):
        gguf_to_hf(path)

    path = write_gguf(tmp_path / "bert.gguf", "bert", {}, {})
    with pytest.raises(PocketLMError, match=r"bert\.gguf: architecture 'bert' is not supported"):
        gguf_to_hf(path)


# ---- against transformers' GGUF loader -------------------------------------------------------------

QUANT_MIX = {  # every supported type somewhere (rows are 256 wide, so K-quants fit); first match wins
    "token_embd": T.Q8_0, "attn_output": T.Q5_1, "output.": T.Q6_K,
    "attn_q.": T.Q4_0, "attn_k.": T.Q5_0, "attn_v": T.Q4_1,
    "blk.0.ffn_gate": T.Q4_K, "blk.0.ffn_up": T.Q5_K, "blk.0.ffn_down": T.Q6_K,
    "blk.1.ffn_gate": T.BF16, "blk.1.ffn_up": T.F16, "blk.1.ffn_down": T.Q8_0,
}  # fmt: skip


def random_k_quants(tensors: dict) -> dict:
    """gguf-py cannot quantize to K types: give those tensors random (finite-scale) blocks instead."""
    out = {}
    for i, (name, (w, qtype)) in enumerate(tensors.items()):
        if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
            w = random_blocks(qtype, w.size // 256, seed=i).reshape(w.shape[0], -1)
        out[name] = (w, qtype)
    return out


def assert_same_as_transformers(path: Path, fields: list[str], hf_model=None) -> None:
    config, state_dict = gguf_to_hf(path)
    if hf_model is None:  # the real models pass the session's shared one (conftest.py)
        hf_model = hf_from_gguf(path)
    hf_config, hf_state_dict = hf_model.config, hf_model.state_dict()
    expected_keys = set(hf_state_dict) - ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    assert set(state_dict) == expected_keys
    different = [k for k in expected_keys if not torch.equal(state_dict[k], hf_state_dict[k])]
    assert not different, different[:5]
    hf = hf_config.to_dict()
    assert {k: config[k] for k in fields} == {k: hf[k] for k in fields}
    assert config["model_type"] == hf["model_type"]


LLAMA_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "hidden_act", "rope_parameters", "attention_bias", "mlp_bias",
]  # fmt: skip
GEMMA3_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "hidden_activation", "rope_parameters", "sliding_window",
    "layer_types", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("arch, tied", [("llama", False), ("gemma3", True)])
def test_tiny_quantized_model_matches_transformers(tmp_path, arch, tied):
    tensors = random_k_quants(to_gguf_tensors(arch, tiny_hf_state_dict(arch, tied), QUANT_MIX))
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", arch, tiny_metadata(arch), tensors)
    # transformers does not derive query_pre_attn_scalar and keeps its default 256; llama.cpp (and we) use
    # head_dim, 64 here. The two agree for every released Gemma 3 but the 27B, where transformers is wrong.
    fields = LLAMA_FIELDS if arch == "llama" else [f for f in GEMMA3_FIELDS if f != "query_pre_attn_scalar"]
    assert_same_as_transformers(path, fields)


# ---- the real models ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_matches_transformers(hf_smollm2):
    assert_same_as_transformers(registry.resolve("smollm2-135m-instruct")[1], LLAMA_FIELDS, hf_smollm2)


@pytest.mark.slow
def test_gemma3_matches_transformers(hf_gemma3):
    assert_same_as_transformers(registry.resolve("gemma3-270m")[1], GEMMA3_FIELDS, hf_gemma3)


@pytest.mark.slow
def test_smollm2_metadata_matches_gguf_py_reader():
    path = smollm2_path()
    theirs = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    f = read_gguf(path)
    assert f.metadata == theirs
    assert len(f.tensors) == 272 and f.tensors["token_embd.weight"].shape == (49152, 576)
