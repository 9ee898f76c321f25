"""Calibrated int4 against round-to-nearest: perplexity of the float model, RTN, GPTQ and AWQ, and how much of RTN's
perplexity increase each calibrated method leaves (issue 27's target: at most 1/3 at groups of 32, 1/2 at 128).

    .venv/bin/python bench/bench_quantize.py                                   # SmolLM2 and Gemma 3 270M, groups 32 and 128
    .venv/bin/python bench/bench_quantize.py --models smollm2-135m-instruct --groups 64 --eval-tokens 2048

The float model is the dequantized GGUF (`pocketlm eval MODEL --task perplexity --quant none`), RTN is
`--quant int4` / `int4-g128` (quantize_groups), GPTQ and AWQ are pocketlm.quant.calibrate on a calibration text no
evaluation text comes from: 3,000 Alpaca rows (seeded sample of /work/shared/data/alpaca, instruction + input +
output). Evaluated on the first --eval-tokens tokens of WikiText-2 test (the shared copy, rows joined as the usual
recipe does) and of a text no one tuned on: chapters I-III of Little Women (Project Gutenberg eBook #37106,
bench/data/little_women_ch1-3.txt), in windows of 1,024 tokens without overlap (the GPTQ paper's protocol).
Every result is appended to --results (JSON lines) as it comes, so a killed run goes on where it stopped.
`--methods gptq-in-order` is GPTQ with the columns in their order (each group's grid found as the loop reaches it, the
reference's default) instead of act order; `--calib-text wikitext2-rest` calibrates on text of WikiText-2's kind.

    .venv/bin/python bench/bench_quantize.py --budget-fraction 0.5 --models gemma3-270m   # the KL budget instead
    .venv/bin/python bench/bench_quantize.py --max-bits 5 --models gemma3-270m            # the least KL within 5 bits

--budget-fraction F: uniform int4 (round-to-nearest, --budget-scheme) against `pocketlm quantize --budget` (GPTQ,
pocketlm.quant.calibrate.budget_search) given F times uniform int4's KL as its budget: bits per weight of the
decoder layers' linears and KL(float || quantized), on the calibration tokens the search measures (the last
--kl-tokens of the calibration text, sequences of 512, held out of what GPTQ calibrates on) and on the WikiText-2
evaluation tokens (windows of 1,024). `--calib-text wikitext2-rest` calibrates on the second half of WikiText-2 test
instead (the evaluation reads its first 4,096 tokens): how much of the gap on WikiText-2 is the calibration text's kind.
--max-bits B: the search given a bits cap instead of a budget (`pocketlm quantize --max-bits`): the least KL it finds
within B bits per weight, against uniform int4's at its 5.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TEXTS = {"wikitext2": SHARED / "wikitext2_raw" / "test.txt", "little-women": REPO / "bench" / "data" / "little_women_ch1-3.txt"}


def cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({isa}), {len([l for l in info.splitlines() if l.startswith('processor')])} cores"


def alpaca_text(rows: int = 3000, seed: int = 0) -> str:
    data = [json.loads(line) for line in (SHARED / "alpaca" / "alpaca_data.jsonl").read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(data)
    return "".join(r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") + f"\n\n{r['output']}\n\n" for r in data[:rows])


def wikitext2_rest() -> str:
    """The second half of WikiText-2 test: text of the evaluation's kind that no evaluation window reads."""
    from pocketlm.eval.data import read_text

    text = read_text(TEXTS["wikitext2"], True)
    return text[text.index("\n\n", len(text) // 2) :].lstrip()  # from the first paragraph break past the middle


def eval_ids(tokenizer, name: str, tokens: int) -> list[int]:
    from pocketlm.engine.generate import encode_raw
    from pocketlm.eval.data import read_text

    return encode_raw(tokenizer, read_text(TEXTS[name], name == "wikitext2"))[:tokens]


METHODS = ("gptq", "gptq-in-order", "awq", "awq+gptq")  # calibrated; gptq-in-order: columns in order, each group's grid found as reached


def run_one(model: str, method: str, group: int, args, calib: str) -> dict:
    """Perplexity of one (model, method, group) on every text; float when method is "float"."""
    from pocketlm.eval.perplexity import perplexity
    from pocketlm.load import load
    from pocketlm.quant import QuantScheme
    from pocketlm.quant.calibrate import CalibConfig, calibrate, calibration_ids

    scheme = "int4" if group == 32 else f"int4-g{group}"
    start = time.perf_counter()
    lm = load(model, quant=scheme if method == "rtn" else "none")
    calib_s = 0.0
    calibrated = method in METHODS
    if calibrated:
        ids = calibration_ids(lm.tokenizer, calib, args.calib_tokens, 512)
        base_method, _, variant = method.partition("-")  # gptq-in-order: GPTQ with act_order off (the reference's default)
        report = calibrate(lm.model, ids, QuantScheme.parse(scheme), CalibConfig(method=base_method, act_order=variant != "in-order", quiet=True))
        calib_s = report["seconds"]
    row = {"model": model, "method": method, "group": group, "calib_tokens": args.calib_tokens if calibrated else 0,
           "calib_text": args.calib_text if calibrated else None,
           "eval_tokens": args.eval_tokens, "calib_s": calib_s, "load_s": round(time.perf_counter() - start - calib_s, 1)}
    for text in args.texts:
        t0 = time.perf_counter()
        result = perplexity(lm.model, eval_ids(lm.tokenizer, text, args.eval_tokens), window=1024, stride=1024)
        row[text] = result["perplexity"]
        row[f"{text}_tokens"] = result["tokens"]
        row[f"{text}_s"] = round(time.perf_counter() - t0, 1)
    return row


def same_calibration(row: dict, args) -> bool:
    """Whether a stored row was calibrated as this run asks (float and RTN rows are not calibrated at all)."""
    return row["method"] in ("float", "rtn") or (row["calib_tokens"], row.get("calib_text", "alpaca")) == (args.calib_tokens, args.calib_text)


def run_budget(model: str, args, calib: str) -> dict:
    """Uniform int4 against the KL-budget search given args.budget_fraction times uniform int4's KL (or args.max_bits)."""
    from pocketlm.eval.agreement import agreement_stats
    from pocketlm.load import load
    from pocketlm.quant import QuantScheme
    from pocketlm.quant.calibrate import CalibConfig, budget_search, calibrate, calibration_ids, held_out, kind_bits

    ref = load(model, quant="none")
    cfg = CalibConfig(method="gptq", tokens=args.calib_tokens, kl_tokens=args.kl_tokens, quiet=True)
    ids = calibration_ids(ref.tokenizer, calib, args.calib_tokens, 512)  # (n, 512)
    fit_ids, kl_ids = held_out(ids, cfg.kl_tokens)  # what budget_search measures its KL on, and GPTQ calibrates on
    held = torch.tensor(eval_ids(ref.tokenizer, "wikitext2", args.eval_tokens))

    def kl(model_q) -> tuple[float, float]:
        on_calib = agreement_stats(model_q, ref.model, kl_ids.reshape(-1), kl_ids.shape[1], kl_ids.shape[1])["kl_mean"]
        return on_calib, agreement_stats(model_q, ref.model, held, 1024, 1024)["kl_mean"]

    uniform = load(model, quant=args.budget_scheme)
    u_calib, u_held = kl(uniform.model)
    del uniform
    gptq_kl = {}
    if args.vs_gptq:  # uniform int4 by GPTQ on the tokens the search calibrates on: what the mix of bits adds to GPTQ's
        uniform = load(model, quant="none")
        calibrate(uniform.model, fit_ids, QuantScheme.parse(args.budget_scheme), cfg)
        gptq_kl = dict(zip(("uniform_gptq_kl_calib", "uniform_gptq_kl_wikitext2"), kl(uniform.model)))
        del uniform
    group = QuantScheme.parse(args.budget_scheme).group_size
    start = time.perf_counter()
    budget = args.budget_fraction * u_calib if args.budget_fraction is not None else None
    quantized, report = budget_search(ref, lambda: load(model, quant="none"), QuantScheme.parse(args.budget_scheme), ids,
                                      budget, cfg, args.max_bits)
    search_s = round(time.perf_counter() - start, 1)
    return {"model": model, "method": "budget", "scheme": args.budget_scheme, "fraction": args.budget_fraction, "max_bits": args.max_bits,
            "calib_tokens": args.calib_tokens, "calib_text": args.calib_text, "eval_tokens": args.eval_tokens, "kl_tokens": int(kl_ids.numel()),
            "uniform_bits": kind_bits(f"int4-g{group}", 1), "uniform_kl_calib": u_calib, "uniform_kl_wikitext2": u_held,
            "budget": report["budget"], "bits": report["bits_per_weight"], "kl_calib": report["kl_measured"],
            "kl_wikitext2": agreement_stats(quantized, ref.model, held, 1024, 1024)["kl_mean"], "kinds": report["kinds"],
            "rounds": len(report["rounds"]), "search_s": search_s, **gptq_kl}


def budget_table(rows: list[dict]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    head = ["model", "uniform int4 (RTN): bits", "KL calib", "KL WikiText-2", "budget", "max bits", "search: bits", "KL calib", "KL WikiText-2",
            "KL / uniform's (calib, WikiText-2)", "uniform GPTQ's KL (calib, WikiText-2)", "kinds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kinds = ", ".join(f"{k} {n}" for k, n in r["kinds"].items())
        lines.append(f"| {r['model']} | {r['uniform_bits']:.2f} | {r['uniform_kl_calib']:.4f} | {r['uniform_kl_wikitext2']:.4f} | "
                     f"{fmt(r['budget'], '.4f')} | {fmt(r.get('max_bits'), 'g')} | {r['bits']:.2f} | {r['kl_calib']:.4f} | {r['kl_wikitext2']:.4f} | "
                     f"{r['kl_calib'] / r['uniform_kl_calib']:.2f}, {r['kl_wikitext2'] / r['uniform_kl_wikitext2']:.2f} | "
                     f"{fmt(r.get('uniform_gptq_kl_calib'), '.4f')}, {fmt(r.get('uniform_gptq_kl_wikitext2'), '.4f')} | {kinds} |")
    return "\n".join(lines)


def table(rows: list[dict], texts: list[str]) -> str:
    """One line per (model, text, group): each method's perplexity and its increase as a fraction of RTN's."""
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    names = {"gptq": "GPTQ", "gptq-in-order": "GPTQ in order", "awq": "AWQ", "awq+gptq": "AWQ+GPTQ"}
    head = ["model", "text", "group", "float", "RTN"] + [names[m] for m in methods] + [f"{names[m]} / RTN increase" for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {(r["model"], r["method"], r["group"]): r for r in rows}
    groups = sorted({r["group"] for r in rows if r["method"] != "float"})
    for model in dict.fromkeys(r["model"] for r in rows):
        base_row = by.get((model, "float", 0), {})
        for text in texts:
            for g in groups:
                base, rtn = base_row.get(text), by.get((model, "rtn", g), {}).get(text)
                if base is None or rtn is None:
                    continue
                got = [by.get((model, m, g), {}).get(text) for m in methods]
                cells = [f"{v:.3f} ({(v - base) / base:+.1%})" if v is not None else "" for v in [rtn, *got]]
                ratios = [f"{(v - base) / (rtn - base):.2f}" if v is not None else "" for v in got]
                lines.append(f"| {model} | {text} | {g} | {base:.3f} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    p.add_argument("--groups", nargs="+", type=int, default=[32, 128])
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"], choices=["rtn", *METHODS])
    p.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (sequences of 512)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each evaluation text")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on two shared cores two threads wait on each other)")
    p.add_argument("--results", default="bench_quantize.jsonl", help="results so far (JSON lines); a rerun skips what it holds")
    p.add_argument("--budget-fraction", type=float, help="the KL budget instead: --budget at this fraction of uniform int4's KL")
    p.add_argument("--max-bits", type=float, help="the search within this many bits per weight instead (or with --budget-fraction)")
    p.add_argument("--vs-gptq", action="store_true", help="with --max-bits / --budget-fraction: uniform int4 by GPTQ's KL too")
    p.add_argument("--budget-scheme", default="int4", help="the uniform int4 it is measured against (default int4: groups of 32)")
    p.add_argument("--calib-text", choices=["alpaca", "wikitext2-rest"], default="alpaca",
                   help="calibration text (default alpaca; wikitext2-rest: WikiText-2 test's second half, which no evaluation window reads)")
    p.add_argument("--kl-tokens", type=int, default=1024, help="calibration tokens the search measures KL on (default 1024)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results_path = Path(args.results)
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    searched = args.budget_fraction is not None or args.max_bits is not None
    calib = wikitext2_rest() if args.calib_text == "wikitext2-rest" else alpaca_text()
    if searched:
        print(f"CPU: {cpu_name()}; torch threads {args.threads}; calibration: {args.calib_tokens} tokens of {args.calib_text}; "
              f"held-out KL: the first {args.eval_tokens} tokens of WikiText-2, windows of 1024", flush=True)
        for model in args.models:
            key = (model, "budget", args.budget_scheme, args.budget_fraction, args.max_bits, args.calib_tokens, args.eval_tokens,
                   args.kl_tokens, args.calib_text)
            if not any((r["model"], r["method"], r.get("scheme"), r.get("fraction"), r.get("max_bits"), r["calib_tokens"],
                        r.get("eval_tokens"), r.get("kl_tokens"), r.get("calib_text", "alpaca")) == key
                       for r in done):
                row = run_budget(model, args, calib)
                done.append(row)
                with results_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
        print(budget_table([r for r in done if r["method"] == "budget" and r["model"] in args.models
                            and (r["scheme"], r["fraction"], r.get("max_bits"), r["calib_tokens"], r.get("calib_text", "alpaca"))
                            == (args.budget_scheme, args.budget_fraction, args.max_bits, args.calib_tokens, args.calib_text)]))
        return
    done = [r for r in done if r["method"] != "budget" and r.get("eval_tokens") == args.eval_tokens]
    print(f"CPU: {cpu_name()}; torch threads {args.threads}; calibration: {args.calib_tokens} tokens of {args.calib_text}; "
          f"evaluation: the first {args.eval_tokens} tokens of {', '.join(args.texts)}, windows of 1024", flush=True)
    for model in args.models:
        jobs = [("float", 0)] + [(m, g) for g in args.groups for m in args.methods]
        for method, group in jobs:
            have = next((r for r in done if (r["model"], r["method"], r["group"]) == (model, method, group)
                         and all(t in r for t in args.texts) and same_calibration(r, args)), None)
            if have is None:
                have = run_one(model, method, group, args, calib)
                done.append(have)
                with results_path.open("a") as f:
                    f.write(json.dumps(have) + "\n")
            print(json.dumps(have), flush=True)
    rows = [r for r in done if r["model"] in args.models and (r["group"] in args.groups or r["method"] == "float")
            and same_calibration(r, args)]
    print(table(rows, args.texts))


if __name__ == "__main__":
    main()
