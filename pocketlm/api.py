"""The Python API: a model by name, then text, chat and embeddings with the CLI's defaults.

    import pocketlm
    lm = pocketlm.load("smollm2")                 # as `pocketlm run` loads it: a Q4 GGUF runs int4 (quant="auto")
    print(lm.generate("Hi"))                      # the chat template applied, as `pocketlm run "Hi"`
    for piece in lm.chat([{"role": "user", "content": "Hi"}], stream=True, temperature=0):
        print(piece, end="")
    vectors = pocketlm.load("minilm").embed(["first sentence", "second sentence"])

A thin layer over the library the CLI runs (pocketlm.load.load, pocketlm.engine.generate): the same prompt ids,
the same sampler and the same defaults (SamplingParams: temperature 0.8, top-k 40, top-p 0.9, repetition penalty
1.1, 256 new tokens), so `lm.generate(prompt, seed=1)` writes what `pocketlm run MODEL PROMPT --seed 1` writes.
`pocketlm.load` is this module's `load` (pocketlm/__init__.py), and still the module pocketlm/load.py too.
"""

from __future__ import annotations

from typing import Iterator

from pocketlm import registry
from pocketlm.errors import PocketLMError


def load(model: str = registry.DEFAULT_MODEL, *, quant: str = "auto", dtype: str = "float32", ctx_size: int | None = None,
         draft: str | None = None, threads: int | None = None, lora: str | None = None) -> LM:
    """A model ready to answer: a registry name ("smollm2", "gemma3-270m", "minilm"), a .gguf file or a Hugging Face
    folder. quant: "auto" (the CLI's default: a GGUF at its own bits, a Q4 file as int4-mixed; float for a float
    model), "none", "int8", "int4", ... as `--quant`. dtype: "float32" or "bfloat16". ctx_size: the context window
    of every request (prompt and answer), at most the model's own (its default). draft: a draft head or a smaller
    model for speculative decoding (`--draft`). lora: a LoRA adapter folder, applied unmerged (`--lora`). threads:
    torch's threads for this process, chosen as the CLI chooses them when None ($POCKETLM_THREADS, else one per core
    that other processes leave idle)."""
    from pocketlm import threads as compute_threads

    compute_threads.start()  # how busy the cores are is read over the load, as the CLI reads it over its start
    import torch

    from pocketlm.engine.generate import check_window
    from pocketlm.load import load as load_model, load_draft, load_with_adapter

    if dtype not in ("float32", "bfloat16"):
        raise PocketLMError(f"dtype must be float32 or bfloat16, not {dtype!r}")
    if lora:
        lm = load_with_adapter(model, lora, dtype=getattr(torch, dtype), quant=quant)
    else:
        lm = load_model(model, dtype=getattr(torch, dtype), quant=quant)
    window = None if lm.is_encoder else check_window(lm, ctx_size)
    helper = load_draft(draft, lm, getattr(torch, dtype), quant) if draft else None
    compute_threads.configure(threads)
    return LM(lm, window, helper)


def sampling(max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, min_p: float | None = None, repeat_penalty: float | None = None,
             repeat_last_n: int | None = None, seed: int | None = None, stop: str | list[str] | None = None):
    """Keyword arguments -> SamplingParams; what is not given keeps the CLI's default. A temperature (or top_p) below
    1e-6 decodes greedily, as the CLI and the server do. An unknown keyword is a TypeError naming it."""
    from pocketlm.engine.params import SamplingParams

    given = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                 repetition_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed,
                 stop=[stop] if isinstance(stop, str) else stop)
    params = SamplingParams(**{k: v for k, v in given.items() if v is not None})
    tiny = 1e-6  # as the CLI's sampling_params (pocketlm/cli.py) and the server's SMALLEST
    if 0 < params.temperature < tiny or params.top_p < tiny:
        params.temperature = 0.0
    return params


class Stream:
    """The text of one generation, piece by piece as it is decoded (an iterator of str); `stats` (token counts,
    finish_reason, timings: pocketlm.engine.generate.GenerationStats) is complete once it ends. close() stops it."""

    def __init__(self, pieces: Iterator[str], stats):
        self._pieces, self.stats = pieces, stats

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()


class LM:
    """A loaded model (`pocketlm.load(...)`). One generation at a time: the model holds one KV cache, so a stream
    must end (or be closed) before the next generation starts. `loaded` is the pocketlm.load.LoadedModel beneath."""

    def __init__(self, loaded, ctx_size: int | None = None, draft=None):
        self.loaded, self.ctx_size, self.draft = loaded, ctx_size, draft
        self._busy = False

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def context_length(self) -> int:
        """The window a request may fill: ctx_size, else the model's own."""
        return self.ctx_size or self.loaded.context_length

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def __repr__(self) -> str:
        meta = self.loaded.meta
        return f"<pocketlm.LM {self.name}: weights {meta.get('weights')}, context {self.context_length}>"

    def generate(self, prompt: str, *, system: str | None = None, raw: bool = False, stream: bool = False,
                 **sampling_kwargs) -> str | Stream:
        """The answer to `prompt`, in the model's chat template as `pocketlm run` puts it (with `system` as the
        system prompt); raw=True, or a model without a chat template (a base model), continues the prompt as plain
        text. stream=True: a Stream of text pieces. Sampling: max_tokens, temperature, top_p, top_k, min_p,
        repeat_penalty, repeat_last_n, seed, stop (a string or a list)."""
        from pocketlm.engine.generate import encode_chat, encode_raw

        self._check_generative()
        if raw or not self.tokenizer.has_chat_template:
            if system is not None:
                raise PocketLMError("a system prompt needs the chat template: drop raw=True (or system=)")
            ids = encode_raw(self.tokenizer, prompt)
        else:
            ids = encode_chat(self.tokenizer, [{"role": "user", "content": prompt}], system=system or self.loaded.defaults.system)
        return self._run(ids, stream, sampling_kwargs, "generate")

    def chat(self, messages: list[dict], *, stream: bool = False, **sampling_kwargs) -> str | Stream:
        """The assistant's next message after `messages` ([{"role": "system" | "user" | "assistant", "content":
        ...}], OpenAI's shape), rendered by the model's chat template as `pocketlm chat` renders a conversation.
        stream=True: a Stream of text pieces. Sampling keywords as generate's. A conversation longer than the
        context window is refused with both numbers (`pocketlm chat` instead forgets its oldest turns)."""
        from pocketlm.engine.generate import encode_chat

        self._check_generative()
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise PocketLMError('messages must be a list of {"role": ..., "content": ...} dicts')
        return self._run(encode_chat(self.tokenizer, messages), stream, sampling_kwargs, "chat")

    def embed(self, texts: str | list[str]) -> list[float] | list[list[float]]:
        """Sentence embeddings of an embedding model ("minilm"): a unit vector (a list of floats) per text, as
        `pocketlm embed` prints them; one vector for one str, a list of them for a list."""
        from pocketlm.engine.embed import embed

        if not self.loaded.is_encoder:
            raise PocketLMError(f"{self.name} is not an embedding model; try pocketlm.load(\"{registry.DEFAULT_EMBED_MODEL}\")")
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        if not batch or not all(isinstance(t, str) for t in batch):
            raise PocketLMError("embed takes a text or a non-empty list of texts")
        vectors = embed(self.loaded, batch).tolist()
        return vectors[0] if single else vectors

    # ------------------------------------------------------------------------------------------------

    def _check_generative(self) -> None:
        if self.loaded.is_encoder:
            raise PocketLMError(f"{self.name} is an embedding model: use lm.embed(texts)")

    def _run(self, ids: list[int], stream: bool, sampling_kwargs: dict, method: str) -> str | Stream:
        import inspect

        from pocketlm.engine.generate import generate

        known = inspect.signature(sampling).parameters
        for key in sampling_kwargs:
            if key not in known:
                raise TypeError(f"{method}() got an unexpected keyword argument {key!r} (sampling: {', '.join(known)})")
        from pocketlm import named

        # what the call leaves out: the model's defaults (a created model's, generation_config.json), then the CLI's
        names = {"max_tokens": "max_new_tokens", "repeat_penalty": "repetition_penalty"}
        given = {names.get(k, k) for k, v in sampling_kwargs.items() if v is not None}
        params = named.apply(sampling(**sampling_kwargs), given, self.loaded.defaults.params)
        generation = generate(self.loaded, ids, params, draft=self.draft, context_length=self.ctx_size)
        pieces = self._one_at_a_time(generation)
        return Stream(pieces, generation.stats) if stream else "".join(pieces)

    def _one_at_a_time(self, generation) -> Iterator[str]:
        # The model has one KV cache, which a generation sets up when it starts and frees when it ends: a second one
        # started while a stream is still open would overwrite the first's cache, so it is refused instead.
        if self._busy:
            raise PocketLMError(f"{self.name} is still streaming an answer: read that stream to its end or close() it first")
        self._busy = True
        try:
            yield from generation
        finally:
            self._busy = False
