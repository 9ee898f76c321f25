"""`pocketlm finetune` flags: one per FinetuneConfig field, so the CLI, the YAML recipe and the Python API agree.

Flags default to "not given" (argparse.SUPPRESS), so only the flags typed on the command line override
a --config recipe; FinetuneConfig's defaults fill the rest. No torch import here (`--help` is instant).
"""

from __future__ import annotations

import argparse

from pocketlm.finetune.config import DEFAULT_LORA_TARGETS, KD_LOSSES, POOLINGS, TASKS, FinetuneConfig

# (flag, field, type or "flag", help)
FLAGS = [
    ("--data", "data", str, "training data, JSONL: {messages} | {prompt, completion} | {text, label} | {instruction, input, output}"),
    ("-o/--out", "out", str, "output folder: the fine-tuned model folder (checkpoints/ inside while training)"),
    ("--task", "task", str, f"{' | '.join(TASKS)}: sft generates the answer; classify trains a head; dpo learns preferences from {{prompt, chosen, rejected}} rows (default sft)"),
    ("--template", "template", str, "user message for {text, label} rows, with {text} (default '{text}')"),
    ("--system", "system", str, "system prompt before every conversation that has none"),
    ("--eval-data", "eval_data", str, "held-out JSONL (default: none, or --eval-split)"),
    ("--eval-split", "eval_split", float, "fraction of the training rows held out (seeded; default 0)"),
    ("--eval-every", "eval_every", int, "evaluate every N steps (default: only at the end)"),
    ("--eval-max", "eval_max", int, "held-out examples per evaluation (default 200)"),
    ("--seq-len", "seq_len", int, "tokens per example (longer ones are cut) or per packed block (default 512)"),
    ("--pack", "pack", "flag", "pack short examples into --seq-len blocks (causal attention across the block)"),
    ("--group-by-length", "group_by_length", "flag", "batch examples of about one length together: less padding, faster steps"),
    ("--batch-size", "batch_size", int, "examples per micro-batch per process (default 8)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step (default 1)"),
    ("--steps", "steps", int, "optimizer steps (default: from --epochs)"),
    ("--epochs", "epochs", float, "passes over the data when --steps is not given (default 1)"),
    ("--lr", "lr", float, "peak learning rate (default 2e-5; LoRA wants about 2e-4)"),
    ("--min-lr-ratio", "min_lr_ratio", float, "cosine ends at lr x this (default 0.1)"),
    ("--warmup-steps", "warmup_steps", int, "linear warm-up steps (default 0)"),
    ("--warmup-ratio", "warmup_ratio", float, "warm-up as a fraction of the steps, if --warmup-steps is 0"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay on matrices (default 0)"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping, 0 = off (default 1.0)"),
    ("--lora-r", "lora_r", int, "LoRA rank; 0 = full fine-tuning (default 0)"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (default 16)"),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout (default 0)"),
    ("--lora-targets", "lora_targets", str, f"comma-separated Linear names (default {','.join(DEFAULT_LORA_TARGETS)})"),
    ("--merge", "merge", "flag", "LoRA: also write the merged full model folder (the adapter is always saved)"),
    ("--quant", "quant", str, "the base's weights while training: none (float, default), int4, int4-g64, int4-g128, int8 (QLoRA: the base stays quantized, its embedding and head float but in a quantized folder; needs --lora-r), auto (as saved)"),
    ("--dpo-beta", "dpo_beta", float, "dpo: beta, the weight of the KL to the reference (default 0.1)"),
    ("--pooling", "pooling", str, f"classify: {' | '.join(POOLINGS)} (default: last for decoders, mean for encoders)"),
    ("--head-lr", "head_lr", float, "classify: the head's peak learning rate (default: --lr)"),
    ("--freeze-embeddings", "freeze_embeddings", "flag", "keep the token embedding and output head as loaded (full fine-tuning; fewer parameters to train)"),
    ("--grad-checkpoint", "grad_checkpoint", "flag", "recompute activations in backward: less memory, about 1/3 slower"),
    ("--bf16", "bf16", "flag", "bf16 autocast for forward and backward (weights stay fp32)"),
    ("--seed", "seed", int, "data order and initialization (default 0)"),
    ("--save-every", "save_every", int, "checkpoint every N steps, 0 = never (default 100)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept (default 2)"),
    ("--resume", "resume", "flag", "continue from the newest checkpoint in the output folder"),
    ("--device", "device", str, "auto | cpu | cuda (default auto)"),
    ("--quiet", "quiet", "flag", "no progress bar"),
    ("--stop-after", "stop_after", int, argparse.SUPPRESS),  # tests: leave the loop after this step, as a kill
]

DISTILL_FLAGS = [
    ("--teacher", "teacher", str, "the teacher: registry name or path, any tokenizer (another one's is aligned by characters; --task classify: a classifier folder)"),
    ("--kd-loss", "kd_loss", str, f"{' | '.join(KD_LOSSES)} (default forward_kl)"),
    ("--kd-temperature", "kd_temperature", float, "softmax temperature of both distributions (default 1)"),
    ("--kd-weight", "kd_weight", float, "weight of the distillation term; the data's cross-entropy gets 1 - this (default 0.5)"),
    ("--hidden-weight", "hidden_weight", float, "also align final hidden states through a learned projection (default 0 = off; online teacher only)"),
    ("--teacher-logits", "teacher_logits", str, "folder of the teacher's top-k log-probs (--task classify: its label logits): computed on first use, reused by later runs (offline distillation)"),
    ("--teacher-top-k", "teacher_top_k", int, "tokens kept per position in --teacher-logits (default 32; the rest count as one)"),
]


def add_finetune_arguments(p: argparse.ArgumentParser, distill: bool = False) -> None:
    """`pocketlm finetune MODEL ...`, or with distill=True `pocketlm distill --student S --teacher T ...`."""
    if distill:
        p.add_argument("--student", dest="model", default=argparse.SUPPRESS, help="the student: registry name or path (e.g. a pocketlm prune output)")
    else:
        p.add_argument("model", nargs="?", default=argparse.SUPPRESS, help="base model: registry name or path")
    p.add_argument("--config", help="a recipe YAML (recipes/*.yaml); flags given here override it")
    for flag, dest, kind, help_text in (DISTILL_FLAGS if distill else []) + FLAGS:
        names = flag.split("/")
        if kind == "flag":
            p.add_argument(*names, dest=dest, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(*names, dest=dest, type=kind, default=argparse.SUPPRESS, help=help_text)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    overrides = {dest: getattr(args, dest) for _, dest, _, _ in DISTILL_FLAGS + FLAGS if hasattr(args, dest)}
    if hasattr(args, "model"):
        overrides["model"] = args.model
    if args.config:
        return FinetuneConfig.from_yaml(args.config, overrides)
    return FinetuneConfig.from_dict(overrides, source="command line")
