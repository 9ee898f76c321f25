"""Sentence embeddings from an encoder model: tokenize, pad into batches, mean-pool, L2-normalize."""

from __future__ import annotations

import torch

BATCH = 32


@torch.inference_mode()
def embed(lm, texts: list[str]) -> torch.Tensor:
    """texts -> (N, D) unit vectors, as sentence-transformers' all-MiniLM-L6-v2 computes them."""
    max_len = lm.context_length
    pad = lm.tokenizer.pad_id or 0
    out = []
    for begin in range(0, len(texts), BATCH):
        ids = [lm.tokenizer.encode(t) for t in texts[begin : begin + BATCH]]
        ids = [x if len(x) <= max_len else x[: max_len - 1] + x[-1:] for x in ids]  # keep [SEP] last
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])  # (B, T)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])  # (B, T)
        out.append(lm.model.embed(input_ids, mask).float())
    return torch.cat(out)  # (N, D)
