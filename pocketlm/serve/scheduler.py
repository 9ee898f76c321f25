"""Loaded models and the worker thread that runs requests.

One worker thread owns the models. Requests wait in a bounded queue; between decode steps the worker takes
as many as there are free slots (`max_batch` sequences in all) and seats each new sequence in a slot of its
model's batch (pocketlm.engine.batch: continuous batching with a prefix cache). Each turn of its loop runs
a chunk of the new prompts, then one decode step for all sequences together, and hands each sequence its
logits to sample from with its own settings. The HTTP side never blocks on the model: it puts a Job in the
queue and reads the Job's events as they come.
"""

from __future__ import annotations

import queue
import sys
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


@dataclass(eq=False)  # compared and hashed by identity
class Job:
    request: GenerateRequest | EmbedRequest
    emit: Callable[[object], None]  # called from the worker thread with each event
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0  # when the worker took it from the queue
    open_choices: int = 0  # choices still decoding; the job is done at 0

    def cancel(self) -> None:
        self.cancelled.set()


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        self.retry_after_s = retry_after_s


@dataclass
class Loaded:
    lm: object  # pocketlm.load.LoadedModel
    memory_bytes: int
    loaded_at: float
    last_used: float  # when a request last started or ended on it
    keep_alive_s: float | None = None  # unloaded this long after last_used (a request's keep_alive); None: kept


class ModelPool:
    """Models by name, loaded on first use; beyond max_loaded the least recently used one leaves. A LoRA adapter
    (--lora) is no model of its own: it loads with its base, and its LoadedModel runs the base's model with it."""

    def __init__(self, config: ServerConfig, refs: dict[str, str]):
        self.config, self.refs = config, refs  # refs: served name -> registry name or path
        # --lora NAME=PATH: each adapter's name -> the served model it runs over (the first one named)
        self.lora = {name: next(iter(refs)) for name in config.adapters} if refs else {}
        self.slots: OrderedDict[str, Loaded] = OrderedDict()
        self.lock = threading.Lock()  # the worker changes slots; /api/ps reads them
        self.draft: Loaded | None = None  # --draft's model, once loaded
        self.draft_target = ""  # the served model a draft head was loaded for

    def get(self, name: str):
        """The model served as `name` (only the worker thread calls this, so loads never race)."""
        if name in self.lora:  # a LoRA adapter: its base's model (loaded with every adapter) run with this one
            return self.get(self.lora[name]).lora_views[name]
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
        lm.lora_views = {}  # its LoRA adapters' LoadedModels: one model, shared (pocketlm/models/lora.py)
        adapters = {a: self.config.adapters[a] for a, base in self.lora.items() if base == name}
        if adapters:
            from pocketlm.load import load_adapters

            lm.lora_views = load_adapters(lm, adapters)
        now = time.time()
        with self.lock:
            self.slots[name] = Loaded(lm, model_bytes(lm.model), now, now)
        return lm

    def keep(self, name: str, seconds: float | None) -> None:
        """A request's keep_alive (Ollama's): the model stays this long after its last request; < 0: until evicted."""
        with self.lock:
            if name in self.slots:
                self.slots[name].keep_alive_s = None if seconds is None or seconds < 0 else seconds

    def touch(self, name: str) -> None:
        with self.lock:
            if name in self.slots:
                self.slots[name].last_used = time.time()

    def unload(self, name: str) -> bool:
        """Forget the model (a request still decoding on it keeps it until it ends). -> whether it was loaded."""
        with self.lock:
            return self.slots.pop(name, None) is not None

    def expire(self, busy: set[str]) -> float | None:
        """Unload the models whose keep_alive ran out, but not those in `busy`. -> seconds until the next one does."""
        now, soonest = time.time(), None
        with self.lock:
            for name, slot in list(self.slots.items()):
                if slot.keep_alive_s is None or name in busy:
                    continue
                left = slot.last_used + slot.keep_alive_s - now
                if left <= 0:
                    del self.slots[name]
                else:
                    soonest = left if soonest is None else min(soonest, left)
        return soonest

    def draft_for(self, lm):
        """The draft model (--draft) for lm, loaded with the first model that takes it; None without one, for an
        embedding model, or for a model whose tokenizer differs from the draft's (said once on the server's output)."""
        if not self.config.draft or lm.is_encoder:
            return None
        if self.draft is None:
            import torch

            from pocketlm.load import load_draft

            try:  # a draft head is loaded for (and attached to) the first model that takes it
                draft = load_draft(self.config.draft, lm, getattr(torch, self.config.dtype), self.config.quant)
            except PocketLMError as e:  # a head made for another model
                print(f"pocketlm: {e}: {lm.name} runs without speculative decoding", file=sys.stderr, flush=True)
                return None
            draft.name, now = self.config.draft, time.time()
            with self.lock:
                self.draft, self.draft_target = Loaded(draft, model_bytes(draft.model), now, now), lm.name
        if hasattr(self.draft.lm.model, "attach"):  # a draft head: it reads this model's embedding, once it is its own
            if lm.name != self.draft_target:
                print(f"pocketlm: the draft head {self.config.draft} serves {self.draft_target}, not {lm.name}: {lm.name} "
                      f"runs without speculative decoding", file=sys.stderr, flush=True)
                return None
            self.draft.lm.model.attach(lm.model)  # the model may have been unloaded and loaded again since
        if not lm.tokenizer.same_vocabulary(self.draft.lm.tokenizer):
            print(f"pocketlm: the draft {self.config.draft} has another tokenizer than {lm.name}: {lm.name} runs "
                  f"without speculative decoding", file=sys.stderr, flush=True)
            return None
        self.draft.last_used = time.time()
        return self.draft.lm

    def _load(self, name: str):
        import torch

        from pocketlm.load import load

        return load(name, dtype=getattr(torch, self.config.dtype), quant=self.config.quant)

    def snapshot(self) -> list[dict]:
        """The loaded models, the draft (kind "draft") last."""
        with self.lock:
            loaded = [(name, s, "embed" if s.lm.is_encoder else "generate") for name, s in self.slots.items()]
            loaded += [(self.draft.lm.name, self.draft, "draft")] if self.draft else []
            return [
                {"name": name, "memory_bytes": s.memory_bytes, "load_s": round(s.lm.load_s, 3),
                 "loaded_at": int(s.loaded_at), "last_used": int(s.last_used),
                 "expires_at": None if s.keep_alive_s is None else s.last_used + s.keep_alive_s,
                 "context_length": s.lm.context_length, "kind": kind}
                for name, s, kind in loaded
            ]


def model_bytes(model) -> int:
    """Bytes of parameters and buffers (tied weights counted once), and of the copies quantized layers keep in their
    kernels' layouts (Int4Linear.packed, Int8Linear.packed_weight: not buffers, since they are never saved)."""
    import torch

    seen, total = set(), 0
    layouts = [getattr(m, name, None) for m in model.modules() for name in ("packed", "packed_weight")]
    for t in [*model.parameters(), *model.buffers(), *(t for t in layouts if isinstance(t, torch.Tensor))]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@dataclass(eq=False)
class Choice:
    """One choice of one request: a Sequence, in a slot of its model's batch or waiting for one."""

    job: Job
    index: int
    seq: object  # pocketlm.engine.generate.Sequence
    lm: object
    seated: bool = False
    sent: int = 0  # logprob entries already sent


class Scheduler:
    def __init__(self, config: ServerConfig, pool: ModelPool, metrics=None, hand_over: Callable[[], None] = lambda: None):
        """hand_over: called at the end of each turn of the worker's loop, when the turn's events have been emitted,
        and before the worker sleeps (the HTTP side's Outbox delivers them then, in one go)."""
        self.pool, self.metrics, self.max_batch, self.hand_over = pool, metrics, config.max_batch, hand_over
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=config.max_queue)
        self.choices: list[Choice] = []  # in arrival order
        self.running: set[Job] = set()  # taken from the queue and not done
        self.job_s = 2.0  # moving average of a job's duration, for Retry-After
        self.wake_in_s: float | None = None  # when idle, wake up then: a model's keep_alive runs out
        self.follow = None
        if config.follow_threads:  # no --threads given: as many threads as the other processes leave cores idle
            from pocketlm.threads import Follow

            self.follow = Follow(config.follow_threads)
        self.thread = threading.Thread(target=self._loop, name="pocketlm-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            # a slot frees about every job_s / max_batch seconds
            raise QueueFull(max(1, round(self.job_s * (self.queue.qsize() + 1) / self.max_batch))) from None

    def depth(self) -> int:
        return self.queue.qsize() + len(self.running)

    def _loop(self) -> None:
        while True:
            if self.follow is not None:
                self.follow.check()
            busy = {c.job.request.model for c in self.choices} | {job.request.model for job in self.running}
            self.wake_in_s = self.pool.expire(busy)
            self._admit()
            self._drop_cancelled()
            self._seat_waiting()
            self._step()
            self.hand_over()

    def _seat_waiting(self) -> None:
        """Waiting choices into free slots, the oldest first."""
        for choice in list(self.choices):
            if not choice.seated and choice in self.choices and self._batch(choice.lm).has_room():
                self._guarded(choice.job, self._seat, choice)

    def _step(self) -> None:
        """Each model's batch: a chunk of the new prompts, then one decode step; each choice samples its own
        next token from its logits."""
        # a base and its LoRA adapters (views of one model) share its batch: grouped by model
        for lm in {id(c.lm.model): c.lm for c in self.choices if c.seated}.values():
            batch = self._batch(lm)
            for run in (batch.prefill_step, batch.step):
                seated = {id(c.seq): c for c in self.choices if c.seated and c.lm.model is lm.model}
                try:
                    stepped = run()
                except Exception as e:  # a bug, not a client's fault: fail this batch's requests, keep serving
                    for choice in seated.values():
                        self._done(choice.job, internal_error(e))
                    break
                if run == batch.step and self.metrics is not None and stepped:
                    self.metrics.batch_size.observe(len(stepped))
                for seq, logits, proposals in stepped:
                    choice, kept = seated[id(seq)], 0
                    for i in range(len(logits)):  # one row, or a verify pass's: each while the draft guessed right
                        if choice not in self.choices:  # ended (done, or failed by another choice of its request)
                            break
                        token = self._guarded(choice.job, self._advance, choice, logits[i : i + 1])
                        if i == len(proposals) or token != proposals[i]:
                            break
                        kept += 1
                    if proposals:
                        seq.stats.draft_accepted += kept
                        if self.metrics is not None:
                            self.metrics.draft_tokens.inc(len(proposals))
                            self.metrics.draft_accepted.inc(kept)

    def _admit(self) -> None:
        """Take queued jobs while slots are free; wait for one when there is nothing to do."""
        while len(self.choices) < self.max_batch:
            if not self.choices:
                self.hand_over()  # what was emitted (a failed or cancelled job's last events) goes out before it sleeps
            try:
                job = self.queue.get(block=not self.choices, timeout=None if self.choices else self.wake_in_s)
            except queue.Empty:
                return
            if job.cancelled.is_set():  # its client left while it waited
                self._count_cancel()
                job.emit(Done())
                continue
            self.running.add(job)
            job.started_at = time.monotonic()
            self._guarded(job, self._start, job)

    def _start(self, job: Job) -> None:
        request = job.request
        if isinstance(request, GenerateRequest) and not request.prompts and request.keep_alive_s == 0:
            self.pool.unload(request.model)  # Ollama's unload: keep_alive 0 and nothing to answer
            job.emit(Started(request.model, 0))
            return self._done(job)
        lm = self.pool.get(request.model)
        if request.keep_alive_s is not None:
            self.pool.keep(request.model, request.keep_alive_s)
        if isinstance(request, GenerateRequest) and not request.prompts:  # Ollama's load: nothing to answer yet
            job.emit(Started(lm.name, 0))
            return self._done(job)
        if isinstance(request, EmbedRequest):
            run_embed(job, lm)
            return self._done(job)
        choices = sequences(request, lm)  # fails before any output for a prompt over the context window
        job.open_choices = len(choices)
        texts = [prompt_text(lm.tokenizer, prompt, choices[p * request.n].prompt_ids) for p, prompt in enumerate(request.prompts)]
        job.emit(Started(lm.name, sum(len(seq.prompt_ids) for j, seq in enumerate(choices) if j % request.n == 0),
                         [len(text) for text in texts]))
        if request.echo:
            echo(job, lm, choices, texts)
        if request.no_new_tokens:  # max_tokens 0: the prompt (echoed, scored) was the whole answer
            for i in range(len(choices)):
                job.emit(Finished(i, "length", 0, 0.0, 0.0))
            return self._done(job)
        self.choices += [Choice(job, i, seq, lm) for i, seq in enumerate(choices)]

    def _seat(self, choice: Choice) -> None:
        self._batch(choice.lm).add(choice.seq, getattr(choice.lm, "adapter", 0))
        choice.seated = True

    def _advance(self, choice: Choice, logits) -> int:
        """Sample the choice's next token from its logits (1, V) and send the text it makes visible. -> the token"""
        seq, stats = choice.seq, choice.seq.stats
        token, logits = seq.choose(logits)
        text = seq.accept(token, logits)
        if seq.done:
            text += seq.finish()
        if text or seq.done:
            # the tokens behind this text (a stop string may have held some back)
            entries = list(zip(stats.token_ids[choice.sent :], stats.token_logprobs[choice.sent :]))
            choice.sent = len(stats.token_logprobs)
            if seq.done and token in seq.stop_ids and seq.logprobs is not None and choice.job.request.end_token_logprob:
                from pocketlm.engine.generate import token_logprobs

                entries.append((token, token_logprobs(logits[0], token, seq.logprobs)))  # Sequence keeps no end token
            if text or entries:
                choice.job.emit(Delta(choice.index, text, logprobs_of(choice.lm.tokenizer, entries)))
        if seq.done:
            self._remove(choice)
            choice.job.emit(Finished(choice.index, stats.finish_reason, stats.completion_tokens,
                                     stats.time_to_first_token_s, stats.decode_tokens_per_s, stats.cached_tokens))
            choice.job.open_choices -= 1
            if not choice.job.open_choices:
                self._done(choice.job)
        return token

    def _guarded(self, job: Job, action, *args):
        """action(*args) for job; an error fails only this job (bad input: 400; a bug: 500), not the
        others in the batch, and the server keeps serving (-> None then)."""
        try:
            return action(*args)
        except PocketLMError as e:
            self._done(job, Failed(400, str(e)))
        except Exception as e:
            self._done(job, internal_error(e))

    def _drop_cancelled(self) -> None:
        """Free the slots of requests whose clients went away."""
        for job in {c.job for c in self.choices if c.job.cancelled.is_set()}:
            self._count_cancel()
            self._done(job)

    def _remove(self, choice: Choice) -> None:
        if choice.seated:
            self._batch(choice.lm).remove(choice.seq)
        self.choices.remove(choice)

    def _done(self, job: Job, failed: Failed | None = None) -> None:
        """End a job: its last events, its choices out of the batch. Once: several choices may fail it."""
        if job not in self.running:
            return
        self.running.discard(job)
        self.pool.touch(job.request.model)  # its keep_alive counts from here
        for choice in [c for c in self.choices if c.job is job]:
            self._remove(choice)
        self.job_s = 0.8 * self.job_s + 0.2 * (time.monotonic() - job.started_at)
        if failed is not None:
            job.emit(failed)
        job.emit(Done())

    def _batch(self, lm):
        """The model's batch of slots, made on first use; it lives (cache and prefix cache) as long as the model, and
        is kept on it: a base and its LoRA adapters' views share it."""
        if getattr(lm.model, "batch", None) is None:
            from pocketlm.engine.batch import Batch

            draft = self.pool.draft_for(lm)
            lm.model.batch = Batch(lm.model, self.max_batch, lm.context_length, draft and draft.model, self.pool.config.draft_tokens)
        return lm.model.batch

    def _count_cancel(self) -> None:
        if self.metrics is not None:
            self.metrics.cancelled.inc()


def internal_error(e: Exception) -> Failed:
    """A bug, not the client's fault: its traceback goes to the server's log (the client gets the one line)."""
    import traceback

    traceback.print_exception(e, file=sys.stderr)
    return Failed(500, f"internal error: {type(e).__name__}: {e}")


def sequences(request: GenerateRequest, lm) -> list:
    """The request's choices as Sequences: prompt by prompt, n each (choice index = prompt index * n + j)."""
    from pocketlm.engine.generate import Sequence, encode_chat, encode_raw
    from pocketlm.engine.sampling import logit_bias_processor, presence_frequency_processor
    from pocketlm.serve.constrain import grammar_processor

    if lm.is_encoder:
        raise PocketLMError(f"{lm.name} is an embedding model: use /v1/embeddings")
    tokenizer = lm.tokenizer
    out_of_range = [t for t in request.logit_bias if t >= lm.config.vocab_size]
    if out_of_range:
        raise PocketLMError(f"logit_bias: token id {out_of_range[0]} is not in {lm.name}'s vocabulary of {lm.config.vocab_size}")
    base_params, window = with_model_defaults(request, lm)
    out = []
    for prompt in request.prompts:
        if isinstance(prompt, str):
            ids = encode_raw(tokenizer, prompt)
        elif prompt and isinstance(prompt[0], int):  # token ids, taken as they are
            ids = prompt
            unknown = [t for t in ids if t >= lm.config.vocab_size]
            if unknown:
                raise PocketLMError(f"prompt token id {unknown[0]} is not in {lm.name}'s vocabulary of {lm.config.vocab_size}")
        elif not tokenizer.has_chat_template:
            raise PocketLMError(f"{lm.name} is a base model with no chat template: use /v1/completions")
        else:  # a created model's system prompt when the conversation has none (as Ollama's SYSTEM)
            ids = encode_chat(tokenizer, prompt, system=None if any(m["role"] == "system" for m in prompt) else lm.defaults.system)
        for j in range(request.n):
            params = base_params
            if params.seed is not None and j:  # n choices from one seed must still differ
                params = type(params)(**{**params.__dict__, "seed": (params.seed + j) % 2**64})
            processors = []
            if request.logit_bias:
                processors.append(logit_bias_processor(request.logit_bias))
            if request.presence_penalty or request.frequency_penalty:
                processors.append(presence_frequency_processor(request.presence_penalty, request.frequency_penalty))
            if request.grammar is not None:  # last: nothing after it may re-enable a masked token
                processors.append(grammar_processor(tokenizer, request.grammar, lm.config.vocab_size))
            out.append(Sequence(tokenizer, ids, params, window, processors, request.logprobs))
    return out


def with_model_defaults(request: GenerateRequest, lm):
    """-> (the request's SamplingParams with what it left unset taken from the model's defaults, its context window):
    a created model's parameters and generation_config.json (pocketlm/named.py) under the request's own values."""
    from pocketlm import named

    defaults = lm.defaults.params
    params = request.params if request.given is None else named.apply(request.params, request.given, defaults)
    window = request.context_length or defaults.get("num_ctx") or lm.context_length
    return params, max(2, min(window, lm.context_length))


def prompt_text(tokenizer, prompt, ids: list[int]) -> str:
    """A completion prompt as text (token ids decoded); "" for chat messages."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(ids, skip_special_tokens=False) if prompt and isinstance(prompt[0], int) else ""


def echo(job: Job, lm, choices: list, texts: list[str]) -> None:
    """Each prompt as the first text of its choices (completions' echo); with logprobs, its tokens' log-probs,
    None for the first token, as in OpenAI's legacy API."""
    from pocketlm.engine.generate import prompt_logprobs
    from pocketlm.models.lora import select

    request = job.request
    select(lm.model, getattr(lm, "adapter", 0))  # a LoRA adapter's view scores with its adapter
    for p, text in enumerate(texts):
        ids, logprobs = choices[p * request.n].prompt_ids, []
        if request.logprobs is not None:
            first = TokenLogprob(lm.tokenizer.decode(ids[:1], skip_special_tokens=False), None, None)
            logprobs = [first, *logprobs_of(lm.tokenizer, zip(ids[1:], prompt_logprobs(lm.model, ids, request.logprobs)))]
        for j in range(request.n):
            job.emit(Delta(p * request.n + j, text, logprobs))


def logprobs_of(tokenizer, entries) -> list[TokenLogprob]:
    text = lambda i: tokenizer.decode([i], skip_special_tokens=False)  # noqa: E731
    return [TokenLogprob(text(t), lp, [(text(i), p) for i, p in top]) for t, (lp, top) in entries]


def run_embed(job: Job, lm) -> None:
    from pocketlm.engine.embed import embed

    if not lm.is_encoder:
        raise PocketLMError(f"{lm.name} is not an embedding model; try {registry.DEFAULT_EMBED_MODEL}")
    limit = lm.context_length
    counts = [len(lm.tokenizer.encode(t)) for t in job.request.texts]
    too_long = [(i, c) for i, c in enumerate(counts) if c > limit]
    if too_long and not job.request.truncate:  # else engine.embed keeps the first tokens and the last ([SEP])
        i, c = too_long[0]
        raise PocketLMError(f"input {i} is {c} tokens but {lm.name}'s context window is {limit} tokens; shorten it")
    vectors = embed(lm, job.request.texts).tolist()
    job.emit(Embedded(lm.name, vectors, sum(min(c, limit) for c in counts)))  # the tokens it read
