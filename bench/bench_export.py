"""`pocketlm export --format gguf` of SmolLM2 at every type: file size, export time, and how the file loads back.

    .venv/bin/python bench/bench_export.py

Each exported file is loaded through pocketlm (its own converted cache in a temporary POCKETLM_HOME) and
compared with the source: max |logit difference| and top-1 agreement on 256 tokens, and perplexity on
tests/fixtures/wikitext2_test_excerpt.txt (window 1,024, stride 512).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from pocketlm.eval.perplexity import perplexity
from pocketlm.export import export
from pocketlm.load import load

EVAL = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "wikitext2_test_excerpt.txt"
TYPES = ["f32", "f16", "q8_0", "q4_0", "q4_k"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=TYPES, choices=TYPES, help=f"GGUF types to export (default: all of {', '.join(TYPES)})")
    types = p.parse_args().types
    os.environ["POCKETLM_HOME"] = tempfile.mkdtemp()  # exported files are converted here, not in the user's cache
    src = load("smollm2-135m-instruct")
    ids = src.tokenizer.encode(EVAL.read_text(encoding="utf-8"))
    probe = torch.tensor([ids[:256]])
    with torch.inference_mode():
        ref = src.model(probe)  # (1, 256, V)
    print("| type | size | export | max abs logit diff | top-1 agreement | perplexity |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in types:
            path = Path(tmp) / f"smollm2-{qtype}.gguf"
            start = time.perf_counter()
            report = export("smollm2-135m-instruct", "gguf", path, qtype)
            export_s = time.perf_counter() - start
            lm = load(str(path))
            with torch.inference_mode():
                out = lm.model(probe)
                ppl = perplexity(lm.model, ids)["perplexity"]
            diff = (out - ref).abs().max().item()
            agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"| {qtype} | {report['bytes'] / 1e6:.1f} MB | {export_s:.1f} s | {diff:.4f} | {agree:.1%} | {ppl:.3f} |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
