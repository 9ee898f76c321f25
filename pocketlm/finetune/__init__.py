"""Fine-tuning: supervised fine-tuning (full or LoRA) with the model's chat template, and classification heads.

    from pocketlm.finetune import FinetuneConfig, finetune
    finetune(FinetuneConfig(model="smollm2-135m-instruct", data="train.jsonl", out="out/run", lora_r=16, merge=True))

    from pocketlm.finetune.classify import Classifier
    Classifier.load("out/head").predict(["my card has not arrived"])

config.py   the run's settings (a dataclass; recipes/*.yaml use its field names)
data.py     JSONL -> conversations -> ids + assistant-only labels -> packing, batches, the data stream
lora.py     peft LoRA on the native models, adapters in PEFT's format, merging; gradient checkpointing
classify.py a classification head on a pooled hidden state; save, load, predict
checkpoint.py  atomic training checkpoints and --resume
recipe.py   the training script: the loop, written out
"""

from pocketlm.finetune.config import FinetuneConfig


def finetune(cfg: FinetuneConfig) -> dict:
    from pocketlm.finetune.recipe import finetune as run

    return run(cfg)


__all__ = ["FinetuneConfig", "finetune"]
