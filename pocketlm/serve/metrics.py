"""Prometheus metrics, in a registry of the app's own (two apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pocketlm_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("pocketlm_request_latency_seconds", "Request start to last byte sent", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pocketlm_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.cached_tokens = Counter("pocketlm_prompt_cached_tokens", "Prompt tokens taken from the prefix cache, not computed", ["model"], registry=r)
        self.completion_tokens = Counter("pocketlm_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("pocketlm_time_to_first_token_seconds", "Prefill until the first token (per choice)", buckets=LATENCY_BUCKETS, registry=r)
        self.decode_rate = Histogram("pocketlm_decode_tokens_per_second", "Decode speed of each finished choice", buckets=RATE_BUCKETS, registry=r)
        self.draft_tokens = Counter("pocketlm_draft_tokens", "Tokens a draft model proposed (serve --draft)", registry=r)
        self.draft_accepted = Counter("pocketlm_draft_accepted", "Proposed tokens the served model kept", registry=r)
        self.batch_size = Histogram("pocketlm_decode_batch_size", "Sequences decoded together in one forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("pocketlm_queue_depth", "Requests waiting or running", registry=r)
        self.cancelled = Counter("pocketlm_cancelled", "Requests whose client went away before the end", registry=r)
        self.rejected = Counter("pocketlm_rejected", "Requests refused with 429 because the queue was full", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
