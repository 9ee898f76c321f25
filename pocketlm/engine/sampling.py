"""Turning logits into the next token: small composable steps, applied in llama.cpp's order
(repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw).

Every step takes and returns (B, V) fp32 logits; a filtered-out token gets -inf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pocketlm.errors import PocketLMError


@dataclass
class SamplingParams:
    """What a caller may ask of one generation. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.9  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off
    repetition_penalty: float = 1.1  # 1.0 = off; CTRL-style, as llama.cpp's repeat_penalty
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at (-1: all)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past end tokens (benchmarks that want exactly max_new_tokens)

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise PocketLMError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    # CTRL (Keskar et al. 2019), as llama.cpp and transformers: divide positive logits, multiply negative ones.
    # logits (B, V); recent (B, N) token ids already in the context
    if penalty == 1.0 or recent.numel() == 0:
        return logits
    seen = logits.gather(-1, recent)  # (B, N)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, recent, seen)


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


def sample(
    logits: torch.Tensor, params: SamplingParams, recent: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) next token ids."""
    logits = apply_repetition_penalty(logits.float(), recent, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    probs = (logits / params.temperature).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
