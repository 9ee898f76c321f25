"""The native request and event types. OpenAI's schema is translated to and from these at the edge
(openai_compat.py); the worker (scheduler.py) only ever sees these."""

from __future__ import annotations

from dataclasses import dataclass, field

from pocketlm.engine.sampling import SamplingParams


@dataclass
class GenerateRequest:
    model: str
    # One entry per prompt: a list of chat messages ({"role", "content"}) or a raw text to continue.
    prompts: list[list[dict] | str]
    params: SamplingParams
    n: int = 1  # choices per prompt; choice index = prompt index * n + j
    logprobs: int | None = None  # None: off; k: each token's logprob and its k most likely alternatives
    grammar: str | None = None  # an llguidance grammar every output must match (JSON schema, tool call)
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass
class EmbedRequest:
    model: str
    texts: list[str]


@dataclass
class Started:
    """The request was accepted by the model: prompts encoded, every length within the context window."""

    model: str
    prompt_tokens: int  # summed over prompts, each counted once (not once per choice)


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


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
