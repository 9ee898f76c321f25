"""Decode with the packed weights in 4 KB pages against 2 MB pages (kernels.weight_buffer), the same model file loaded
twice into one process and decoded in turn, so both sides see the same machine from one moment to the next.

    .venv/bin/python bench/bench_pages.py /work/scale/random-llama-3.2B-Q4_K_M.gguf          # 8 rounds of 64 tokens
    .venv/bin/python bench/bench_pages.py MODEL --rounds 12 --new-tokens 128 --threads 2

Decode reads every packed weight byte once a token, far past the caches: in 4 KB pages each 4 KB starts a new
walk of the page tables and a new stream for the hardware prefetcher. llama.cpp memory-maps the GGUF, and a recent
Linux kernel's page cache holds it in large folios (FileHugePages in /proc/meminfo), so it reads 2 MB pages without
asking. Prints both sides' decode tok/s by round, their medians and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

from bench_quantize import cpu_name

from pocketlm import kernels
from pocketlm.bench import prompt_ids
from pocketlm.engine.generate import generate
from pocketlm.engine.sampling import SamplingParams
from pocketlm.load import load


def anon_huge_mb() -> float:
    """This process's anonymous memory in transparent huge pages (/proc/self/smaps_rollup), MB."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a GGUF file or model folder")
    p.add_argument("--quant", default="int4-mixed", help="runtime quantization (default: int4-mixed, as a Q4 GGUF runs)")
    p.add_argument("--rounds", type=int, default=8, help="rounds after a warm-up, each side once a round (default 8)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for pages, switch in (("4 KB", "0"), ("2 MB", "1")):
        os.environ["POCKETLM_HUGEPAGES"] = switch
        before = anon_huge_mb()
        models[pages] = load(args.model, quant=args.quant)
        print(f"{pages} pages: loaded; {anon_huge_mb() - before:.0f} MB more in huge pages")
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"CPU: {cpu_name()}; pocketlm {kernels.target() or 'aten'}; {args.threads} threads; transparent huge pages: "
          f"{mode.read_text().strip() if mode.exists() else 'none'}")
    ids = prompt_ids(models["4 KB"].tokenizer, 8)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    tok_s = {pages: [] for pages in models}
    for r in range(args.rounds + 1):  # round 0 warms both up; the order alternates
        for pages in list(models) if r % 2 else list(models)[::-1]:
            run = generate(models[pages], ids, params)
            run.text()
            if r:
                tok_s[pages].append(run.stats.decode_tokens_per_s)
    ratios = [b / a for a, b in zip(tok_s["4 KB"], tok_s["2 MB"])]
    print(f"\n{Path(args.model).name}: decode tok/s, {args.new_tokens} tokens a run, rounds in order")
    print("| pages | median | rounds |\n|---|---|---|")
    for pages, runs in tok_s.items():
        print(f"| {pages} | {statistics.median(runs):.1f} | {' '.join(f'{x:.1f}' for x in runs)} |")
    print(f"2 MB / 4 KB: median {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
