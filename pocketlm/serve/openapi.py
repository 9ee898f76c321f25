"""The server's own OpenAPI 3.1 description, served at /openapi.json: the routes, and the request bodies as
JSON schemas of what openai_compat.py accepts (its checks are the truth; this says the same in a form a client
generator or a fuzzer reads). Data, no torch.
"""

from __future__ import annotations

from pocketlm.serve.openai_compat import COMPLETION_MAX_TOKENS, MAX_WINDOW, ROLES

NUMBER = {"type": "number"}
STRING = {"type": "string"}


def nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def integer(lo=None, hi=None, **extra) -> dict:
    return {"type": "integer", **({"minimum": lo} if lo is not None else {}), **({"maximum": hi} if hi is not None else {}), **extra}


def number(lo, hi, **extra) -> dict:
    return {"type": "number", "minimum": lo, "maximum": hi, **extra}


TEXT_PART = {"type": "object", "properties": {"type": {"const": "text"}, "text": STRING}, "required": ["type", "text"]}
MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"enum": list(ROLES)},
        "content": {"anyOf": [STRING, {"type": "array", "items": TEXT_PART}, {"type": "null"}]},
        "name": STRING,
        "tool_call_id": STRING,
        "tool_calls": {"type": "array", "items": {"type": "object", "properties": {
            "id": STRING, "type": {"const": "function"},
            "function": {"type": "object", "properties": {"name": STRING, "arguments": STRING}, "required": ["name", "arguments"]}}}},
    },
    "required": ["role"],
}
TOOL = {
    "type": "object",
    "properties": {"type": {"const": "function"}, "function": {"type": "object", "properties": {
        "name": STRING, "description": STRING, "parameters": {"type": "object"}}, "required": ["name"]}},
    "required": ["function"],
}
STOP = {"anyOf": [STRING, {"type": "array", "items": STRING, "maxItems": 4}, {"type": "null"}]}

# fields both generation routes take (OpenAI's, then vLLM's and llama.cpp's sampler names)
SAMPLING = {
    "model": {**STRING, "description": "a served model (GET /v1/models); default: the first chat model"},
    "temperature": nullable(number(0, 2, default=1)),
    "top_p": nullable(number(0, 1, default=1)),
    "stop": STOP,
    "seed": nullable(integer(-(2**63), 2**64 - 1)),
    "presence_penalty": nullable(number(-2, 2, default=0)),
    "frequency_penalty": nullable(number(-2, 2, default=0)),
    "logit_bias": nullable({"type": "object", "propertyNames": {"pattern": "^[0-9]+$"}, "additionalProperties": number(-100, 100)}),
    "stream": nullable({"type": "boolean", "default": False}),
    "stream_options": nullable({"type": "object", "properties": {"include_usage": {"type": "boolean"}}}),
    "top_k": nullable(integer(0, default=0)),
    "min_p": nullable(number(0, 0.99, default=0)),
    "repetition_penalty": nullable(number(0.01, 10, default=1)),
    "repeat_last_n": nullable(integer(-1, MAX_WINDOW, default=64)),
}


def chat_request(config) -> dict:
    return {
        "type": "object",
        "properties": {
            "messages": {"type": "array", "items": MESSAGE, "minItems": 1},
            "max_tokens": nullable(integer(1, default=config.default_max_tokens, description="null: the default")),
            "max_completion_tokens": nullable(integer(1, default=config.default_max_tokens)),
            **SAMPLING,
            "n": nullable(integer(1, config.max_n, description="choices per prompt")),
            "logprobs": nullable({"type": "boolean"}),
            "top_logprobs": nullable(integer(0, 20)),
            "response_format": nullable({"type": "object", "properties": {
                "type": {"enum": ["text", "json_object", "json_schema"]},
                "json_schema": {"type": "object", "properties": {"name": STRING, "schema": {"type": "object"}, "strict": {"type": "boolean"}}}},
                "required": ["type"]}),
            "tools": nullable({"type": "array", "items": TOOL}),
            "tool_choice": nullable({"anyOf": [{"enum": ["none", "auto", "required"]}, {"type": "object", "properties": {
                "type": {"const": "function"}, "function": {"type": "object", "properties": {"name": STRING}, "required": ["name"]}}}]}),
        },
        "required": ["messages"],
    }


def completion_request(config) -> dict:
    return {
        "type": "object",
        "properties": {
            "prompt": {"anyOf": [STRING, {"type": "array", "items": STRING, "minItems": 1}]},
            "max_tokens": nullable(integer(1, default=COMPLETION_MAX_TOKENS, description="null: the default")),
            **SAMPLING,
            "n": nullable(integer(1, config.max_n, description="choices per prompt")),
            "logprobs": nullable(integer(0, 5)),
            "echo": {"const": False},
            "best_of": nullable(integer(1, 1)),
        },
        "required": ["prompt"],
    }


EMBEDDING_REQUEST = {
    "type": "object",
    "properties": {
        "model": STRING,
        "input": {"anyOf": [STRING, {"type": "array", "items": STRING, "minItems": 1}]},
        "encoding_format": {"enum": ["float", "base64"]},
    },
    "required": ["input"],
}
ERROR = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "message": STRING, "type": STRING, "param": nullable(STRING), "code": nullable(STRING)},
        "required": ["message", "type", "param", "code"]}},
    "required": ["error"],
}
ERRORS = {str(status): {"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
          for status, what in [(400, "a bad value, named in error.param"), (401, "a missing or wrong API key"),
                               (403, "a foreign Origin or Host"), (404, "an unknown model"), (413, "a body over --max-body"),
                               (429, "the queue is full (Retry-After)")]}


def post(summary: str, schema: str, streams: bool = True) -> dict:
    content = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        content["text/event-stream"] = {"schema": STRING}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {"200": {"description": "the answer (server-sent events with stream: true)", "content": content}, **ERRORS},
    }}


def get(summary: str, media: str = "application/json", open_: bool = False) -> dict:
    operation = {"summary": summary, "responses": {"200": {"description": "OK", "content": {media: {"schema": {}}}}}}
    if open_:
        operation["security"] = []  # needs no key
    return {"get": operation}


def spec(config) -> dict:
    keyed = bool(config.api_key)
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "pocketlm serve", "version": "1", "description": "OpenAI-compatible API of a local pocketlm server"},
        "paths": {
            "/v1/chat/completions": post("Chat completion (OpenAI)", "ChatCompletionRequest"),
            "/v1/completions": post("Text completion (OpenAI's legacy API)", "CompletionRequest"),
            "/v1/embeddings": post("Sentence embeddings (OpenAI)", "EmbeddingRequest", streams=False),
            "/v1/models": get("The served models"),
            "/v1/models/{name}": {"get": {**get("One served model")["get"], "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": STRING}]}},
            "/health": get("Liveness; the models and queue only with the key", open_=True),
            "/metrics": get("Prometheus metrics", "text/plain"),
            "/api/ps": get("Loaded models and their memory"),
            "/openapi.json": get("This description"),
            "/": get("The chat page", "text/html", open_=True),
        },
        "components": {"schemas": {
            "ChatCompletionRequest": chat_request(config),
            "CompletionRequest": completion_request(config),
            "EmbeddingRequest": EMBEDDING_REQUEST,
            "Error": ERROR,
        }},
    }
    if keyed:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
