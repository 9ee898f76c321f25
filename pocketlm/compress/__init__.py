"""Making models smaller: structured pruning (prune.py), knowledge distillation (distill.py: the losses and the
teacher's targets; xtok.py: teachers with another tokenizer; rollout.py: the student's samples and the teacher's
answers), the distillation recipe for those (distill_recipe.py; the same-tokenizer loop is pocketlm.finetune.recipe's),
draft heads (draft_head.py) and the whole road from a teacher to an evaluated student (shrink.py)."""
