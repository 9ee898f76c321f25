"""Prompt and decode tokens/s: pocketlm against its peers on the same model file, in one run, as Markdown.

    .venv/bin/python bench/bench_generate.py [--models smollm2-135m-instruct gemma3-270m]
        [--quants auto none] [--vs transformers llama.cpp] [--prompt-tokens 512] [--repeats 3] [--rounds 1]
        [--kernel-target avx2 --llama-cpp DIR]   # both restricted to AVX2, on any machine that runs it

Every row names its kernels: pocketlm's target (pocketlm/kernels: the best this CPU runs, or --kernel-target),
llama.cpp's build (its own instruction sets; --llama-cpp DIR takes a build installed with pip install --target DIR,
e.g. with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF ..."), or aten.

Each row is `pocketlm bench` (pocketlm/bench.py): every engine in its own process, the same prompt ids,
greedy, end tokens ignored so every engine decodes the same count, medians after a warm-up. A peer that
is not installed is listed as skipped. Then the warm-start time to the first byte of `pocketlm run`
(a fresh process; the converted and quantized copies are cached by then).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from pocketlm.bench import run_bench


def warm_start_ttft(model: str) -> float:
    """Seconds from starting `pocketlm run` to its first byte of answer."""
    cmd = [sys.executable, "-m", "pocketlm.cli", "run", model, "Say hello.", "-n", "8", "--temperature", "0"]
    subprocess.run(cmd, capture_output=True)  # fills the caches, if a first run has not
    start = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        proc.stdout.read(1)
        first = time.perf_counter() - start
        proc.wait()
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--quants", nargs="+", default=["auto", "none"], help="pocketlm rows (--quant values)")
    parser.add_argument("--vs", nargs="*", default=["transformers", "llama.cpp"])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernel-target", help="pocketlm's CPU kernels (default: the best this CPU runs)")
    parser.add_argument("--llama-cpp", metavar="DIR", help="another llama-cpp-python build, installed with pip install --target DIR")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every engine this many times, interleaved (pocketlm, peers, pocketlm, peers, ...); rows "
                             "are each engine's median round and the ratio column lists every round's ratio: a machine "
                             "whose speed drifts moves a ratio taken within one round far less than either speed")
    args = parser.parse_args()

    base = "llama.cpp" if "llama.cpp" in args.vs else "transformers"  # the ratio column's reference
    print(f"| model | engine | kernels | weights | prompt tok/s | decode tok/s | first token | peak memory | roofline | decode vs {base} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    skipped = set()
    for name in args.models:
        rounds = []  # per round: {(engine, weights): row}
        for _ in range(args.rounds):
            rows = {}
            for i, quant in enumerate(args.quants):
                peers = args.vs if i == 0 else []  # peers once per model
                result = run_bench(name, args.prompt_tokens, args.new_tokens, args.repeats, quant=quant, peers=peers,
                                   kernel_target=args.kernel_target, llama_cpp=args.llama_cpp)
                rows |= {(r["engine"], r["weights"]): r for r in result["results"]}
                skipped |= {(s["engine"], s["reason"]) for s in result["skipped"]}
            rounds.append(rows)
        reference = next((key for key in rounds[0] if key[0] == base), None)
        for key in rounds[0]:
            by_speed = sorted((rows[key] for rows in rounds), key=lambda row: row["decode_tok_s"])
            r = by_speed[(len(by_speed) - 1) // 2]  # the median round (the lower one of an even count)
            ratios = sorted(rows[key]["decode_tok_s"] / rows[reference]["decode_tok_s"] for rows in rounds) if reference else []
            vs = " / ".join(f"{x:.2f}x" for x in ratios) or "-"
            print(f"| {name} | {r['engine']} | {r['kernels']} | {r['weights']} | {r['prompt_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                  f"{r['ttft_s'] * 1000:.0f} ms | {r['peak_rss_mb']:.0f} MB | "
                  f"{r['roofline_decode_tok_s']:.0f} ({r['fraction_of_roofline']:.0%}) | {vs} |")
    print(f"\n({args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.repeats}; "
          f"{args.rounds} interleaved round(s): the median round's row, every round's ratio, lowest first; "
          f"read bandwidth {result['read_bandwidth_gb_s']} GB/s)")
    for engine, reason in sorted(skipped):
        print(f"skipped {engine}: {reason}")
    print("\n| model | `pocketlm run` warm start to first token |")
    print("|---|---|")
    for name in args.models:
        print(f"| {name} | {warm_start_ttft(name):.2f} s |")


if __name__ == "__main__":
    main()
