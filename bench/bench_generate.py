"""Decode and prompt tokens/s: pocketlm against Hugging Face transformers' `generate`, same model, same run.

    .venv/bin/python bench/bench_generate.py [--models smollm2-135m-instruct gemma3-270m] [--repeats 3]

Batch 1, the threads torch picks (2 here), a 33-token-ish prompt, 128 new tokens (end tokens ignored so
every engine decodes the same count), greedy. Prints medians and pocketlm/transformers ratios, then the
warm-start time to first token of the `pocketlm run` command (a fresh process, converted cache in place).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pocketlm import registry
from pocketlm.engine.generate import encode_raw, generate
from pocketlm.engine.sampling import SamplingParams
from pocketlm.load import load

PROMPT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Germany and "
    "France built wooden machines that riders pushed along with their feet."
)
NEW_TOKENS = 128


def time_pocketlm(lm, ids: list[int], repeats: int) -> dict:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    runs = []
    for _ in range(repeats + 1):  # the first run is a warm-up
        g = generate(lm, ids, params)
        g.text()
        runs.append(g.stats)
    runs = runs[1:]
    return {
        "prompt_tok_s": statistics.median(s.prompt_tokens_per_s for s in runs),
        "decode_tok_s": statistics.median(s.decode_tokens_per_s for s in runs),
        "ttft_s": statistics.median(s.time_to_first_token_s for s in runs),
    }


@torch.inference_mode()
def time_transformers(gguf_path: Path, ids: list[int], repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.eval()
    input_ids = torch.tensor([ids])
    prefill, decode = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(input_ids)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        total_s = time.perf_counter() - start
        if i:
            prefill.append(prefill_s)
            # generate = one prefill + (NEW_TOKENS - 1) decode steps
            decode.append((NEW_TOKENS - 1) / (total_s - prefill_s))
    return {
        "prompt_tok_s": len(ids) / statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "ttft_s": statistics.median(prefill),
    }


def warm_start_ttft(model: str) -> float:
    """Seconds from starting `pocketlm run` to its first byte of answer (the conversion is cached by then)."""
    cmd = [sys.executable, "-m", "pocketlm.cli", "run", model, "Say hello.", "-n", "8", "--temperature", "0"]
    start = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        proc.stdout.read(1)
        first = time.perf_counter() - start
        proc.wait()
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quants", nargs="+", default=["none", "int8"], help="pocketlm rows: none (fp weights) and/or int8")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {NEW_TOKENS} new tokens, pocketlm {args.dtype}")
    rows = []
    for name in args.models:
        ours = {}
        for quant in args.quants:
            lm = load(name, dtype=getattr(torch, args.dtype), quant=quant)
            ids = encode_raw(lm.tokenizer, PROMPT)
            ours[quant] = time_pocketlm(lm, ids, args.repeats)
            del lm
        theirs = time_transformers(registry.resolve(name)[1], ids, args.repeats)
        rows.append((name, len(ids), ours, theirs, warm_start_ttft(name)))

    print(f"\n| model | prompt | engine | prompt tok/s | decode tok/s | decode vs transformers |")
    print("|---|---|---|---|---|---|")
    for name, n, ours, theirs, _ in rows:
        for quant, r in ours.items():
            engine = f"pocketlm {args.dtype}" + (" + int8 weights" if quant == "int8" else "")
            print(f"| {name} | {n} | {engine} | {r['prompt_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / theirs['decode_tok_s']:.2f}x |")
        print(f"| {name} | {n} | transformers fp32 generate | {theirs['prompt_tok_s']:.1f} | {theirs['decode_tok_s']:.1f} | 1.00x |")
    print("\n| model | `pocketlm run` warm start to first token |")
    print("|---|---|")
    for name, *_, ttft in rows:
        print(f"| {name} | {ttft:.2f} s |")


if __name__ == "__main__":
    main()
