"""The 1-8B models people run: load time, memory, disk and speed of random-weight Llama-shaped GGUFs that this
script writes itself (speed and memory do not depend on the values), against llama.cpp on the same file.

    .venv/bin/python bench/bench_scale.py [--sizes 135M 1.1B 3.2B] [--types Q4_0 Q4_K_M] [--threads 2]
        [--llama-cpp DIR] [--out /tmp/pocketlm-scale]          # --sizes 7.2B too: about 4 GB per file

Shapes: 135M SmolLM2's; 1.1B TinyLlama's (22 layers, 2048, FFN 5632, 32/4 heads); 3.2B Llama 3.2 3B's (28 layers,
3072, FFN 8192, 24/8 heads, tied embedding); 7.2B Mistral 7B's (32 layers, 4096, FFN 14336, 32/8 heads). Every model
takes SmolLM2's tokenizer (49,152 tokens). Q4_0: every matrix Q4_0 (the embedding too, as `pocketlm export --type
q4_0`); Q4_K_M: as llama.cpp's Q4_K_M mixes them (src/llama-quant.cpp, llama_tensor_get_type): Q6_K for the output
head, and for attn_v and ffn_down in the layers of use_more_bits (the first and last eighth and every third between,
about half), Q4_K elsewhere.

Each row, in fresh processes with an empty POCKETLM_HOME: the first `pocketlm run FILE "Hello there" -n 1` (cold:
the file just written, so in the page cache; the first start pays any conversion), a second one (warm), the peak
resident memory of the warm one, the bytes the runs wrote under POCKETLM_HOME, then `pocketlm bench FILE --vs
llama.cpp` (512-token prompt, 64 new tokens, each engine in its own process) and the share of the memory-bandwidth
bound. Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {  # name: (layers, hidden, ffn, heads, kv heads, tied)
    "135M": (30, 576, 1536, 9, 3, True),
    "1.1B": (22, 2048, 5632, 32, 4, False),
    "3.2B": (28, 3072, 8192, 24, 8, True),
    "7.2B": (32, 4096, 14336, 32, 8, False),
}
VOCAB = 49152


def random_blocks(qtype, n_blocks: int, rng) -> np.ndarray:
    """n_blocks GGML blocks with random codes and small fp16 scales: a layer's output stays of the order of its
    input, as a trained model's does (no NaN or inf anywhere)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scale = lambda lo, hi: rng.uniform(lo, hi, (n_blocks, 1)).astype(np.float16).view(np.uint8)  # noqa: E731
    if qtype in (T.Q4_0, T.Q5_0, T.Q8_0):
        blocks[:, :2] = scale(0.002, 0.01)
    elif qtype == T.Q4_K:
        blocks[:, :2], blocks[:, 2:4] = scale(0.0002, 0.001), scale(0.0002, 0.001)
    elif qtype == T.Q6_K:
        blocks[:, -2:] = scale(0.0002, 0.001)
    return blocks


def write_model(path: Path, size: str, kind: str, seed: int = 0) -> None:
    """A random-weight Llama-shaped GGUF, written tensor by tensor (a 7B file never sits in memory)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter

    from pocketlm import registry
    from pocketlm.formats.gguf import read_gguf

    layers, hidden, ffn, heads, kv_heads, tied = SHAPES[size]
    head_dim = hidden // heads
    writer = GGUFWriter(path, "llama")
    writer.add_name(f"random-llama-{size}")
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(2 if kind == "Q4_0" else 15)  # llama.cpp's MOSTLY_Q4_0, MOSTLY_Q4_K_M
    smollm2 = read_gguf(registry.resolve("smollm2-135m-instruct")[1]).metadata
    for key, value in smollm2.items():  # SmolLM2's tokenizer, as it is in its own file
        if key.startswith("tokenizer."):
            if isinstance(value, list):
                writer.add_array(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, bool):
                writer.add_bool(key, value)
            else:
                writer.add_uint32(key, value)

    def use_more_bits(i: int) -> bool:  # llama-quant.cpp's: the layers Q4_K_M gives 6 bits in attn_v and ffn_down
        return i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2

    def matrix_type(name: str, row: int, layer: int = -1):
        if kind == "Q4_0":
            return T.Q4_0
        more_bits = name == "output" or (name in ("attn_v", "ffn_down") and use_more_bits(layer))
        if row % 256:  # K-quants need rows of 256: llama.cpp's fallbacks (SmolLM2's 576-wide rows)
            return T.Q8_0 if more_bits else T.Q5_0
        return T.Q6_K if more_bits else T.Q4_K

    tensors = [("token_embd.weight", (VOCAB, hidden), matrix_type("token_embd", hidden)), ("output_norm.weight", (hidden,), T.F32)]
    if not tied:
        tensors.append(("output.weight", (VOCAB, hidden), matrix_type("output", hidden)))
    for i in range(layers):
        for name, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (heads * head_dim, hidden)),
                            ("attn_k", (kv_heads * head_dim, hidden)), ("attn_v", (kv_heads * head_dim, hidden)),
                            ("attn_output", (hidden, heads * head_dim)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn))):
            tensors.append((f"blk.{i}.{name}.weight", shape, T.F32 if len(shape) == 1 else matrix_type(name, shape[-1], i)))
    for name, shape, qtype in tensors:
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape)) // block * type_size
        writer.add_tensor_info(name, shape[::-1] if qtype == T.F32 else (shape[0], shape[1] // block * type_size),
                               np.dtype(np.float32 if qtype == T.F32 else np.uint8), n_bytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape, qtype in tensors:
        if qtype == T.F32:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            block = GGML_QUANT_SIZES[qtype][0]
            writer.write_tensor_data(random_blocks(qtype, int(np.prod(shape)) // block, rng).reshape(shape[0], -1))
    writer.close()


def timed_run(path: Path, home: Path) -> tuple[float, int]:
    """Seconds from start to the first byte of answer of `pocketlm run` in a fresh process, and its peak RSS."""
    code = ("import sys, resource; from pocketlm.cli import main; main(sys.argv[1:]); "
            "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024, file=sys.stderr)")
    cmd = [sys.executable, "-c", code, "run", str(path), "Hello there", "-n", "1", "--temperature", "0"]
    start = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "POCKETLM_HOME": str(home)}) as proc:
        proc.stdout.read(1)
        first = time.perf_counter() - start
        out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"pocketlm run failed: {err.decode()[-500:]}")
    return first, int(err.decode().split()[-1])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["135M", "1.1B", "3.2B"], choices=list(SHAPES))
    parser.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M"], choices=["Q4_0", "Q4_K_M"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--llama-cpp", metavar="DIR", help="a llama-cpp-python build installed with pip install --target DIR")
    parser.add_argument("--kernel-target", help="pocketlm's kernels (default: the best this CPU runs)")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "pocketlm-scale"), help="where the GGUFs go")
    args = parser.parse_args()
    from pocketlm import kernels
    from pocketlm.bench import run_bench

    if args.kernel_target:
        os.environ["POCKETLM_KERNEL_TARGET"] = args.kernel_target
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores, pocketlm kernels {kernels.target()}, {args.threads} threads\n")
    print("| model | file | cold first token | warm first token | peak RSS (warm) | written to disk | prompt tok/s (llama.cpp) "
          "| decode tok/s (llama.cpp) | decode vs llama.cpp | share of bandwidth bound (llama.cpp) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for kind in args.types:
            path = out / f"random-llama-{size}-{kind}.gguf"
            if not path.exists():
                write_model(path, size, kind)
            home = Path(tempfile.mkdtemp(prefix="pocketlm-home-"))
            cold, _ = timed_run(path, home)
            warm, peak = timed_run(path, home)
            written = folder_bytes(home)
            result = run_bench(str(path), args.prompt_tokens, args.new_tokens, repeats=2, threads=args.threads,
                               peers=["llama.cpp"], kernel_target=args.kernel_target, llama_cpp=args.llama_cpp)
            shutil.rmtree(home, ignore_errors=True)
            rows = {r["engine"]: r for r in result["results"]}
            ours, theirs = rows["pocketlm"], rows.get("llama.cpp")
            peer = lambda key, fmt: f" ({fmt.format(theirs[key])})" if theirs else ""  # noqa: E731
            print(f"| {size} | {kind}, {path.stat().st_size / 1e9:.2f} GB | {cold:.1f} s | {warm:.1f} s | {peak / 1e9:.2f} GB | "
                  f"{written / 1e6:.0f} MB | {ours['prompt_tok_s']:.0f}{peer('prompt_tok_s', '{:.0f}')} | "
                  f"{ours['decode_tok_s']:.1f}{peer('decode_tok_s', '{:.1f}')} | "
                  f"{ours['decode_tok_s'] / theirs['decode_tok_s'] if theirs else float('nan'):.2f}x | "
                  f"{ours['fraction_of_roofline']:.0%}{peer('fraction_of_roofline', '{:.0%}')} |", flush=True)
            for s in result["skipped"]:
                print(f"skipped {s['engine']}: {s['reason']}")


if __name__ == "__main__":
    main()
