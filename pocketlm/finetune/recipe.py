"""The fine-tuning recipe: one script, the training loop written out (torchtune style).

    pocketlm finetune smollm2-135m-instruct --data train.jsonl -o out/run1 --lora-r 16 --merge
    pocketlm distill --teacher smollm2-135m-instruct --student ./pruned --data train.jsonl -o out/student
    torchrun --nproc_per_node 2 -m pocketlm.cli finetune ...      # data parallel (gloo on CPU, nccl on GPU)

What happens, top to bottom in `finetune()`:
  1. processes: torchrun's environment -> a process group; one process is the plain case
  2. model: pocketlm.load (fp32), weights copied off the memory map so the optimizer can write them
  3. data: JSONL -> token ids + loss mask (pocketlm.finetune.data) -> optional packing -> held-out split
  4. what trains: all weights, or LoRA adapters via peft; for --task classify a head on a pooled state;
     with a teacher (distillation), the loss is pocketlm.compress.distill's, against the teacher's targets
     computed alongside or read from --teacher-logits
  5. AdamW + cosine schedule with linear warm-up; optional resume from the newest checkpoint
  6. the loop: a global batch per step, split over processes and micro-batches; the loss is summed and
     divided by the global batch's target-token count, so 1 process and N processes (and any
     micro-batch split) compute the same gradient
  7. eval every N steps, checkpoint every N steps (atomic), a progress bar, metrics.jsonl
  8. the model folder (pocketlm.formats.hf.write_model_folder) with lineage, the adapter, loss.png

Determinism (what --resume relies on): the data order is a function of (seed, step) only, the models
have no dropout, LoRA dropout defaults to 0, and the checkpoint holds parameters, AdamW moments,
scheduler and RNG state. So a run resumed after step k computes step k+1 exactly as the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.finetune import checkpoint
from pocketlm.finetune.config import FinetuneConfig
from pocketlm.finetune.data import (
    IGNORE, Example, build_examples, collate, pack, read_jsonl, stream_indices, target_count,
)
from pocketlm.finetune.lora import apply_lora, enable_grad_checkpointing, merge, save_adapter, trainable_state, unwrap


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy over the target tokens. Wrapping the loss in a module lets DDP see
    the whole forward; computing logits only where a label counts skips most of the (N, V) head matmul
    (a classification answer is a few tokens of a 60-token example)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.model.hidden(ids)  # (B, T, D)
        h, targets = h[:, :-1], labels[:, 1:]  # position t predicts token t+1: (B, T-1, D), (B, T-1)
        keep = targets != IGNORE  # (B, T-1)
        logits = self.model.logits(h[keep])  # (N, V)
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


class ClassifyLoss(nn.Module):
    """Summed cross-entropy of the head's logits against the label index (labels[:, 0])."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(ids, lengths), labels[:, 0], reduction="sum")


def optimizer_and_schedule(params: dict, cfg, total_steps: int, warmup: int, head: set[str] = frozenset()):
    """AdamW over the trainable params by name (matrices decay; norms and biases do not) and its warm-up + cosine
    schedule, for finetune's, distill's and DPO's recipes. head: names of a head that starts from scratch beside
    pre-trained weights, without decay and at --head-lr (a larger step) when given."""
    decay = [p for name, p in params.items() if p.ndim >= 2 and name not in head]
    no_decay = [p for name, p in params.items() if p.ndim < 2 and name not in head]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if head:
        groups.append({"params": [params[n] for n in sorted(head)], "weight_decay": 0.0, "lr": cfg.head_lr or cfg.lr})
    # fused: one pass over each tensor; on this CPU 2 s a step for SmolLM2's 135M parameters, against 17 s for the
    # foreach kernels (their temporaries are as large as the model)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, cfg.min_lr_ratio))


def lr_lambda(total: int, warmup: int, min_ratio: float):
    """Linear warm-up to 1 over `warmup` steps, then cosine down to min_ratio at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# --------------------------------------------------------------------------------------- processes


def setup_processes(cfg: FinetuneConfig) -> SimpleNamespace:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise PocketLMError("--device cuda: this machine has no CUDA device torch can use; use --device cpu (or auto)")
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return SimpleNamespace(world=world, rank=rank, device=device, main=rank == 0)


def all_sum(t: torch.Tensor, procs) -> torch.Tensor:
    if procs.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(procs) -> None:
    if procs.world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------- the recipe


def finetune(cfg: FinetuneConfig) -> dict:
    """Run the recipe; returns a summary (steps, final loss, eval metrics, output paths)."""
    if not cfg.model or not cfg.data or not cfg.out:
        raise PocketLMError("finetune needs a model, --data FILE.jsonl and -o OUT_DIR (or the same keys in --config)")
    if cfg.task == "dpo":  # its own recipe: pairs, a reference, another loss
        from pocketlm.finetune.dpo import dpo

        return dpo(cfg)
    procs = setup_processes(cfg)
    out = Path(cfg.out).expanduser()
    torch.manual_seed(cfg.seed)  # LoRA and head initialization: the same on every process

    rows = read_jsonl(cfg.data)  # first: a bad data file fails before the model loads
    eval_rows = read_jsonl(cfg.eval_data) if cfg.eval_data else []

    # ---- 2. model: fp32, parameters copied off the read-only memory map (the optimizer writes them in place)
    lm = load_base(cfg)
    model, tokenizer = lm.model, lm.tokenizer
    if tokenizer is None:
        raise PocketLMError(f"{lm.path}: no tokenizer.json: cannot tokenize the training data")
    if lm.is_encoder and cfg.task != "classify":
        raise PocketLMError(f"{lm.name} is an encoder: it can only be fine-tuned with --task classify")
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    model.train()  # no dropout in the native models: train() only marks intent
    pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    teacher_lm = load_teacher(cfg, lm) if cfg.teacher else None  # a Classifier for --task classify

    # ---- 3. data
    if not cfg.eval_data and cfg.eval_split > 0:  # a seeded split: the same held-out rows on every process and every resume
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + 1)).tolist()
        n_eval = max(1, int(len(rows) * cfg.eval_split))
        eval_rows, rows = [rows[i] for i in sorted(order[:n_eval])], [rows[i] for i in sorted(order[n_eval:])]
    labels_list = None
    if cfg.task == "classify":
        from pocketlm.finetune.classify import SequenceClassifier, encode_text

        for path, n, row in rows + eval_rows:
            for key in ("text", "label"):
                if key not in row:
                    raise PocketLMError(f"{path}:{n}: missing field {key!r} (--task classify needs {{text, label}} rows)")
        labels_list = sorted({str(r["label"]) for _, _, r in rows})
        index = {label: i for i, label in enumerate(labels_list)}
        for path, n, row in eval_rows:
            if str(row["label"]) not in index:
                raise PocketLMError(f"{path}:{n}: label {row['label']!r} does not occur in the training data")

        def to_units(rs):  # labels[0] carries the class index; target count 1 per example
            out_ = []
            for _, _, r in rs:
                ids = encode_text(tokenizer, str(r["text"]), cfg.template, cfg.seq_len, lm.is_encoder)
                out_.append(Example(ids, [index[str(r["label"])]] * len(ids), answer=str(r["label"])))
            return out_

        examples, eval_examples = to_units(rows), to_units(eval_rows)
        count = lambda e: 1  # noqa: E731
    else:
        examples, eval_examples = build_examples(tokenizer, rows, cfg), build_examples(tokenizer, eval_rows, cfg)
        count = target_count
    if len(eval_examples) > cfg.eval_max:  # a seeded sample, not the file's head: test files are often sorted by label
        keep = torch.randperm(len(eval_examples), generator=torch.Generator().manual_seed(cfg.seed + 3))[: cfg.eval_max]
        eval_examples = [eval_examples[i] for i in sorted(keep.tolist())]
    units = examples
    if cfg.pack:
        if cfg.task == "classify":
            raise PocketLMError("--pack is for generative fine-tuning, not --task classify")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed + 2)).tolist()
        units = pack(examples, cfg.seq_len, order)
    unit_targets = [count(u) for u in units]
    unit_lengths = [len(u.ids) for u in units] if cfg.group_by_length else None
    if sum(unit_targets) == 0:
        raise PocketLMError(f"{cfg.data}: no tokens to learn (every answer was cut off by --seq-len {cfg.seq_len}?)")

    global_batch = cfg.batch_size * cfg.grad_accum * procs.world
    total_steps = cfg.steps or math.ceil(cfg.epochs * len(units) / global_batch)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)

    teacher = None  # distillation: the teacher's targets per batch
    if teacher_lm is not None:
        from pocketlm.compress.distill import OnlineTeacher, StoredTeacher

        if cfg.task == "classify":  # the teacher's logits for every example, once; computed by process 0
            from pocketlm.compress.distill import ClassifierTeacher

            store = Path(cfg.teacher_logits or out / "teacher-logits").expanduser() / "classifier-logits.safetensors"
            texts = [str(r["text"]) for _, _, r in rows]  # units are rows, in order (no packing for classify)
            if procs.main:
                from pocketlm.eval.tasks import progress_bar

                with progress_bar("teacher logits", len(texts), not cfg.quiet) as advance:
                    teacher = ClassifierTeacher.open_or_build(store, teacher_lm, cfg.teacher, texts, labels_list, advance)
            barrier(procs)
            teacher = teacher or ClassifierTeacher.open_or_build(store, teacher_lm, cfg.teacher, texts, labels_list)
        elif cfg.teacher_logits:
            if procs.main:  # one process computes what is missing; the others open the finished store
                from pocketlm.eval.tasks import progress_bar

                with progress_bar("teacher top-k", len(units), not cfg.quiet) as advance:
                    teacher = StoredTeacher.open_or_build(cfg.teacher_logits, cfg.teacher, lambda: teacher_lm.model, units,
                                                          cfg.kd_temperature, cfg.teacher_top_k, cfg.batch_size, pad_id, advance)
            barrier(procs)
            teacher = teacher or StoredTeacher(cfg.teacher_logits)
        else:
            teacher = OnlineTeacher(teacher_lm.model.to(procs.device), cfg.kd_temperature, cfg.hidden_weight > 0)

    # ---- 4. what trains
    peft_model = None
    if cfg.task == "classify":
        pooling = cfg.pooling or ("mean" if lm.is_encoder else "last")
        classifier = SequenceClassifier(model, len(labels_list), pooling, lm.is_encoder)
        if (teacher_lm is not None and teacher_lm.model.pre is None
                and teacher_lm.model.score.in_features == classifier.score.in_features):
            # a student pruned from its teacher (same width) starts from the teacher's head, not from scratch (a
            # transformers classifier's head reads its own transform of [CLS]: it does not fit a pocketlm head)
            from pocketlm.compress.distill import label_columns

            columns = label_columns(teacher_lm, cfg.teacher, labels_list)  # (C,) the teacher's row per student label
            with torch.no_grad():
                classifier.score.weight.copy_(teacher_lm.model.score.weight[columns])
                classifier.score.bias.copy_(teacher_lm.model.score.bias[columns])
        if not cfg.lora:
            # parameters the head never reaches (an untied lm_head, BERT's pooler) would stall DDP's reduction
            for name in ("lm_head", "pooler"):
                if hasattr(model, name) and not getattr(model.cfg, "tie_word_embeddings", False):
                    getattr(model, name).requires_grad_(False)
    if cfg.freeze_embeddings:  # the input embedding and the output head; one matrix when tied
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.requires_grad_(False)
        if hasattr(model, "lm_head"):
            model.lm_head.requires_grad_(False)
    if cfg.lora:
        peft_model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, base_name=cfg.model)
        model = unwrap(peft_model)  # the same native module, LoRA Linears inside, everything else frozen
    if cfg.grad_checkpoint:
        enable_grad_checkpointing(model)
    if teacher is not None and cfg.task == "classify":
        from pocketlm.compress.distill import ClassifyDistillLoss

        loss_module = ClassifyDistillLoss(classifier, cfg.kd_loss, cfg.kd_temperature, cfg.kd_weight)
        eval_loss = ClassifyLoss(classifier)  # held out: the student's own cross-entropy on the labels
    elif teacher is not None:
        from pocketlm.compress.distill import DistillLoss

        loss_module = DistillLoss(model, cfg.kd_loss, cfg.kd_temperature, cfg.kd_weight, cfg.hidden_weight, teacher_lm.model.cfg.dim)
        eval_loss = CausalLMLoss(model)  # held out: the student's own cross-entropy on the data
    else:
        loss_module = ClassifyLoss(classifier) if cfg.task == "classify" else CausalLMLoss(model)
        eval_loss = loss_module
    loss_module.to(procs.device)
    train_module = loss_module
    if procs.world > 1:
        train_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=[procs.device] if procs.device.type == "cuda" else None)
    params = {name: p for name, p in loss_module.named_parameters() if p.requires_grad}

    # ---- 5. optimizer, schedule, resume
    head = {name for name in params if name.startswith("classifier.score.")}
    optimizer, scheduler = optimizer_and_schedule(params, cfg, total_steps, warmup, head)
    step = 0
    metrics_path = out / "metrics.jsonl"
    if cfg.resume:
        found = checkpoint.latest(out)
        if found is None:
            raise PocketLMError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        state = checkpoint.load(found, params, optimizer, scheduler, cfg.to_dict(), procs.world)
        if state.get("total_steps") != total_steps:
            raise PocketLMError(f"--resume: {found} was a run of {state.get('total_steps')} steps; now it is {total_steps}")
        step = state["step"]
        if procs.main:  # forget what the killed run logged after its last checkpoint
            kept = [line for line in _read_lines(metrics_path) if json.loads(line)["step"] <= step]
            metrics_path.write_text("".join(kept))
    elif procs.main:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        metrics_path.write_text("")
    barrier(procs)

    autocast = torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    progress = _progress(cfg, procs, total_steps, step, "distill" if cfg.teacher else "finetune")
    last_loss, last_eval, tokens_seen, t_start, first_step = None, {}, 0, time.perf_counter(), step
    if procs.main:
        trainable = sum(p.numel() for p in params.values())
        _log(progress, f"{lm.name}: {len(units)} {'blocks' if cfg.pack else 'examples'}, {len(eval_examples)} held out; "
             f"{total_steps} steps x global batch {global_batch} ({procs.world} process(es)); "
             f"training {trainable / 1e6:.2f}M parameters ({'LoRA r=%d' % cfg.lora_r if cfg.lora else 'full'})")

    # ---- 6. the loop
    while step < total_steps:
        t0 = time.perf_counter()
        positions = stream_indices(len(units), step * global_batch, global_batch, cfg.seed, unit_lengths, global_batch)  # this step's units, all processes
        n_targets = max(1, sum(unit_targets[i] for i in positions))  # every process knows the global count
        mine = positions[procs.rank :: procs.world]  # (batch_size * grad_accum,) this process's share
        loss_sum = torch.zeros((), device=procs.device)
        tokens = 0
        for k in range(cfg.grad_accum):
            micro_units = mine[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            batch = {name: t.to(procs.device) for name, t in collate([units[i] for i in micro_units], pad_id).items()}  # ids, labels (B, T)
            tokens += int(batch["lengths"].sum())
            # DDP all-reduces gradients on every backward; skip that until the last micro-batch
            sync = train_module.no_sync() if procs.world > 1 and k < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast:
                    targets = {} if teacher is None else {  # the teacher's distribution at each target position
                        name: t if t is None else t.to(procs.device) for name, t in teacher.targets(batch, micro_units).items()}
                    micro_loss = train_module(batch["ids"], batch["labels"], batch["lengths"], **targets)  # summed over targets
                # DDP averages gradients over processes: * world undoes that, / n_targets makes it a global mean
                (micro_loss * procs.world / n_targets).backward()
            loss_sum += micro_loss.detach().float()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        stats = all_sum(torch.tensor([loss_sum.item(), float(tokens)]), procs)  # (2,) loss sum, tokens over processes
        last_loss = stats[0].item() / n_targets
        tokens_seen += int(stats[1])
        tok_s = stats[1].item() / (time.perf_counter() - t0)
        if procs.main:
            row = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0], "tokens": int(stats[1]), "tok_s": round(tok_s, 1)}
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if progress is not None:
                progress.update(progress.task_ids[0], completed=step, loss=last_loss, tok_s=tok_s)
                if not progress.console.is_terminal and step % max(1, cfg.log_every) == 0:  # a log file: plain lines
                    eta = (time.perf_counter() - t_start) / (step - first_step) * (total_steps - step)
                    progress.console.print(f"step {step}/{total_steps} loss {last_loss:.4f} {tok_s:.0f} tok/s ETA {eta / 60:.1f} min")

        # ---- 7. eval and checkpoint
        if eval_examples and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            last_eval = _evaluate(cfg, procs, eval_loss, model, tokenizer, eval_examples, pad_id, count, step, metrics_path, progress)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            if procs.main:
                state = {"config": cfg.to_dict(), "global_batch": global_batch, "total_steps": total_steps,
                         "data_position": step * global_batch, "world_size": procs.world}
                checkpoint.save(out, step, trainable_state(loss_module), optimizer, scheduler, state, cfg.keep_checkpoints)
            barrier(procs)
        if cfg.stop_after and step >= cfg.stop_after:  # tests: leave as a kill right after this checkpoint would
            if progress is not None:
                progress.stop()
            return {"step": step, "loss": last_loss, "stopped": True}

    if eval_examples:
        last_eval = _evaluate(cfg, procs, eval_loss, model, tokenizer, eval_examples, pad_id, count, step, metrics_path, progress)
    if progress is not None:
        progress.stop()

    # ---- 8. outputs (one process writes)
    summary = {"steps": step, "final_loss": last_loss, "eval": last_eval, "out": str(out),
               "train_s": round(time.perf_counter() - t_start, 1), "tokens": tokens_seen}
    if procs.main:
        lineage = {
            "base_model": cfg.model,
            "base": {k: v for k, v in lm.meta.items() if k != "runtime_quant"},
            "data": str(Path(cfg.data).expanduser().resolve()),
            "recipe": {"name": "distill" if cfg.teacher else "finetune", "task": cfg.task,
                       "method": lora_method(cfg, lm),
                       **{k: v for k, v in cfg.to_dict().items() if k in checkpoint.MUST_MATCH or k in (
                           "batch_size", "grad_accum", "steps", "epochs", "bf16", "merge", "teacher_logits")}},
            "steps": step, "global_batch": global_batch, "world_size": procs.world,
            "final_loss": last_loss, "eval": last_eval, "quant": None,  # a merged QLoRA model is float too
        }
        if peft_model is not None:
            save_adapter(peft_model, out / "adapter")
        write_model = cfg.task == "classify" or not cfg.lora or cfg.merge
        if write_model:
            backbone = merge(peft_model) if peft_model is not None else model
            hf_config = lm.config.to_hf()
            hf_config["pocketlm"] = lineage
            extra = None
            if cfg.task == "classify":
                from pocketlm.finetune.classify import save_head

                def extra(folder):  # noqa: F811
                    save_head(folder, classifier, labels_list, cfg.template)

            _publish_model(out, hf_config, backbone.state_dict(), tokenizer, extra)
        (out / "finetune.json").write_text(json.dumps({**summary, "lineage": lineage}, indent=2))
        _plot(metrics_path, out / "loss.png")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: the model folder replaces them
        summary["model_written"] = write_model
    barrier(procs)
    if procs.world > 1:
        dist.destroy_process_group()
    return summary


# ------------------------------------------------------------------------------------------ helpers


def load_base(cfg: FinetuneConfig):
    """The model to train: fp32, or with --quant (or a quantized folder under auto) its linear layers int4/int8,
    which then stay quantized and frozen while LoRA adapters train (QLoRA). The output head and the token
    embedding stay float, as in bitsandbytes' QLoRA: an int8 embedding had cost banking77 1.5-2.6 points."""
    from pocketlm.load import load

    lm = load(cfg.model, quant=cfg.quant, head="float")
    if lm.meta.get("weights", "float32") not in ("float32", "bfloat16") and not cfg.lora:
        raise PocketLMError(f"{lm.name} is quantized ({lm.meta['weights']}): train LoRA adapters over it (--lora-r, QLoRA), "
                            "or fine-tune the float model it came from")
    return lm


def lora_method(cfg: FinetuneConfig, lm) -> str:
    if not cfg.lora:
        return "full"
    weights = lm.meta.get("weights", "float32")
    return f"qlora r={cfg.lora_r} on {weights}" if weights not in ("float32", "bfloat16") else f"lora r={cfg.lora_r}"


def load_teacher(cfg: FinetuneConfig, student):
    """The distillation teacher, in float32 and frozen; it must tokenize as the student does. For --task
    classify, a classifier (a `finetune --task classify` folder), which tokenizes the text itself."""
    from pocketlm.load import load

    if cfg.task == "classify":
        from pocketlm.finetune.classify import Classifier

        return Classifier.load(cfg.teacher)

    teacher = load(cfg.teacher)
    if teacher.is_encoder or teacher.tokenizer is None:
        raise PocketLMError(f"{teacher.name} cannot be a teacher: distillation needs a generative model with a tokenizer")
    if not student.tokenizer.same_vocabulary(teacher.tokenizer):
        raise PocketLMError(
            f"{student.name} and the teacher {teacher.name} have different tokenizers: distillation compares their "
            f"next-token distributions, so they must share one (a student pruned from the teacher, or of its family)"
        )
    if teacher.config.vocab_size != student.config.vocab_size:
        raise PocketLMError(f"the teacher's output has {teacher.config.vocab_size} tokens and the student's "
                            f"{student.config.vocab_size}: they must be equal (was the student's vocabulary trimmed?)")
    return teacher


@torch.no_grad()
def _evaluate(cfg, procs, loss_module, model, tokenizer, examples, pad_id, count, step, metrics_path, progress) -> dict:
    """Held-out loss (and accuracy: by greedy generation for {text,label} chat data, argmax for a head).
    Process 0 evaluates the whole held-out set; the others wait (it is small)."""
    result = {}
    if procs.main:
        loss, n = 0.0, 0
        correct = 0
        for begin in range(0, len(examples), cfg.batch_size):
            micro = examples[begin : begin + cfg.batch_size]
            batch = {k: t.to(procs.device) for k, t in collate(micro, pad_id).items()}
            loss += loss_module(batch["ids"], batch["labels"], batch["lengths"]).item()
            n += sum(count(e) for e in micro)
            if cfg.task == "classify":
                pred = loss_module.classifier(batch["ids"], batch["lengths"]).argmax(-1)
                correct += int((pred == batch["labels"][:, 0]).sum())
        result = {"step": step, "eval_loss": loss / max(1, n)}
        if cfg.task == "classify":
            result["eval_accuracy"] = correct / len(examples)
        elif examples[0].answer is not None:
            result["eval_accuracy"] = _generation_accuracy(model, tokenizer, examples, procs.device)
        with metrics_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        _log(progress, "eval @ step %d: %s" % (step, ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "step")))
    barrier(procs)
    return result


def _generation_accuracy(model, tokenizer, examples: list[Example], device) -> float:
    """Greedy answers through the engine (the way `pocketlm run` would answer), exact match after strip."""
    from pocketlm.engine.generate import generate
    from pocketlm.engine.sampling import SamplingParams

    lm = SimpleNamespace(model=model, tokenizer=tokenizer, context_length=model.cfg.max_position_embeddings)
    longest = max(len(tokenizer.encode(e.answer, add_special_tokens=False)) for e in examples)
    params = SamplingParams(max_new_tokens=longest + 2, temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    correct = 0
    for e in examples:
        text = generate(lm, e.prompt_ids, params).text()
        correct += text.strip() == e.answer.strip()
    return correct / len(examples)


def _publish_model(out: Path, hf_config: dict, state_dict: dict, tokenizer, extra=None) -> None:
    """The model files into `out`, which also holds metrics, the adapter and checkpoints: write_model_folder
    builds a complete folder beside them, then its files move in, config.json last (the loader's sign of
    a model folder), so a kill never leaves a folder that loads half a model."""
    from pocketlm.formats.hf import write_model_folder

    staging = write_model_folder(out / ".model-staging", hf_config, state_dict, tokenizer)
    if extra is not None:
        extra(staging)
    (out / "config.json").unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        target = out / path.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(path, target)
    staging.rmdir()


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.exists() else []


def _plot(metrics_path: Path, png: Path) -> None:
    """Training loss per step (and held-out loss) as a PNG; matplotlib's Agg backend needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in _read_lines(metrics_path)]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=1, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _progress(cfg, procs, total: int, done: int, label: str):
    if not procs.main or cfg.quiet:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tok_s]:.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )
    progress.add_task("steps", total=total, completed=done, loss=float("nan"), tok_s=0.0)
    progress.start()
    return progress


def _log(progress, message: str) -> None:
    if progress is not None:  # None: --quiet, or not process 0
        progress.console.print(message)
