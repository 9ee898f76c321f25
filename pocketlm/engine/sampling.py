"""Turning logits into the next token: small composable steps, applied in llama.cpp's order
(repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw).

Every step takes and returns (B, V) fp32 logits; a filtered-out token gets -inf.
"""

from __future__ import annotations

import torch

from pocketlm.engine.params import SamplingParams  # noqa: F401  (re-exported: the sampler's input)


def apply_repetition_penalty(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    # CTRL (Keskar et al. 2019), as llama.cpp and transformers: divide positive logits, multiply negative ones.
    # logits (B, V); recent (B, N) token ids already in the context
    if penalty == 1.0 or recent.numel() == 0:
        return logits
    seen = logits.gather(-1, recent)  # (B, N)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, recent, seen)


def recent_ids(ids: torch.Tensor, window: int) -> torch.Tensor:
    """ids (N,) -> (1, n): the last `window` ids, what the repetition penalty looks at (none for window 0)."""
    return ids[-window:][None] if window else ids[:0][None]


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    # Nucleus sampling (Holtzman et al. 2019): keep the smallest set whose probability reaches p.
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    # Keep tokens whose probability is at least min_p times the top token's (Nguyen et al. 2024).
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    threshold = probs.max(-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def token_distribution(logits: torch.Tensor, params: SamplingParams, recent: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> (B, V) the probabilities a sampled (temperature > 0) token is drawn from."""
    logits = apply_repetition_penalty(logits.float(), recent, params.repetition_penalty)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    return (logits / params.temperature).softmax(-1)


def greedy_token(logits: torch.Tensor, params: SamplingParams, recent: torch.Tensor) -> torch.Tensor:
    """(B, V) logits -> (B,) the most likely token after the repetition penalty (the first of equals)."""
    logits = apply_repetition_penalty(logits.float(), recent, params.repetition_penalty)
    if logits.device.type == "cpu":  # numpy's argmax: 5 us for SmolLM2's 49k logits, torch's 70 (per token of every stream)
        return torch.from_numpy(logits.numpy().argmax(-1))
    return logits.argmax(-1)


def sample(
    logits: torch.Tensor, params: SamplingParams, recent: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) next token ids."""
    if params.greedy:
        return greedy_token(logits, params, recent)
    return torch.multinomial(token_distribution(logits, params, recent), 1, generator=generator).squeeze(-1)


# Logits processors: callables (logits (B, V), generated ids so far) -> logits, handed to Generation.
# They carry per-request state (a bias table, a grammar), which SamplingParams, plain values, does not.
# The two below change fp32 logits in place, at the few ids they touch: a step's logits are its own, and a
# copy of the whole row for each token cost more than the rest of sampling (0.35 ms of a server's 0.75 ms per
# token for logit_bias, SmolLM2's 49k vocabulary, 8 streams).


def logit_bias_processor(bias: dict[int, float]):
    """Add a fixed value to chosen tokens' logits (OpenAI's logit_bias: -100 bans a token, 100 forces it)."""
    ids = torch.tensor(list(bias), dtype=torch.long)
    values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def process(logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        return logits.float().index_add_(-1, ids, values.expand(logits.size(0), -1))

    return process


def presence_frequency_processor(presence: float, frequency: float):
    """OpenAI's penalties on tokens already generated (not the prompt): subtract `presence` once per
    distinct token and `frequency` times its count."""

    def process(logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        if not generated:
            return logits
        ids, counts = torch.tensor(generated, dtype=torch.long).unique(return_counts=True)
        penalty = presence + frequency * counts.float()  # (N,)
        return logits.float().index_add_(-1, ids, -penalty.expand(logits.size(0), -1))

    return process
