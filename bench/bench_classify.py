"""Two classifiers (`pocketlm finetune --task classify` folders: a teacher and its pruned, distilled student)
on the same labelled texts, in one process: accuracy, and throughput in texts per second measured in
interleaved rounds (teacher, student, teacher, ...) so that a noisy machine slows both alike.

    .venv/bin/python bench/bench_classify.py runs/b77-head-lora runs/b77-student --data banking77 [--rounds 3]

Each round classifies every text once (batches of 32 texts of about one length, as `pocketlm eval --by head`);
the table gives the median round and the student / teacher ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pocketlm.eval.data import resolve_data
from pocketlm.finetune.classify import Classifier
from pocketlm.finetune.data import read_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teacher")
    ap.add_argument("student")
    ap.add_argument("--data", default="banking77", help="a {text, label} JSONL file or a shared set (default banking77: its test split)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    path, _ = resolve_data(args.data)
    rows = [row for _, _, row in read_jsonl(path)]
    texts, truth = [str(r["text"]) for r in rows], [str(r["label"]) for r in rows]
    models = {"teacher": Classifier.load(args.teacher), "student": Classifier.load(args.student)}
    seconds = {name: [] for name in models}
    accuracy = {}
    for _ in range(args.rounds):
        for name, clf in models.items():
            start = time.perf_counter()
            logits = clf.logits(texts)  # (N, n_labels)
            seconds[name].append(time.perf_counter() - start)
            accuracy[name] = sum(clf.labels[i] == t for i, t in zip(logits.argmax(-1).tolist(), truth)) / len(texts)

    print(f"{len(texts)} texts of {path}, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print("| model | blocks | parameters | accuracy | texts/s | rounds (s) |")
    print("|---|---|---|---|---|---|")
    rate = {}
    for name, clf in models.items():
        rate[name] = len(texts) / statistics.median(seconds[name])
        params = sum(p.numel() for p in clf.model.parameters()) / 1e6
        print(f"| {name} | {clf.model.backbone.cfg.n_layers} | {params:.1f}M | "
              f"{100 * accuracy[name]:.2f}% | {rate[name]:.1f} | {', '.join(f'{s:.1f}' for s in seconds[name])} |")
    print(f"student / teacher: accuracy {accuracy['student'] / accuracy['teacher']:.4f}, "
          f"throughput {rate['student'] / rate['teacher']:.2f}x")


if __name__ == "__main__":
    main()
