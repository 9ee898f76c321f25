"""Prefill then decode with a preallocated KV cache (the shape of gpt-fast's generate.py).

`prefill` and `decode_one_token` (engine/step.py) are the small functions a compiler can take; `Sequence` is one sequence's
state (it samples, detokenizes, holds back text while a stop string may be forming, and keeps the numbers
a caller reports); `Generation` is the one generator that drives a Sequence through them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from pocketlm.engine.sampling import SamplingParams, recent_ids, sample
from pocketlm.engine.step import PREFILL_CHUNK, decode_one_token, prefill  # noqa: F401  (PREFILL_CHUNK: batch.py's)
from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import StreamDecoder

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
    cached_tokens: int = 0  # prompt tokens a server's prefix cache held (pocketlm.engine.batch): not computed
    completion_tokens: int = 0
    finish_reason: str = ""  # "stop" (end token or stop string), "length" (max_new_tokens or context full)
    time_to_first_token_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    draft_tokens: int = 0  # speculative decoding: tokens the draft proposed, and how many the target kept
    draft_accepted: int = 0
    draft_checks: int = 0  # the target's verify passes
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
            **({"draft_tokens": self.draft_tokens, "draft_accepted": self.draft_accepted, "draft_checks": self.draft_checks}
               if self.draft_tokens else {}),
        }


class Sequence:
    """One sequence's decoding state: its sampler (params, processors, seed), the tokens so far, the text held
    back while a stop string may be forming, and its numbers. `Generation` drives one through a cache of its
    own; the server's batch (pocketlm.engine.batch) drives many through one forward pass per step.

    Per step: token, logits = seq.choose(logits); text = seq.accept(token, logits); once seq.done, seq.finish()
    gives the text still held back."""

    def __init__(
        self, tokenizer, prompt_ids: list[int], params: SamplingParams, context_length: int,
        processors=(), logprobs: int | None = None,
    ):
        """processors: callables (logits (1, V), generated ids so far) -> logits, applied before sampling
        (a grammar's token mask, logit bias, presence/frequency penalties). logprobs: record each token's
        log-probability (after the processors) and its `logprobs` most likely alternatives in stats."""
        if not prompt_ids:
            raise PocketLMError("the prompt is empty")
        if len(prompt_ids) >= context_length:
            raise PocketLMError(
                f"the prompt is {len(prompt_ids)} tokens but the model's context window is {context_length} "
                f"tokens (room is needed for at least one new token); shorten the prompt"
            )
        self.prompt_ids, self.params = prompt_ids, params
        self.max_new = min(params.max_new_tokens, context_length - len(prompt_ids))
        self.processors, self.logprobs = list(processors), logprobs
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        self.stop_ids = set() if params.ignore_eos else tokenizer.stop_ids
        self.stops, self.detok = StopStrings(params.stop), StreamDecoder(tokenizer)
        self.context = torch.tensor(prompt_ids, dtype=torch.long)  # prompt + chosen tokens: the penalty's window
        self.window = params.repeat_last_n if params.repeat_last_n >= 0 else len(prompt_ids) + self.max_new
        self.done, self.hit_stop_string = False, False
        self.started = time.perf_counter()  # reset by the driver when its prefill starts

    def recent(self) -> torch.Tensor:
        """(1, N) the tokens the repetition penalty looks at."""
        return recent_ids(self.context, self.window)

    @torch.inference_mode()  # the processors change the step's logits, inference tensors, in place
    def choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        """logits (1, V) of the next position -> (token id, the logits after the processors)."""
        for process in self.processors:
            logits = process(logits, self.stats.token_ids)
        return int(sample(logits, self.params, self.recent(), self.generator)), logits

    def accept(self, token: int, logits: torch.Tensor) -> str:
        """Take the chosen token; return the text it makes safe to show. Sets done (and the finish reason) at an
        end token, a stop string or the token budget."""
        stats = self.stats
        if stats.completion_tokens == 0:
            now = time.perf_counter()
            stats.time_to_first_token_s = stats.prefill_s = now - self.started
            self.started = now  # from here on: decode time
        stats.completion_tokens += 1
        self.context = torch.cat([self.context, torch.tensor([token])])
        if token in self.stop_ids:
            stats.finish_reason, self.done = "stop", True
            return ""
        stats.token_ids.append(token)
        if self.logprobs is not None:
            stats.token_logprobs.append(token_logprobs(logits[0], token, self.logprobs))
        text, self.hit_stop_string = self.stops.push(self.detok.push(token))
        if self.hit_stop_string:
            stats.finish_reason, self.done = "stop", True
        elif stats.completion_tokens >= self.max_new:
            stats.finish_reason, self.done = "length", True
        return text

    def finish(self) -> str:
        """The text held back until now (none after a stop string); stops the decode clock."""
        self.stats.decode_s = time.perf_counter() - self.started
        if self.hit_stop_string:
            return ""
        tail, hit = self.stops.push(self.detok.flush())
        return tail + ("" if hit else self.stops.flush())


class Generation:
    """Iterate to get text chunks as they are produced; `stats` is complete once iteration ends.

    Closing the iterator early (a Ctrl-C, a client that went away) stops decoding at once.
    """

    def __init__(
        self, model, tokenizer, prompt_ids: list[int], params: SamplingParams, context_length: int,
        processors=(), logprobs: int | None = None, draft=None, draft_tokens: int = 4, adapter: int = 0,
    ):
        """processors, logprobs: as Sequence's. draft: a smaller model with the same tokenizer for speculative
        decoding (pocketlm.engine.speculative), proposing `draft_tokens` tokens per target pass; the output
        keeps the target's distribution. adapter: the model's LoRA adapter to run with (pocketlm.models.lora), 0: none."""
        if draft is not None and (processors or logprobs is not None):
            raise PocketLMError("speculative decoding (a draft model) does not combine with logits processors or logprobs")
        self.seq = Sequence(tokenizer, prompt_ids, params, context_length, processors, logprobs)
        self.model, self.params, self.prompt_ids = model, params, prompt_ids
        self.draft, self.draft_tokens = draft, draft_tokens
        self.adapter = adapter
        self.stats = self.seq.stats

    def __iter__(self) -> Iterator[str]:
        seq = self.seq
        # a draft head keeps no cache; a draft model's pass may write up to draft_tokens + 1 positions ahead
        models = [m for m in (self.model, self.draft) if hasattr(m, "setup_cache")]
        for model in models:
            model.setup_cache(1, len(self.prompt_ids) + seq.max_new + (self.draft_tokens + 1 if self.draft else 0))
        try:
            seq.started = time.perf_counter()
            if self.draft is None:
                tokens = self.sampled_tokens()
            else:
                from pocketlm.engine.speculative import speculative_tokens

                tokens = speculative_tokens(
                    self.model, self.draft, seq.context, self.params, self.draft_tokens, seq.window, seq.generator, self.stats
                )
            if hasattr(self.model, "adapters"):
                tokens = with_adapter(self.model, self.adapter, tokens)
            for token, logits in tokens:
                text = seq.accept(token, logits)
                if text:
                    yield text
                if seq.done:
                    break
            tail = seq.finish()
            if tail:
                yield tail
        finally:
            for model in models:
                model.clear_cache()

    def sampled_tokens(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Plain decoding, one forward pass per token: yields (token id, the logits (1, V) it was drawn from)
        forever. The next pass runs only when the next token is asked for, after seq.accept took this one."""
        seq = self.seq
        logits = prefill(self.model, seq.context[None])  # (1, V)
        while True:
            token, logits = seq.choose(logits)
            yield token, logits
            logits = decode_one_token(self.model, torch.tensor([[token]]), torch.tensor([len(seq.context) - 1]))

    def text(self) -> str:
        """Run to the end and return the whole text."""
        return "".join(self)


def with_adapter(model, adapter: int, tokens: Iterator):
    """tokens, each pass run with `adapter` selected (pocketlm.models.lora.select): it is chosen again before every
    pass, as another Generation of the same model (the base, another adapter) may run between two of them."""
    from pocketlm.models.lora import select

    while True:
        select(model, adapter)
        try:
            item = next(tokens)
        except StopIteration:
            return
        yield item


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """logits (V,) -> (log-probability of `token`, the k most likely (id, log-probability))."""
    logp = torch.log_softmax(logits.float(), -1)
    top = torch.topk(logp, k) if k > 0 else None
    alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logp[token]), alternatives


PROMPT_LOGIT_ROWS = 256  # positions whose (., V) logits exist at once in prompt_logprobs


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Each prompt token's log-probability given the tokens before it, and the k most likely tokens at its place,
    from the second token on (nothing predicts the first): what `echo` with `logprobs` returns in OpenAI's legacy
    completions, and what lm-evaluation-harness sums. One plain causal forward, which leaves any KV cache alone."""
    idx = torch.tensor(ids, dtype=torch.long)
    h = model.hidden(idx[None])[0]  # (T, D)
    out = []
    for begin in range(0, len(ids) - 1, PROMPT_LOGIT_ROWS):
        logits = model.logits(h[None, begin : begin + PROMPT_LOGIT_ROWS])[0]  # (n, V): position t predicts token t + 1
        out += [token_logprobs(row, token, k) for row, token in zip(logits, ids[begin + 1 : begin + 1 + PROMPT_LOGIT_ROWS])]
    return out


def encode_chat(tokenizer, messages: list[dict], system: str | None = None) -> list[int]:
    """Render the model's own chat template (with `system` as a first system message, if given) and
    tokenize it. The template writes the BOS token itself where the model wants one, so no special
    tokens are added on top (as transformers' apply_chat_template)."""
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def fit_chat(tokenizer, messages: list[dict], window: int, reserve: int, system: str | None = None) -> tuple[list[int], int]:
    """encode_chat of the latest turns that leave `reserve` tokens of a `window`-token context for the answer:
    the oldest turns (a user message with its answer) are dropped first; `system`, or system messages at the
    start, always stay. -> (prompt ids, messages dropped). The newest user message is never dropped: when it
    does not fit alone, generation refuses it with both numbers (Sequence)."""
    head = 0  # leading system messages stay
    while head < len(messages) and messages[head].get("role") == "system":
        head += 1
    dropped = 0
    while True:
        ids = encode_chat(tokenizer, messages[:head] + messages[head + dropped :], system)
        if len(ids) + reserve <= window or len(messages) - head - dropped <= 1:
            return ids, dropped
        dropped += 2 if len(messages) - head - dropped > 2 else 1  # whole turns, so the chat still opens with a user message


def encode_raw(tokenizer, text: str) -> list[int]:
    """A plain completion prompt: BOS added if the model wants one."""
    return tokenizer.encode(text, add_special_tokens=True)


def generate(
    lm, prompt_ids: list[int], params: SamplingParams, processors=(), logprobs: int | None = None,
    draft=None, draft_tokens: int | None = None, context_length: int | None = None,
) -> Generation:
    """The one entry point for text generation on a loaded model (pocketlm.load.LoadedModel); `draft`, a
    LoadedModel with the same tokenizer or a draft head (pocketlm.load.load_draft), turns on speculative decoding,
    proposing draft_tokens per check (default: 1 for a head, whose second guess is right too rarely to pay for
    the longer check on a CPU; 4 for a model; docs/BENCHMARKS.md). context_length: the window this request may
    fill, prompt and answer (`--ctx-size`; the KV cache is sized to what the request can use of it), at most the
    model's own (the default)."""
    window = check_window(lm, context_length)
    if draft is not None:
        from pocketlm.engine.speculative import check_same_tokenizer
        from pocketlm.models.draft_head import DraftHead

        check_same_tokenizer(lm.tokenizer, draft.tokenizer)
        draft = draft.model
        draft_tokens = draft_tokens or (1 if isinstance(draft, DraftHead) else 4)
    return Generation(lm.model, lm.tokenizer, prompt_ids, params, window, processors, logprobs, draft, draft_tokens or 4,
                      getattr(lm, "adapter", 0))


def check_window(lm, context_length: int | None) -> int:
    """A requested context window (None: the model's own) -> tokens, refused past the model's: its RoPE and training
    stop there."""
    if context_length is None:
        return lm.context_length
    if not 2 <= context_length <= lm.context_length:
        raise PocketLMError(f"a context window of {context_length} tokens: {lm.name} takes 2 to {lm.context_length}")
    return context_length
