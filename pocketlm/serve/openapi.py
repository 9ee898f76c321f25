"""The server's own OpenAPI 3.1 description, served at /openapi.json: the routes, and the request bodies as
JSON schemas of what openai_compat.py accepts (its checks are the truth; this says the same in a form a client
generator or a fuzzer reads). Data, no torch.
"""

from __future__ import annotations

from pocketlm.serve.openai_compat import COMPLETION_MAX_TOKENS, CONSTRAINT_FIELDS, MAX_LOGPROBS, MAX_STOPS, MAX_WINDOW, ROLES

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
TOKEN_IDS = {"type": "array", "items": integer(0), "minItems": 1}
# Not listed as properties: one request takes one of them (a fuzzer drawing each optional field would send several)
CONSTRAINED = (f"The output may be constrained by one of the fields {', '.join(CONSTRAINT_FIELDS)} (GBNF, regular "
               "expressions, JSON schemas, a list of choices; as llama.cpp's server, SGLang and vLLM name them), vLLM's "
               "structured_outputs, or response_format; any other field that looks like a constraint is a 400.")
STOP = {"anyOf": [STRING, {"type": "array", "items": STRING, "maxItems": MAX_STOPS}, {"type": "null"}]}

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
        "description": CONSTRAINED,
    }


def completion_request(config) -> dict:
    return {
        "type": "object",
        "properties": {
            "prompt": {"anyOf": [STRING, {"type": "array", "items": STRING, "minItems": 1}, TOKEN_IDS,
                                 {"type": "array", "items": TOKEN_IDS, "minItems": 1}]},
            "max_tokens": nullable(integer(0, default=COMPLETION_MAX_TOKENS, description="null: the default; 0: the prompt alone")),
            **SAMPLING,
            "n": nullable(integer(1, config.max_n, description="choices per prompt")),
            "logprobs": nullable(integer(0, MAX_LOGPROBS)),
            "echo": nullable({"type": "boolean", "default": False, "description": "the prompt, and with logprobs its tokens' log-probs, before the answer"}),
            "best_of": nullable(integer(1, 1)),
        },
        "required": ["prompt"],
        "description": CONSTRAINED,
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


# Ollama's API (ollama_compat.py), as its docs/api.md describes the bodies
OLLAMA_OPTIONS = {"type": "object", "description": "Ollama's sampler options; hardware hints (num_thread, num_gpu, ...) are "
                  "taken and left to the server; mirostat, tfs_z and typical_p only at their neutral values",
                  "properties": {"temperature": number(0, 2, default=0.8), "top_k": integer(0, default=40),
                                 "top_p": number(0, 1, default=0.9), "min_p": number(0, 0.99, default=0),
                                 "num_predict": integer(-2, description="-1: up to the context window"),
                                 "repeat_penalty": number(0.01, 10, default=1.1), "repeat_last_n": integer(-1, MAX_WINDOW, default=64),
                                 "seed": integer(-(2**63), 2**64 - 1), "stop": {"anyOf": [STRING, {"type": "array", "items": STRING}]},
                                 "num_ctx": integer(2), "presence_penalty": number(-2, 2), "frequency_penalty": number(-2, 2)}}
KEEP_ALIVE = {"anyOf": [NUMBER, STRING], "description": "seconds or a duration (\"5m\"); 0 unloads; < 0 keeps the model loaded"}
FORMAT = {"anyOf": [{"enum": ["", "json"]}, {"type": "object"}], "description": "\"json\" or a JSON schema the output follows"}
OLLAMA_COMMON = {"model": STRING, "stream": {"type": "boolean", "default": True}, "options": OLLAMA_OPTIONS,
                 "format": FORMAT, "keep_alive": KEEP_ALIVE, "think": {"const": False},
                 "logprobs": {"type": "boolean"}, "top_logprobs": integer(0, 20)}
OLLAMA_MESSAGE = {"type": "object", "properties": {
    "role": {"enum": ["system", "user", "assistant", "tool"]}, "content": STRING, "tool_name": STRING,
    "tool_calls": {"type": "array", "items": {"type": "object", "properties": {"function": {"type": "object", "properties": {
        "name": STRING, "arguments": {"type": "object"}}, "required": ["name"]}}, "required": ["function"]}}}, "required": ["role"]}
OLLAMA_SCHEMAS = {
    "OllamaChatRequest": {"type": "object", "properties": {**OLLAMA_COMMON, "messages": {"type": "array", "items": OLLAMA_MESSAGE},
                                                           "tools": {"type": "array", "items": TOOL}}, "required": ["model"]},
    "OllamaGenerateRequest": {"type": "object", "properties": {**OLLAMA_COMMON, "prompt": STRING, "system": STRING,
                                                               "raw": {"type": "boolean"}}, "required": ["model"]},
    "OllamaEmbedRequest": {"type": "object", "properties": {"model": STRING, "input": {"anyOf": [STRING, {"type": "array", "items": STRING, "minItems": 1}]},
                                                            "dimensions": integer(1), "keep_alive": KEEP_ALIVE, "options": OLLAMA_OPTIONS},
                           "required": ["model", "input"]},
    "OllamaEmbeddingsRequest": {"type": "object", "properties": {"model": STRING, "prompt": STRING, "keep_alive": KEEP_ALIVE}, "required": ["model"]},
    "OllamaModelRequest": {"type": "object", "properties": {"model": STRING, "stream": {"type": "boolean", "default": True}}, "required": ["model"]},
    "OllamaCreateRequest": {"type": "object", "properties": {
        "model": STRING, "from": STRING, "system": STRING, "template": {**STRING, "description": "a Jinja chat template"},
        "parameters": {"type": "object", "description": "sampling defaults by Ollama's option names"},
        "stream": {"type": "boolean", "default": True}}, "required": ["model", "from"]},
    "OllamaCopyRequest": {"type": "object", "properties": {"source": STRING, "destination": STRING}, "required": ["source", "destination"]},
}


def ollama_post(summary: str, schema: str, method: str = "post", streams: bool = False) -> dict:
    content = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        content["application/x-ndjson"] = {"schema": STRING}
    return {method: {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}},
        "responses": {"200": {"description": "the answer (NDJSON, one object a line, unless stream is false)" if streams else "OK",
                              "content": content},
                      "400": {"description": "a bad value", "content": {"application/json": {"schema": {
                          "type": "object", "properties": {"error": STRING}, "required": ["error"]}}}}},
    }}


OLLAMA_PATHS = {
    "/api/chat": ollama_post("Chat (Ollama)", "OllamaChatRequest", streams=True),
    "/api/generate": ollama_post("Generate (Ollama); no prompt: load the model, keep_alive 0: unload it", "OllamaGenerateRequest", streams=True),
    "/api/embed": ollama_post("Embeddings (Ollama)", "OllamaEmbedRequest"),
    "/api/embeddings": ollama_post("One embedding (Ollama's older route)", "OllamaEmbeddingsRequest"),
    "/api/tags": get("The served models (Ollama)"),
    "/api/show": ollama_post("A model's Modelfile, parameters, template, details and model_info (Ollama)", "OllamaModelRequest"),
    "/api/ps": get("Loaded models and their memory (Ollama's shape, with pocketlm's kind and memory_bytes)"),
    "/api/version": get("The Ollama API version this server follows"),
    "/api/pull": ollama_post("Install a registry model (pocketlm pull)", "OllamaModelRequest", streams=True),
    "/api/create": ollama_post("A named model from a base (pocketlm create)", "OllamaCreateRequest", streams=True),
    "/api/copy": ollama_post("Copy a model under a new name (pocketlm cp)", "OllamaCopyRequest"),
    "/api/delete": ollama_post("Delete a created model", "OllamaModelRequest", method="delete"),
}


def spec(config) -> dict:
    keyed = bool(config.api_key)
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "pocketlm serve", "version": "1", "description": "OpenAI-compatible API (under /v1) and Ollama's (under /api) of a local pocketlm server"},
        "paths": {
            "/v1/chat/completions": post("Chat completion (OpenAI)", "ChatCompletionRequest"),
            "/v1/completions": post("Text completion (OpenAI's legacy API)", "CompletionRequest"),
            "/v1/embeddings": post("Sentence embeddings (OpenAI)", "EmbeddingRequest", streams=False),
            "/v1/models": get("The served models"),
            "/v1/models/{name}": {"get": {**get("One served model")["get"], "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": STRING}]}},
            "/health": get("Liveness; the models and queue only with the key", open_=True),
            "/metrics": get("Prometheus metrics", "text/plain"),
            **OLLAMA_PATHS,
            "/openapi.json": get("This description"),
            "/": get("The chat page", "text/html", open_=True),
        },
        "components": {"schemas": {
            "ChatCompletionRequest": chat_request(config),
            "CompletionRequest": completion_request(config),
            "EmbeddingRequest": EMBEDDING_REQUEST,
            "Error": ERROR,
            **OLLAMA_SCHEMAS,
        }},
    }
    if keyed:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
