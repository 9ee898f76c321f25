"""Perplexity of a model on a text: sliding windows with a stride (as in Hugging Face's perplexity guide),
the loss computed a chunk of positions at a time so the (T, V) logits never exist whole
(Gemma 3's 262k vocabulary makes them about 2 GB for 2,000 tokens in fp32)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_CHUNK = 256  # positions whose logits exist at once


@torch.inference_mode()
def sum_nll(model, ids: torch.Tensor, n_scored: int) -> float:
    """Sum of -log p(ids[t] | ids[:t]) over the last `n_scored` positions of ids (T,)."""
    h = model.hidden(ids[None])[0]  # (T, D)
    targets = ids[1:]  # position t predicts t + 1
    total = 0.0
    first = ids.numel() - 1 - n_scored
    for begin in range(first, ids.numel() - 1, LOSS_CHUNK):
        end = min(begin + LOSS_CHUNK, ids.numel() - 1)
        logits = model.logits(h[None, begin:end])[0].float()  # (chunk, V)
        total += F.cross_entropy(logits, targets[begin:end], reduction="sum").item()
    return total


def perplexity(model, ids: list[int], window: int = 1024, stride: int = 512, on_scored=None) -> dict:
    """Each window scores only the tokens the previous one did not, with up to window - stride of context.
    on_scored(n), if given, hears how many tokens each window scored (a progress bar)."""
    ids_t = torch.tensor(ids, dtype=torch.long, device=next(model.parameters()).device)  # where the model is (a GPU too)
    nll, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        n_new = end - max(prev_end, begin + 1)  # targets in this window not scored before
        nll += sum_nll(model, ids_t[begin:end], n_new)
        scored += n_new
        prev_end = end
        if on_scored is not None:
            on_scored(n_new)
        if end == len(ids):
            break
    return {"perplexity": math.exp(nll / scored), "nll": nll / scored, "tokens": scored}
