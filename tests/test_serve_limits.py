"""`pocketlm serve` under limits: an API key, a tiny queue and body limit, clients that give up."""

import re
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest
from serve_process import running_server

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
NO_END = {"0": -100, "2": -100}  # SmolLM2's end tokens banned: the answer runs to max_tokens
# 2,000 tokens take several seconds on any machine here (400 once finished inside test_a_client_that_times_out's 3 s)
LONG = {"model": CHAT, "prompt": "Once upon a time", "max_tokens": 2000, "logit_bias": NO_END, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    # one slot and one place in the queue: a third request finds them full
    with running_server("smollm2", "--api-key", KEY, "--max-batch", "1", "--max-queue", "1", "--max-body", "4096") as url:
        # load the model now, so the tests below start from a warm worker
        httpx.post(url + "/v1/completions", json={"model": CHAT, "prompt": "Hi", "max_tokens": 1}, headers=AUTH, timeout=300)
        yield url


def metric(url: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", httpx.get(url + "/metrics", headers=AUTH).text, re.M)  # the key: /metrics too
    return float(match.group(1)) if match else 0.0


def wait_for(condition, what: str, limit_s: float = 120):
    """A bound on a hang, not a speed check."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(server + "/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [CHAT]
    assert httpx.get(server + "/health").json() == {"status": "ok"}  # a liveness probe needs no key, and learns no more
    assert httpx.get(server + "/metrics").status_code == 401


def test_body_over_the_limit_is_413(server):
    response = httpx.post(server + "/v1/completions", json={**LONG, "prompt": "x" * 5000}, headers=AUTH)
    assert response.status_code == 413 and "4096" in response.json()["error"]["message"]


def test_full_queue_is_429_and_a_client_that_leaves_is_cancelled(server):
    cancelled_before = metric(server, "pocketlm_cancelled_total")
    statuses = []

    def post():
        body = {"model": CHAT, "prompt": "Hello", "max_tokens": 2}
        response = httpx.post(server + "/v1/completions", json=body, headers=AUTH, timeout=300)
        statuses.append((response.status_code, response.headers.get("retry-after"), response.json()))

    with httpx.stream("POST", server + "/v1/completions", json={**LONG, "stream": True}, headers=AUTH, timeout=300) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")  # the worker is busy with this one now
        waiting = [threading.Thread(target=post) for _ in range(2)]
        for t in waiting:
            t.start()
        wait_for(lambda: statuses, "the request that finds the queue full")
        status, retry_after, body = statuses[0]
        assert status == 429 and int(retry_after) >= 1 and body["error"]["code"] == "rate_limit_exceeded"
    # leaving the stream cancels its generation: the queued request runs and finishes
    for t in waiting:
        t.join()
    assert sorted(s for s, _, _ in statuses) == [200, 429]
    wait_for(lambda: metric(server, "pocketlm_cancelled_total") == cancelled_before + 1, "the stream's cancellation")
    assert metric(server, "pocketlm_rejected_total") >= 1


def test_a_client_that_times_out_is_cancelled(server):
    before = metric(server, "pocketlm_cancelled_total")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server + "/v1/completions", json=LONG, headers=AUTH, timeout=3)
    wait_for(lambda: metric(server, "pocketlm_cancelled_total") == before + 1, "the cancellation")
    wait_for(lambda: httpx.get(server + "/health", headers=AUTH).json()["queue_depth"] == 0, "the worker to be free")
    done = httpx.post(server + "/v1/completions", json={"model": CHAT, "prompt": "Hi", "max_tokens": 2}, headers=AUTH, timeout=300)
    assert done.status_code == 200


def test_prefix_cache_computes_a_shared_system_prompt_once_with_the_same_text(server):
    """One slot here, so what its cache holds is known: the last request's tokens."""
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    system = {"role": "system", "content": "You are a geography teacher. " * 20 + "Answer in one short sentence."}

    def ask(question: str):
        return client.chat.completions.create(model=CHAT, messages=[system, {"role": "user", "content": question}],
                                              max_tokens=16, temperature=0)

    cold = ask("What is the capital of France?")  # the slot held another prompt: little in common
    other = ask("What is the capital of Italy?")  # the system prompt comes from the cache
    warm = ask("What is the capital of France?")  # the system prompt again, Italy's question replaced
    system_tokens = cold.usage.prompt_tokens - 20  # the question and the template's few tokens around it
    assert cold.usage.prompt_tokens_details.cached_tokens < 10
    assert other.usage.prompt_tokens_details.cached_tokens > system_tokens
    assert system_tokens < warm.usage.prompt_tokens_details.cached_tokens < warm.usage.prompt_tokens - 1
    assert warm.choices[0].message.content == cold.choices[0].message.content
    assert metric(server, 'pocketlm_prompt_cached_tokens_total{model="smollm2-135m-instruct"}') > 2 * system_tokens
