"""Structured pruning (no distillation) and vocabulary trimming: parameters, size, perplexity before and after.

    .venv/bin/python bench/bench_prune.py smollm2          # depth / width variants at about 50% non-embedding params
    .venv/bin/python bench/bench_prune.py gemma-vocab      # Gemma 3 270M with its vocabulary trimmed for English
    .venv/bin/python bench/bench_prune.py gemma-vocab-heldout   # that trim, scored on Alpaca rows it never saw

Perplexity: `pocketlm.eval.perplexity` on tests/fixtures/wikitext2_test_excerpt.txt (window 1,024, stride 512);
importance on the default calibration text (pocketlm/compress/data, disjoint from that excerpt). A trimmed
vocabulary splits some words into more tokens, so for it bits per byte are the comparable number.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from pocketlm.compress.prune import PruneSpec, prune_model
from pocketlm.eval.perplexity import perplexity
from pocketlm.load import load

ROOT = Path(__file__).resolve().parent.parent
EVAL = ROOT / "tests" / "fixtures" / "wikitext2_test_excerpt.txt"
ALPACA = Path("/work/shared/data/alpaca/alpaca_data.jsonl")
WIKI = Path("/work/shared/data/wikitext2_raw/test.txt")  # the excerpt is its first 12,000 bytes

SMOLLM2_VARIANTS = {  # name: (spec, what it removes)
    "depth: drop 15 of 30 blocks": PruneSpec(drop_layers=15),
    "width: FFN 1536 -> 640, 9/3 -> 6/2 heads": PruneSpec(ffn=640, heads=6, kv_groups=2),
    "depth + width: drop 8 blocks, FFN 1536 -> 896": PruneSpec(drop_layers=8, ffn=896),
}


def measure(ref: str, text: str) -> dict:
    lm = load(ref)
    ids = lm.tokenizer.encode(text)
    start = time.perf_counter()
    with torch.inference_mode():
        ppl = perplexity(lm.model, ids)
    n_bytes = len(text.encode("utf-8"))
    tied = lm.config.tie_word_embeddings
    params = sum(p.numel() for p in lm.model.parameters())  # parameters() lists a tied weight once
    embedding = lm.model.model.embed_tokens.weight.numel() + (0 if tied else lm.model.lm_head.weight.numel())
    return {
        "params": params,
        "non_embedding": params - embedding,
        "fp32_mb": params * 4 / 1e6,
        "tokens": len(ids),
        "perplexity": ppl["perplexity"],
        "bits_per_byte": ppl["nll"] * ppl["tokens"] / math.log(2) / n_bytes,
        "eval_s": time.perf_counter() - start,
    }


def alpaca_records() -> list[dict]:
    return [json.loads(line) for line in ALPACA.read_text(encoding="utf-8").splitlines()]


def alpaca_text(records: list[dict], between: str) -> str:
    """Alpaca rows as plain text: instruction, input and output on lines of their own, `between` rows."""
    return between.join(f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in records)


def row(name: str, m: dict, base: dict) -> str:
    return (
        f"| {name} | {m['params'] / 1e6:.1f}M | {m['non_embedding'] / 1e6:.1f}M ({m['non_embedding'] / base['non_embedding']:.0%}) "
        f"| {m['fp32_mb']:.0f} MB | {m['tokens']} | {m['perplexity']:.2f} | {m['bits_per_byte']:.3f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="smollm2", choices=["smollm2", "gemma-vocab", "gemma-vocab-heldout"],
                   help="SmolLM2's depth and width variants, Gemma 3 270M's trimmed vocabulary, or that trim scored on Alpaca rows "
                        "it never saw (default smollm2)")
    what = p.parse_args().what
    text = EVAL.read_text(encoding="utf-8")
    header = "| model | params | non-embedding | fp32 size | eval tokens | perplexity | bits/byte |\n|---|---|---|---|---|---|---|"
    with tempfile.TemporaryDirectory() as tmp:
        if what == "smollm2":
            base = measure("smollm2-135m-instruct", text)
            rows = [row("SmolLM2-135M-Instruct (dequantized Q4_1)", base, base)]
            for name, spec in SMOLLM2_VARIANTS.items():
                start = time.perf_counter()
                prune_model("smollm2-135m-instruct", Path(tmp) / "p", spec)
                prune_s = time.perf_counter() - start
                rows.append(row(f"{name} (prune {prune_s:.0f} s)", measure(str(Path(tmp) / "p"), text), base))
        elif what == "gemma-vocab":
            domain = Path(tmp) / "alpaca.txt"
            domain.write_text(alpaca_text(alpaca_records(), "\n"), encoding="utf-8")
            # Alpaca plus the WikiText-2 test lines after the evaluation excerpt (its first 12,000 bytes)
            wiki = WIKI.read_bytes()[len(text.encode("utf-8")):].decode("utf-8", errors="ignore")
            both = Path(tmp) / "alpaca-wiki.txt"
            both.write_text(domain.read_text(encoding="utf-8") + "\n" + wiki, encoding="utf-8")
            base = measure("gemma3-270m", text)
            rows = [row("Gemma 3 270M (dequantized Q4_K_M)", base, base)]
            runs = (("Alpaca", domain, None), ("Alpaca + rest of WikiText-2 test", both, None),
                    ("Alpaca, topped up to 94,000 (--vocab-size)", domain, 94000))
            for name, source, size in runs:
                start = time.perf_counter()
                report = prune_model("gemma3-270m", Path(tmp) / "v", PruneSpec(vocab_from=str(source), vocab_size=size))
                prune_s = time.perf_counter() - start
                label = f"vocabulary from {name} ({report['changes'][-1]}, {prune_s:.0f} s)"
                rows.append(row(label, measure(str(Path(tmp) / "v"), text), base))
                print(rows[-1], flush=True)
        elif what == "gemma-vocab-heldout":
            # trim from Alpaca's first 48,000 rows; score its last 300 (English instructions the trim never saw)
            records = alpaca_records()
            domain = Path(tmp) / "alpaca-train.txt"
            domain.write_text(alpaca_text(records[:48000], "\n"), encoding="utf-8")
            held_out = alpaca_text(records[-300:], "\n\n")
            base = measure("gemma3-270m", held_out)
            rows = [row("Gemma 3 270M (dequantized Q4_K_M)", base, base)]
            for size in (None, 94000):
                report = prune_model("gemma3-270m", Path(tmp) / "v", PruneSpec(vocab_from=str(domain), vocab_size=size))
                m = measure(str(Path(tmp) / "v"), held_out)
                change = 100 * (m["bits_per_byte"] / base["bits_per_byte"] - 1)
                rows.append(row(f"{report['changes'][-1]} ({change:+.2f}% bits/byte)", m, base))
                print(rows[-1], flush=True)
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
