"""`pocketlm distill`'s settings beyond fine-tuning's: a dataclass and its flags, without torch (as finetune.config),
so the CLI parses and checks them before any heavy import. The recipe is pocketlm.compress.distill_recipe.

    cfg = DistillConfig.from_yaml("recipes/b77-xtok-distill.yaml", overrides={"on_policy": 0.5})
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pocketlm.errors import PocketLMError
from pocketlm.finetune.config import FinetuneConfig

OWN_KEYS = ("on_policy", "on_policy_tokens", "on_policy_temperature", "teacher_answers", "teacher_answer_tokens", "xtok_top_k")


@dataclass
class DistillConfig(FinetuneConfig):
    """FinetuneConfig with the teacher (`teacher` set) and the options of this recipe; recipes/*.yaml use the names."""

    on_policy: float = 0.0  # share of each batch replaced by the student's own samples to the units' prompts (GKD)
    on_policy_tokens: int = 64  # longest sample
    on_policy_temperature: float = 1.0  # the student samples its full softmax at this temperature (GKD: 1)
    teacher_answers: bool = False  # the teacher's greedy answers to the training prompts replace the data's answers
    teacher_answer_tokens: int = 128  # longest teacher answer
    generate_batch: int = 16  # prompts the teacher answers together
    # a teacher with another tokenizer: at the first position of each aligned span that both start with the same
    # bytes, its top tokens that the student's vocabulary spells too (and the rest together) are matched as a
    # distribution; 0 (the default): the spans' likelihoods only (xtok's ALM), which did as well on the tests' task
    xtok_top_k: int = 0

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (0 <= self.on_policy <= 1, "on_policy must be a fraction in [0, 1]"),
            (self.on_policy_tokens >= 1, "on_policy_tokens must be >= 1"),
            (self.on_policy_temperature >= 0, "on_policy_temperature must be >= 0 (0: greedy)"),
            (self.teacher_answer_tokens >= 1, "teacher_answer_tokens must be >= 1"),
            (self.generate_batch >= 1, "generate_batch must be >= 1"),
            (self.xtok_top_k >= 0, "xtok_top_k must be >= 0"),
            (not (self.on_policy or self.teacher_answers) or self.task == "sft",
             "on_policy and teacher_answers are for generative distillation, not --task classify"),
        ]
        for ok, message in checks:
            if not ok:
                raise PocketLMError(message)


FLAGS = [
    ("--on-policy", "on_policy", float, "share of each batch made of the student's own answers to its prompts, scored by the teacher (GKD; default 0)"),
    ("--on-policy-tokens", "on_policy_tokens", int, "longest student sample (default 64)"),
    ("--on-policy-temperature", "on_policy_temperature", float, "the student samples its softmax at this temperature (default 1; 0 = greedy)"),
    ("--teacher-answers", "teacher_answers", "flag", "sequence-level distillation: the teacher's greedy answers to the training prompts replace the data's answers (generated once into OUT/teacher_answers.jsonl)"),
    ("--teacher-answer-tokens", "teacher_answer_tokens", int, "longest teacher answer (default 128)"),
    ("--generate-batch", "generate_batch", int, "prompts the teacher answers together (default 16)"),
    ("--xtok-top-k", "xtok_top_k", int, "another tokenizer's teacher: its top K tokens also matched where an aligned span starts with the same token on both sides, over the tokens both vocabularies spell (default 0: span likelihoods only)"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """finetune's flags with --student and the teacher's (finetune.args), then this recipe's."""
    from pocketlm.finetune.args import add_finetune_arguments

    add_finetune_arguments(p, distill=True)
    g = p.add_argument_group("on-policy and sequence-level distillation")
    for flag, dest, kind, help_text in FLAGS:
        if kind == "flag":
            g.add_argument(flag, dest=dest, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            g.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=help_text)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    from pocketlm.finetune.args import DISTILL_FLAGS
    from pocketlm.finetune.args import FLAGS as FINETUNE_FLAGS

    names = [dest for _, dest, _, _ in DISTILL_FLAGS + FINETUNE_FLAGS + FLAGS] + ["model"]
    overrides = {dest: getattr(args, dest) for dest in names if hasattr(args, dest)}
    if args.config:
        return DistillConfig.from_yaml(args.config, overrides)
    return DistillConfig.from_dict(overrides, source="command line")
