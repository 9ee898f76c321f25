"""How fast one decode row streams the 4- and 6-bit layouts (Q4_0, Q4_K, Q6_K) from memory and from cache, against
the bandwidth probe `pocketlm bench` divides by, for one or more builds of cpu.cpp, interleaved in one process.

    .venv/bin/python bench/bench_stream.py                         # the library pocketlm loads, 2 threads
    .venv/bin/python bench/bench_stream.py --threads 1 --builds /tmp/a.so /tmp/b.so   # two builds, A/B

Each layout: 12 layers of 8,192 x 3,072 (Llama 3.2 3B's gate/up shape, 12 x 13-20 MB: far past the L3 cache) run in
turn as a model's layers are ("memory"), and one layer of 2,048 x 3,072 again and again ("cache": its 3-5 MB stay in
L3, so this is the arithmetic's rate). Medians of 7 interleaved rounds. A decode row's time is about the sum of the
two rates' times, not the larger one: build variants (other prefetch distances and hints, none at all, two blocks
of weights a row) are compared here (docs/BENCHMARKS.md, issue 23). The layers are random GGML blocks packed by
int4_pack_gguf, as tests/test_kernels.py makes them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_kernels import gguf_layer  # noqa: E402

from bench_quantize import cpu_name  # noqa: E402

from pocketlm import kernels  # noqa: E402
from pocketlm.bench import read_bandwidth_gb_s  # noqa: E402
from pocketlm.quant.int8 import Int8Linear  # noqa: E402


def packed_bytes(layer) -> int:
    return (layer.packed_weight if isinstance(layer, Int8Linear) else layer.packed).numel()


def rate(layers, x: torch.Tensor, reps: int) -> float:
    """GB/s of weights read: reps passes over `layers`."""
    start = time.perf_counter()
    for _ in range(reps):
        for layer in layers:
            layer(x)
    return sum(map(packed_bytes, layers)) * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=1, help="activation rows (1: a decode step of one sequence)")
    p.add_argument("--builds", nargs="*", default=[], help="builds of cpu.cpp to compare (default: the one pocketlm loads)")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kernels.library()
    builds = {Path(b).name: kernels.open_library(Path(b)) for b in args.builds} or {kernels.target(): kernels.library()}
    cases = {}
    for qtype in ("q4_0", "q4_k", "q6_k"):
        cases[f"{qtype} memory"] = ([gguf_layer(qtype, 8192, 3072, i)[0] for i in range(12)], 1)
        cases[f"{qtype} cache"] = ([gguf_layer(qtype, 2048, 3072, 99)[0]], 60)
    x = torch.randn(args.rows, 3072)
    got = {(case, build): [] for case in cases for build in builds}
    for _ in range(args.rounds):
        for case, (layers, reps) in cases.items():
            for build, lib in builds.items():
                kernels._lib = lib  # the library the kernels call (kernels.using() does the same for a target)
                rate(layers, x, max(1, reps // 10))  # warm
                got[case, build].append(rate(layers, x, reps))
    print(f"CPU: {cpu_name()}; {kernels.describe()}; {args.threads} threads; {args.rows} row(s); GB/s, medians of {args.rounds} rounds")
    names = list(builds)
    print("| layout | " + " | ".join(names) + (" | " + " | ".join(f"{n} / {names[0]}" for n in names[1:]) if len(names) > 1 else "") + " |")
    print("|---" * (1 + 2 * len(names) - 1) + "|")
    for case in cases:
        medians = [statistics.median(got[case, b]) for b in names]
        print(f"| {case} | " + " | ".join(f"{m:.1f}" for m in medians)
              + "".join(f" | {m / medians[0]:.3f}" for m in medians[1:]) + " |")
    probes = [read_bandwidth_gb_s(args.threads, 512) for _ in range(5)]
    print(f"read probe (pocketlm bench's bound), 512 MB, 5 reads: {min(probes):.1f}-{max(probes):.1f} GB/s")


if __name__ == "__main__":
    main()
