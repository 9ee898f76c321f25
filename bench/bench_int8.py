"""The int8 matmul of a decode step, kernel against kernel: aten's `_weight_int8pack_mm` (bf16 activations:
what Int8Linear runs for layers under PACK_MIN_WEIGHTS), fbgemm's dynamically quantized linear as torch.ao
runs it (8-bit activations, one grid per block), and Int8Linear's fbgemm path (each row sent as two rows on a
fixed grid: what it runs for output heads), here forced on for every shape. The shapes are the fused
projections and output heads of SmolLM2-135M and Gemma 3 270M.

    .venv/bin/python bench/bench_int8.py [--threads 2] [--rows 1 8]

Prints microseconds per call (best of 5 runs) and the error of each against the exact product of the int8
weight, relative to the output's norm, on activations with one outlier channel (as language models have).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import pocketlm.quant.int8 as int8
from pocketlm import kernels
from pocketlm.quant.int8 import Int8Linear

SHAPES = {  # (out, in)
    "smollm2 qkv": (960, 576), "smollm2 o": (576, 576), "smollm2 gate+up": (3072, 576), "smollm2 down": (576, 1536),
    "smollm2 head": (49152, 576),
    "gemma qkv": (1536, 640), "gemma gate+up": (4096, 640), "gemma down": (640, 2048), "gemma head": (262144, 640),
}


def per_call_us(fn, budget_s: float = 0.3) -> float:
    fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.05:
        fn()
        n += 1
    calls = max(3, int(n * budget_s / 0.05 / 5))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    int8.PACK_MIN_WEIGHTS = 0  # the fbgemm path for every shape, to compare
    kernels._lib = False  # as without pocketlm's kernels, which would take the layer instead (bench_kernels.py times them)
    print(f"{args.threads} threads; microseconds per call (relative error against the exact int8 product)")
    print(f"{'layer':<16} {'rows':>4} {'aten int8pack':>20} {'fbgemm (torch.ao)':>20} {'fbgemm, two rows':>20} {'aten/two rows':>13}")
    for name, (n_out, n_in) in SHAPES.items():
        layer = Int8Linear.from_linear(torch.nn.Linear(n_in, n_out, bias=False))
        exact_w = layer.weight.float() * layer.scales.float()[:, None]  # (out, in)
        scales_bf16 = layer.scales
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(layer.weight, layer.scales.double(),
                                                               torch.zeros(n_out, dtype=torch.long), 0)
            plain_packed = torch.ops.quantized.linear_prepack(qweight, None)
        for rows in args.rows:
            x = torch.randn(rows, n_in)
            x[:, 3] *= 20  # an outlier channel
            exact = x @ exact_w.T

            def aten():
                return torch.ops.aten._weight_int8pack_mm(x.bfloat16(), layer.weight, scales_bf16).float()

            def fbgemm():
                return torch.ops.quantized.linear_dynamic(x, plain_packed, False)

            def ours():
                return layer(x)

            cells = []
            for fn in (aten, fbgemm, ours):
                with torch.inference_mode():
                    err = ((fn() - exact).norm() / exact.norm()).item()
                    cells.append((per_call_us(fn), err))
            text = [f"{us:9.0f} ({err:.0e})" for us, err in cells]
            print(f"{name:<16} {rows:>4} {text[0]:>20} {text[1]:>20} {text[2]:>20} {cells[0][0] / cells[2][0]:12.2f}x", flush=True)


if __name__ == "__main__":
    main()
