"""The fine-tuning run as one dataclass: what the CLI flags, a recipe YAML and the Python API all fill.

No torch here (as pocketlm.config): the CLI reads and checks a recipe before paying for a torch import.
A recipe file (recipes/*.yaml) uses these field names as keys; a CLI flag that is given wins over it.

    cfg = FinetuneConfig.from_yaml("recipes/banking77.yaml", overrides={"steps": 200})
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

from pocketlm.errors import PocketLMError

TASKS = ("sft", "classify", "dpo")
QUANTS = ("none", "auto", "int8", "int4", "int4-g64", "int4-g128")  # the base's weights (QLoRA: LoRA on a quantized base)
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")  # pocketlm.compress.distill.divergence
POOLINGS = ("last", "mean")
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class FinetuneConfig:
    model: str = ""  # registry name or path (the base model)
    data: str = ""  # training JSONL
    out: str = ""  # run folder: the final model folder, with checkpoints/ inside while training

    task: str = "sft"  # "sft": generate the answer (chat template, loss on assistant tokens); "classify": a head;
    # "dpo": preference pairs {"prompt","chosen","rejected"} (pocketlm/finetune/dpo.py)
    # {"text","label"} rows as chat: the user message is template.format(text=...), the answer the label
    template: str = "{text}"
    system: str | None = None  # system prompt put before every conversation that has none

    # held-out evaluation: a file, or a fraction split off the training data (seeded)
    eval_data: str | None = None
    eval_split: float = 0.0
    eval_every: int = 0  # steps; 0 = only at the end (when there is held-out data)
    eval_max: int = 200  # held-out examples used per evaluation (generation is the slow part)

    seq_len: int = 512  # tokens per example (truncated) or per packed block
    pack: bool = False  # several short examples per seq_len block (attention stays causal across the block)
    group_by_length: bool = False  # batches of units of about one length: less padding (transformers' Trainer option)
    batch_size: int = 8  # examples (or packed blocks) per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * processes
    steps: int = 0  # optimizer steps; 0 = from epochs
    epochs: float = 1.0

    lr: float = 2e-5
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    weight_decay: float = 0.0  # on matrices only (not norms, biases)
    max_grad_norm: float = 1.0  # 0 = no clipping
    betas: tuple[float, float] = (0.9, 0.999)

    lora_r: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    merge: bool = False  # LoRA: also write the merged full model folder (the adapter is always written)
    # the base model's weights while training: "none" (float), or int4/int8 (QLoRA: LoRA adapters over a base that
    # stays quantized in memory); "auto": as the model was saved (a `pocketlm quantize` folder stays quantized)
    quant: str = "none"
    dpo_beta: float = 0.1  # dpo: the KL penalty's weight (Rafailov et al. 2023's beta)

    pooling: str = ""  # classify: "last" (decoders' default) or "mean" (encoders' default)
    head_lr: float = 0.0  # classify: the new head's peak learning rate (0 = lr); it starts from scratch
    # the token embedding and the output head (one matrix when tied) stay as loaded: a student pruned from its
    # teacher keeps the teacher's vocabulary space, and a small data set cannot move the rows of tokens it lacks
    freeze_embeddings: bool = False

    # distillation (pocketlm distill): a teacher with the same tokenizer; see pocketlm.compress.distill
    teacher: str = ""  # registry name or path; empty = plain fine-tuning
    kd_loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    kd_temperature: float = 1.0
    kd_weight: float = 0.5  # the distillation term's weight; the data's cross-entropy gets 1 - kd_weight
    hidden_weight: float = 0.0  # > 0: also align final hidden states through a learned projection (online only)
    teacher_logits: str = ""  # a folder of the teacher's top-k log-probs, computed on first use and reused
    teacher_top_k: int = 32

    grad_checkpoint: bool = False
    bf16: bool = False  # bf16 autocast for the forward/backward (weights and optimizer stay fp32)
    seed: int = 0
    save_every: int = 100  # checkpoint every N steps (0 = never)
    keep_checkpoints: int = 2
    resume: bool = False
    log_every: int = 1
    device: str = "auto"  # "auto": CUDA when there is one, else CPU
    quiet: bool = False  # no progress bar (tests, logs)
    # For tests: leave the loop after this step (after its checkpoint), as a kill would. 0 = off.
    stop_after: int = 0

    def __post_init__(self):
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        self.betas = tuple(self.betas)
        checks = [
            (self.task in TASKS, f"task must be one of {', '.join(TASKS)}, not {self.task!r}"),
            (self.pooling in ("", *POOLINGS), f"pooling must be one of {', '.join(POOLINGS)}"),
            (self.seq_len >= 8, "seq_len must be >= 8"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.steps >= 0, "steps must be >= 0"),
            (self.steps > 0 or self.epochs > 0, "give steps or epochs > 0"),
            (self.lr > 0, "lr must be > 0"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, not {self.device!r}"),
            (0 <= self.eval_split < 1, "eval_split must be in [0, 1)"),
            (self.lora_r >= 0, "lora_r must be >= 0"),
            (not self.lora_r or self.lora_targets, "lora_targets is empty"),
            (not (self.freeze_embeddings and self.lora_r), "freeze_embeddings is for full fine-tuning: LoRA already freezes them"),
            (self.quant in QUANTS, f"quant must be one of {', '.join(QUANTS)}, not {self.quant!r}"),
            (self.quant in ("none", "auto") or self.lora_r, f"quant {self.quant}: a quantized base trains LoRA adapters only (QLoRA): give lora_r"),
            (self.dpo_beta > 0, "dpo_beta must be > 0"),
            (not (self.task == "dpo" and self.teacher), "dpo trains on preference pairs, without a teacher"),
            (not (self.task == "dpo" and self.pack), "pack is for sft: a dpo pair's two answers are scored whole"),
            ("{text}" in self.template, "template must contain {text}"),
            (self.kd_loss in KD_LOSSES, f"kd_loss must be one of {', '.join(KD_LOSSES)}, not {self.kd_loss!r}"),
            (self.kd_temperature > 0, "kd_temperature must be > 0"),
            (0 <= self.kd_weight <= 1, "kd_weight must be in [0, 1]"),
            (self.hidden_weight >= 0, "hidden_weight must be >= 0"),
            (self.teacher_top_k >= 1, "teacher_top_k must be >= 1"),
            (not (self.teacher and self.task == "classify" and self.hidden_weight),
             "hidden_weight aligns next-token models' hidden states; a classifier learns the teacher's label distribution"),
            (not (self.hidden_weight and self.teacher_logits),
             "hidden_weight needs the teacher online: stored --teacher-logits hold no hidden states"),
        ]
        for ok, message in checks:
            if not ok:
                raise PocketLMError(message)

    @property
    def lora(self) -> bool:
        return self.lora_r > 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PocketLMError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise PocketLMError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> FinetuneConfig:
        """A recipe file, then `overrides` (the CLI flags that were given) on top."""
        return cls.from_dict({**read_recipe(path), **(overrides or {})}, source=str(path))


def read_recipe(path: str | Path) -> dict:
    """A recipe YAML file's settings, its relative data paths made relative to the recipe's folder (so a recipe runs
    from anywhere); a missing file, bad YAML or a non-mapping is a PocketLMError in one line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PocketLMError(f"{path}: no such recipe file")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PocketLMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise PocketLMError(f"{path}: a recipe is a mapping of settings (key: value)")
    for key in ("data", "eval_data"):
        if isinstance(d.get(key), str) and not Path(d[key]).expanduser().is_absolute():
            candidate = (path.parent / d[key]).resolve()
            if candidate.exists() or not Path(d[key]).exists():
                d[key] = str(candidate)
    return d
