"""QLoRA against LoRA: the same banking77 recipe (recipes/banking77-head-lora.yaml: a classification head and LoRA
r=16 on every linear of SmolLM2-135M), once over the float base and once over the int4 base (`--quant int4`, which
stays int4 in memory while the adapters train), then each scored on the whole banking77 test set.

    .venv/bin/python bench/bench_qlora.py --steps 300        # a bounded run: 300 steps of 16 messages (about half an epoch)
    .venv/bin/python bench/bench_qlora.py --steps 300 --seed 1   # another data order and initialization: the spread
    .venv/bin/python bench/bench_qlora.py --steps 300 --grad-checkpoint   # activations recomputed in backward (less memory)

Each run is its own process under /usr/bin/time -v (peak resident memory, wall and CPU time); accuracy and macro-F1
come from `pocketlm eval OUT --task classify --by head --data banking77` (3,080 rows). Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POCKETLM = [sys.executable, "-m", "pocketlm.cli"]


def timed(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    stats = {}
    for key, pattern in (("peak_rss_mb", r"Maximum resident set size \(kbytes\): (\d+)"), ("wall", r"Elapsed \(wall clock\) time.*: (\S+)"),
                         ("user_s", r"User time \(seconds\): ([\d.]+)")):
        m = re.search(pattern, done.stderr)
        stats[key] = m.group(1) if m else None
    stats["peak_rss_mb"] = round(int(stats["peak_rss_mb"]) / 1024) if stats["peak_rss_mb"] else None
    return done, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="runs/bench-qlora", help="where the two runs are written")
    p.add_argument("--threads", default="1", help="OMP_NUM_THREADS of each run (default 1: two shared cores)")
    p.add_argument("--bases", nargs="+", default=["none", "int4"], help="--quant of each run: none (LoRA on the float base), int4 (QLoRA)")
    p.add_argument("--seed", type=int, default=0, help="finetune's --seed (data order and initialization) for every run")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="finetune's --grad-checkpoint in every run: activations recomputed in backward, as the QLoRA paper trains")
    p.add_argument("--results", default="bench_qlora.jsonl", help="finished runs (JSON lines); a rerun skips them")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": args.threads, "POCKETLM_THREADS": args.threads}
    results = Path(args.results)
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    rows = []
    for quant in args.bases:
        have = next((r for r in done if r["quant"] == quant and r["steps"] == args.steps and r.get("seed", 0) == args.seed
                     and r.get("grad_checkpoint", False) == args.grad_checkpoint), None)
        if have is not None:
            rows.append(have)
            print(json.dumps(have), flush=True)
            continue
        out = Path(args.out) / f"b77-head-lora-{quant}{'-gc' if args.grad_checkpoint else ''}" / f"seed-{args.seed}"
        # a checkpoint every 50 steps: a killed run goes on with --resume (its peak memory is then the resumed part's)
        resume = ["--resume"] if (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*[0-9]")) else []
        cmd = [*POCKETLM, "finetune", "--config", str(REPO / "recipes" / "banking77-head-lora.yaml"), "-o", str(out),
               "--steps", str(args.steps), "--quant", quant, "--seed", str(args.seed), "--eval-max", "100", "--save-every", "50",
               "--quiet", *(["--grad-checkpoint"] if args.grad_checkpoint else []), *resume]
        _, train = timed(cmd, env)
        train["resumed"] = bool(resume)
        done, _ = timed([*POCKETLM, "eval", str(out), "--task", "classify", "--by", "head", "--data", "banking77", "--json", "--quiet"], env)
        metrics = json.loads(done.stdout)["metrics"]
        row = {"base": "float32 (LoRA)" if quant == "none" else f"{quant} (QLoRA)", "quant": quant, "steps": args.steps, "seed": args.seed,
               "grad_checkpoint": args.grad_checkpoint, **train,
               "accuracy": metrics["accuracy"], "macro_f1": metrics.get("macro_f1")}
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print("| base | steps of 16 | seed | grad checkpoint | train wall | train CPU s | peak RSS | banking77 test accuracy | macro-F1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f1 = f"{r['macro_f1']:.2%}" if r["macro_f1"] is not None else ""
        print(f"| {r['base']} | {r['steps']} | {r.get('seed', 0)} | {'yes' if r.get('grad_checkpoint') else 'no'} | {r['wall']} | {r['user_s']} | {r['peak_rss_mb']} MB | {r['accuracy']:.2%} | {f1} |")


if __name__ == "__main__":
    main()
