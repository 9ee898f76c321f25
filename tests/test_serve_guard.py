"""Other web pages and other names may not use `pocketlm serve` (Origin and Host checks, as Ollama's), and with
--api-key nothing but the chat page and a minimal /health answers without the key. A real server process on a
tiny random Llama (tests/tiny_models.py), driven by raw HTTP as a browser would send it and by the openai client."""

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest
from serve_process import running_server

pytestmark = pytest.mark.slow

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED = "http://app.example:3000"


@pytest.fixture(scope="module")
def open_server(small_llama_dir):
    with running_server(str(small_llama_dir)) as url:
        yield url, small_llama_dir.name


@pytest.fixture(scope="module")
def keyed_server(small_llama_dir):
    with running_server(str(small_llama_dir), "--api-key", KEY, "--allow-origin", ALLOWED, "--allow-host", "models.lan") as url:
        yield url, small_llama_dir.name


def completion(model: str) -> dict:
    return {"model": model, "prompt": "Hello", "max_tokens": 2}


def generated(url: str, headers: dict | None = None) -> float:
    """Completion tokens the server has produced so far (Prometheus)."""
    text = httpx.get(url + "/metrics", headers=headers).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("pocketlm_completion_tokens_total"))


def test_a_page_of_another_site_cannot_make_the_model_generate(open_server):
    url, model = open_server
    before = generated(url)
    # what a page on evil.example can send without a CORS preflight: a text/plain POST
    import json

    response = httpx.post(url + "/v1/completions", content=json.dumps(completion(model)),
                          headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "origin_not_allowed" and "--allow-origin" in error["message"]
    assert "access-control-allow-origin" not in response.headers
    for origin in ("null", "http://127.0.0.1:1", "file://", "http://localhost.evil.example"):
        assert httpx.get(url + "/v1/models", headers={"Origin": origin}).status_code == 403, origin
    assert generated(url) == before
    # the server's own page (same origin as its address) may
    own = httpx.post(url + "/v1/completions", json=completion(model), headers={"Origin": url})
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers


def test_a_foreign_host_is_refused(open_server):
    url, model = open_server
    port = url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", "192.168.1.7", "localhost.attacker.example"):
        response = httpx.post(url + "/v1/completions", json=completion(model), headers={"Host": host})
        assert response.status_code == 403 and response.json()["error"]["code"] == "host_not_allowed", host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"127.0.0.2:{port}", "[::1]", f"app.localhost:{port}"):
        assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host


def test_allowed_origin_and_host(keyed_server):
    url, model = keyed_server
    preflight = httpx.options(url + "/v1/completions", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    response = httpx.post(url + "/v1/completions", json=completion(model), headers={**AUTH, "Origin": ALLOWED})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ALLOWED
    unauthorized = httpx.get(url + "/v1/models", headers={"Origin": ALLOWED})  # the page can read why
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == ALLOWED
    other = httpx.options(url + "/v1/completions", headers={"Origin": "http://other.example", "Access-Control-Request-Method": "POST"})
    assert other.status_code == 403 and "access-control-allow-origin" not in other.headers
    assert httpx.get(url + "/v1/models", headers={**AUTH, "Host": "models.lan"}).status_code == 200
    assert httpx.get(url + "/v1/models", headers={**AUTH, "Host": "other.lan"}).status_code == 403


def test_with_a_key_only_the_page_and_a_bare_health_answer_without_it(keyed_server):
    url, model = keyed_server
    assert httpx.get(url + "/").status_code == 200 and "<html" in httpx.get(url + "/").text.lower()
    assert httpx.get(url + "/static/chat.js").status_code == 200
    assert httpx.get(url + "/health").json() == {"status": "ok"}  # no model names without the key
    full = httpx.get(url + "/health", headers=AUTH).json()
    assert full["models"] == [model] and "queue_depth" in full
    for path in ("/metrics", "/v1/models", f"/v1/models/{model}", "/api/ps", "/openapi.json", "/nothing"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.get(url + path, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", (path, headers)
    assert httpx.post(url + "/v1/completions", json=completion(model)).status_code == 401
    assert "pocketlm_requests_total" in httpx.get(url + "/metrics", headers=AUTH).text
    assert httpx.get(url + "/openapi.json", headers=AUTH).json()["security"] == [{"bearer": []}]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=model, prompt="Hello", max_tokens=2).usage.completion_tokens >= 1
