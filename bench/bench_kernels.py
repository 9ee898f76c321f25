"""One decode step's layers, pocketlm's CPU kernels (pocketlm/kernels) against aten's, in one process.

    .venv/bin/python bench/bench_kernels.py [--rounds 5] [--threads 2] [--target avx2] [--vs-target avx512-vnni]

Rows: SmolLM2-135M's int4 layers (fused q/k/v, o, fused gate/up, down) and its int8 output head, one input
row each (a decode step), then attention over 640 cached positions; then an int8 output head (SmolLM2's,
Gemma 3's) at 1 and 8 rows through pocketlm's two int8 kernels (exact fp32 products, and VNNI). An int4 row goes through 30 copies of its
layer in turn, as a token goes through SmolLM2's 30 layers, so the weights come from memory as in a model
(one layer alone would stay in the cache between calls). Each row is the median of interleaved rounds (aten,
pocketlm, aten, ...), so a drift of the machine's speed moves both columns alike.

Last, SmolLM2's whole fused decode step (int4, --quant auto) for 1, 2, 4 and 8 rows at position 80, the
server's batch. `--vs-build SO` times another build of cpu.cpp alongside, in turns in the same process (the
machine's speed drifts by up to 2x within minutes here, so two processes cannot be compared), e.g. the
source of an earlier commit:

    git show HEAD~1:pocketlm/kernels/cpu.cpp > /tmp/old.cpp
    cp pocketlm/kernels/simd.h /tmp/   # or the old commit's, where it has one
    g++ -O3 -march=x86-64-v4 -mavx512vnni -ffp-contract=off -fopenmp -std=c++17 -shared -fPIC /tmp/old.cpp -o /tmp/old.so
    .venv/bin/python bench/bench_kernels.py --vs-build /tmp/old.so

(the flags of the target it is compared with: pocketlm/kernels/__init__.py's TARGETS). `--target NAME` runs every
table on another kernel target this CPU runs (default: the best), `--vs-target NAME` times a second target's decode
step beside it: the AVX2 build against the AVX-512 one on an AVX-512 machine, say.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels
from pocketlm.models.llama import KVCache, apply_rope
from pocketlm.quant.int4 import Int4Linear
from pocketlm.quant.int8 import Int8Linear

LAYERS = 30  # copies of each int4 layer, called in turn
INT4_LAYERS = {"q/k/v 576 -> 960": (576, 960), "o 576 -> 576": (576, 576), "gate/up 576 -> 3072": (576, 3072), "down 1536 -> 576": (1536, 576)}


def time_us(fn, n: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def compare(aten, ours, rounds: int, n: int) -> tuple[float, float]:
    times = [(time_us(aten, n), time_us(ours, n)) for _ in range(rounds)]
    return statistics.median(t for t, _ in times), statistics.median(t for _, t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vs-build", metavar="SO", help="another build of cpu.cpp to time the decode step against")
    parser.add_argument("--target", help="the kernel target to time (default: the best this CPU runs)")
    parser.add_argument("--vs-target", help="a second kernel target whose decode step is timed beside")
    parser.add_argument("--prompt-rows", action="store_true", help="only the prompt table: 512 rows through 1-3B layers, "
                        "pocketlm's integer kernels against the weight dequantized and MKL's fp32 matmul")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.int4_kernel_on():
        raise SystemExit(f"pocketlm's int4 kernel is not available here: {kernels.why_unavailable}")
    with kernels.using(args.target or kernels.target()):
        print(f"kernels: pocketlm {kernels.target()}, {args.threads} threads\n")
        prompt_rows(args) if args.prompt_rows else tables(args)


def tables(args) -> None:
    torch.manual_seed(0)
    print("| layer | aten | pocketlm | speed-up |")
    print("|---|---|---|---|")
    rows = []
    for name, (K, N) in INT4_LAYERS.items():
        layers = [Int4Linear.from_linear(nn.Linear(K, N, bias=False), 32) for _ in range(LAYERS)]
        aten_weights = [(layer.aten_weight(), layer.scales_and_zeros) for layer in layers]
        x = torch.randn(1, K)

        def aten():
            for weight, scales_and_zeros in aten_weights:
                torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), weight, 32, scales_and_zeros).float()

        def ours():
            for layer in layers:
                layer(x)

        aten_us, ours_us = compare(aten, ours, args.rounds, 10)
        rows.append((f"int4 {name}", aten_us / LAYERS, ours_us / LAYERS))
    head = Int8Linear.from_linear(nn.Linear(576, 49152, bias=False))
    x = torch.randn(1, 576)
    rows.append(("int8 head 576 -> 49152", *compare(
        lambda: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), head.weight, head.scales).float(),
        lambda: head(x), args.rounds, 20)))
    cache = KVCache(1, 1024, 3, 64, torch.float32)
    cache.k.normal_(), cache.v.normal_()
    q, k, v = torch.randn(1, 1, 9 * 64), torch.randn(1, 1, 3 * 64), torch.randn(1, 1, 3 * 64)
    cos, sin = torch.ones(1, 64), torch.zeros(1, 64)
    pos = 640

    def sdpa():
        qh, kh = apply_rope(q.view(1, 9, 1, 64), cos, sin), apply_rope(k.view(1, 3, 1, 64), cos, sin)
        cache.update(torch.tensor([pos]), kh, v.view(1, 3, 1, 64))
        return F.scaled_dot_product_attention(qh, cache.k[:, :, : pos + 1], cache.v[:, :, : pos + 1], enable_gqa=True)

    rows.append(("attention, 9 heads / 3 KV heads, 641 positions", *compare(
        sdpa, lambda: kernels.attend_decode(q, k, v, 9, 3, 64, cos, sin, None, None, 0.0, cache, pos, 0, 0.125),
        args.rounds, 200)))
    for name, aten_us, ours_us in rows:
        print(f"| {name} | {aten_us:.0f} us | {ours_us:.0f} us | {aten_us / ours_us:.2f}x |")
    if kernels.int8_kernel_on():  # an output head's two kernels: one row is a decode step, 8 a server's batch
        print("\n| int8 output head | rows | exact fp32 products (`int8_linear`) | integer (`int8_packed_linear`) | speed-up |")
        print("|---|---|---|---|---|")
        for name, (K, N) in {"SmolLM2 576 -> 49152": (576, 49152), "Gemma 3 640 -> 262144": (640, 262144)}.items():
            weight = torch.randint(-127, 128, (N, K), dtype=torch.int8)
            scales = (torch.rand(N) / 100).to(torch.bfloat16)
            packed = kernels.int8_pack(weight)
            for M in (1, 8):
                x = torch.randn(M, K)
                fp32_us, vnni_us = compare(lambda: kernels.int8_linear(x, weight, scales, None),
                                           lambda: kernels.int8_packed_linear(x, packed, scales, None), args.rounds, 10)
                print(f"| {name} | {M} | {fp32_us:.0f} us | {vnni_us:.0f} us | {fp32_us / vnni_us:.2f}x |")
    decode_steps(args)


def prompt_rows(args) -> None:
    """A prompt's rows through the layers of 1-3B models (TinyLlama's and Llama 3.2 3B's down and gate/up): the
    integer kernels (the activations rounded to int8, products summed in int32) against the float path (the weight
    dequantized for the call, MKL's fp32 matmul), each the median of interleaved rounds."""
    import torch.nn.functional as F

    print("| layer | rows | kernel | int8 kernel | int8 dequantized + MKL | int4 kernel | int4 dequantized + MKL |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for name, (K, N) in {"TinyLlama down 5632 -> 2048": (5632, 2048), "Llama 3.2 3B down 8192 -> 3072": (8192, 3072),
                         "Llama 3.2 3B gate/up 3072 -> 16384": (3072, 16384)}.items():
        linear = nn.Linear(K, N, bias=False)
        int8, int4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, 32)
        for M in (64, 512):
            x = torch.randn(M, K)
            int8_us, int8_float_us = compare(lambda: kernels.int8_packed_linear(x, int8.packed_weight, int8.scales, None),
                                             lambda: F.linear(x, int8.weight.float() * int8.scales.float()[:, None]), args.rounds, 2)
            int4_us, int4_float_us = compare(lambda: kernels.int4_linear(x, int4.packed, N, 32, None),
                                             lambda: F.linear(x, int4.dequantized()), args.rounds, 2)
            print(f"| {name} | {M} | {kernels.target()} | {int8_us / 1e3:.0f} ms | {int8_float_us / 1e3:.0f} ms | "
                  f"{int4_us / 1e3:.0f} ms | {int4_float_us / 1e3:.0f} ms |", flush=True)


def decode_steps(args) -> None:
    """SmolLM2's fused decode step for a batch of n rows, each in its own cache row at position 80."""
    from pocketlm.load import load
    from pocketlm.models.fused_step import FusedStep

    model = load("smollm2", quant="auto").model
    model.setup_cache(8, 1024)
    step = FusedStep(model)
    builds = {f"this build ({kernels.target()})": kernels.library()}
    if args.vs_target:
        builds[args.vs_target] = kernels.load_target(kernels.target_named(args.vs_target))
    if args.vs_build:
        builds[args.vs_build] = kernels.open_library(args.vs_build)
    names = list(builds)
    print(f"\n| SmolLM2 decode step, rows at position 80 | {' | '.join(names)} |" + (" speed-up |" if len(names) > 1 else ""))
    print("|---|" + "---|" * (len(names) + (len(names) > 1)))
    for n in (1, 2, 4, 8):
        tokens, pos, rows, logits = torch.randint(0, 1000, (n,)), torch.full((n,), 80), torch.arange(n), torch.empty(n, step.vocab)
        times = {name: [] for name in names}
        for _ in range(5 * args.rounds):  # the builds in turns
            for name, lib in builds.items():
                start = time.perf_counter()
                lib.decode_step(ctypes.byref(step.model), n, tokens.data_ptr(), pos.data_ptr(), rows.data_ptr(), logits.data_ptr(), n, None, args.threads)  # no hidden states
                times[name].append(time.perf_counter() - start)
        ms = [statistics.median(times[name]) * 1e3 for name in names]
        cells = " | ".join(f"{t:.2f} ms ({n / t * 1e3:.0f} tok/s)" for t in ms)
        print(f"| {n} | {cells} |" + (f" {ms[1] / ms[0]:.2f}x |" if len(ms) > 1 else ""))


if __name__ == "__main__":
    main()
