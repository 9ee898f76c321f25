"""The decode step's fused CPU kernels (cpu.cpp, over simd.h's 16 lanes), built for this CPU's instruction sets
with the system's C++ compiler and called through ctypes.

    from pocketlm import kernels
    if kernels.usable(x, layer.weight):        # fp32 on the CPU, no gradient wanted, library built
        y = kernels.int8_linear(x, layer.weight, layer.scales, layer.bias)

A whole decoded token goes through `decode_step` in one call (pocketlm/models/fused_step.py points it at a
model's tensors); the per-layer functions serve the module path (prompt chunks, batches of sequences).

Targets: one build per instruction-set family (TARGETS, best first). The library loaded is the best one whose
instructions the CPU has (/proc/cpuinfo's flags, or POCKETLM_CPU_FLAGS in their place to play an older CPU), or
the one POCKETLM_KERNEL_TARGET names, refused with one line when the CPU lacks what it needs. Every target
computes the integer kernels bit for bit alike (simd.h) and is tested against the scalar build
(tests/test_kernels.py). A build is compiled the first time it is needed, or by `python -m pocketlm.kernels`
(scripts/setup runs it), in a few seconds, into pocketlm/kernels/build/ (or $POCKETLM_HOME/kernels when the
package folder is read-only), named by the target and a hash of the sources and flags, so an edited source builds
afresh (that target's builds it replaces are removed). Without a compiler, or with POCKETLM_KERNELS=0, everything
runs on aten's kernels: `usable` is False and callers take their PyTorch path; `describe()` says which ran.

OpenMP: the library links libgomp.so.1, which resolves to the copy torch already loaded (torch/lib/libgomp.so.1),
so the kernels and aten share one thread pool instead of two pools spinning against each other on 2 cores.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketlm.errors import PocketLMError

SOURCES = [Path(__file__).with_name("cpu.cpp"), Path(__file__).with_name("simd.h")]
SOURCE = SOURCES[0]
# -ffp-contract=off: a * b + c is fused only where the source says so (std::fma, the intrinsics), so a target with
# FMA computes the same floats as one without (simd.h's promise)
COMPILE = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC"]


@dataclass(frozen=True)
class Target:
    name: str
    machine: str  # platform.machine()
    flags: tuple[str, ...]  # the compiler's
    needs: frozenset[str]  # /proc/cpuinfo's names ("flags" on x86, "Features" on ARM)


X86_64_V3 = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"}  # -march=x86-64-v3 (abm: lzcnt)
X86_64_V4 = X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
TARGETS = [  # best first; simd.h says what each computes with
    Target("avx512-vnni", "x86_64", ("-march=x86-64-v4", "-mavx512vnni"), frozenset(X86_64_V4 | {"avx512_vnni"})),
    Target("avx2-vnni", "x86_64", ("-march=x86-64-v3", "-mavxvnni"), frozenset(X86_64_V3 | {"avx_vnni"})),
    Target("avx2", "x86_64", ("-march=x86-64-v3",), frozenset(X86_64_V3)),
    Target("neon-dotprod", "aarch64", ("-march=armv8.2-a+dotprod",), frozenset({"asimd", "asimddp"})),
    Target("scalar", "x86_64", ("-march=x86-64",), frozenset()),
    Target("scalar", "aarch64", ("-march=armv8-a",), frozenset()),
]

_libs: dict[str, ctypes.CDLL] = {}  # target name -> its loaded build
_lib: ctypes.CDLL | None | bool = None  # the library the kernels call; None: not chosen yet; False: unavailable
why_unavailable = ""
fallbacks: list[str] = []  # targets passed over on the way to the one loaded, with the reason (a failed build)

P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "kernel_target": [],
    "cpu_runs_target": [],
    "int4_packed_bytes": [I64, I64, I64, I32],
    "int4_pack": [P, P, I64, I64, I64, P],
    "int4_unpack": [P, I64, I64, I64, I32, P, P],
    "int4_pack_gguf": [P, I32, I64, I64, P, I32, P],
    "int8_rows_gguf": [P, I32, I64, I64, P, P],
    "read_floats": [P, I64, I32],
    "int4_linear": [P, I64, I64, P, I64, I64, I32, P, P, I32],
    "int8_linear": [P, I64, I64, P, P, I64, P, P, I32],
    "int8_packed_bytes": [I64, I64],
    "int8_pack": [P, I64, I64, P],
    "int8_unpack": [P, I64, I64, P],
    "int8_packed_linear": [P, I64, I64, P, P, I64, P, P, I32],
    "rms_norm": [P, I64, I64, P, F32, F32, P],
    "gated_act": [P, I64, I64, I32, P],
    "attend_decode": [P, P, P, I64, I64, I64, P, P, I64, P, P, F32, P, P, I32, I64, I64, I64, F32, F32, P, I32],
    "decode_step": [P, I64, P, P, P, P, I64, P, I32],  # pocketlm/models/fused_step.py
    "draft_head_step": [P, I64, P, P, I32],  # pocketlm/models/fused_step.py
}

RESTYPES = {"kernel_target": ctypes.c_char_p, "cpu_runs_target": ctypes.c_int, "int4_packed_bytes": ctypes.c_int64,
            "int8_packed_bytes": ctypes.c_int64, "read_floats": ctypes.c_float}


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def cpu_flags() -> set[str]:
    """The CPU's instruction-set names as /proc/cpuinfo lists them; POCKETLM_CPU_FLAGS (space-separated) plays
    another CPU (the tests take an AVX2 machine's path on an AVX-512 one this way)."""
    if "POCKETLM_CPU_FLAGS" in os.environ:
        return set(os.environ["POCKETLM_CPU_FLAGS"].split())
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")), "")
    return set(line.partition(":")[2].split())


def runnable_targets() -> list[Target]:
    """The targets this CPU runs, best first (the last is always the scalar one)."""
    flags = cpu_flags()
    return [t for t in TARGETS if t.machine == platform.machine() and t.needs <= flags]


def target_named(name: str) -> Target:
    """The target of this machine's architecture called `name`; one line naming the choices otherwise."""
    for t in TARGETS:
        if t.name == name and t.machine == platform.machine():
            return t
    names = ", ".join(t.name for t in TARGETS if t.machine == platform.machine())
    raise PocketLMError(f"unknown kernel target {name!r} for {platform.machine()}; choose one of: {names}")


def library_path(target: Target) -> Path:
    sources = b"".join(source.read_bytes() for source in SOURCES)
    key = hashlib.sha256(sources + " ".join(COMPILE + list(target.flags) + ["-mtune=native"]).encode()).hexdigest()[:16]
    folder = SOURCE.parent / "build"
    if not os.access(SOURCE.parent, os.W_OK):
        from pocketlm.cache import home

        folder = home() / "kernels"
    return folder / f"cpu-{target.name}-{key}.so"


def build(target: Target) -> Path:
    """Compile cpu.cpp for target unless this source is built for it already; the file appears whole (renamed
    into place)."""
    path = library_path(target)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    # -mtune=native: scheduled for this CPU (the instruction sets stay the target's): a batch of 8 rows through
    # SmolLM2's int4 layers 11% faster on the AMD EPYC than with x86-64-v4's generic tuning
    command = [compiler(), *COMPILE, *target.flags, "-mtune=native", str(SOURCE), "-o", str(tmp)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        tmp.unlink(missing_ok=True)
        raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"{compiler()} failed")
    os.replace(tmp, path)
    for old in path.parent.glob(f"cpu-{target.name}-*.so"):  # an earlier source's build (a process that loaded it keeps its mapping)
        if old != path:
            old.unlink(missing_ok=True)
    return path


def load_target(target: Target) -> ctypes.CDLL:
    """target's build, compiled on first use and loaded once; refused (one line) where the CPU lacks its instructions,
    before any of its code runs."""
    missing = target.needs - cpu_flags()
    if target.machine != platform.machine() or missing:
        raise PocketLMError(
            f"the {target.name} kernels need {', '.join(sorted(missing)) or target.machine}, which this CPU does not have; "
            f"unset POCKETLM_KERNEL_TARGET or choose one of: {', '.join(t.name for t in runnable_targets())}"
        )
    if target.name not in _libs:
        lib = open_library(build(target))
        if not lib.cpu_runs_target():  # /proc/cpuinfo said yes, the CPU's own answer says no
            raise PocketLMError(f"this CPU cannot run the {target.name} kernels; set POCKETLM_KERNEL_TARGET=scalar")
        _libs[target.name] = lib
    return _libs[target.name]


def library() -> ctypes.CDLL | None:
    """The loaded library, building it on first use: POCKETLM_KERNEL_TARGET's, or the best target this CPU runs
    (a target whose build fails gives way to the next, in `fallbacks`); None where none can be had (see
    why_unavailable)."""
    global _lib, why_unavailable
    if _lib is None:
        _lib = False
        if os.environ.get("POCKETLM_KERNELS", "1") == "0":
            why_unavailable = "POCKETLM_KERNELS=0"
        elif sys.platform != "linux":
            why_unavailable = f"not built on {sys.platform}"
        elif os.environ.get("POCKETLM_KERNEL_TARGET"):
            _lib = load_target(target_named(os.environ["POCKETLM_KERNEL_TARGET"]))  # its errors are the user's to see
        else:
            for target in runnable_targets():
                try:
                    _lib = load_target(target)
                    break
                except (OSError, PocketLMError) as e:
                    fallbacks.append(f"{target.name}: {e}")
            else:
                why_unavailable = f"could not build {SOURCE.name} with {compiler()}: {fallbacks[-1] if fallbacks else 'no target'}"
    return _lib or None


def target() -> str | None:
    """The name of the kernels' target in use (simd.h), or None where aten's kernels run."""
    lib = library()
    return lib.kernel_target().decode() if lib is not None else None


def describe() -> str:
    """One line for `pocketlm show` and `bench`: which kernels run, and why where they are not pocketlm's best."""
    name = target()
    if name is None:
        return f"aten (pocketlm's kernels not available: {why_unavailable})"
    passed = f"; passed over {'; '.join(fallbacks)}" if fallbacks else ""
    forced = " (POCKETLM_KERNEL_TARGET)" if os.environ.get("POCKETLM_KERNEL_TARGET") else ""
    return f"pocketlm {name}{forced}{passed}"


@contextlib.contextmanager
def using(target_name: str):
    """Run the kernels of another target this CPU runs for the duration (tests, bench/bench_kernels.py): every target
    reads the same weight layouts, so a model packed under one runs under another."""
    global _lib
    library()
    before, _lib = _lib, load_target(target_named(target_name))
    try:
        yield _lib
    finally:
        _lib = before


def open_library(path: Path) -> ctypes.CDLL:
    """A build of cpu.cpp with its functions' signatures set: a target's (load_target), or another source's
    (bench/bench_kernels.py --vs-build times two builds in one process)."""
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = RESTYPES.get(name)
    return lib


def kernel_on(switch: str) -> bool:
    """Whether the library is built and the integer kernel `switch` names is not switched off (switch=0)."""
    return library() is not None and os.environ.get(switch, "1") != "0"


def int4_kernel_on() -> bool:
    """Whether the int4 kernel (int4_linear) is on; POCKETLM_INT4_KERNEL=0 switches it off."""
    return kernel_on("POCKETLM_INT4_KERNEL")


def int8_kernel_on() -> bool:
    """Whether the packed int8 kernel (int8_packed_linear) is on; POCKETLM_INT8_KERNEL=0 switches it off."""
    return kernel_on("POCKETLM_INT8_KERNEL")


def usable(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether x (with the layer's params) can go through the kernels: fp32 on the CPU, no gradient to record
    (training keeps PyTorch's ops), and the library built."""
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    return x.dtype == torch.float32 and x.device.type == "cpu" and not grad and library() is not None


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# Decode streams every packed weight byte once a token. In 4 KB pages two Zen 4 cores decoded SmolLM2-135M to 3.2B
# models 9-14% slower than in 2 MB ones (bench/bench_pages.py, docs/BENCHMARKS.md); llama.cpp gets 2 MB pages
# without asking, as it memory-maps the GGUF and the page cache holds it in large folios.
HUGE_PAGE = 2 << 20  # the transparent huge page of x86-64 and of ARM64 with 4 KB pages
MADV_HUGEPAGE = 14  # linux/mman.h


def weight_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialized uint8 buffer for packed weights. From 2 MB on (Linux) it starts on a 2 MB boundary and is
    advised into transparent huge pages before its first write, so that they back it where the kernel allows them
    ("always" or "madvise" in /sys/kernel/mm/transparent_hugepage/enabled); POCKETLM_HUGEPAGES=0 turns this off."""
    if nbytes < HUGE_PAGE or sys.platform != "linux" or os.environ.get("POCKETLM_HUGEPAGES", "1") == "0":
        return torch.empty(nbytes, dtype=torch.uint8)
    room = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # the slack before the boundary is never touched
    start = -room.data_ptr() % HUGE_PAGE
    out = room[start : start + nbytes]
    _libc().madvise(ctypes.c_void_p(out.data_ptr()), ctypes.c_size_t(nbytes // HUGE_PAGE * HUGE_PAGE), MADV_HUGEPAGE)
    return out


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def int4_pack(codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes (N, K/2) uint8, scales_and_zeros (K/g, N, 2) bf16 (Int4Linear's buffers) -> the kernel's layout
    (cpu.cpp: 16 output rows per block, each group's scales and zeros before its codes), uint8."""
    N, K = codes.shape[0], codes.shape[1] * 2
    codes, scales_and_zeros = codes.contiguous(), scales_and_zeros.contiguous()
    out = weight_buffer(int4_packed_bytes(N, K, group_size))
    library().int4_pack(ptr(codes), ptr(scales_and_zeros), N, K, group_size, ptr(out))
    return out


# The int4 kernel's layouts (cpu.cpp's Int4Layout): "zeros", int4_pack's bf16 scales and zeros (any group size);
# "q4_0" and "q4_k", int4_pack_gguf's of a GGUF's Q4_0 / Q4_K blocks as they are (groups of 32; 4.5 and 4.625 bits a
# weight where "zeros" takes 5); "q6_k", Q6_K's 6-bit blocks as they are (6.5625 bits, where int8 rows take 8)
INT4_LAYOUTS = {"zeros": 0, "q4_0": 1, "q4_k": 2, "q6_k": 3}


def int4_unpack(packed: torch.Tensor, N: int, K: int, group_size: int, layout: str = "zeros") -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout -> codes (N, K/2) uint8, scales_and_zeros (K/g, N, 2) bf16 (int4_pack's inverse; a GGUF's
    layouts' scales and zeros rounded to bf16). Not "q6_k", whose codes are 6-bit."""
    if layout == "q6_k":
        raise ValueError("the q6_k layout holds 6-bit codes, which int4 codes cannot hold")
    codes, scales_and_zeros = torch.empty(N, K // 2, dtype=torch.uint8), torch.empty(K // group_size, N, 2, dtype=torch.bfloat16)
    library().int4_unpack(ptr(packed), N, K, group_size, INT4_LAYOUTS[layout], ptr(codes), ptr(scales_and_zeros))
    return codes, scales_and_zeros


GGUF_GRID_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q4_K": 12, "Q6_K": 14}  # int4_pack_gguf's types (ggml's ids)


def int4_packed_bytes(N: int, K: int, group_size: int, layout: str = "zeros") -> int:
    return library().int4_packed_bytes(N, K, group_size, INT4_LAYOUTS[layout])


def int4_pack_gguf(blocks: torch.Tensor, ggml_type: str, N: int, K: int, order: torch.Tensor | None, out: torch.Tensor,
                   layout: str = "zeros") -> None:
    """A GGML Q4_0 / Q4_1 / Q4_K / Q6_K tensor's bytes (N, K) -> the kernel's `layout` (groups of 32) written into out,
    rows taken in `order` (int64, or None: as they are). "zeros" takes the three 4-bit types; "q4_0", "q4_k" and
    "q6_k" their own type."""
    if layout == "zeros" and ggml_type == "Q6_K":
        raise ValueError("Q6_K blocks go into the q6_k layout: their codes are 6-bit")
    if layout != "zeros" and layout != ggml_type.lower():
        raise ValueError(f"the int4 layout {layout!r} holds {layout.upper()} blocks, not {ggml_type}")
    order = None if order is None else order.to(torch.int64).contiguous()
    library().int4_pack_gguf(ptr(blocks), GGUF_GRID_TYPES[ggml_type], N, K, ptr(order), INT4_LAYOUTS[layout], ptr(out))


GGUF_ROW_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13,
                  "Q6_K": 14, "BF16": 30}  # int8_rows_gguf's types (ggml's ids)


def int8_rows_gguf(blocks: torch.Tensor, ggml_type: str, N: int, K: int, weight: torch.Tensor, scales: torch.Tensor) -> None:
    """A GGML tensor's bytes (N, K) of a GGUF_ROW_TYPES type -> int8 rows into weight (N, K) and bf16 scales (N,),
    as pocketlm.quant.int8.int8_rows rounds the tensor's float values, a row at a time."""
    library().int8_rows_gguf(ptr(blocks), GGUF_ROW_TYPES[ggml_type], N, K, ptr(weight), ptr(scales))


def int4_linear(x: torch.Tensor, packed: torch.Tensor, N: int, group_size: int, bias, layout: str = "zeros") -> torch.Tensor:
    """x (..., K) fp32; packed: an (N, K) weight in the kernel's `layout` (INT4_LAYOUTS) -> (..., N)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()  # (M, K)
    out = torch.empty(*x.shape[:-1], N)
    library().int4_linear(ptr(x2), x2.shape[0], K, ptr(packed), N, group_size, INT4_LAYOUTS[layout], ptr(bias), ptr(out),
                          torch.get_num_threads())
    return out


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias) -> torch.Tensor:
    """x (..., K) fp32; weight (N, K) int8; scales (N,) bf16 -> (..., N)."""
    N, K = weight.shape
    x2 = x.reshape(-1, K).contiguous()  # (M, K)
    out = torch.empty(*x.shape[:-1], N)
    library().int8_linear(ptr(x2), x2.shape[0], K, ptr(weight), ptr(scales), N, ptr(bias), ptr(out), torch.get_num_threads())
    return out


def int8_pack(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) int8 (Int8Linear's) -> int8_packed_linear's layout (cpu.cpp: 16 output rows per block, stored
    + 128), uint8. K must be a multiple of 32."""
    N, K = weight.shape
    weight = weight.contiguous()
    out = weight_buffer(library().int8_packed_bytes(N, K))
    library().int8_pack(ptr(weight), N, K, ptr(out))
    return out


def int8_unpack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """int8_pack's inverse -> weight (N, K) int8."""
    out = torch.empty(N, K, dtype=torch.int8)
    library().int8_unpack(ptr(packed), N, K, ptr(out))
    return out


def int8_packed_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias) -> torch.Tensor:
    """x (..., K) fp32; packed: int8_pack's layout of an (N, K) weight; scales (N,) bf16 -> (..., N)."""
    K, N = x.shape[-1], scales.shape[0]
    x2 = x.reshape(-1, K).contiguous()  # (M, K)
    out = torch.empty(*x.shape[:-1], N)
    library().int8_packed_linear(ptr(x2), x2.shape[0], K, ptr(packed), ptr(scales), N, ptr(bias), ptr(out), torch.get_num_threads())
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


def attend_decode(q, k, v, n_heads, n_kv_heads, head_dim, cos, sin, q_norm, k_norm, norm_eps, cache, pos, begin, scale,
                  softcap=None):
    """One token of one sequence (batch row 0 of the cache): q (1, 1, nh*hd), k, v (1, 1, n_kv*hd) fresh from the
    projections (views of the fused one are fine); cos, sin (1, rd) at pos, RoPE on the first rd channels of each
    head (rd < hd: Phi-3's partial rotary); q_norm, k_norm (hd,) weights or None.
    Writes the token's key and value at pos (into an fp32 or fp16 cache) and attends over positions begin..pos,
    the scores soft-capped as tanh(s / softcap) * softcap when softcap is set (Gemma 2). -> (1, 1, nh * hd)"""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(1, 1, n_heads * head_dim)
    library().attend_decode(
        ptr(q), ptr(k), ptr(v), n_heads, n_kv_heads, head_dim, ptr(cos), ptr(sin), cos.shape[-1], ptr(q_norm), ptr(k_norm),
        norm_eps,
        ptr(cache.k), ptr(cache.v), int(cache.k.dtype == torch.float16), cache.k.shape[2], pos, begin, scale, softcap or 0.0,
        ptr(out), torch.get_num_threads(),
    )
    return out
