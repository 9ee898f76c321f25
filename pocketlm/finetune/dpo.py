"""Direct preference optimization: `pocketlm finetune --task dpo`, one recipe with its loop written out.

    pocketlm finetune smollm2 --task dpo --data pairs.jsonl -o out/dpo --lora-r 16 --lr 5e-5 --dpo-beta 0.1
    pocketlm finetune smollm2 --task dpo --data pairs.jsonl -o out/qdpo --lora-r 16 --quant int4    # over an int4 base

Rows are TRL's preference format, {"prompt", "chosen", "rejected"}: strings (the prompt a user message, the answers
the assistant's, in the model's chat template), or lists of {"role", "content"} messages. The loss is Rafailov et
al. 2023's (their eq. 7, TRL's "sigmoid" loss):

    -log sigmoid(beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))])

where log pi(answer) is the summed log-probability of the answer's tokens given the prompt, and ref is the frozen
base model: with LoRA the same model with its adapters switched off (peft's disable_adapter), so no second copy
is held; a full fine-tune keeps a frozen copy. The reference runs on each batch beside the policy, as TRL's
default does. beta * (log pi - log ref) of each answer is its implicit reward; the log reports the mean reward
margin (chosen minus rejected) and how often the chosen answer's reward is the larger (accuracy).

The rest is the fine-tuning recipe's (recipe.py): processes, the quantized base of QLoRA, the seeded data stream,
AdamW with a cosine schedule, global-batch-exact gradients across micro-batches and processes, checkpoints with
--resume, held-out evaluation, the adapter / model folder, metrics.jsonl and loss.png.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.finetune import checkpoint
from pocketlm.finetune.config import FinetuneConfig
from pocketlm.finetune.data import IGNORE, build_pairs, collate, read_jsonl, stream_indices
from pocketlm.finetune.lora import apply_lora, enable_grad_checkpointing, merge, save_adapter, trainable_state, unwrap
from pocketlm.finetune.recipe import (
    _log, _plot, _progress, _publish_model, _read_lines, all_sum, barrier, load_base, lora_method, optimizer_and_schedule,
    setup_processes,
)


def sequence_logps(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ids, labels (B, T) -> (B,): each sequence's summed log-probability of its labelled tokens."""
    h = model.hidden(ids)[:, :-1]  # (B, T-1, D): position t predicts token t+1
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE
    logp = torch.log_softmax(model.logits(h[keep]).float(), dim=-1)  # (N, V) only where a label counts
    token_logp = logp.gather(-1, targets[keep][:, None])[:, 0]  # (N,)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(targets)[keep]  # (N,) each token's sequence
    return torch.zeros(ids.shape[0], device=ids.device).index_add(0, rows, token_logp)


class DPOLoss(nn.Module):
    """The summed DPO loss of B pairs, given as 2B sequences (the B chosen, then the B rejected) and the reference's
    log-probabilities of them. Returns (loss summed over pairs, rewards (B, 2) detached)."""

    def __init__(self, model: nn.Module, beta: float):
        super().__init__()
        self.model, self.beta = model, beta

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor):
        B = ids.shape[0] // 2
        ratios = sequence_logps(self.model, ids, labels) - ref_logps  # (2B,) log pi - log ref
        chosen, rejected = ratios[:B], ratios[B:]
        loss = -F.logsigmoid(self.beta * (chosen - rejected)).sum()
        return loss, self.beta * torch.stack([chosen, rejected], dim=1).detach()  # (B, 2) implicit rewards


def dpo(cfg: FinetuneConfig) -> dict:
    """Run the DPO recipe; returns a summary (steps, final loss, eval metrics, output paths)."""
    procs = setup_processes(cfg)
    out = Path(cfg.out).expanduser()
    torch.manual_seed(cfg.seed)
    rows = read_jsonl(cfg.data)
    eval_rows = read_jsonl(cfg.eval_data) if cfg.eval_data else []

    # ---- the model (float, or QLoRA's quantized base), the pairs
    lm = load_base(cfg)
    model, tokenizer = lm.model, lm.tokenizer
    if tokenizer is None or lm.is_encoder:
        raise PocketLMError(f"{lm.name}: dpo needs a generative model with a tokenizer")
    with torch.no_grad():  # off the read-only memory map: the optimizer writes in place
        for p in model.parameters():
            p.data = p.data.clone()
    model.train()
    pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    if not cfg.eval_data and cfg.eval_split > 0:  # seeded: the same held-out pairs on every process and every resume
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + 1)).tolist()
        n_eval = max(1, int(len(rows) * cfg.eval_split))
        eval_rows, rows = [rows[i] for i in sorted(order[:n_eval])], [rows[i] for i in sorted(order[n_eval:])]
    pairs, eval_pairs = build_pairs(tokenizer, rows, cfg), build_pairs(tokenizer, eval_rows, cfg)[: cfg.eval_max]
    global_batch = cfg.batch_size * cfg.grad_accum * procs.world
    total_steps = cfg.steps or math.ceil(cfg.epochs * len(pairs) / global_batch)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)

    # ---- what trains, and the reference: the frozen base
    peft_model = None
    if cfg.lora:
        peft_model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, base_name=cfg.model)
        model = unwrap(peft_model)
        ref_model, reference = model, peft_model.disable_adapter  # the same weights, the adapters off
    else:
        ref_model, reference = load_base(cfg).model.eval().requires_grad_(False), contextlib.nullcontext
    if cfg.grad_checkpoint:
        enable_grad_checkpointing(model)
    loss_module = DPOLoss(model, cfg.dpo_beta).to(procs.device)
    ref_model.to(procs.device)
    train_module = loss_module
    if procs.world > 1:
        train_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=[procs.device] if procs.device.type == "cuda" else None)
    params = {name: p for name, p in loss_module.named_parameters() if p.requires_grad}

    def ref_logps(batch: dict) -> torch.Tensor:  # (2B,)
        with torch.no_grad(), reference():
            return sequence_logps(ref_model, batch["ids"], batch["labels"])

    # ---- optimizer, schedule, resume
    optimizer, scheduler = optimizer_and_schedule(params, cfg, total_steps, warmup)
    step, metrics_path = 0, out / "metrics.jsonl"
    if cfg.resume:
        found = checkpoint.latest(out)
        if found is None:
            raise PocketLMError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        state = checkpoint.load(found, params, optimizer, scheduler, cfg.to_dict(), procs.world)
        if state.get("total_steps") != total_steps:
            raise PocketLMError(f"--resume: {found} was a run of {state.get('total_steps')} steps; now it is {total_steps}")
        step = state["step"]
        if procs.main:
            metrics_path.write_text("".join(line for line in _read_lines(metrics_path) if json.loads(line)["step"] <= step))
    elif procs.main:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        metrics_path.write_text("")
    barrier(procs)

    progress = _progress(cfg, procs, total_steps, step, "dpo")
    if procs.main:
        _log(progress, f"{lm.name}: {len(pairs)} pairs, {len(eval_pairs)} held out; {total_steps} steps x global batch "
             f"{global_batch} pairs; training {sum(p.numel() for p in params.values()) / 1e6:.2f}M parameters "
             f"({lora_method(cfg, lm)}), beta {cfg.dpo_beta}")
    last, last_eval, t_start = None, {}, time.perf_counter()

    # ---- the loop
    while step < total_steps:
        t0 = time.perf_counter()
        positions = stream_indices(len(pairs), step * global_batch, global_batch, cfg.seed)  # this step's pairs, all processes
        mine = positions[procs.rank :: procs.world]
        sums = torch.zeros(4)  # loss, reward margin, chosen preferred, tokens: summed over this process's pairs
        for k in range(cfg.grad_accum):
            micro = [pairs[i] for i in mine[k * cfg.batch_size : (k + 1) * cfg.batch_size]]
            batch = {n: t.to(procs.device) for n, t in collate([c for c, _ in micro] + [r for _, r in micro], pad_id).items()}
            sync = train_module.no_sync() if procs.world > 1 and k < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                loss, rewards = train_module(batch["ids"], batch["labels"], ref_logps(batch))  # summed over the pairs
                (loss * procs.world / global_batch).backward()  # a mean over the global batch's pairs
            margin = rewards[:, 0] - rewards[:, 1]
            sums += torch.tensor([loss.item(), margin.sum().item(), (margin > 0).sum().item(), batch["lengths"].sum().item()])
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        sums = all_sum(sums, procs) / torch.tensor([global_batch, global_batch, global_batch, 1])
        last = {"step": step, "loss": sums[0].item(), "margin": sums[1].item(), "accuracy": sums[2].item(),
                "lr": scheduler.get_last_lr()[0], "tok_s": round(sums[3].item() / (time.perf_counter() - t0), 1)}
        if procs.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
            if progress is not None:
                progress.update(progress.task_ids[0], completed=step, loss=last["loss"], tok_s=last["tok_s"])
        if eval_pairs and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            last_eval = _evaluate(cfg, procs, loss_module, ref_logps, eval_pairs, pad_id, step, metrics_path, progress)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            if procs.main:
                state = {"config": cfg.to_dict(), "global_batch": global_batch, "total_steps": total_steps,
                         "data_position": step * global_batch, "world_size": procs.world}
                checkpoint.save(out, step, trainable_state(loss_module), optimizer, scheduler, state, cfg.keep_checkpoints)
            barrier(procs)
        if cfg.stop_after and step >= cfg.stop_after:  # tests: leave as a kill would
            if progress is not None:
                progress.stop()
            return {"step": step, "loss": last["loss"], "stopped": True}

    if eval_pairs:
        last_eval = _evaluate(cfg, procs, loss_module, ref_logps, eval_pairs, pad_id, step, metrics_path, progress)
    if progress is not None:
        progress.stop()

    # ---- outputs (one process writes)
    summary = {"steps": step, "final_loss": last["loss"] if last else None, "final_margin": last["margin"] if last else None,
               "eval": last_eval, "out": str(out), "train_s": round(time.perf_counter() - t_start, 1)}
    if procs.main:
        lineage = {
            "base_model": cfg.model, "base": {k: v for k, v in lm.meta.items() if k != "runtime_quant"},
            "data": str(Path(cfg.data).expanduser().resolve()),
            "recipe": {"name": "dpo", "task": "dpo", "method": lora_method(cfg, lm), "beta": cfg.dpo_beta,
                       **{k: v for k, v in cfg.to_dict().items() if k in checkpoint.MUST_MATCH or k in ("batch_size", "grad_accum", "steps", "epochs")}},
            "steps": step, "global_batch": global_batch, "world_size": procs.world, "final": last, "eval": last_eval, "quant": None,
        }
        if peft_model is not None:
            save_adapter(peft_model, out / "adapter")
        write_model = not cfg.lora or cfg.merge
        if write_model:
            backbone = merge(peft_model) if peft_model is not None else model
            hf_config = lm.config.to_hf()
            hf_config["pocketlm"] = lineage
            _publish_model(out, hf_config, backbone.state_dict(), tokenizer)
        (out / "finetune.json").write_text(json.dumps({**summary, "lineage": lineage}, indent=2))
        _plot(metrics_path, out / "loss.png")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        summary["model_written"] = write_model
    barrier(procs)
    if procs.world > 1:
        dist.destroy_process_group()
    return summary


@torch.no_grad()
def _evaluate(cfg, procs, loss_module: DPOLoss, ref_logps, pairs, pad_id: int, step: int, metrics_path: Path, progress) -> dict:
    """Held-out pairs: the mean DPO loss, reward margin and accuracy (process 0; the others wait)."""
    result = {}
    if procs.main:
        loss = margin = preferred = 0.0
        for begin in range(0, len(pairs), cfg.batch_size):
            micro = pairs[begin : begin + cfg.batch_size]
            batch = {n: t.to(procs.device) for n, t in collate([c for c, _ in micro] + [r for _, r in micro], pad_id).items()}
            l, rewards = loss_module(batch["ids"], batch["labels"], ref_logps(batch))
            m = rewards[:, 0] - rewards[:, 1]
            loss, margin, preferred = loss + l.item(), margin + m.sum().item(), preferred + (m > 0).sum().item()
        n = len(pairs)
        result = {"step": step, "eval_loss": loss / n, "eval_margin": margin / n, "eval_accuracy": preferred / n}
        with metrics_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        _log(progress, "eval @ step %d: %s" % (step, ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "step")))
    barrier(procs)
    return result
