"""Label log-likelihood scoring: the KV-cache way against one batched forward per label, same examples, same run.

    .venv/bin/python bench/bench_eval_loglik.py [--model smollm2-135m-instruct] [--examples 4] [--batch-examples 1]

For banking77 (77 labels, a ~600-token shared prefix listing them) and sst2 (2 single-token labels) zero-shot,
scores the same test examples with pocketlm.eval.loglik's "cache" and "batch" methods, alternating them
example by example (this machine's speed drifts), checks that both give the same scores, and prints the median
seconds per example (the batch method on the first --batch-examples only: it takes minutes per banking77 example). Reads ../shared/data (or $POCKETLM_DATA).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pocketlm.eval.loglik import ChoiceScorer
from pocketlm.eval.tasks import EvalConfig, Prompter, prepare, use_chat
from pocketlm.load import load


def bench(lm, data: str, examples: int, batch_examples: int) -> dict:
    cfg = EvalConfig(task="classify", data=data, limit=examples, seed=0)
    prepared = prepare(cfg)
    prompter = Prompter(prepared.spec, lm.tokenizer, prepared.labels, [], use_chat(cfg, lm.tokenizer))
    prefix, _ = prompter.encode(prepared.records[0])
    conts = [lm.tokenizer.encode(prompter.target_text({"label": label}), add_special_tokens=False)
             for label in prepared.labels]
    times = {"cache": [], "batch": []}
    start = time.perf_counter()
    scorers = {m: ChoiceScorer(lm.model, prefix, conts, lm.context_length, m) for m in times}
    prefix_s = time.perf_counter() - start
    worst = 0.0
    for i, record in enumerate(prepared.records):
        _, query = prompter.encode(record)
        scores = {}
        for method, scorer in scorers.items():
            if method == "batch" and i >= batch_examples:  # minutes per example with 77 labels
                continue
            t = time.perf_counter()
            scores[method] = scorer.score(query)
            times[method].append(time.perf_counter() - t)
        if "batch" in scores:
            worst = max(worst, (scores["cache"] - scores["batch"]).abs().max().item())
    return {
        "data": data, "labels": len(conts), "label_tokens": sum(map(len, conts)), "prefix_tokens": len(prefix),
        "prefix_s": prefix_s, "max_abs_diff": worst,
        **{f"{m}_s": statistics.median(v) if v else float("nan") for m, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--batch-examples", type=int, default=1, help="examples timed with the slow batch method")
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load(args.model)
    print(f"{args.model}, {torch.get_num_threads()} threads, median seconds per example")
    print("| data | labels | label tokens | prefix tokens | cache s/example | batch s/example | batch / cache | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for data in ("sst2", "banking77"):
        r = bench(lm, data, args.examples, args.batch_examples)
        print(f"| {r['data']} | {r['labels']} | {r['label_tokens']} | {r['prefix_tokens']} | {r['cache_s']:.3f} | "
              f"{r['batch_s']:.3f} | {r['batch_s'] / r['cache_s']:.1f}x | {r['max_abs_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
