"""Cross-tokenizer distillation against the labels alone: the same student, data, steps and seed, with and without a
teacher of another tokenizer (docs/BENCHMARKS.md, "Distillation across tokenizers").

    pocketlm finetune --config recipes/banking77-gemma-gen.yaml -o runs/gemma-b77        # the teacher
    .venv/bin/python bench/bench_distill_xtok.py --teacher runs/gemma-b77 -o runs/xtok --rows 800 --steps 100

    .venv/bin/python bench/bench_distill_xtok.py --task multi30k -o runs/mt --teacher-rows 2400   # the teacher's rows
    pocketlm finetune --config recipes/multi30k-gemma.yaml --data runs/mt/teacher-2400.jsonl -o runs/gemma-mt
    .venv/bin/python bench/bench_distill_xtok.py --task multi30k --teacher runs/gemma-mt -o runs/mt --rows 800 --steps 100

Each run is the task's recipe (recipes/distill-xtok-banking77.yaml: banking77 by generation; recipes/
distill-xtok-multi30k.yaml: English to German; both SmolLM2-135M-Instruct with LoRA) on the first --rows of a
seeded shuffle of the training set; the held-out split is --eval-max random rows of the test set, scored by the
student's own cross-entropy on the references and by greedy answers (banking77: accuracy; multi30k: BLEU and chrF
with `pocketlm eval --task translate`'s prompt, which is the one trained on). Variants: `labels` (pocketlm
finetune, no teacher), `xtok` (pocketlm distill: aligned-chunk likelihoods), `teacher-answers` (the teacher's
greedy answers to the prompts are the targets, sequence-level), with --xtok-top-k K also `xtok+top-k` (the
teacher's K likeliest tokens at each chunk's start), and with --on-policy F also `xtok+on-policy`. Prints one JSON
object per run and a table at the end.
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
RECIPES = {"banking77": REPO / "recipes" / "distill-xtok-banking77.yaml", "multi30k": REPO / "recipes" / "distill-xtok-multi30k.yaml"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(RECIPES), default="banking77")
    p.add_argument("--teacher", help="the fine-tuned teacher (another tokenizer than the student's)")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--rows", type=int, default=800, help="training rows (a seeded shuffle of the task's training set)")
    p.add_argument("--teacher-rows", type=int, help="write a teacher's training rows, train nothing: the last N of the same "
                   "shuffle, which no student run reads (a teacher that has not learned the student's rows by heart)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-max", type=int, default=200, help="held-out rows scored by loss (and by greedy answers)")
    p.add_argument("--translations", type=int, help="multi30k: test sentences translated for BLEU and chrF (default: --eval-max)")
    p.add_argument("--score-only", action="store_true", help="multi30k: train nothing, translate with each variant's model from an earlier run")
    p.add_argument("--on-policy", type=float, default=0.0, help="also run with this share of each batch on-policy")
    p.add_argument("--xtok-top-k", type=int, default=0, help="also run with the teacher's top K tokens at each chunk's start")
    p.add_argument("--kd-weight", type=float, help="the teacher's share of the loss in every distilled variant (default: the recipe's)")
    p.add_argument("--only", nargs="*", help="run only these variants (labels, xtok, teacher-answers, xtok+top-k, xtok+on-policy)")
    return p


def write_rows(task: str, n_rows: int, out: Path, teacher: bool = False) -> tuple[Path, Path | None]:
    """The first n_rows of a seeded shuffle of the task's training set (a teacher's: the last), as the recipe reads
    them, and (multi30k) its held-out rows; files under `out`."""
    from pocketlm.eval.data import shared_data_dir
    from pocketlm.eval.tasks import task_spec

    out.mkdir(parents=True, exist_ok=True)
    folder = shared_data_dir() / ("banking77" if task == "banking77" else "multi30k_en_de")
    rows = (folder / "train.jsonl").read_text().splitlines()
    random.Random(0).shuffle(rows)
    if task == "banking77":  # {text, label} rows are finetune's own
        heldout, convert = None, lambda lines: lines
    else:  # {src, tgt} -> {prompt, completion}, the prompt that `pocketlm eval --task translate` asks with
        heldout, spec = out / "heldout.jsonl", task_spec("translate")
        prompt = spec.instruction + spec.separator + spec.prompt  # the chat prompt's user turn: "Translate ...\n\nEnglish: {src}\nGerman:"
        def convert(lines):
            pairs = [json.loads(line) for line in lines]
            return [json.dumps({"prompt": prompt.format(src=p["src"]), "completion": p["tgt"]}, ensure_ascii=False) for p in pairs]
        heldout.write_text("\n".join(convert((folder / "test_2016_flickr.jsonl").read_text().splitlines())) + "\n")
    train = out / f"{'teacher' if teacher else 'train'}-{n_rows}.jsonl"
    train.write_text("\n".join(convert(rows[-n_rows:] if teacher else rows[:n_rows])) + "\n")
    return train, heldout


def run_configs(args: argparse.Namespace, out: Path) -> dict:
    """Each variant's config, by name; writes the training rows they share under `out`."""
    from pocketlm.compress.distill_config import DistillConfig
    from pocketlm.finetune import FinetuneConfig

    train, heldout = write_rows(args.task, args.rows, out)
    base = DistillConfig.from_yaml(RECIPES[args.task], {
        "teacher": args.teacher, "data": str(train), "steps": args.steps, "eval_max": args.eval_max, "quiet": True,
        "out": str(out / "unused"), **({"eval_data": str(heldout)} if heldout else {}),
        **({"kd_weight": args.kd_weight} if args.kd_weight is not None else {})}).to_dict()
    # the same run without a teacher: finetune's own settings, less its distillation ones
    no_teacher = ("teacher", "kd_loss", "kd_temperature", "kd_weight")
    plain = {k: v for k, v in base.items() if k in {f.name for f in dataclasses.fields(FinetuneConfig)} and k not in no_teacher}
    # each variant's changes to the distillation config; None: no teacher
    variants = {"labels": None, "xtok": {}, "teacher-answers": {"teacher_answers": True}}
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


def translate_test(model_dir: str, n: int) -> dict:
    """BLEU and chrF of greedy translations of n random Multi30k test sentences (pocketlm eval --task translate);
    the translations are kept beside the model (translations.jsonl) for the paired test against the labels' run."""
    from pocketlm.eval.tasks import EvalConfig, evaluate

    result = evaluate(model_dir, EvalConfig(task="translate", limit=n, seed=0, progress=False))
    rows = [{"prediction": e["prediction"], "reference": e["references"][0]} for e in result.examples]
    (Path(model_dir) / "translations.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"bleu": round(result.metrics["bleu"], 2), "chrf": round(result.metrics["chrf"], 2)}


def against_labels(out: Path, names: list[str]) -> dict[str, dict]:
    """Each variant's BLEU and chrF p-values against the labels' run on the same sentences: sacrebleu's paired
    bootstrap resampling (1,000 samples; Koehn 2004), the share of resamples where the difference does not hold."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    def read(name):
        path = out / name.replace("+", "-") / "translations.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else None

    base = read("labels")
    if not base:
        return {}
    references = [r["reference"] for r in base]
    others = {name: rows for name in names if name != "labels" and (rows := read(name)) and [r["reference"] for r in rows] == references}
    if not others:
        return {}
    systems = [("labels", [r["prediction"] for r in base])] + [(name, [r["prediction"] for r in rows]) for name, rows in others.items()]
    _, scores = PairedTest(systems, {"BLEU": BLEU(), "chrF": CHRF()}, [references], test_type="bs", n_samples=1000)()
    return {name: {"p_bleu": scores["BLEU"][i].p_value, "p_chrf": scores["chrF2"][i].p_value} for i, name in enumerate(others, 1)}


def main() -> int:
    args = parser().parse_args()
    out = Path(args.out)
    if args.teacher_rows:
        print(*(p for p in write_rows(args.task, args.teacher_rows, out, teacher=True) if p))
        return 0
    if args.score_only and args.task != "multi30k":
        raise SystemExit("bench_distill_xtok: --score-only translates: it needs --task multi30k")
    if not args.teacher and args.only != ["labels"]:
        raise SystemExit("bench_distill_xtok: --teacher is needed (every variant but --only labels has one)")
    from pocketlm.compress.distill_recipe import distill
    from pocketlm.finetune import finetune

    configs = run_configs(args, out)
    n_translations = args.translations or args.eval_max
    results = {}
    for name, cfg in configs.items():
        if args.score_only:
            results[name] = {"eval_loss": None, "accuracy": None, "seconds": None}
        else:
            start = time.perf_counter()
            summary = finetune(cfg) if name == "labels" else distill(cfg)
            results[name] = {"eval_loss": summary["eval"]["eval_loss"], "accuracy": summary["eval"].get("eval_accuracy"),
                             "steps": summary["steps"], "seconds": round(time.perf_counter() - start)}
        if args.task == "multi30k":
            results[name] |= translate_test(cfg.out, n_translations)
        print(json.dumps({"variant": name, **results[name]}), flush=True)
    if args.task == "multi30k":
        for name, p_values in against_labels(out, list(configs)).items():
            results[name] |= p_values
        print(f"\n| variant | held-out loss (nats/token, {args.eval_max} rows) | BLEU / chrF ({n_translations} test sentences) | "
              "p against labels (BLEU / chrF) | training seconds |\n|---|---:|---:|---:|---:|")
        for name, r in results.items():
            p = f"{r['p_bleu']:.3f} / {r['p_chrf']:.3f}" if "p_bleu" in r else "-"
            loss = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
            print(f"| {name} | {loss} | {r['bleu']:.2f} / {r['chrf']:.2f} | {p} | {r['seconds'] or '-'} |")
        return 0
    print(f"\n| variant | held-out loss (nats/token) | accuracy ({args.eval_max} test rows) | training seconds |\n|---|---:|---:|---:|")
    for name, r in results.items():
        acc = f"{100 * r['accuracy']:.1f}%" if r["accuracy"] is not None else "-"
        print(f"| {name} | {r['eval_loss']:.4f} | {acc} | {r['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
