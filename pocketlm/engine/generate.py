"""Prefill then decode with a preallocated KV cache (the shape of gpt-fast's generate.py).

`prefill` and `decode_one_token` are the small functions a compiler can take; `Generation` is the one
generator around them that samples, detokenizes, holds back text while a stop string may be forming,
and keeps the numbers (tokens, timings) a caller reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from pocketlm.engine.sampling import SamplingParams, sample
from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import StreamDecoder

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds the (T, S) attention mask and activations


@torch.inference_mode()
def prefill(model, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Run the prompt through the model, filling the cache. idx (B, T) -> logits of the last position (B, V)."""
    for begin in range(0, idx.size(1), PREFILL_CHUNK):
        chunk = idx[:, begin : begin + PREFILL_CHUNK]  # (B, t)
        input_pos = torch.arange(start + begin, start + begin + chunk.size(1))
        h = model.hidden(chunk, input_pos)  # (B, t, D)
    # Only the last position's logits: Gemma's 262k vocabulary makes the full (T, V) block large.
    return model.logits(h[:, -1:])[:, -1]  # (B, V)


@torch.inference_mode()
def decode_one_token(model, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """token (B, 1), input_pos (1,) -> logits (B, V)."""
    return model(token, input_pos)[:, -1]


class StopStrings:
    """Holds back the end of the text while it could still become a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add new text; return (text safe to show, whether a stop string was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0  # longest suffix of pending that is a proper prefix of some stop string
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""  # "stop" (end token or stop string), "length" (max_new_tokens or context full)
    time_to_first_token_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    draft_tokens: int = 0  # speculative decoding: tokens the draft proposed, and how many the target kept
    draft_accepted: int = 0
    # with Generation(logprobs=k): per kept token, (logprob, [(id, logprob)] of the k most likely)
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes out of prefill; the rest are decode steps
        steps = self.completion_tokens - 1
        return steps / self.decode_s if self.decode_s and steps > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "time_to_first_token_s": round(self.time_to_first_token_s, 4),
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "prompt_tokens_per_s": round(self.prompt_tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            **({"draft_tokens": self.draft_tokens, "draft_accepted": self.draft_accepted} if self.draft_tokens else {}),
        }


class Generation:
    """Iterate to get text chunks as they are produced; `stats` is complete once iteration ends.

    Closing the iterator early (a Ctrl-C, a client that went away) stops decoding at once.
    """

    def __init__(
        self, model, tokenizer, prompt_ids: list[int], params: SamplingParams, context_length: int,
        processors=(), logprobs: int | None = None, draft=None, draft_tokens: int = 4,
    ):
        """processors: callables (logits (1, V), generated ids so far) -> logits, applied before sampling
        (a grammar's token mask, logit bias, presence/frequency penalties). logprobs: record each token's
        log-probability (after the processors) and its `logprobs` most likely alternatives in stats.
        draft: a smaller model with the same tokenizer for speculative decoding (pocketlm.engine.speculative),
        proposing `draft_tokens` tokens per target pass; the output keeps the target's distribution."""
        if not prompt_ids:
            raise PocketLMError("the prompt is empty")
        if len(prompt_ids) >= context_length:
            raise PocketLMError(
                f"the prompt is {len(prompt_ids)} tokens but the model's context window is {context_length} "
                f"tokens (room is needed for at least one new token); shorten the prompt"
            )
        if draft is not None and (processors or logprobs is not None):
            raise PocketLMError("speculative decoding (a draft model) does not combine with logits processors or logprobs")
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.prompt_ids = prompt_ids
        self.max_new = min(params.max_new_tokens, context_length - len(prompt_ids))
        self.processors, self.logprobs = list(processors), logprobs
        self.draft, self.draft_tokens = draft, draft_tokens
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))

    def __iter__(self) -> Iterator[str]:
        params, stats = self.params, self.stats
        generator = None
        if not params.greedy:
            generator = torch.Generator().manual_seed(
                params.seed if params.seed is not None else torch.seed()
            )
        stop_ids = set() if params.ignore_eos else self.tokenizer.stop_ids
        stops, detok = StopStrings(params.stop), StreamDecoder(self.tokenizer)
        n_prompt, hit_stop_string = len(self.prompt_ids), False
        context = torch.tensor(self.prompt_ids, dtype=torch.long)
        window = params.repeat_last_n if params.repeat_last_n >= 0 else n_prompt + self.max_new

        models = [self.model] if self.draft is None else [self.model, self.draft]
        for model in models:  # a draft pass may write up to draft_tokens + 1 positions ahead
            model.setup_cache(1, n_prompt + self.max_new + (self.draft_tokens + 1 if self.draft else 0))
        try:
            start = time.perf_counter()
            if self.draft is None:
                tokens = self.sampled_tokens(context, window, generator)
            else:
                from pocketlm.engine.speculative import speculative_tokens

                tokens = speculative_tokens(
                    self.model, self.draft, context, params, self.draft_tokens, window, generator, stats
                )
            for step, (token, logits) in zip(range(self.max_new), tokens):
                if step == 0:
                    stats.time_to_first_token_s = stats.prefill_s = time.perf_counter() - start
                    start = time.perf_counter()
                stats.completion_tokens += 1
                if token in stop_ids:
                    stats.finish_reason = "stop"
                    break
                stats.token_ids.append(token)
                if self.logprobs is not None:
                    stats.token_logprobs.append(token_logprobs(logits[0], token, self.logprobs))
                text, hit_stop_string = stops.push(detok.push(token))
                if text:
                    yield text
                if hit_stop_string:
                    stats.finish_reason = "stop"
                    break
            else:
                stats.finish_reason = "length"
            stats.decode_s = time.perf_counter() - start
            if not hit_stop_string:
                tail, hit_stop_string = stops.push(detok.flush())
                tail += "" if hit_stop_string else stops.flush()
                if tail:
                    yield tail
        finally:
            for model in models:
                model.clear_cache()

    def sampled_tokens(self, context: torch.Tensor, window: int, generator) -> Iterator[tuple[int, torch.Tensor]]:
        """Plain decoding, one forward pass per token: yields (token id, the logits (1, V) it was drawn from)
        forever. The next pass runs only when the next token is asked for."""
        logits = prefill(self.model, context[None])  # (1, V)
        while True:
            recent = context[-window:][None] if window else context[:0][None]
            for process in self.processors:
                logits = process(logits, self.stats.token_ids)
            token = sample(logits, self.params, recent, generator)  # (1,)
            yield int(token), logits
            context = torch.cat([context, token])
            logits = decode_one_token(self.model, token[None], torch.tensor([len(context) - 1]))

    def text(self) -> str:
        """Run to the end and return the whole text."""
        return "".join(self)


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """logits (V,) -> (log-probability of `token`, the k most likely (id, log-probability))."""
    logp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(logp, k) if k > 0 else None
    alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logp[token]), alternatives


def encode_chat(tokenizer, messages: list[dict], system: str | None = None) -> list[int]:
    """Render the model's own chat template (with `system` as a first system message, if given) and
    tokenize it. The template writes the BOS token itself where the model wants one, so no special
    tokens are added on top (as transformers' apply_chat_template)."""
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_raw(tokenizer, text: str) -> list[int]:
    """A plain completion prompt: BOS added if the model wants one."""
    return tokenizer.encode(text, add_special_tokens=True)


def generate(
    lm, prompt_ids: list[int], params: SamplingParams, processors=(), logprobs: int | None = None,
    draft=None, draft_tokens: int = 4,
) -> Generation:
    """The one entry point for text generation on a loaded model (pocketlm.load.LoadedModel); `draft`, a
    LoadedModel with the same tokenizer, turns on speculative decoding."""
    if draft is not None:
        from pocketlm.engine.speculative import check_same_tokenizer

        check_same_tokenizer(lm.tokenizer, draft.tokenizer)
        draft = draft.model
    return Generation(lm.model, lm.tokenizer, prompt_ids, params, lm.context_length, processors, logprobs, draft, draft_tokens)
