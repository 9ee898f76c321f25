"""Training-step speed of SmolLM2-135M on banking77, counted in CPU seconds.

    .venv/bin/python bench/bench_finetune.py            # all variants, 3 rounds, prints a JSON summary

One step = forward, backward and a fused AdamW step, through the recipe's own CausalLMLoss, on 8 real
banking77 examples in the recipe's chat format. One thread and time.process_time(): on a shared
machine wall-clock time measures the neighbours; CPU time of one thread (no OpenMP spin-waiting)
measures the work. Variants run in turns, so slow periods hit them alike; the first round is warm-up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pocketlm.finetune.config import FinetuneConfig
from pocketlm.finetune.data import build_examples, collate, read_jsonl
from pocketlm.finetune.lora import apply_lora, enable_grad_checkpointing, unwrap
from pocketlm.finetune.recipe import CausalLMLoss
from pocketlm.load import load

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "banking77.yaml"
VARIANTS = ["full", "full+bf16", "full+ckpt", "lora", "lora+bf16", "lora+ckpt"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = FinetuneConfig.from_yaml(RECIPE, {"out": "unused"})
    runs = {}
    for name in args.variants.split(","):
        lm = load(cfg.model)
        with torch.no_grad():
            for p in lm.model.parameters():
                p.data = p.data.clone()  # off the read-only memory map, as the recipe does
        model = lm.model
        if name.startswith("lora"):
            model = unwrap(apply_lora(model, 16, 32, 0.0, cfg.lora_targets))
        if "ckpt" in name:
            enable_grad_checkpointing(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
        runs[name] = (CausalLMLoss(model), opt, "bf16" in name)
    examples = build_examples(lm.tokenizer, read_jsonl(cfg.data)[: args.batch], cfg)
    batch = collate(examples, lm.tokenizer.pad_id or 0)
    n = int(batch["lengths"].sum())
    print(f"{n} tokens, padded {tuple(batch['ids'].shape)}", flush=True)
    best = {}
    for r in range(args.rounds):
        for name, (module, opt, bf16) in runs.items():
            start = time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = module(batch["ids"], batch["labels"], batch["lengths"])
            loss.backward()
            opt.step()
            opt.zero_grad()
            cpu = time.process_time() - start
            if r:  # round 0 is warm-up (allocates the AdamW state)
                best[name] = max(best.get(name, 0.0), n / cpu)
            print(f"round {r} {name:10} {cpu:6.2f} CPU s  {n / cpu:6.1f} tokens per CPU s", flush=True)
    print(json.dumps({k: round(v, 1) for k, v in best.items()}))


if __name__ == "__main__":
    main()
