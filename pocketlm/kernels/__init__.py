"""The decode step's fused CPU kernels (cpu.cpp), built once with the system's C++ compiler and called through ctypes.

    from pocketlm import kernels
    if kernels.usable(x, layer.weight):        # fp32 on the CPU, no gradient wanted, library built
        y = kernels.int8_linear(x, layer.weight, layer.scales, layer.bias)

A whole decoded token goes through `decode_step` in one call (pocketlm/models/fused_step.py points it at a
model's tensors); the per-layer functions serve the module path (prompt chunks, batches of sequences).

The library is compiled for this CPU (-O3 -march=native -fopenmp, a few seconds) the first time it is
needed, or by `python -m pocketlm.kernels` (scripts/setup runs it), into pocketlm/kernels/build/ (or
$POCKETLM_HOME/kernels when the package folder is read-only), under a name made of the source's and the CPU's
fingerprint, so an edited source or another CPU builds afresh (the builds it replaces are removed). Without a compiler, or with POCKETLM_KERNELS=0,
everything runs on aten's kernels as before: `usable` is False and callers take their PyTorch path.

OpenMP: the library links libgomp.so.1, which resolves to the copy torch already loaded (torch/lib/libgomp.so.1),
so the kernels and aten share one thread pool instead of two pools spinning against each other on 2 cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu.cpp")
COMPILE = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]


_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable
why_unavailable = ""

P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "has_vnni": [],
    "int4_packed_bytes": [I64, I64, I64],
    "int4_pack": [P, P, I64, I64, I64, P],
    "int4_linear": [P, I64, I64, P, I64, I64, P, P, I32],
    "int8_linear": [P, I64, I64, P, P, I64, P, P, I32],
    "int8_packed_bytes": [I64, I64],
    "int8_pack": [P, I64, I64, P],
    "int8_vnni_linear": [P, I64, I64, P, P, I64, P, P, I32],
    "rms_norm": [P, I64, I64, P, F32, F32, P],
    "gated_act": [P, I64, I64, I32, P],
    "attend_decode": [P, P, P, I64, I64, I64, P, P, P, P, F32, P, P, I32, I64, I64, I64, F32, P, I32],
    "decode_step": [P, I64, P, P, P, P, I64, P, I32],  # pocketlm/models/fused_step.py
    "draft_head_step": [P, I64, P, P, I32],  # pocketlm/models/fused_step.py
}

RESTYPES = {"has_vnni": ctypes.c_int, "int4_packed_bytes": ctypes.c_int64, "int8_packed_bytes": ctypes.c_int64}


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def cpu_fingerprint() -> str:
    """-march=native code runs only on CPUs with the same instruction sets: key the build on them."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def library_path() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + cpu_fingerprint().encode() + " ".join(COMPILE).encode()).hexdigest()[:16]
    folder = SOURCE.parent / "build"
    if not os.access(SOURCE.parent, os.W_OK):
        from pocketlm.cache import home

        folder = home() / "kernels"
    return folder / f"cpu-{key}.so"


def build() -> Path:
    """Compile cpu.cpp unless this source for this CPU is built already; the file appears whole (renamed into place)."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([compiler(), *COMPILE, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
    if done.returncode:
        tmp.unlink(missing_ok=True)
        raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"{compiler()} failed")
    os.replace(tmp, path)
    for old in path.parent.glob("cpu-*.so"):  # an earlier source's build (a process that loaded it keeps its mapping)
        if old != path:
            old.unlink(missing_ok=True)
    return path


def library() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None where it cannot be had (see why_unavailable)."""
    global _lib, why_unavailable
    if _lib is None:
        _lib = False
        if os.environ.get("POCKETLM_KERNELS", "1") == "0":
            why_unavailable = "POCKETLM_KERNELS=0"
        elif sys.platform != "linux":
            why_unavailable = f"not built on {sys.platform}"
        else:
            try:
                _lib = open_library(build())
            except (OSError, FileNotFoundError) as e:
                why_unavailable = f"could not build {SOURCE.name} with {compiler()}: {e}"
    return _lib or None


def open_library(path: Path) -> ctypes.CDLL:
    """A build of cpu.cpp with its functions' signatures set: this source's (library()), or another's
    (bench/bench_kernels.py --vs-build times two builds in one process)."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = RESTYPES.get(name)
    return lib


def vnni_kernel_on(switch: str) -> bool:
    """Whether a VNNI kernel is built (the library, on a CPU with AVX-512 VNNI) and not switched off (switch=0)."""
    lib = library()
    return lib is not None and bool(lib.has_vnni()) and os.environ.get(switch, "1") != "0"


def int4_kernel_on() -> bool:
    """Whether the int4 kernel (int4_linear) is on; POCKETLM_INT4_KERNEL=0 switches it off."""
    return vnni_kernel_on("POCKETLM_INT4_KERNEL")


def int8_kernel_on() -> bool:
    """Whether the int8 VNNI kernel (int8_vnni_linear) is on; POCKETLM_INT8_KERNEL=0 switches it off."""
    return vnni_kernel_on("POCKETLM_INT8_KERNEL")


def usable(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether x (with the layer's params) can go through the kernels: fp32 on the CPU, no gradient to record
    (training keeps PyTorch's ops), and the library built."""
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    return x.dtype == torch.float32 and x.device.type == "cpu" and not grad and library() is not None


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def int4_pack(codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes (N, K/2) uint8, scales_and_zeros (K/g, N, 2) bf16 (Int4Linear's buffers) -> the kernel's layout
    (cpu.cpp: 16 output rows per block, each group's scales and zeros before its codes), uint8."""
    N, K = codes.shape[0], codes.shape[1] * 2
    codes, scales_and_zeros = codes.contiguous(), scales_and_zeros.contiguous()
    out = torch.empty(library().int4_packed_bytes(N, K, group_size), dtype=torch.uint8)
    library().int4_pack(ptr(codes), ptr(scales_and_zeros), N, K, group_size, ptr(out))
    return out


def int4_linear(x: torch.Tensor, packed: torch.Tensor, N: int, group_size: int, bias) -> torch.Tensor:
    """x (..., K) fp32; packed: int4_pack's layout of an (N, K) weight -> (..., N)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()  # (M, K)
    out = torch.empty(*x.shape[:-1], N)
    library().int4_linear(ptr(x2), x2.shape[0], K, ptr(packed), N, group_size, ptr(bias), ptr(out), torch.get_num_threads())
    return out


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias) -> torch.Tensor:
    """x (..., K) fp32; weight (N, K) int8; scales (N,) bf16 -> (..., N)."""
    N, K = weight.shape
    x2 = x.reshape(-1, K).contiguous()  # (M, K)
    out = torch.empty(*x.shape[:-1], N)
    library().int8_linear(ptr(x2), x2.shape[0], K, ptr(weight), ptr(scales), N, ptr(bias), ptr(out), torch.get_num_threads())
    return out


def int8_pack(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) int8 (Int8Linear's) -> the VNNI kernel's layout (cpu.cpp: 16 output rows per block, stored
    + 128), uint8. K must be a multiple of 32."""
    N, K = weight.shape
    weight = weight.contiguous()
    out = torch.empty(library().int8_packed_bytes(N, K), dtype=torch.uint8)
    library().int8_pack(ptr(weight), N, K, ptr(out))
    return out


def int8_vnni_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias) -> torch.Tensor:
    """x (..., K) fp32; packed: int8_pack's layout of an (N, K) weight; scales (N,) bf16 -> (..., N)."""
    K, N = x.shape[-1], scales.shape[0]
    x2 = x.reshape(-1, K).contiguous()  # (M, K)
    out = torch.empty(*x.shape[:-1], N)
    library().int8_vnni_linear(ptr(x2), x2.shape[0], K, ptr(packed), ptr(scales), N, ptr(bias), ptr(out), torch.get_num_threads())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: float = 0.0) -> torch.Tensor:
    """x (..., D) -> x * rsqrt(mean(x^2) + eps) * (weight + unit_offset), in fp32."""
    x = x.contiguous()
    out = torch.empty_like(x)
    library().rms_norm(ptr(x), x.numel() // x.shape[-1], x.shape[-1], ptr(weight), eps, unit_offset, ptr(out))
    return out


def gated_act(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """gate_up (..., 2F) = [gate | up] -> act(gate) * up (..., F); act silu, or gelu-tanh with gelu=True."""
    gate_up = gate_up.contiguous()
    F = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], F)
    library().gated_act(ptr(gate_up), gate_up.numel() // (2 * F), F, int(gelu), ptr(out))
    return out


def attend_decode(q, k, v, n_heads, n_kv_heads, head_dim, cos, sin, q_norm, k_norm, norm_eps, cache, pos, begin, scale):
    """One token of one sequence (batch row 0 of the cache): q (1, 1, nh*hd), k, v (1, 1, n_kv*hd) fresh from the
    projections (views of the fused one are fine); cos, sin (1, hd) at pos; q_norm, k_norm (hd,) weights or None.
    Writes the token's key and value at pos (into an fp32 or fp16 cache) and attends over positions begin..pos.
    -> (1, 1, nh * hd)"""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(1, 1, n_heads * head_dim)
    library().attend_decode(
        ptr(q), ptr(k), ptr(v), n_heads, n_kv_heads, head_dim, ptr(cos), ptr(sin), ptr(q_norm), ptr(k_norm), norm_eps,
        ptr(cache.k), ptr(cache.v), int(cache.k.dtype == torch.float16), cache.k.shape[2], pos, begin, scale, ptr(out),
        torch.get_num_threads(),
    )
    return out
