"""Loaded models and the worker thread that runs requests.

One worker thread runs one request at a time, in arrival order, from a bounded queue: on 2 CPU cores a
second decode in parallel would only share the same cores. (Continuous batching, several sequences in
one forward pass, needs per-sequence positions in the models' KV cache; see the README.) The HTTP side
never blocks on the model: it puts a Job in the queue and reads the Job's events as they come.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from pocketlm import registry
from pocketlm.errors import PocketLMError
from pocketlm.serve.config import ServerConfig
from pocketlm.serve.protocol import (
    Delta, Done, Embedded, EmbedRequest, Failed, Finished, GenerateRequest, Started, TokenLogprob,
)


class Cancelled(Exception):
    """The client went away: stop decoding and free the worker."""


@dataclass
class Job:
    request: GenerateRequest | EmbedRequest
    emit: Callable[[object], None]  # called from the worker thread with each event
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled.set()


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        self.retry_after_s = retry_after_s


@dataclass
class Slot:
    lm: object  # pocketlm.load.LoadedModel
    memory_bytes: int
    loaded_at: float
    last_used: float


class ModelPool:
    """Models by name, loaded on first use; beyond max_loaded the least recently used one leaves."""

    def __init__(self, config: ServerConfig, refs: dict[str, str]):
        self.config, self.refs = config, refs  # refs: served name -> registry name or path
        self.slots: OrderedDict[str, Slot] = OrderedDict()
        self.lock = threading.Lock()  # the worker changes slots; /api/ps reads them

    def get(self, name: str):
        """The model served as `name` (only the worker thread calls this, so loads never race)."""
        with self.lock:
            slot = self.slots.get(name)
            if slot is not None:
                self.slots.move_to_end(name)
                slot.last_used = time.time()
                return slot.lm
            while len(self.slots) >= self.config.max_loaded:
                self.slots.popitem(last=False)  # least recently used; freed before the next one loads
        lm = self._load(self.refs.get(name, name))
        lm.name = name
        now = time.time()
        with self.lock:
            self.slots[name] = Slot(lm, model_bytes(lm.model), now, now)
        return lm

    def _load(self, name: str):
        import torch

        from pocketlm.load import load

        return load(name, dtype=getattr(torch, self.config.dtype), quant=self.config.quant)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return [
                {"name": name, "memory_bytes": s.memory_bytes, "load_s": round(s.lm.load_s, 3),
                 "loaded_at": int(s.loaded_at), "last_used": int(s.last_used),
                 "context_length": s.lm.context_length, "kind": "embed" if s.lm.is_encoder else "generate"}
                for name, s in self.slots.items()
            ]


def model_bytes(model) -> int:
    """Bytes of parameters and buffers (tied weights counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class Scheduler:
    def __init__(self, config: ServerConfig, pool: ModelPool, metrics=None):
        self.pool, self.metrics = pool, metrics
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=config.max_queue)
        self.busy = False
        self.job_s = 2.0  # moving average of a job's duration, for Retry-After
        self.thread = threading.Thread(target=self._loop, name="pocketlm-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(max(1, round(self.job_s * (self.queue.qsize() + 1)))) from None

    def depth(self) -> int:
        return self.queue.qsize() + (1 if self.busy else 0)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job.cancelled.is_set():  # its client left while it waited
                self._count_cancel()
                job.emit(Done())
                continue
            self.busy, start = True, time.monotonic()
            try:
                run(job, self.pool)
            except Cancelled:
                self._count_cancel()
            except PocketLMError as e:
                job.emit(Failed(400, str(e)))
            except Exception as e:  # a bug, not the client's fault: say so, keep serving
                job.emit(Failed(500, f"internal error: {type(e).__name__}: {e}"))
            finally:
                self.busy = False
                self.job_s = 0.8 * self.job_s + 0.2 * (time.monotonic() - start)
                job.emit(Done())

    def _count_cancel(self) -> None:
        if self.metrics is not None:
            self.metrics.cancelled.inc()


def run(job: Job, pool: ModelPool) -> None:
    request = job.request
    lm = pool.get(request.model)
    if isinstance(request, EmbedRequest):
        return run_embed(job, lm)
    from pocketlm.engine.generate import encode_chat, encode_raw, generate
    from pocketlm.engine.sampling import logit_bias_processor, presence_frequency_processor
    from pocketlm.serve.constrain import grammar_processor

    if lm.is_encoder:
        raise PocketLMError(f"{lm.name} is an embedding model: use /v1/embeddings")
    tokenizer = lm.tokenizer
    out_of_range = [t for t in request.logit_bias if t >= lm.config.vocab_size]
    if out_of_range:
        raise PocketLMError(f"logit_bias: token id {out_of_range[0]} is not in {lm.name}'s vocabulary of {lm.config.vocab_size}")

    def check_cancel(logits, generated):  # a processor, so it runs at every decode step
        if job.cancelled.is_set():
            raise Cancelled
        return logits

    generations, prompt_tokens = [], 0
    for prompt in request.prompts:
        if isinstance(prompt, str):
            ids = encode_raw(tokenizer, prompt)
        elif not tokenizer.has_chat_template:
            raise PocketLMError(f"{lm.name} is a base model with no chat template: use /v1/completions")
        else:
            ids = encode_chat(tokenizer, prompt)
        prompt_tokens += len(ids)
        for j in range(request.n):
            params = request.params
            if params.seed is not None and j:  # n choices from one seed must still differ
                params = type(params)(**{**params.__dict__, "seed": (params.seed + j) % 2**64})
            processors = [check_cancel]
            if request.logit_bias:
                processors.append(logit_bias_processor(request.logit_bias))
            if request.presence_penalty or request.frequency_penalty:
                processors.append(presence_frequency_processor(request.presence_penalty, request.frequency_penalty))
            if request.grammar is not None:  # last: nothing after it may re-enable a masked token
                processors.append(grammar_processor(tokenizer, request.grammar, lm.config.vocab_size))
            # Built now, not in the loop below, so a prompt over the context window fails before any output.
            generations.append(generate(lm, ids, params, processors, request.logprobs))
    job.emit(Started(lm.name, prompt_tokens))

    def logprobs_of(entries) -> list[TokenLogprob]:
        text = lambda i: tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
        return [TokenLogprob(text(t), lp, [(text(i), p) for i, p in top]) for t, (lp, top) in entries]

    for index, generation in enumerate(generations):
        stats, sent = generation.stats, 0
        for text in generation:
            # the tokens that produced this text (a stop string may have held some back)
            entries = list(zip(stats.token_ids[sent:], stats.token_logprobs[sent:]))
            sent = len(stats.token_logprobs)
            job.emit(Delta(index, text, logprobs_of(entries)))
        rest = list(zip(stats.token_ids[sent:], stats.token_logprobs[sent:]))
        if rest:
            job.emit(Delta(index, "", logprobs_of(rest)))
        job.emit(Finished(index, stats.finish_reason, stats.completion_tokens,
                          stats.time_to_first_token_s, stats.decode_tokens_per_s))


def run_embed(job: Job, lm) -> None:
    from pocketlm.engine.embed import embed

    if not lm.is_encoder:
        raise PocketLMError(f"{lm.name} is not an embedding model; try {registry.DEFAULT_EMBED_MODEL}")
    limit = lm.context_length
    counts = [len(lm.tokenizer.encode(t)) for t in job.request.texts]
    too_long = [(i, c) for i, c in enumerate(counts) if c > limit]
    if too_long:
        i, c = too_long[0]
        raise PocketLMError(f"input {i} is {c} tokens but {lm.name}'s context window is {limit} tokens; shorten it")
    vectors = embed(lm, job.request.texts).tolist()
    job.emit(Embedded(lm.name, vectors, sum(counts)))
