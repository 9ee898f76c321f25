"""Making models smaller: structured pruning (prune.py); distillation losses later."""
