"""How closely a model follows a reference model token by token: KL(ref || model) and top-1 agreement.

The yardstick for a quantized, pruned or distilled model against its full-precision teacher, as llama.cpp's
`perplexity --kl-divergence` reports it (mean, median and 99th percentile KL; "same top p"). Both models read
the same windows of the text as the perplexity does (perplexity.py), and the logits are compared a chunk of
positions at a time, so no (T, V) block exists whole.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pocketlm.eval.metrics import kl_and_top1

CHUNK = 128  # positions whose logits (of both models) exist at once


@torch.inference_mode()
def agreement_stats(model, ref_model, ids: torch.Tensor, window: int, stride: int, on_scored=None) -> dict:
    """ids (N,) -> KL and top-1 numbers over every predicted position, plus both perplexities."""
    kl_parts, agree, nll, ref_nll, scored, prev_end = [], 0, 0.0, 0.0, 0, 0
    n = ids.numel()
    for begin in range(0, n - 1, stride):
        end = min(begin + window, n)
        n_new = end - max(prev_end, begin + 1)  # targets this window scores that the previous did not
        chunk = ids[begin:end]  # (T,)
        h = model.hidden(chunk[None])[0]  # (T, D)
        h_ref = ref_model.hidden(chunk[None])[0]  # (T, D_ref)
        targets = chunk[1:]  # position t predicts t + 1
        for b in range(chunk.numel() - 1 - n_new, chunk.numel() - 1, CHUNK):
            e = min(b + CHUNK, chunk.numel() - 1)
            logits = model.logits(h[None, b:e])[0].float()  # (c, V)
            ref_logits = ref_model.logits(h_ref[None, b:e])[0].float()  # (c, V)
            kl, same = kl_and_top1(ref_logits, logits)
            kl_parts.append(kl)
            agree += int(same.sum())
            nll += F.cross_entropy(logits, targets[b:e], reduction="sum").item()
            ref_nll += F.cross_entropy(ref_logits, targets[b:e], reduction="sum").item()
        scored += n_new
        prev_end = end
        if on_scored is not None:
            on_scored(n_new)
        if end == n:
            break
    kl = torch.cat(kl_parts).clamp_min(0)  # (scored,); tiny negatives are fp32 rounding of equal distributions
    return {
        "kl_mean": kl.mean().item(),
        "kl_median": kl.median().item(),
        "kl_p99": torch.quantile(kl, 0.99).item() if kl.numel() <= 2**24 else float("nan"),
        "top1_agreement": agree / scored,
        "perplexity": math.exp(nll / scored),
        "reference_perplexity": math.exp(ref_nll / scored),
        "tokens": scored,
        "kl_per_token": kl.tolist(),
    }
