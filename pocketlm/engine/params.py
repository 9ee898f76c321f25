"""What a caller may ask of one generation: plain values, no torch (so `pocketlm --help` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
