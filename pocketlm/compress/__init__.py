"""Making models smaller: structured pruning (prune.py) and knowledge distillation (distill.py: the losses and
the teacher's targets; the training loop is pocketlm.finetune.recipe's)."""
