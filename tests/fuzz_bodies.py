"""Requests for fuzzing `pocketlm serve`, drawn with hypothesis from the server's own OpenAPI description
(/openapi.json), for tests/test_serve_fuzz.py (a CI-sized run) and bench/fuzz_serve.py (10,000 requests):

    schema bodies   follow the request schemas (so most reach the model), strings now and then with a lone
                    UTF-16 surrogate in them
    mutated bodies  the same with one field replaced by any JSON value (NaN, huge numbers, deep nesting, ...)
    raw bodies      bytes that are no JSON or barely: random bytes, brackets thousands deep, a body cut short,
                    CESU-8 surrogates, a top-level array
    other routes    GETs of model names and paths, wrong methods

A response passes when its status is 2xx or 4xx, a 4xx carries OpenAI's error object, and a stream holds no
server error. hypothesis-jsonschema would draw from the schemas too, but it does not work with today's
hypothesis; the schemas here use a small part of JSON Schema, which `from_schema` covers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote

from hypothesis import strategies as st

POST_ROUTES = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest",
               "/v1/embeddings": "EmbeddingRequest"}
SURROGATES = ["\ud800", "\udfff", "a\ud83d", "\ude00b"]


@dataclass
class Probe:
    method: str
    path: str
    content: bytes | None = None

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return f"{self.method} {self.path} {self.content[:300]!r}" if self.content is not None else f"{self.method} {self.path}"


def texts() -> st.SearchStrategy[str]:
    """Mostly valid text; one string in 40 holds a lone surrogate (a body has many strings)."""
    plain = st.text(max_size=30)
    with_surrogate = st.tuples(plain, st.sampled_from(SURROGATES), plain).map("".join)
    return st.tuples(st.integers(0, 39), plain, with_surrogate).map(lambda t: t[2] if t[0] == 0 else t[1])


def any_json(max_leaves: int = 8) -> st.SearchStrategy:
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(), st.integers(-5, 5), st.floats(), st.sampled_from([2**64, -(2**63) - 1, 10**30]),
        texts(), st.sampled_from(["", "auto", "none", "text", "json_object", "json_schema", "function", "user", "-1"]),
    )
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts(), inner, max_size=4)),
                        max_leaves=max_leaves)


def from_schema(schema: dict, components: dict) -> st.SearchStrategy:
    """Values of a JSON schema, for the part of JSON Schema that pocketlm/serve/openapi.py uses."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].rsplit("/", 1)[1]], components)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        near = st.integers(lo if lo is not None else -4, min(hi, (lo or 0) + 24) if hi is not None else (lo or 0) + 24)
        return st.one_of(near, near, near, st.integers(lo, hi))
    if kind == "number":
        return st.one_of(st.integers(int(lo), int(hi)), st.floats(lo, hi, allow_nan=False))
    if kind == "string":
        return texts()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), components), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 3), 3))
    if kind == "object" and "properties" in schema:
        props, required = schema["properties"], set(schema.get("required", []))
        return st.fixed_dictionaries({k: from_schema(v, components) for k, v in props.items() if k in required},
                                     optional={k: from_schema(v, components) for k, v in props.items() if k not in required})
    if kind == "object" and "additionalProperties" in schema:
        keys = st.from_regex(schema["propertyNames"]["pattern"], fullmatch=True) if "propertyNames" in schema else texts()
        return st.dictionaries(keys, from_schema(schema["additionalProperties"], components), max_size=3)
    if kind == "object":  # a JSON schema or function parameters: any small object, often a plausible schema
        schemas = st.fixed_dictionaries({"type": st.sampled_from(["object", "string", "integer", "array", "nonsense"])},
                                        optional={"properties": st.dictionaries(st.text(max_size=8), st.just({"type": "string"}), max_size=3),
                                                  "required": st.lists(st.text(max_size=8), max_size=2)})
        return st.one_of(schemas, st.dictionaries(texts(), any_json(4), max_size=3))
    return any_json(4)


def bodies(spec: dict, schema_name: str, models: list[str]) -> st.SearchStrategy[dict]:
    """Bodies of one request schema; "model" mostly the first of `models` (the one the route takes), else
    another, one that is not served, a path, or none (the server's default)."""
    components = spec["components"]["schemas"]
    names = st.sampled_from([models[0]] * 12 + [*models[1:], "no-such-model", "../../etc/passwd", None])
    return st.tuples(from_schema(components[schema_name], components), names).map(
        lambda t: t[0] if t[1] is None else {**t[0], "model": t[1]})


def mutated(valid: st.SearchStrategy[dict], schema: dict) -> st.SearchStrategy[dict]:
    fields = st.sampled_from([*schema["properties"], "unknown_field"])
    return st.tuples(valid, fields, any_json()).map(lambda t: {**t[0], t[1]: t[2]})


def raw_bodies(valid: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes]:
    deep = st.tuples(st.integers(1, 20_000), st.sampled_from([b"[", b'{"a":'])).map(
        lambda t: b'{"messages":' + t[1] * t[0] + b"1" + (b"]" if t[1] == b"[" else b"}") * t[0] + b"}")
    cut = st.tuples(valid.map(lambda b: json.dumps(b).encode()), st.integers(0, 200)).map(lambda t: t[0][: t[1]])
    return st.one_of(
        st.binary(max_size=64), deep, cut,
        st.just(b'{"prompt": "\xed\xa0\x80"}'),  # CESU-8: a surrogate written as UTF-8 bytes
        st.just(b'{"prompt": "x", "max_tokens": NaN}'), st.just(b"[1, 2]"), st.just(b""),
        valid.map(lambda b: json.dumps([b]).encode()),
    )


def probes(spec: dict, models: list[str]) -> st.SearchStrategy[Probe]:
    """Every kind of request above, mostly POSTs; models: [a generating model, an embedding model]."""
    components = spec["components"]["schemas"]
    posts = []
    for path, name in POST_ROUTES.items():
        valid = bodies(spec, name, models[::-1] if path == "/v1/embeddings" else models)
        encode = lambda b: json.dumps(b).encode()  # noqa: E731  (ensure_ascii: a lone surrogate goes as \ud800)
        kinds = st.one_of(valid.map(encode), valid.map(encode), mutated(valid, components[name]).map(encode), raw_bodies(valid))
        posts.append(kinds.map(lambda content, path=path: Probe("POST", path, content)))
    names = st.one_of(st.sampled_from(models), st.text(max_size=20))
    gets = st.one_of(
        names.map(lambda n: Probe("GET", f"/v1/models/{quote(n, safe='/')}")),
        st.sampled_from([Probe("GET", p) for p in ("/v1/models", "/health", "/api/ps", "/openapi.json", "/metrics", "/nothing")]),
        st.sampled_from([Probe("GET", "/v1/chat/completions"), Probe("PUT", "/v1/completions", b"{}"), Probe("DELETE", "/v1/models")]),
    )
    return st.one_of(*posts, *posts, *posts, gets)


def send(client, url: str, probe: Probe, timeout: float) -> tuple[int, str]:
    """-> (status, problem or ""): a problem is a 5xx, another status class, a 4xx without OpenAI's error
    object, or a stream that carries a server error. A hang raises httpx's timeout."""
    headers = {"Content-Type": "application/json"} if probe.content is not None else {}
    with client.stream(probe.method, url + probe.path, content=probe.content, headers=headers, timeout=timeout) as response:
        text = response.read().decode("utf-8", "replace")
    status = response.status_code
    if status >= 500 or not (200 <= status < 300 or 400 <= status < 500):
        return status, f"status {status}: {text[:500]}"
    if status >= 400:
        try:
            error = json.loads(text)["error"]
            assert {"message", "type", "param", "code"} <= set(error)
        except (ValueError, KeyError, TypeError, AssertionError):
            return status, f"a {status} without OpenAI's error object: {text[:300]}"
    if response.headers.get("content-type", "").startswith("text/event-stream") and '"server_error"' in text:
        return status, f"a stream that failed: {text[-500:]}"
    return status, ""
