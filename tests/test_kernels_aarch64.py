"""pocketlm's CPU kernels built for aarch64 (simd.h's neon-dotprod and scalar targets), cross-compiled into
tests/kernel_driver.cpp and run under qemu-aarch64: the integer kernels (int4_linear, int8_packed_linear) bit for bit
what this machine's scalar build computes, the others as close to PyTorch as tests/test_kernels.py asks of x86.

qemu's default CPU ("max") has the dot product instructions, so the NEON build runs here as on an ARMv8.2 core."""

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pocketlm import kernels
from pocketlm.models.llama import KVCache, apply_rope
from pocketlm.quant.int4 import pack_nibbles, quantize_groups

CXX, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"
DRIVER = Path(__file__).with_name("kernel_driver.cpp")
TARGETS = [t for t in kernels.TARGETS if t.machine == "aarch64"]  # neon-dotprod, scalar
# pocketlm's own flags for a program instead of a library; static, so qemu needs no aarch64 sysroot to run it
FLAGS = [f for f in kernels.COMPILE if f not in ("-shared", "-fPIC")] + ["-static"]


def build_driver(target: kernels.Target, folder: Path) -> Path:
    path = folder / f"kernel_driver-{target.name}"
    done = subprocess.run([CXX, *FLAGS, *target.flags, str(DRIVER), "-o", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, f"{target.name}: {done.stderr}"
    return path


@pytest.fixture(scope="session")
def drivers(tmp_path_factory) -> dict[str, Path]:
    """target name -> its driver, both compiled at once (a few seconds each, the session's slowest part)."""
    missing = [tool for tool in (CXX, QEMU) if shutil.which(tool) is None]
    if missing:
        # a machine that can install them must run these tests: never skip silently there
        if os.geteuid() == 0 and shutil.which("apt-get"):
            pytest.fail(f"{' and '.join(missing)} not installed: `bash scripts/setup test` installs them", pytrace=False)
        pytest.skip(f"{' and '.join(missing)} not installed (g++-aarch64-linux-gnu, qemu-user)")
    folder = tmp_path_factory.mktemp("aarch64")
    with ThreadPoolExecutor(len(TARGETS)) as pool:
        return dict(zip((t.name for t in TARGETS), pool.map(build_driver, TARGETS, [folder] * len(TARGETS))))


def write_case(folder: Path, kernel: str, args: dict, inputs: dict[str, torch.Tensor | None]):
    """case.txt and one raw file per input (None: left out, a null pointer), as kernel_driver.cpp reads them."""
    folder.mkdir(parents=True)
    (folder / "case.txt").write_text(" ".join([kernel, *(f"{k}={v!r}" for k, v in args.items())]) + "\n")
    for name, t in inputs.items():
        if t is not None:
            (folder / f"{name}.bin").write_bytes(t.contiguous().view(torch.uint8).numpy().tobytes())


def on_aarch64(drivers, tmp_path: Path, kernel: str, args: dict, inputs: dict) -> dict[str, Path]:
    """Runs the case on each aarch64 target under qemu (2 threads, as a 2-core machine) -> target name -> the
    folder its outputs are in. The targets run side by side: under qemu every instruction is translated, so the
    runs, not the Python around them, take the time."""
    folders = {name: tmp_path / name for name in drivers}
    for folder in folders.values():
        write_case(folder, kernel, args, inputs)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    runs = {name: subprocess.Popen([QEMU, str(drivers[name]), str(folders[name])], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env) for name in drivers}
    done = {name: (run.communicate(timeout=120), run.returncode) for name, run in runs.items()}
    for name, ((stdout, stderr), returncode) in done.items():
        assert returncode == 0, f"{name}: exit {returncode}: {stderr}"
        assert stdout.split() == [name], f"the {name} driver ran {stdout!r}"  # -march gave the target's code path
    return folders


def output(folder: Path, name: str, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray((folder / name).read_bytes()), dtype=dtype).reshape(shape)


def assert_same_bits(actual, expected, target: str):
    differ = actual.view(torch.int32) != expected.view(torch.int32)  # fp32 bits: NaN and -0 too
    assert not differ.any(), (
        f"{target}: {differ.sum().item()} of {differ.numel()} outputs differ from the x86 scalar build's, by up to "
        f"{(actual - expected).abs().max().item():.3g}"
    )


def assert_close(actual, expected, target: str, **tolerance):
    """torch's assert_close, its message naming the target that failed"""
    torch.testing.assert_close(actual, expected, **tolerance, msg=lambda message: f"{target}: {message}")


# --------------------------------------------------------------------------- integer kernels: bit for bit


def activations(M: int, K: int) -> torch.Tensor:
    """(M, K) with what the rounding to int8 must cope with: an outlier channel, a row 50x larger, a block of 32
    zeros (scale 0)."""
    x = torch.randn(M, K)
    x[:, 7] *= 40
    x[M // 2] *= 50
    x[0, 32:64] = 0
    return x


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 2, 7])  # NEON's tiles of 2 rows: a row alone, one tile, three and a row left
@pytest.mark.parametrize("N, K, bias", [(40, 384, True), (24, 512, False)])  # 40, 24: a last block of 16 partly padding
def test_int4_linear_equals_the_x86_scalar_build(drivers, tmp_path, group_size, M, N, K, bias):
    """int4_pack's layout and int4_linear's outputs, on both aarch64 targets, bit for bit this machine's scalar
    build's (so the two targets' too): simd.h's promise, sdot's sums in place of the scalar loops'."""
    torch.manual_seed(0)
    codes, scales_and_zeros, _ = quantize_groups(torch.randn(N, K), group_size)  # (N, K) 0..15, (K/g, N, 2) bf16
    codes = pack_nibbles(codes)  # (N, K/2) uint8, Int4Linear's buffer
    x, b = activations(M, K), torch.randn(N) if bias else None  # (M, K), (N,)
    with kernels.using("scalar"):
        packed = kernels.int4_pack(codes, scales_and_zeros, group_size)
        expected = kernels.int4_linear(x, packed, N, group_size, b)  # (M, N)
    inputs = {"codes": codes, "scales_and_zeros": scales_and_zeros, "x": x, "bias": b}
    folders = on_aarch64(drivers, tmp_path, "int4_linear", {"M": M, "K": K, "N": N, "g": group_size}, inputs)
    for name, folder in folders.items():
        assert torch.equal(output(folder, "packed.bin", torch.uint8, packed.shape), packed), f"{name}: int4_pack's layout"
        assert_same_bits(output(folder, "out.bin", torch.float32, (M, N)), expected, name)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("M", [1, 2, 7])
def test_int4_linear_on_gguf_blocks_equals_the_x86_scalar_build(drivers, tmp_path, qtype, M):
    """A GGUF's Q4_0 / Q4_K / Q6_K blocks laid out as they are (int4_pack_gguf) and int4_linear on them, both aarch64
    targets bit for bit the x86 scalar build (NEON widens the fp16 and u8 scales with vcvt_f32_f16, vmovl, and
    joins Q6_K's high bits with vshlq)."""
    from test_kernels import random_blocks

    N, K = 40, 512
    gen = torch.Generator().manual_seed(M)
    blocks = random_blocks(qtype, N, K, gen)
    x, b = activations(M, K), torch.randn(N, generator=gen)
    with kernels.using("scalar"):
        packed = torch.empty(kernels.int4_packed_bytes(N, K, 32, qtype), dtype=torch.uint8)
        kernels.int4_pack_gguf(blocks.reshape(-1), qtype.upper(), N, K, None, packed, qtype)
        expected = kernels.int4_linear(x, packed, N, 32, b, qtype)  # (M, N)
    case = {"M": M, "K": K, "N": N, "type": kernels.GGUF_GRID_TYPES[qtype.upper()], "layout": kernels.INT4_LAYOUTS[qtype]}
    folders = on_aarch64(drivers, tmp_path, "int4_linear_gguf", case, {"blocks": blocks, "x": x, "bias": b})
    for name, folder in folders.items():
        assert torch.equal(output(folder, "packed.bin", torch.uint8, packed.shape), packed), f"{name}: int4_pack_gguf's layout"
        assert_same_bits(output(folder, "out.bin", torch.float32, (M, N)), expected, name)


@pytest.mark.parametrize("M", [1, 2, 3, 8, 13])  # the tiles: 8 rows, 4 (AVX-512's), 2, then one
def test_int8_packed_linear_equals_the_x86_scalar_build(drivers, tmp_path, M):
    """int8_pack's layout and int8_packed_linear's outputs bit for bit the x86 scalar build's: NEON's weights are
    (q + 128) ^ 0x80 = q through sdot, plus 128 sum x, where the scalar build multiplies q + 128 itself."""
    torch.manual_seed(0)
    N, K = 40, 576
    weight = torch.randint(-127, 128, (N, K), dtype=torch.int8)  # (N, K)
    scales = (torch.rand(N) * 0.01 + 1e-3).bfloat16()  # (N,)
    x, bias = activations(M, K), torch.randn(N)  # (M, K), (N,)
    with kernels.using("scalar"):
        packed = kernels.int8_pack(weight)
        expected = kernels.int8_packed_linear(x, packed, scales, bias)  # (M, N)
    inputs = {"weight": weight, "scales": scales, "x": x, "bias": bias}
    folders = on_aarch64(drivers, tmp_path, "int8_packed_linear", {"M": M, "K": K, "N": N}, inputs)
    for name, folder in folders.items():
        assert torch.equal(output(folder, "packed.bin", torch.uint8, packed.shape), packed), f"{name}: int8_pack's layout"
        assert_same_bits(output(folder, "out.bin", torch.float32, (M, N)), expected, name)


# --------------------------------------------------------------------------- float kernels: close to PyTorch


def test_int8_linear_is_the_exact_product(drivers, tmp_path):
    torch.manual_seed(0)
    M, N, K = 6, 40, 200  # 6 rows: a tile of 4 and two alone; 200: a row tail past the 16-wide vectors
    weight, scales = torch.randint(-127, 128, (N, K), dtype=torch.int8), (torch.rand(N) * 0.01).bfloat16()  # (N, K), (N,)
    x, bias = torch.randn(M, K), torch.randn(N)
    exact = x @ (weight.float() * scales.float()[:, None]).T + bias  # (M, N)
    inputs = {"x": x, "weight": weight, "scales": scales, "bias": bias}
    for name, folder in on_aarch64(drivers, tmp_path, "int8_linear", {"M": M, "K": K, "N": N}, inputs).items():
        assert_close(output(folder, "out.bin", torch.float32, (M, N)), exact, name, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unit_offset", [0.0, 1.0])  # Llama's weight, Gemma 3's (1 + weight)
def test_rms_norm(drivers, tmp_path, unit_offset):
    torch.manual_seed(0)
    x, w = torch.randn(3, 576) * 4, torch.randn(576)  # (M, D), (D,)
    ref = F.rms_norm(x, (576,), w + unit_offset, 1e-6)
    args = {"M": 3, "D": 576, "eps": 1e-6, "unit_offset": unit_offset}
    for name, folder in on_aarch64(drivers, tmp_path, "rms_norm", args, {"x": x, "weight": w}).items():
        assert_close(output(folder, "out.bin", torch.float32, (3, 576)), ref, name, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gelu", [False, True])
def test_gated_act(drivers, tmp_path, gelu):
    torch.manual_seed(0)
    gate_up = torch.randn(2, 2 * 1000) * 6  # (M, 2F): both tails of the activation, F no multiple of 16
    gate, up = gate_up.chunk(2, -1)
    ref = (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up  # (M, F)
    args = {"M": 2, "F": 1000, "gelu": int(gelu)}
    for name, folder in on_aarch64(drivers, tmp_path, "gated_act", args, {"gate_up": gate_up}).items():
        assert_close(output(folder, "out.bin", torch.float32, (2, 1000)), ref, name, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "nh, n_kv, hd, pos, begin, norms",
    [  # tests/test_kernels.py's cases
        (9, 3, 64, 300, 0, False),  # SmolLM2's heads; positions split between the threads
        (4, 1, 256, 40, 25, True),  # Gemma 3 270M's heads, a sliding window, q/k norms
        (8, 2, 128, 150, 3, False),  # 128-wide heads; 148 positions: blocks of 16 scores and a tail
        (4, 2, 16, 5, 0, False),  # a head size without a vector path
    ],
)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_attend_decode_matches_sdpa(drivers, tmp_path, nh, n_kv, hd, pos, begin, norms, kv_dtype):
    """tests/test_kernels.py's test of the same name, on aarch64: attention over an fp32 or fp16 cache, and the new
    key and value written into it as torch writes them."""
    torch.manual_seed(0)
    S = 512
    cache = KVCache(1, S, n_kv, hd, kv_dtype)  # k, v (1, n_kv, S, hd)
    cache.k.normal_(), cache.v.normal_()
    keys, values = cache.k.clone(), cache.v.clone()
    q, k, v = torch.randn(1, 1, nh * hd), torch.randn(1, 1, n_kv * hd), torch.randn(1, 1, n_kv * hd)
    angles = torch.rand(1, hd // 2).repeat(1, 2) * 6
    cos, sin = angles.cos(), angles.sin()  # (1, hd)
    q_norm, k_norm = (torch.randn(hd), torch.randn(hd)) if norms else (None, None)
    scale = 0.0625
    args = {"nh": nh, "n_kv": n_kv, "hd": hd, "S": S, "pos": pos, "begin": begin, "scale": scale, "eps": 1e-6,
            "kv_half": int(kv_dtype == torch.float16)}
    inputs = {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "q_norm": q_norm, "k_norm": k_norm, "k_cache": cache.k, "v_cache": cache.v}
    folders = on_aarch64(drivers, tmp_path, "attend_decode", args, inputs)

    q, k = q.view(1, nh, 1, hd), k.view(1, n_kv, 1, hd)  # T = 1: (B, T, heads, hd) and (B, heads, T, hd) agree
    if norms:
        q, k = F.rms_norm(q, (hd,), 1 + q_norm, 1e-6), F.rms_norm(k, (hd,), 1 + k_norm, 1e-6)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys[:, :, pos], values[:, :, pos] = k[:, :, 0].to(kv_dtype), v.view(1, n_kv, hd).to(kv_dtype)
    window = slice(begin, pos + 1)
    ref = F.scaled_dot_product_attention(q, keys[:, :, window].float(), values[:, :, window].float(), scale=scale, enable_gqa=True)
    for name, folder in folders.items():
        out = output(folder, "out.bin", torch.float32, (1, 1, nh * hd))
        assert_close(out, ref.reshape(1, 1, nh * hd), name, rtol=1e-5, atol=1e-5)
        k_cache = output(folder, "k_cache_out.bin", kv_dtype, keys.shape)  # (1, n_kv, S, hd)
        v_cache = output(folder, "v_cache_out.bin", kv_dtype, values.shape)
        if kv_dtype == torch.float16:  # the same rounding: nothing depends on which path wrote a position
            assert torch.equal(k_cache, keys), name
        assert_close(k_cache, keys, name, rtol=1e-6, atol=1e-6)  # the new key written, rotated, at pos
        assert torch.equal(v_cache, values), name
