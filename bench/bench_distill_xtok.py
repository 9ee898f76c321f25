"""Cross-tokenizer distillation against the labels alone: the same student, data, steps and seed, with and without a
teacher of another tokenizer (docs/BENCHMARKS.md, "Distillation across tokenizers").

    pocketlm finetune --config recipes/banking77-gemma-gen.yaml -o runs/gemma-b77        # the teacher
    .venv/bin/python bench/bench_distill_xtok.py --teacher runs/gemma-b77 -o runs/xtok --rows 800 --steps 100

Each run is recipes/distill-xtok-banking77.yaml's settings (SmolLM2-135M-Instruct with LoRA, banking77 by
generation) on the first --rows of a seeded shuffle of the training set; the held-out split is --eval-max random
rows of the test set, scored by the student's own cross-entropy on the labels and by greedy answers (accuracy).
Variants: `labels` (pocketlm finetune, no teacher), `xtok` (pocketlm distill: aligned-chunk likelihoods, kd_weight
0.5), with --xtok-top-k K also `xtok+top-k` (the teacher's K likeliest tokens at each chunk's start), and with
--on-policy F also `xtok+on-policy`. Prints one JSON object per run and a table at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "distill-xtok-banking77.yaml"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the fine-tuned teacher (another tokenizer than the student's)")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--rows", type=int, default=800, help="training rows (a seeded shuffle of banking77 train)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-max", type=int, default=200)
    p.add_argument("--on-policy", type=float, default=0.0, help="also run with this share of each batch on-policy")
    p.add_argument("--xtok-top-k", type=int, default=0, help="also run with the teacher's top K tokens at each chunk's start")
    p.add_argument("--kd-weight", type=float, help="the teacher's share of the loss in every distilled variant (default: the recipe's)")
    p.add_argument("--only", nargs="*", help="run only these variants (labels, xtok, xtok+top-k, xtok+on-policy)")
    return p


def run_configs(args: argparse.Namespace, out: Path) -> dict:
    """Each variant's config, by name; writes the training rows they share under `out`."""
    from pocketlm.compress.distill_config import DistillConfig
    from pocketlm.eval.data import shared_data_dir
    from pocketlm.finetune import FinetuneConfig

    out.mkdir(parents=True, exist_ok=True)
    rows = (shared_data_dir() / "banking77" / "train.jsonl").read_text().splitlines()
    random.Random(0).shuffle(rows)
    train = out / f"train-{args.rows}.jsonl"
    train.write_text("\n".join(rows[: args.rows]) + "\n")
    base = DistillConfig.from_yaml(RECIPE, {"teacher": args.teacher, "data": str(train), "steps": args.steps, "eval_max": args.eval_max,
                                            "quiet": True, "out": str(out / "unused"),
                                            **({"kd_weight": args.kd_weight} if args.kd_weight is not None else {})}).to_dict()
    # the same run without a teacher: finetune's own settings, less its distillation ones
    no_teacher = ("teacher", "kd_loss", "kd_temperature", "kd_weight")
    plain = {k: v for k, v in base.items() if k in {f.name for f in dataclasses.fields(FinetuneConfig)} and k not in no_teacher}
    variants = {"labels": None, "xtok": {}}  # each variant's changes to the distillation config; None: no teacher
    if args.xtok_top_k:
        variants["xtok+top-k"] = {"xtok_top_k": args.xtok_top_k}
    if args.on_policy:
        variants["xtok+on-policy"] = {"on_policy": args.on_policy}
    configs = {}
    for name, changes in variants.items():
        if args.only and name not in args.only:
            continue
        run_out = str(out / name.replace("+", "-"))
        configs[name] = (FinetuneConfig.from_dict({**plain, "out": run_out}) if changes is None
                         else DistillConfig.from_dict({**base, **changes, "out": run_out}))
    return configs


def main() -> int:
    args = parser().parse_args()
    from pocketlm.compress.distill_recipe import distill
    from pocketlm.finetune import finetune

    configs = run_configs(args, Path(args.out))
    results = {}
    for name, cfg in configs.items():
        start = time.perf_counter()
        summary = finetune(cfg) if name == "labels" else distill(cfg)
        results[name] = {"eval_loss": summary["eval"]["eval_loss"], "accuracy": summary["eval"].get("eval_accuracy"),
                         "steps": summary["steps"], "seconds": round(time.perf_counter() - start)}
        print(json.dumps({"variant": name, **results[name]}), flush=True)
    print(f"\n| variant | held-out loss (nats/token) | accuracy ({args.eval_max} test rows) | seconds |\n|---|---:|---:|---:|")
    for name, r in results.items():
        acc = f"{100 * r['accuracy']:.1f}%" if r["accuracy"] is not None else "-"
        print(f"| {name} | {r['eval_loss']:.4f} | {acc} | {r['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
