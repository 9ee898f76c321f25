"""`pocketlm run` decode speed with one core busy with another job, against the same run on a quiet machine.

    .venv/bin/python bench/bench_threads.py [--rounds 3] [--model smollm2] [--new-tokens 128]

Each round runs every setting once, in turn (so a change in the machine's other load falls on all of them):
the default thread count (pocketlm/threads.py: one per idle core), --threads 1, --threads 2, and --threads 2 with
OMP_WAIT_POLICY=passive; each quiet, then beside `python -c "while True: pass"` pinned to the last core with
taskset. Prints the median decode tokens/s of each (from `run --json`), the threads the default chose, and each
busy median as a share of the quiet default's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "Write a long story about a dragon who learns to read."
SETTINGS = {
    "default": ([], {}),
    "--threads 1": (["--threads", "1"], {}),
    "--threads 2": (["--threads", "2"], {}),
    "--threads 2, OMP_WAIT_POLICY=passive": (["--threads", "2"], {"OMP_WAIT_POLICY": "passive"}),
}


def run_once(model: str, new_tokens: int, flags: list[str], env: dict) -> dict:
    cmd = [sys.executable, "-m", "pocketlm.cli", "run", model, PROMPT, "-n", str(new_tokens), "--temperature", "0", "--json", *flags]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "POCKETLM_THREADS")} | env
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    speeds: dict[tuple[str, str], list[float]] = {}
    chosen: dict[str, list[int]] = {"quiet": [], "busy": []}
    run_once(args.model, 8, [], {})  # the model converted and quantized into the cache, the page cache warm
    for r in range(args.rounds):
        for load in ("quiet", "busy"):
            hog = None
            if load == "busy":
                hog = subprocess.Popen(["taskset", "-c", str(cpus[-1]), sys.executable, "-c", "while True: pass"])
                time.sleep(1)
            try:
                for name, (flags, env) in SETTINGS.items():
                    out = run_once(args.model, args.new_tokens, flags, env)
                    speeds.setdefault((load, name), []).append(out["decode_tokens_per_s"])
                    if name == "default":
                        chosen[load].append(out.get("threads"))
                    print(f"round {r + 1} {load:5} {name:40} {out['decode_tokens_per_s']:6.1f} tok/s "
                          f"({out['completion_tokens']} tokens)", flush=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    quiet = statistics.median(speeds[("quiet", "default")])
    print(f"\nCPU: {cpu_name()}, {len(cpus)} cores; load average now {os.getloadavg()}")
    print(f"threads the default chose: quiet {chosen['quiet']}, busy {chosen['busy']}")
    print(f"{'setting':40} {'quiet tok/s':>12} {'busy tok/s':>11} {'busy / quiet default':>21}")
    for name in SETTINGS:
        q, b = statistics.median(speeds[("quiet", name)]), statistics.median(speeds[("busy", name)])
        print(f"{name:40} {q:12.1f} {b:11.1f} {b / quiet:21.0%}")


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


if __name__ == "__main__":
    main()
