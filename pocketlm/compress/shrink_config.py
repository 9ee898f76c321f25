"""`pocketlm shrink`'s settings: a dataclass without torch (the CLI reads and checks a recipe before any heavy
import), filled by flags, a recipe YAML (`--config`, these field names as keys) and the Python API.

    cfg = ShrinkConfig.from_yaml("recipes/shrink-banking77.yaml", overrides={"size": 0.4})

The `distill` mapping holds pocketlm distill's settings (DistillConfig's field names: steps, epochs, lr, kd_loss,
on_policy, ...) on top of the task's defaults (DISTILL_DEFAULTS).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm.errors import PocketLMError

TASKS = ("auto", "classify", "sft")
QUANTS = ("int4", "int4-g64", "int4-g128", "int8", "none")
METHODS = ("auto", "rtn", "gptq", "awq")  # gptq and awq: pocketlm.quant.calibrate (see shrink.quantize); auto: gptq

# pocketlm distill's settings per task, before the recipe's `distill` mapping: recipes/banking77-distill.yaml for a
# classifier (the run of docs/BENCHMARKS.md that kept 99.8% of the teacher), a short run with stored top-k for a generator
DISTILL_DEFAULTS = {
    "classify": {"kd_loss": "forward_kl", "kd_temperature": 2.0, "kd_weight": 0.5, "epochs": 3, "lr": 1e-4, "batch_size": 16,
                 "seq_len": 96, "group_by_length": True, "pooling": "last", "warmup_ratio": 0.03, "save_every": 100},
    "sft": {"kd_loss": "forward_kl", "kd_temperature": 1.0, "kd_weight": 0.5, "epochs": 1, "lr": 1e-4, "batch_size": 8,
            "seq_len": 256, "group_by_length": True, "warmup_ratio": 0.03, "save_every": 100},
}

OWN_BY_SHRINK = ("model", "teacher", "data", "eval_data", "out", "task", "resume", "quiet", "stop_after")  # set per stage


@dataclass
class ShrinkConfig:
    teacher: str = ""  # registry name or path: a classifier folder (finetune --task classify) or a generative model
    data: str = ""  # JSONL: {text, label} rows for a classifier; any finetune format for a generator
    out: str = ""  # the run folder: OUT/stages/NN-name per stage, report.md, export/
    eval_data: str | None = None  # held-out JSONL; else eval_split of data, seeded
    eval_split: float = 0.1
    eval_limit: int | None = None  # held-out examples scored (a seeded subset); None: all of them
    task: str = "auto"  # auto: classify when the teacher has a classification head, else sft
    size: float = 0.5  # the student's non-embedding parameters, as a share of the teacher's (at most)
    # or a speed to reach instead: the fewest blocks dropped that make the student, quantized as `quant` says, this
    # many times the teacher's speed (the report's: texts/s for a classifier, decode tokens/s for a generator), measured
    speed: float | str | None = None
    calib_tokens: int = 8192  # training text the pruning importance is measured on
    distill: dict = field(default_factory=dict)  # pocketlm distill's settings (DistillConfig fields) over DISTILL_DEFAULTS
    quant: str = "int4"  # the student's weights: int4 (groups of 32), int4-g64, int4-g128, int8, none
    # rtn: round-to-nearest; gptq | awq: calibrated on the training text (pocketlm.quant.calibrate); auto: gptq, which
    # kept 99.3% of the banking77 teacher's accuracy where round-to-nearest kept 90.3% (docs/BENCHMARKS.md)
    method: str = "auto"
    speed_rounds: int = 3  # teacher and student timed in turn this many times; the median counts
    bench: bool = True  # also `pocketlm bench` each side (decode and prompt tokens/s, peak memory) in its own process
    agreement_tokens: int = 4096  # generators: held-out tokens for KL, top-1 agreement and perplexity
    gguf_type: str = ""  # the exported GGUF's tensors: "" = q4_0 for an int4 student, q8_0 for int8, f16 for none
    serve: bool = False  # serve the student at the end (generators)
    port: int = 8000
    seed: int = 0
    quiet: bool = False

    def __post_init__(self):
        if isinstance(self.speed, str):  # "2x" as the flag and recipes spell it
            try:
                self.speed = float(self.speed.strip().removesuffix("x").removesuffix("X"))
            except ValueError:
                raise PocketLMError(f"speed must be a factor such as 2 or 2x, not {self.speed!r}") from None
        checks = [
            (self.task in TASKS, f"task must be one of {', '.join(TASKS)}, not {self.task!r}"),
            (0 < self.size < 1, "size must be a share of the teacher's parameters in (0, 1), e.g. 0.5"),
            (self.speed is None or self.speed > 0, "speed must be a factor above 0, e.g. 2x"),
            (0 < self.eval_split < 1, "eval_split must be in (0, 1)"),
            (self.eval_limit is None or self.eval_limit >= 1, "eval_limit must be >= 1"),
            (self.calib_tokens >= 16, "calib_tokens must be at least a few hundred"),
            (self.quant in QUANTS, f"quant must be one of {', '.join(QUANTS)}"),
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}"),
            (self.method in ("auto", "rtn") or self.quant != "none", f"method {self.method} quantizes: give quant int4 or int8"),
            (self.speed_rounds >= 1, "speed_rounds must be >= 1"),
            (isinstance(self.distill, dict), "distill must be a mapping of pocketlm distill settings"),
            (not set(self.distill) & set(OWN_BY_SHRINK), f"distill: {', '.join(sorted(set(self.distill) & set(OWN_BY_SHRINK)))} "
                                                       "come from the shrink settings, not from distill"),
        ]
        for ok, message in checks:
            if not ok:
                raise PocketLMError(message)

    @property
    def prune_target(self) -> dict:
        """What the prune stage aims at: a size, or a speed measured with the student's quantization."""
        return {"size": self.size} if self.speed is None else {"speed": self.speed, "quant": self.quant}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ShrinkConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PocketLMError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> ShrinkConfig:
        """A recipe file, then `overrides` (the flags given) on top; `distill` settings merge key by key.
        Relative data paths are relative to the recipe's folder, as in finetune's recipes."""
        from pocketlm.finetune.config import read_recipe

        d = read_recipe(path)
        overrides = dict(overrides or {})
        if "distill" in overrides:
            overrides["distill"] = {**(d.get("distill") or {}), **overrides["distill"]}
        return cls.from_dict({**d, **overrides}, source=str(path))


# (flag, field, type or "flag", help)
FLAGS = [
    ("--teacher", "teacher", str, "the model to shrink: a classifier folder (finetune --task classify) or a generative model"),
    ("--data", "data", str, "training data, JSONL ({text, label} for a classifier; any finetune format for a generator)"),
    ("-o/--out", "out", str, "the run folder: stages/ (each stage's output, for resuming), report.md, export/"),
    ("--eval-data", "eval_data", str, "held-out JSONL (default: --eval-split of --data)"),
    ("--eval-split", "eval_split", float, "share of --data held out when there is no --eval-data (seeded; default 0.1)"),
    ("--eval-limit", "eval_limit", int, "held-out examples scored (a seeded subset; default all)"),
    ("--task", "task", str, "classify | sft | auto (default auto: classify for a teacher with a classification head)"),
    ("--size", "size", float, "the student's non-embedding parameters as a share of the teacher's, at most (default 0.5)"),
    ("--speed", "speed", str, "instead of --size: drop the fewest blocks that make the student (quantized by --quant) this many "
                              "times the teacher's speed, measured on this machine: 2x, 1.5"),
    ("--calib-tokens", "calib_tokens", int, "training tokens the pruning importance is measured on (default 8192)"),
    ("--quant", "quant", str, f"the student's weights: {' | '.join(QUANTS)} (default int4)"),
    ("--method", "method", str, "gptq (default) | awq: calibrated on the training text; rtn: round-to-nearest"),
    ("--speed-rounds", "speed_rounds", int, "teacher and student timed in turn this many times, the median counts (default 3)"),
    ("--no-bench", "bench", "false", "skip `pocketlm bench` of each side (decode/prompt tokens/s, peak memory)"),
    ("--gguf-type", "gguf_type", str, "the exported GGUF's type (default q4_0 for int4, q8_0 for int8, f16 for none)"),
    ("--serve", "serve", "flag", "serve the student when it is done (pocketlm serve; generators)"),
    ("--port", "port", int, "--serve's port (default 8000)"),
    ("--seed", "seed", int, "the held-out split and every seeded choice (default 0)"),
    ("--quiet", "quiet", "flag", "no progress display"),
]
DISTILL_FLAGS = [  # pocketlm distill's most used settings, into the `distill` mapping
    ("--steps", "steps", int, "distillation steps (default: from epochs, 3 for a classifier, 1 for a generator)"),
    ("--epochs", "epochs", float, "distillation passes over the training split"),
    ("--lr", "lr", float, "distillation's peak learning rate (default 1e-4)"),
    ("--batch-size", "batch_size", int, "distillation's batch (default 16 for a classifier, 8 for a generator)"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a recipe YAML (recipes/shrink-*.yaml) for the whole chain; flags given here override it")
    for flag, dest, kind, help_text in FLAGS + DISTILL_FLAGS:
        names = flag.split("/")
        if kind == "flag":
            p.add_argument(*names, dest=dest, action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif kind == "false":
            p.add_argument(*names, dest=dest, action="store_false", default=argparse.SUPPRESS, help=help_text)
        else:
            p.add_argument(*names, dest=dest, type=kind, default=argparse.SUPPRESS, help=help_text)


def config_from_args(args: argparse.Namespace) -> ShrinkConfig:
    overrides = {dest: getattr(args, dest) for _, dest, _, _ in FLAGS if hasattr(args, dest)}
    distill = {dest: getattr(args, dest) for _, dest, _, _ in DISTILL_FLAGS if hasattr(args, dest)}
    if distill:
        overrides["distill"] = distill
    if args.config:
        return ShrinkConfig.from_yaml(args.config, overrides)
    return ShrinkConfig.from_dict(overrides, source="command line")
