"""GGUF quality against llama.cpp on the same file (issue 23): how far pocketlm's quantized run of a GGUF is from
llama.cpp's reading of the same blocks, and from the file's float values.

    .venv/bin/python bench/bench_gguf_quality.py [MODEL_OR_GGUF ...] --llama-cpp DIR [--tokens 4096]
        [--window 512] [--stride 512] [--threads 2] [--float-types Q6_K Q8_0 ...]

Models: registry names or .gguf paths (default: smollm2-135m-instruct, Q4_1, and gemma3-270m, Q4_K_M). pocketlm runs a
file's Q4_0/Q4_1/Q4_K and Q6_K tensors with the file's own codes and scales (Q4_0, Q4_K and Q6_K exactly; a Q4_1 or
mixed fused layer's scales and zeros held in bf16) and rounds every other type (Q5_*, Q8_0, F16, ...) to int8 rows with
one scale a row (pocketlm/quant/from_gguf.py), so its model is not llama.cpp's bit for bit. Three readings of one file see the same tokens (pocketlm's tokenizer, BOS as
`pocketlm eval` adds it, the tokens handed to llama.cpp as they are) in the same windows as `pocketlm eval --task
perplexity/agreement --window W --stride S --limit N`:

- llama.cpp: llama-cpp-python (`--llama-cpp DIR`: a `pip install --target DIR` build) in a child process, every
  window evaluated from an empty cache with logits_all, the (T, V) logits sent back through a pipe;
- pocketlm: `pocketlm.load.load(file, quant="auto")`, the default quantized run (what `pocketlm eval` loads);
- float: `pocketlm.load.load(file, quant="none")`, the file's blocks dequantized to fp32 (converted once into a throwaway
  POCKETLM_HOME, deleted after).

Per model: the three perplexities; KL(llama.cpp || pocketlm) mean and 99th percentile over the scored positions and
their top-1 agreement (pocketlm.eval.metrics.kl_and_top1, what `pocketlm eval --task agreement` reports); and as a
yardstick KL(float || llama.cpp) and KL(float || pocketlm): whether pocketlm's re-rounding costs more than the file's
own quantization. --float-types runs pocketlm's layers made from tensors of those GGUF types (a fused layer if any part
is one; "Q8_0" takes a tied embedding and head too) with the float model's weights instead: which re-rounding costs.
Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHUNK = 128  # positions whose logits (of all three readings) exist at once, as pocketlm.eval.agreement


# ------------------------------------------------------------------------------------ llama.cpp, in a child process


def llama_child(model: str, window: int, threads: int) -> None:
    """Reads a JSON list of token ids a line from stdin; answers each with the (T, V) fp32 logits of a fresh
    evaluation (no BOS added: the ids are what llama.cpp sees). First line out: the vocabulary size."""
    import numpy as np
    from llama_cpp import Llama

    out = os.fdopen(os.dup(1), "wb")  # the pipe; anything llama.cpp prints goes to stderr
    os.dup2(2, 1)
    llm = Llama(model_path=model, logits_all=True, n_ctx=window, n_batch=window, n_ubatch=window, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    out.write(f"{llm.n_vocab()}\n".encode())
    out.flush()
    for line in sys.stdin:
        ids = json.loads(line)
        llm.reset()
        llm.eval(ids)
        out.write(np.ascontiguousarray(llm.scores[: len(ids)], dtype=np.float32).tobytes())
        out.flush()


class LlamaCpp:
    def __init__(self, model: Path, llama_cpp: str | None, window: int, threads: int):
        env = dict(os.environ)
        if llama_cpp:
            env["PYTHONPATH"] = os.pathsep.join([llama_cpp, *filter(None, [os.environ.get("PYTHONPATH")])])
        cmd = [sys.executable, __file__, "--llama-child", str(model), "--window", str(window), "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"llama.cpp did not start on {model} (is llama-cpp-python importable? --llama-cpp DIR)")
        self.vocab = int(line)

    def logits(self, ids: list[int]):
        import torch

        self.proc.stdin.write((json.dumps(ids) + "\n").encode())
        self.proc.stdin.flush()
        n = len(ids) * self.vocab * 4
        data = self.proc.stdout.read(n)
        if len(data) != n:
            sys.exit("llama.cpp stopped before answering")
        return torch.frombuffer(bytearray(data), dtype=torch.float32).view(len(ids), self.vocab)  # (T, V)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ------------------------------------------------------------------------------------ pocketlm


def layer_types(path: Path) -> dict[str, set[str]]:
    """pocketlm's quantized layers by module name -> the GGUF types of the tensors each was made from (the names as
    pocketlm/quant/from_gguf.py gives them: q/k/v and gate/up fused, a tied head the embedding's table)."""
    from pocketlm.formats.gguf import ARCHITECTURES, _hf_name, read_gguf
    from pocketlm.quant.from_gguf import FUSED

    f = read_gguf(path)
    arch = ARCHITECTURES[f.architecture]
    types: dict[str, set[str]] = {}
    for name, info in f.tensors.items():
        hf = _hf_name(name, arch.block_names, arch.top_names, arch.blocks)
        if hf is None or not hf.endswith(".weight") or len(info.shape) != 2:
            continue
        module = hf.removesuffix(".weight")
        parent, _, leaf = module.rpartition(".")
        fused = next((f_ for f_, parts in FUSED.items() if leaf in parts), None)
        types.setdefault(f"{parent}.{fused}" if fused else module, set()).add(info.ggml_type.name)
    embed = arch.top_names["token_embd"]
    types.setdefault("lm_head", types.get(embed, set()))
    return types


def use_float_layers(quantized, float_model, types: dict[str, set[str]], float_types: set[str]) -> list[str]:
    """Put the float model's module in place of each of `quantized`'s layers made from a tensor of `float_types`."""
    from pocketlm.models.decoder import fuse_linears
    from pocketlm.quant.from_gguf import FUSED

    swapped = []
    for name, kinds in types.items():
        if not kinds & float_types:
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf in FUSED:  # the float model keeps q/k/v and gate/up apart: fused as the quantized model's are
            module = fuse_linears(*(float_model.get_submodule(f"{parent}.{part}") for part in FUSED[leaf]))
        else:
            module = float_model.get_submodule(name)
        setattr(quantized.get_submodule(parent) if parent else quantized, leaf, module)
        swapped.append(name)
    return swapped


def windows(n: int, window: int, stride: int):
    """(begin, end, targets scored) per window, as pocketlm.eval.perplexity.perplexity walks the text."""
    prev_end = 0
    for begin in range(0, n - 1, stride):
        end = min(begin + window, n)
        yield begin, end, end - max(prev_end, begin + 1)
        prev_end = end
        if end == n:
            break


def measure(path: Path, text: str, args) -> dict:
    import torch
    import torch.nn.functional as F

    from pocketlm.engine.generate import encode_raw
    from pocketlm.eval.metrics import kl_and_top1
    from pocketlm.load import load

    quantized = load(str(path), quant="auto")  # what `pocketlm eval` loads: a GGUF runs at its own bits
    float_lm = load(str(path), quant="none")
    ids = encode_raw(quantized.tokenizer, text)[: args.tokens]  # as `pocketlm eval` reads the text: BOS if the model wants one
    swapped = []
    if args.float_types:
        swapped = use_float_layers(quantized.model, float_lm.model, layer_types(path), set(args.float_types))
        print(f"  {path.name}: {len(swapped)} of pocketlm's layers in float", file=sys.stderr)
    llama = LlamaCpp(path, args.llama_cpp, args.window, args.threads)
    pairs = {"llama.cpp||pocketlm": [], "float||llama.cpp": [], "float||pocketlm": []}
    agree = dict.fromkeys(pairs, 0)
    nll = {"llama.cpp": 0.0, "pocketlm": 0.0, "float": 0.0}
    scored = 0
    ids_t = torch.tensor(ids)
    try:
        for begin, end, n_new in windows(len(ids), args.window, args.stride):
            chunk = ids_t[begin:end]  # (T,)
            ref = llama.logits(chunk.tolist())  # (T, V)
            with torch.inference_mode():
                h_q = quantized.model.hidden(chunk[None])[0]  # (T, D)
                h_f = float_lm.model.hidden(chunk[None])[0]
                targets = chunk[1:]  # position t predicts t + 1
                for b in range(chunk.numel() - 1 - n_new, chunk.numel() - 1, CHUNK):
                    e = min(b + CHUNK, chunk.numel() - 1)
                    logits = {"llama.cpp": ref[b:e],  # (c, V) each
                              "pocketlm": quantized.model.logits(h_q[None, b:e])[0].float(),
                              "float": float_lm.model.logits(h_f[None, b:e])[0].float()}
                    if logits["pocketlm"].shape != logits["llama.cpp"].shape:
                        sys.exit(f"{path.name}: llama.cpp has {llama.vocab} logits a token, pocketlm {logits['pocketlm'].shape[-1]}")
                    for pair in pairs:
                        p, q = pair.split("||")
                        kl, same = kl_and_top1(logits[p], logits[q])
                        pairs[pair].append(kl.clamp_min(0))  # tiny negatives: fp32 rounding of equal distributions
                        agree[pair] += int(same.sum())
                    for name, x in logits.items():
                        nll[name] += F.cross_entropy(x, targets[b:e], reduction="sum").item()
            scored += n_new
            print(f"  {path.name}: {scored} / {len(ids) - 1} tokens", file=sys.stderr, flush=True)
    finally:
        llama.close()
    out = {"tokens": scored, "swapped": swapped}
    for name, total in nll.items():
        out[f"ppl {name}"] = math.exp(total / scored)
    for pair, parts in pairs.items():
        kl = torch.cat(parts)
        out[f"kl {pair}"] = kl.mean().item()
        out[f"kl p99 {pair}"] = torch.quantile(kl, 0.99).item()
        out[f"top1 {pair}"] = agree[pair] / scored
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--llama-cpp", metavar="DIR", help="a llama-cpp-python build installed with pip install --target DIR")
    parser.add_argument("--tokens", type=int, default=4096, help="the first N tokens of the WikiText-2 test split")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, help="default: the window (windows side by side, each from an empty cache)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--float-types", nargs="+", metavar="TYPE", help="run pocketlm's layers of these GGUF types in float")
    parser.add_argument("--llama-child", metavar="GGUF", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.stride = args.stride or args.window
    if args.llama_child:
        llama_child(args.llama_child, args.window, args.threads)
        return

    import torch

    torch.set_num_threads(args.threads)
    from pocketlm import kernels, registry
    from pocketlm.eval.data import read_text, resolve_data
    from pocketlm.formats.gguf import read_gguf
    from pocketlm.load import gguf_quant_name

    paths = [registry.resolve(m)[1] for m in args.models]  # before POCKETLM_HOME moves: gemma3-270m's file lies in it
    home = tempfile.mkdtemp(prefix="pocketlm-quality-home-")  # the float copies land here, and go
    os.environ["POCKETLM_HOME"] = home
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"{cpu}, {os.cpu_count()} cores, pocketlm kernels {kernels.target()}, {args.threads} threads, "
          f"{datetime.date.today()}; WikiText-2 test, first {args.tokens} tokens, window {args.window}, stride {args.stride}"
          + (f"; pocketlm's {' '.join(args.float_types)} layers in float" if args.float_types else "") + "\n")
    text_path, _ = resolve_data("wikitext2")
    text = read_text(text_path, wikitext=True)
    rows = []
    try:
        for path in paths:
            out = measure(path, text, args)
            out["model"] = f"{path.name} ({gguf_quant_name(read_gguf(path).metadata)})"
            rows.append(out)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print("| model | tokens | perplexity llama.cpp | pocketlm | float | KL(llama.cpp ‖ pocketlm) mean | p99 "
          "| top-1 pocketlm = llama.cpp | KL(float ‖ llama.cpp) mean | KL(float ‖ pocketlm) mean |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tokens']} | {r['ppl llama.cpp']:.3f} | {r['ppl pocketlm']:.3f} | {r['ppl float']:.3f} | "
              f"{r['kl llama.cpp||pocketlm']:.4f} | {r['kl p99 llama.cpp||pocketlm']:.4f} | "
              f"{r['top1 llama.cpp||pocketlm']:.1%} | {r['kl float||llama.cpp']:.4f} | {r['kl float||pocketlm']:.4f} |")


if __name__ == "__main__":
    main()
