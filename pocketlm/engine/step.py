"""The two model calls generation is made of: `prefill` (the prompt into the KV cache) and `decode_one_token`.

Small functions a compiler can take, below everything that drives them: engine/generate.py's Generation,
engine/speculative.py's drafters and engine/batch.py's Batch import them from here (and not from each other).
"""

from __future__ import annotations

import torch

from pocketlm.models.fused_step import fused_logits

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds the (T, S) attention mask and activations


@torch.inference_mode()
def prefill(model, idx: torch.Tensor, start: int = 0, slot: int | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt through the model, filling the cache from position `start` (in cache row `slot` alone,
    for a batch of sequences: idx (1, T) then). idx (B, T) -> logits of the last position (B, V). hidden (B, D),
    when given, receives the last position's final-norm hidden state (what a draft head starts from)."""
    for begin in range(0, idx.size(1), PREFILL_CHUNK):
        chunk = idx[:, begin : begin + PREFILL_CHUNK]  # (B, t)
        input_pos = torch.arange(start + begin, start + begin + chunk.size(1))
        if begin + PREFILL_CHUNK >= idx.size(1):  # the last chunk: a short one of one sequence takes the fused step
            slots = None if slot is None else torch.tensor([slot])
            logits = fused_logits(model, chunk, input_pos if slot is None else input_pos[None], slots, last_only=True, hidden=hidden)
            if logits is not None:
                return logits[:, -1]  # (1, V)
        if slot is None:
            h = model.hidden(chunk, input_pos)  # (B, t, D)
        else:
            h = model.hidden(chunk, input_pos[None], torch.tensor([slot]))  # (1, t, D)
    if hidden is not None:
        hidden.copy_(h[:, -1])
    # Only the last position's logits: Gemma's 262k vocabulary makes the full (T, V) block large.
    return model.logits(h[:, -1:])[:, -1]  # (B, V)


@torch.inference_mode()
def decode_one_token(model, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """token (B, 1), input_pos (1,) -> logits (B, V)."""
    return model(token, input_pos)[:, -1]
