"""No input reaches a 500: hypothesis draws requests from the server's own /openapi.json (bodies that follow the
schemas, the same with a field replaced by any JSON value, bytes that are no JSON) and sends them to a real
`pocketlm serve` process; every answer must be 2xx or 4xx (4xx with OpenAI's error object), within a timeout.

The server serves a tiny random Llama (tests/tiny_models.py: the real loader, engine and tokenizer code on a
model that decodes thousands of tokens a second, so a request that asks for its whole context still takes a
fraction of a second) and the real MiniLM for /v1/embeddings. bench/fuzz_serve.py sends 10,000 of the same.
"""

import json

import httpx2 as httpx  # the HTTP client the openai package itself uses
import pytest
from fuzz_bodies import probes, send
from hypothesis import HealthCheck, given, settings
from serve_process import running_server

pytestmark = pytest.mark.slow

EXAMPLES = 150  # about 30 s on the 2-core machine; bench/fuzz_serve.py sends 10,000
TIMEOUT_S = 60  # a bound on a hang, not a speed check


@pytest.fixture(scope="module")
def server(small_llama_dir):
    with running_server(str(small_llama_dir), "minilm", "--max-queue", "64") as url:
        spec = httpx.get(url + "/openapi.json").json()
        yield url, spec, [small_llama_dir.name, "minilm-l6-v2"]


def test_every_generated_request_gets_a_2xx_or_4xx(server):
    url, spec, models = server
    seen = {}
    with httpx.Client() as client:

        # derandomize: the same requests on every run, so the share of valid ones (checked below) cannot fall short
        # by chance (a random draw once gave 8 valid requests of 150)
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(probes(spec, models))
        def probe(p):
            status, problem = send(client, url, p, TIMEOUT_S)
            seen[status // 100] = seen.get(status // 100, 0) + 1
            assert not problem, problem

        probe()
    assert seen.get(2, 0) >= EXAMPLES // 10 and seen.get(4, 0) >= EXAMPLES // 10, seen  # both kinds were reached
    metrics = httpx.get(url + "/metrics").text
    assert 'status="500"' not in metrics


def test_openapi_describes_every_route_with_valid_schemas(server):
    import jsonschema

    url, spec, models = server
    assert spec["openapi"].startswith("3.1") and {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
                                                   "/health", "/metrics", "/openapi.json"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    resolver = {"components": {"schemas": schemas}}
    chat = {"model": models[0], "messages": [{"role": "user", "content": "Hi"}], "max_tokens": None, "temperature": 0}
    for route, name, body in [("/v1/chat/completions", "ChatCompletionRequest", chat),
                              ("/v1/completions", "CompletionRequest", {"model": models[0], "prompt": ["a", "b"], "max_tokens": 2}),
                              ("/v1/embeddings", "EmbeddingRequest", {"model": models[1], "input": "hi"})]:
        jsonschema.validate(body, {**schemas[name], **resolver})  # what the server takes, the description allows
        assert httpx.post(url + route, json=body, timeout=TIMEOUT_S).status_code == 200
        assert spec["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(name)


# -------------------------------------------------------------------------- the probes of issue 26


@pytest.mark.parametrize("depth", [65, 1_000, 5_000, 100_000])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_deep_json_is_400_and_the_connection_goes_on(server, route, depth):
    url, _, models = server
    body = b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
    with httpx.Client() as client:  # one connection for both requests
        response = client.post(url + route, content=body, timeout=TIMEOUT_S)
        assert response.status_code == 400, response.text
        assert "deep" in response.json()["error"]["message"]
        assert client.get(url + "/health").status_code == 200


@pytest.mark.parametrize("route, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[0].content[0].text"),
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "x\ud83d"]}, "prompt[1]"),
    ("/v1/embeddings", {"input": ["ok", "\ud800"]}, "input[1]"),
    ("/v1/embeddings", {"input": "ok", "model": "minilm\ud800"}, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "\udc00"}, "model"),
])
def test_a_lone_surrogate_is_400_naming_the_field(server, route, body, param):
    url, _, models = server
    body = {"model": models[1] if route == "/v1/embeddings" else models[0], **body}
    response = httpx.post(url + route, content=json.dumps(body).encode(), timeout=TIMEOUT_S)  # "\ud800" escaped, as JS would
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"], error


def test_surrogates_as_raw_bytes_and_odd_names_never_break_the_error_handler(server):
    url, _, models = server
    cesu = httpx.post(url + "/v1/completions", content=b'{"prompt": "\xed\xa0\x80"}', timeout=TIMEOUT_S)
    assert cesu.status_code == 400 and cesu.json()["error"]["param"] == "prompt"
    # a model name that is valid Unicode but no model: the 404 quotes it back, ASCII-escaped
    odd = httpx.post(url + "/v1/completions", json={"model": "m\u2028\U0001f600\x00", "prompt": "x"}, timeout=TIMEOUT_S)
    assert odd.status_code == 404 and odd.json()["error"]["code"] == "model_not_found"
    assert odd.content.isascii()


def test_max_tokens_null_is_the_default(server):
    url, _, models = server
    no_end = {"0": -100, "2": -100}  # the tiny model's end tokens banned: only max_tokens stops it
    body = {"model": models[0], "prompt": "Hello world", "temperature": 0, "logit_bias": no_end}
    absent = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT_S).json()
    null = httpx.post(url + "/v1/completions", json={**body, "max_tokens": None}, timeout=TIMEOUT_S).json()
    assert absent["usage"]["completion_tokens"] == null["usage"]["completion_tokens"] == 16  # OpenAI's legacy default
    assert null["choices"][0]["finish_reason"] == "length" and null["choices"][0]["text"] == absent["choices"][0]["text"]
    chat = {"model": models[0], "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "logit_bias": no_end}
    for nulls in ({"max_tokens": None}, {"max_completion_tokens": None}, {"max_tokens": None, "max_completion_tokens": None}):
        response = httpx.post(url + "/v1/chat/completions", json={**chat, **nulls}, timeout=TIMEOUT_S)
        assert response.status_code == 200, response.text
        assert response.json()["usage"] == httpx.post(url + "/v1/chat/completions", json=chat, timeout=TIMEOUT_S).json()["usage"]


@pytest.mark.parametrize("values", [{"temperature": 1e-45}, {"top_p": 5e-324}, {"top_p": 1.7e-49, "temperature": 2},
                                    {"temperature": 1e-7, "top_p": 0.5}])
def test_a_temperature_or_top_p_too_small_for_float32_is_greedy(server, values):
    """Found by bench/fuzz_serve.py: a 500 (NaN probabilities) before; now they sample as 0 does."""
    url, _, models = server
    body = {"model": models[0], "prompt": "Hello world", "max_tokens": 4, "logit_bias": {"0": -100, "2": -100}}
    greedy = httpx.post(url + "/v1/completions", json={**body, "temperature": 0}, timeout=TIMEOUT_S).json()["choices"][0]["text"]
    response = httpx.post(url + "/v1/completions", json={**body, **values}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == greedy
