"""The native request and event types. OpenAI's schema is translated to and from these at the edge
(openai_compat.py); the worker (scheduler.py) only ever sees these."""

from __future__ import annotations

from dataclasses import dataclass, field

from pocketlm.engine.sampling import SamplingParams


@dataclass
class GenerateRequest:
    model: str
    # One entry per prompt: a list of chat messages ({"role", "content"}), a raw text to continue, or token ids to
    # continue as they are (no BOS added: what lm-evaluation-harness sends)
    prompts: list[list[dict] | str | list[int]]
    params: SamplingParams
    n: int = 1  # choices per prompt; choice index = prompt index * n + j
    logprobs: int | None = None  # None: off; k: each token's logprob and its k most likely alternatives
    grammar: str | None = None  # an llguidance grammar every output must match (JSON schema, tool call)
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # SamplingParams fields the client set; the model's defaults (a created model's, generation_config.json:
    # pocketlm/named.py) fill the others. None: every field is the client's.
    given: set[str] | None = None
    context_length: int | None = None  # a window smaller than the model's (Ollama's num_ctx)
    keep_alive_s: float | None = None  # the model stays loaded this long after the request (0: unloaded; < 0: kept)
    # completions (OpenAI's legacy API): echo the prompt (and, with logprobs, its tokens' log-probs, the first's None)
    # before the answer; no_new_tokens is max_tokens 0 (only the prompt); end_token_logprob lists the end token that
    # stopped a choice in its logprobs, as OpenAI's legacy API and vLLM do
    echo: bool = False
    no_new_tokens: bool = False
    end_token_logprob: bool = False


@dataclass
class EmbedRequest:
    model: str
    texts: list[str]
    keep_alive_s: float | None = None
    truncate: bool = False  # a text over the context window is cut to it (Ollama's default), not refused


@dataclass
class Started:
    """The request was accepted by the model: prompts encoded, every length within the context window."""

    model: str
    prompt_tokens: int  # summed over prompts, each counted once (not once per choice)
    prompt_chars: list[int] = field(default_factory=list)  # each prompt's length as text: where text_offset starts


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None: a prompt's first token (nothing before it predicts it)
    top: list[tuple[str, float]] | None


@dataclass
class Delta:
    index: int  # choice
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens behind this text


@dataclass
class Finished:
    index: int
    finish_reason: str  # "stop" or "length"
    completion_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    cached_tokens: int = 0  # prompt tokens the prefix cache held: not computed again


@dataclass
class Embedded:
    model: str
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass
class Failed:
    status: int
    message: str
    code: str | None = None


@dataclass
class Done:
    """The last event of every request."""
