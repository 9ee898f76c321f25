"""Training checkpoints: written whole or not at all, and read back for `--resume`.

OUT/checkpoints/step-000100/
    trainable.safetensors   the parameters the optimizer updates (all of them, or only LoRA's + a head)
    optimizer.pt            AdamW and scheduler state dicts, torch RNG state (torch.save; read weights_only)
    state.json              step, data position, the config that made it, world size

A checkpoint is written under step-N.tmp and renamed; `latest()` never sees a half-written one, so a
kill at any moment leaves the previous checkpoint usable. Only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pocketlm.errors import PocketLMError

# settings that change the numbers: a resume with a different one would not continue the same run
MUST_MATCH = (
    "model", "data", "task", "template", "system", "seq_len", "pack", "group_by_length", "lr", "min_lr_ratio", "warmup_steps",
    "warmup_ratio", "weight_decay", "max_grad_norm", "lora_r", "lora_alpha", "lora_targets", "pooling", "head_lr", "seed",
    "freeze_embeddings", "teacher", "kd_loss", "kd_temperature", "kd_weight", "hidden_weight", "teacher_top_k",
    "quant", "dpo_beta",
)


def save(folder: Path, step: int, params: dict[str, torch.Tensor], optimizer, scheduler, state: dict, keep: int) -> Path:
    root = folder / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in params.items()}, tmp / "trainable.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()},
            tmp / "optimizer.pt",
        )
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    except BaseException as e:  # a full disk, Ctrl-C: the earlier checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        from pocketlm.cache import out_of_space

        if isinstance(e, Exception) and out_of_space(e, root):
            kept = latest(folder)
            raise PocketLMError(f"no space left on the device for the checkpoint of step {step} in {root}: free some space, then "
                                + (f"--resume goes on from {kept.name}" if kept else "start again")) from None
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in complete(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = folder / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp")
                  and (p / "state.json").is_file())


def latest(folder: Path) -> Path | None:
    found = complete(folder)
    return found[-1] if found else None


def load(path: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler, config: dict, world_size: int) -> dict:
    """Restore parameters, optimizer, scheduler and RNG from `path`; return its state.json."""
    state = json.loads((path / "state.json").read_text())
    saved_cfg = state.get("config", {})
    changed = [k for k in MUST_MATCH if saved_cfg.get(k) != config.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {saved_cfg.get(k)!r} -> {config.get(k)!r}" for k in changed[:4])
        raise PocketLMError(f"--resume: {path} was made with other settings ({detail}); use a new output folder or the same settings")
    if state.get("global_batch") != config["batch_size"] * config["grad_accum"] * world_size:
        raise PocketLMError(
            f"--resume: {path} used a global batch of {state.get('global_batch')}; now it is "
            f"{config['batch_size']} x {config['grad_accum']} x {world_size} processes"
        )
    tensors = load_file(path / "trainable.safetensors")
    if set(tensors) != set(params):
        raise PocketLMError(f"--resume: {path} holds other parameters than this run trains")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    blob = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if os.environ.get("RANK", "0") == "0":  # torchrun: process 0 says it
        print(f"resumed from {path} (step {state['step']} of {state.get('total_steps', '?')})", file=sys.stderr, flush=True)
    return state
