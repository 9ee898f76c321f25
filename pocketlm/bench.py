"""`pocketlm bench`: prompt tokens/s, decode tokens/s, time to first token and peak memory, beside the
memory-bandwidth bound, for pocketlm and (with --vs) its peers on the same model file in the same run.

Each engine runs in its own child process (`python -m pocketlm.bench ENGINE ...`, one JSON line out), so
its peak memory is its own and one engine's threads never overlap another's. Every engine gets the same
prompt token ids and decodes the same number of tokens greedily with end tokens ignored.

The roofline: decoding one token reads every weight once, so tokens/s can not exceed
read bandwidth / bytes of weights (llama.cpp's and gpt-fast's yardstick). Bandwidth is measured here by
summing a 512 MB array; bytes are those of the layers a decode step multiplies by.
"""

from __future__ import annotations

import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SCHEMA_VERSION = 2  # 2: each row names its kernels ("kernels": pocketlm's target, llama.cpp's, or aten)
BANDWIDTH_PROBE_MB = 512  # well past the L3 cache (32 MB here)
PEERS = ("transformers", "llama.cpp")
# A prompt made of plain English, repeated and cut to the asked length in tokens.
PROMPT_TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Germany and "
    "France built wooden machines that riders pushed along with their feet. Pedals came later, then "
    "chains, gears and air-filled tyres, and by 1900 millions of people rode to work. "
)


def run_bench(model: str, prompt_tokens: int = 512, new_tokens: int = 128, repeats: int = 3, threads: int | None = None,
              dtype: str = "float32", quant: str = "auto", peers: list[str] = (), kernel_target: str | None = None,
              llama_cpp: str | None = None) -> dict:
    """Run pocketlm, then each peer, each in a child process; return the fixed-schema result dict.
    kernel_target: pocketlm's kernels (POCKETLM_KERNEL_TARGET; default the best this CPU runs). llama_cpp: a folder
    holding another build of llama-cpp-python (`pip install --target DIR`, e.g. one built for AVX2 only), used
    instead of the installed one."""
    from pocketlm import registry

    name, source = registry.resolve(model)
    job = {"model": str(source), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
           "threads": threads, "dtype": dtype, "quant": quant, "kernel_target": kernel_target, "llama_cpp": llama_cpp}
    bandwidth = read_bandwidth_gb_s(threads)
    rows, skipped = [], []
    for engine in ["pocketlm", *dict.fromkeys(peers)]:
        row = _run_child(engine, job)
        if "skipped" in row:
            skipped.append({"engine": engine, "reason": row["skipped"]})
            continue
        row["roofline_decode_tok_s"] = round(bandwidth * 1e9 / row["weight_bytes_per_token"], 1)
        row["fraction_of_roofline"] = round(row["decode_tok_s"] / row["roofline_decode_tok_s"], 3)
        rows.append(row)
    ours = rows[0]
    for row in rows:
        row["decode_vs_pocketlm"] = round(row["decode_tok_s"] / ours["decode_tok_s"], 3)
        row["prompt_vs_pocketlm"] = round(row["prompt_tok_s"] / ours["prompt_tok_s"], 3)
    return {
        "schema": SCHEMA_VERSION,
        "model": name,
        "source": str(source),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": threads or _default_threads(),
        "read_bandwidth_gb_s": round(bandwidth, 1),
        "results": rows,
        "skipped": skipped,
    }


def print_results(results: dict) -> str:
    """The result as a table (rich), returned as text."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['model']}: {results['prompt_tokens']}-token prompt, {results['new_tokens']} new tokens, "
                        f"{results['threads']} threads, median of {results['repeats']}")
    for column in ("engine", "kernels", "weights", "prompt tok/s", "decode tok/s", "first token", "peak memory", "roofline", "decode vs pocketlm"):
        table.add_column(column, justify="left" if column in ("engine", "kernels", "weights") else "right")
    for r in results["results"]:
        table.add_row(r["engine"], r["kernels"], r["weights"], f"{r['prompt_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}",
                      f"{r['ttft_s'] * 1000:.0f} ms", f"{r['peak_rss_mb']:.0f} MB",
                      f"{r['roofline_decode_tok_s']:.0f} ({r['fraction_of_roofline']:.0%})", f"{r['decode_vs_pocketlm']:.2f}x")
    console = Console(record=True, width=140, file=io.StringIO())
    console.print(table)
    console.print(f"roofline: read bandwidth {results['read_bandwidth_gb_s']} GB/s / weight bytes read per token")
    for s in results["skipped"]:
        console.print(f"skipped {s['engine']}: {s['reason']}")
    return console.export_text().rstrip()


def read_bandwidth_gb_s(threads: int | None = None, mb: int | None = None) -> float:
    """Best of 5 sums over an array much larger than the L3 cache: the read bandwidth decode is bound by."""
    import torch

    from pocketlm import kernels

    if threads:
        torch.set_num_threads(threads)
    # in the pages the packed weights lie in (kernels.weight_buffer): it read 12-21% slower in 4 KB ones
    x = kernels.weight_buffer((mb or BANDWIDTH_PROBE_MB) * 2**20).view(torch.float32).fill_(1.0)
    # pocketlm's kernels read as its weight kernels do (wide loads, software prefetch): torch's sum reached 9 GB/s on
    # two Zen 4 cores where they read 16-18, and decode read faster than the "bound"
    read = (lambda: kernels.library().read_floats(x.data_ptr(), x.numel(), torch.get_num_threads())) if kernels.library() else x.sum
    read()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


def _run_child(engine: str, job: dict) -> dict:
    cmd = [sys.executable, "-m", "pocketlm.bench", engine, json.dumps(job)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if engine == "pocketlm" and job.get("kernel_target"):
        env["POCKETLM_KERNEL_TARGET"] = job["kernel_target"]
    if engine == "llama.cpp" and job.get("llama_cpp"):
        env["PYTHONPATH"] = os.pathsep.join([job["llama_cpp"], *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        from pocketlm.errors import PocketLMError

        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PocketLMError(f"the {engine} benchmark failed: {last}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------- in the child process


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


def bench_pocketlm(job: dict) -> dict:
    import torch

    from pocketlm.engine.generate import generate
    from pocketlm.engine.sampling import SamplingParams
    from pocketlm.load import load

    lm = load(job["model"], dtype=getattr(torch, job["dtype"]), quant=job["quant"])
    ids = prompt_ids(lm.tokenizer, job["prompt_tokens"])
    params = SamplingParams(max_new_tokens=job["new_tokens"], temperature=0, repetition_penalty=1.0, ignore_eos=True)
    runs = []
    for _ in range(job["repeats"] + 1):  # the first is a warm-up
        g = generate(lm, ids, params)
        g.text()
        runs.append(g.stats)
    runs = runs[1:]
    from pocketlm import kernels

    return {
        "engine": "pocketlm",
        "kernels": kernels.target() or "aten",
        "weights": lm.meta.get("weights", "float32"),
        "prompt_tok_s": statistics.median(s.prompt_tokens_per_s for s in runs),
        "decode_tok_s": statistics.median(s.decode_tokens_per_s for s in runs),
        "ttft_s": statistics.median(s.time_to_first_token_s for s in runs),
        "weight_bytes_per_token": weight_bytes_per_token(lm.model),
    }


def weight_bytes_per_token(model) -> int:
    """Bytes of the matmul weights (float, int8 or int4 with their scales) a decode step reads (not an untied int8
    embedding's table, Int8Linear.rows_only: a token reads one row of it)."""
    from torch import nn

    from pocketlm.quant.int4 import Int4Linear
    from pocketlm.quant.int8 import Int8Linear

    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, Int8Linear, Int4Linear)) and not getattr(m, "rows_only", False):
            layout = getattr(m, "packed", None) if isinstance(m, Int4Linear) else getattr(m, "packed_weight", None)
            if layout is not None:  # what the kernels read (the plain buffers, where kept, sit unread)
                tensors = [layout, *(p for p in m.parameters(recurse=False) if p is not None)]
                if isinstance(m, Int8Linear):
                    tensors.append(m.scales)
            else:
                tensors = [t for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)) if t is not None]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def bench_transformers(job: dict) -> dict:
    from pathlib import Path

    import torch

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return {"skipped": "transformers is not installed (pip install transformers)"}
    from pocketlm.tokenizer import Tokenizer

    path = Path(job["model"])
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        from pocketlm.load import convert_gguf

        tokenizer = Tokenizer.from_hf_dir(convert_gguf(path))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = Tokenizer.from_hf_dir(path)
    model.eval()
    n_new = job["new_tokens"]
    input_ids = torch.tensor([prompt_ids(tokenizer, job["prompt_tokens"])])
    prefill, decode = [], []
    with torch.inference_mode():
        for i in range(job["repeats"] + 1):
            start = time.perf_counter()
            model(input_ids)
            prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(input_ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
            total_s = time.perf_counter() - start
            if i:
                prefill.append(prefill_s)
                decode.append((n_new - 1) / (total_s - prefill_s))  # generate = one prefill + n_new - 1 steps
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if model.config.tie_word_embeddings:
        weights += model.get_output_embeddings().weight.numel() * 4
    return {
        "engine": "transformers",
        "kernels": "aten",
        "weights": "float32",
        "prompt_tok_s": input_ids.shape[1] / statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "ttft_s": statistics.median(prefill),
        "weight_bytes_per_token": weights,
    }


def bench_llama_cpp(job: dict) -> dict:
    from pathlib import Path

    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed: pip install llama-cpp-python (it compiles llama.cpp, about 8 minutes)"}
    path = Path(job["model"])
    if path.suffix != ".gguf":
        return {"skipped": "llama.cpp runs .gguf files; export this model first (pocketlm export --format gguf)"}
    threads = job["threads"] or _default_threads()
    n_prompt, n_new = job["prompt_tokens"], job["new_tokens"]
    llm = Llama(model_path=str(path), n_ctx=n_prompt + n_new + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=512, verbose=False)
    from pocketlm.formats.gguf import read_gguf
    from pocketlm.tokenizer import Tokenizer

    ids = prompt_ids(Tokenizer.from_gguf_metadata(read_gguf(path).metadata), n_prompt)
    prefill, decode = [], []
    for i in range(job["repeats"] + 1):
        # greedy through llama-cpp-python's own token loop; generate() does not stop at end tokens, and
        # after reset() it cannot reuse the previous run's prompt from its cache
        llm.reset()
        start = time.perf_counter()
        tokens = llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
        next(tokens)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n_new - 1):
            next(tokens)
        if i:
            prefill.append(prefill_s)
            decode.append((n_new - 1) / (time.perf_counter() - start))
    return {
        "engine": "llama.cpp",
        "kernels": llama_cpp_target(),
        "weights": "gguf",
        "prompt_tok_s": n_prompt / statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "ttft_s": statistics.median(prefill),
        "weight_bytes_per_token": path.stat().st_size,  # an over-estimate: the file holds the embedding too
    }


def llama_cpp_target() -> str:
    """The instruction sets the loaded llama.cpp build uses, in pocketlm's target names (ggml's system info lists them:
    "AVX2 = 1 | AVX512 = 0 | ..." or, in newer builds, "CPU : SSE3 = 1 | AVX2 = 1 | ...")."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    has = lambda feature: f"{feature} = 1" in info  # noqa: E731
    if has("AVX512_VNNI"):
        return "avx512-vnni"
    if has("AVX512"):
        return "avx512"
    if has("AVX2"):
        return "avx2-vnni" if has("AVX_VNNI") else "avx2"
    return "neon" if has("NEON") else "other"


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: that survives exec, so a child
    would report its parent's peak (the bandwidth probe's 512 MB)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def _child(engine: str, job: dict) -> None:
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    run = {"pocketlm": bench_pocketlm, "transformers": bench_transformers, "llama.cpp": bench_llama_cpp}[engine]
    row = run(job)
    if "skipped" not in row:
        row["peak_rss_mb"] = peak_rss_mb()
        row = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    print(json.dumps(row))


if __name__ == "__main__":
    _child(sys.argv[1], json.loads(sys.argv[2]))
