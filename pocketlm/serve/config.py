"""What `pocketlm serve` is started with. No torch here: the CLI builds it before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    models: list[str] = field(default_factory=list)  # names offered; empty: every installed registry model
    host: str = "127.0.0.1"  # loopback: nothing outside this machine can reach it unless asked
    port: int = 8000
    api_key: str | None = None  # when set, every route but the chat page and a minimal /health wants "Authorization: Bearer KEY"
    allow_origins: list[str] = field(default_factory=list)  # web pages of other origins that may call it (fnmatch patterns)
    allow_hosts: list[str] = field(default_factory=list)  # Host names it answers besides loopback and the bind address
    max_loaded: int = 2  # models kept in memory; the least recently used one leaves first
    max_batch: int = 8  # sequences decoded together (continuous batching); each has a KV cache row (slot)
    max_queue: int = 16  # requests waiting for a free slot; one more gets 429 with Retry-After
    max_body_bytes: int = 2 * 1024 * 1024  # larger bodies get 413 (a full 8k-token prompt is ~40 KB)
    default_max_tokens: int = 512  # when a request names no max_tokens (the context window still bounds it)
    max_n: int = 8  # choices per request
    threads: int | None = None  # torch's intra-op threads; None: torch's default (one per core)
    follow_threads: int = 0  # > 0: the worker follows the other processes' load, up to this many threads (pocketlm/threads.py)
    dtype: str = "float32"
    quant: str = "none"
    draft: str | None = None  # a model with the served chat models' tokenizer: speculative decoding (engine/batch.py)
    draft_tokens: int = 4  # tokens it proposes per check
    adapters: dict[str, str] = field(default_factory=dict)  # --lora NAME=PATH: LoRA adapters served unmerged over the first model

    def __post_init__(self) -> None:
        for name in ("max_loaded", "max_batch", "max_queue", "max_body_bytes", "default_max_tokens", "max_n", "threads", "draft_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                from pocketlm.errors import PocketLMError

                raise PocketLMError(f"{name.replace('_', '-')} must be >= 1")
