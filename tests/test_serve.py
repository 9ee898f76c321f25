"""`pocketlm serve` end to end: a real server process on the real weights, driven by the official
`openai` client (and raw HTTP where the client would not send what we test)."""

import json
import math
import re
import subprocess
import sys
import threading

import httpx2 as httpx  # the HTTP client the openai package itself uses
import jsonschema
import openai
import pytest
from serve_process import running_server

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
GREEDY = {"temperature": 0}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]},
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time now", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def server():
    with running_server("smollm2", "minilm") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    from pocketlm import registry
    from pocketlm.load import convert_gguf
    from pocketlm.tokenizer import Tokenizer

    return Tokenizer.from_hf_dir(convert_gguf(registry.resolve(CHAT)[1]))


def chat(client, messages=FRANCE, **kwargs):
    return client.chat.completions.create(model=CHAT, messages=messages, **{"max_tokens": 16, **GREEDY, **kwargs})


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ------------------------------------------------------------------------------------------ basics


def test_models_and_health(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == [CHAT, "minilm-l6-v2"]
    assert client.models.retrieve(CHAT).id == CHAT
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["models"] == ids


def test_chat_answers_with_exact_usage(client, tokenizer):
    from pocketlm.engine.generate import encode_chat

    response = chat(client, max_tokens=24, logprobs=True)
    choice = response.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert response.model == CHAT and response.object == "chat.completion"
    assert response.usage.prompt_tokens == len(encode_chat(tokenizer, FRANCE))
    kept = len(choice.logprobs.content)  # one entry per token of the text; an end token adds one more
    assert response.usage.completion_tokens == kept + (choice.finish_reason == "stop")
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content


def test_streamed_chunks_join_to_the_unstreamed_text(client):
    messages = [{"role": "user", "content": "Name three colors."}]
    whole = chat(client, messages, max_tokens=20)
    chunks = list(chat(client, messages, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []  # include_usage: the last chunk
    counts = lambda usage: (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)  # noqa: E731
    assert counts(chunks[-1].usage) == counts(whole.usage)
    # the same prompt again: all of it but its last token comes from the prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_stream_ends_with_done(server):
    body = {"model": CHAT, "messages": FRANCE, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stop_max_tokens_and_seed(client):
    stopped = chat(client, stop=["Paris"])
    assert "Paris" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"
    short = chat(client, max_completion_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    sampled = [chat(client, max_tokens=6, temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same text


def test_n_logit_bias_and_penalties(client, tokenizer):
    two = chat(client, max_tokens=4, n=2, temperature=1.0, seed=1, logprobs=True)
    assert [c.index for c in two.choices] == [0, 1]
    counted = sum(len(c.logprobs.content) + (c.finish_reason == "stop") for c in two.choices)
    assert two.usage.completion_tokens == counted  # over both choices; the prompt counted once
    first = chat(client, max_tokens=1).choices[0].message.content
    banned = tokenizer.encode(first, add_special_tokens=False)[0]
    other = chat(client, max_tokens=1, logit_bias={str(banned): -100}).choices[0].message.content
    assert other != first
    penalized = chat(client, max_tokens=8, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalized.choices[0].message.content


def test_completions_with_a_list_of_prompts(client):
    response = client.completions.create(model=CHAT, prompt=["One, two, three,", "The sky is"], max_tokens=4, n=2, **GREEDY)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text == response.choices[1].text and response.choices[0].text != response.choices[2].text
    single = client.completions.create(model=CHAT, prompt="One, two, three,", max_tokens=4, **GREEDY)
    assert single.choices[0].text == response.choices[0].text
    sky = client.completions.create(model=CHAT, prompt="The sky is", max_tokens=1, **GREEDY)
    assert response.usage.prompt_tokens == single.usage.prompt_tokens + sky.usage.prompt_tokens
    streamed = client.completions.create(model=CHAT, prompt="One, two, three,", max_tokens=4, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == single.choices[0].text


def test_logprobs(client):
    response = chat(client, max_tokens=5, logprobs=True, top_logprobs=3)
    for entry in response.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    legacy = client.completions.create(model=CHAT, prompt="One, two,", max_tokens=3, logprobs=2, **GREEDY)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text and len(lp.top_logprobs[0]) == 2


def test_embeddings(client):
    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock prices fell sharply."]
    response = client.embeddings.create(model="minilm-l6-v2", input=texts)
    vectors = [d.embedding for d in response.data]
    assert [d.index for d in response.data] == [0, 1, 2] and all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    cos = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    assert response.usage.prompt_tokens > 10


# -------------------------------------------------------------------------------- structured output


def test_json_schema_is_enforced_streaming_too(client):
    messages = [{"role": "user", "content": "Invent a person. Answer in JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    whole = chat(client, messages, max_tokens=40, response_format=fmt)
    value = json.loads(whole.choices[0].message.content)
    jsonschema.validate(value, PERSON)
    chunks = chat(client, messages, max_tokens=40, response_format=fmt, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content
    sampled = chat(client, messages, max_tokens=40, response_format=fmt, temperature=1.0, seed=3)
    jsonschema.validate(json.loads(sampled.choices[0].message.content), PERSON)


def test_json_object(client):
    messages = [{"role": "user", "content": "Give me a JSON object about a dog."}]
    response = chat(client, messages, max_tokens=40, response_format={"type": "json_object"})
    if response.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(response.choices[0].message.content), dict)
    else:  # cut off by max_tokens: still a JSON object so far
        assert response.choices[0].message.content.startswith("{")


def test_tool_calls(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        response = chat(client, messages, max_tokens=30, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice)
        message = response.choices[0].message
        assert response.choices[0].finish_reason == "tool_calls" and message.content is None
        call = message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(choice, dict):
            assert call.function.name == "get_weather"
        schema = {"get_weather": WEATHER_TOOL, "get_time": TIME_TOOL}[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
    none = chat(client, messages, max_tokens=8, tools=[WEATHER_TOOL], tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    auto = chat(client, messages, max_tokens=30, tools=[WEATHER_TOOL])
    assert auto.choices[0].message.tool_calls or auto.choices[0].message.content
    # the call goes back into the conversation with the tool's answer
    follow = messages + [message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    assert chat(client, follow, max_tokens=8).choices[0].message.content


def test_tool_call_streamed(client):
    messages = [{"role": "user", "content": "What is the weather in Rome?"}]
    chunks = list(chat(client, messages, max_tokens=30, tools=[WEATHER_TOOL], tool_choice="required", stream=True))
    calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER_TOOL["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


# ------------------------------------------------------------------------------------------- errors


def test_unknown_model_is_404_naming_the_available_ones(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert e.value.status_code == 404 and CHAT in e.value.message and "minilm-l6-v2" in e.value.message
    assert e.value.code == "model_not_found" and e.value.param == "model"


def test_prompt_over_the_context_window_is_400_with_both_counts(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=CHAT, prompt="word " * 9000, max_tokens=1)
    assert "9001 tokens" in e.value.message and "8192" in e.value.message


@pytest.mark.parametrize(
    "change, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop": [1, 2]}, "stop"),
        ({"seed": 2**70}, "seed"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_invalid_values_are_400_naming_the_field(server, change, param):
    body = {"model": CHAT, "messages": FRANCE, "max_tokens": 2, **change}
    response = httpx.post(server + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_malformed_json_and_unknown_routes(server):
    for body in (b"{bad json", b"[1, 2]", b"\xff\xfe"):
        response = httpx.post(server + "/v1/chat/completions", content=body, timeout=30)
        assert response.status_code == 400 and error_of(response)["message"]
    response = httpx.get(server + "/v1/nothing")
    assert response.status_code == 404 and error_of(response)
    response = httpx.get(server + "/v1/chat/completions")
    assert response.status_code == 405 and error_of(response)
    bad = httpx.post(server + "/v1/embeddings", json={"model": CHAT, "input": "hi"}, timeout=60)
    assert bad.status_code == 400 and "not an embedding model" in error_of(bad)["message"]


def test_body_too_large_is_413(server):
    body = json.dumps({"model": CHAT, "prompt": "x" * (3 * 1024 * 1024)}).encode()
    response = httpx.post(server + "/v1/completions", content=body, timeout=60)
    assert response.status_code == 413 and error_of(response)["message"]

    def chunks():  # no content-length: the server must count as the body arrives
        for _ in range(40):
            yield b" " * 100_000

    response = httpx.post(server + "/v1/completions", content=chunks(), timeout=60)
    assert response.status_code == 413


# ---------------------------------------------------------------------------- concurrency and ops


def batch_steps(server) -> tuple[float, float]:
    """(decode steps so far, those that decoded one sequence alone)"""
    text = httpx.get(server + "/metrics").text
    value = lambda name: float(re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M).group(1))  # noqa: E731
    return value("pocketlm_decode_batch_size_count"), value('pocketlm_decode_batch_size_bucket{le="1.0"}')


def test_eight_clients_at_once_get_the_texts_they_get_one_by_one(client, server):
    questions = [f"Say a word that rhymes with {w}." for w in ("cat", "dog", "tree", "sun", "car", "blue", "rain", "cake")]
    alone = [chat(client, [{"role": "user", "content": q}], max_tokens=6).choices[0].message.content for q in questions]
    together = [None] * len(questions)
    steps_before, single_before = batch_steps(server)

    def ask(i):
        together[i] = chat(client, [{"role": "user", "content": questions[i]}], max_tokens=6).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    steps, single = batch_steps(server)
    assert steps - steps_before > single - single_before  # some steps decoded several clients in one pass


def test_metrics_and_ps(server, client):
    chat(client, max_tokens=2)
    text = httpx.get(server + "/metrics").text
    for name in ("pocketlm_requests_total", "pocketlm_prompt_tokens_total", "pocketlm_completion_tokens_total",
                 "pocketlm_request_latency_seconds_bucket", "pocketlm_time_to_first_token_seconds_bucket",
                 "pocketlm_decode_tokens_per_second_bucket", "pocketlm_queue_depth"):
        assert name in text, name
    assert 'pocketlm_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'status="500"' not in text  # no bad input above became a server error
    ps = subprocess.run([sys.executable, "-m", "pocketlm.cli", "ps", "--server", server, "--json"],
                        capture_output=True, text=True, timeout=60)
    loaded = {m["name"]: m for m in json.loads(ps.stdout)["models"]}
    assert CHAT in loaded and loaded[CHAT]["memory_bytes"] > 50e6  # int4 (from the Q4 file) to fp32
    table = subprocess.run([sys.executable, "-m", "pocketlm.cli", "ps", "--server", server], capture_output=True, text=True, timeout=60)
    assert CHAT in table.stdout and " MB" in table.stdout


def test_run_with_server_prints_what_a_local_run_prints(server):
    import os

    def run(*extra):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the local run on a shared machine, as the server's --threads 1
        return subprocess.run([sys.executable, "-m", "pocketlm.cli", "run", "What is the capital of France?", "-n", "12",
                               "--temperature", "0", *extra], capture_output=True, text=True, timeout=600, env=env)

    remote, local = run("--server", server), run()
    assert remote.returncode == 0 and "Paris" in remote.stdout, remote.stderr
    assert remote.stdout == local.stdout  # same sampler settings (top-k, repeat penalty) sent along
    as_json = json.loads(run("--server", server, "--json").stdout)
    assert as_json == {"model": "smollm2-135m-instruct", "text": local.stdout[:-1], "server": server}
    gone = subprocess.run([sys.executable, "-m", "pocketlm.cli", "run", "hi", "--server", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and "no pocketlm server answered" in gone.stderr and "Traceback" not in gone.stderr


def test_chat_with_server_prints_what_a_local_chat_prints(server):
    import os

    def chat_cli(*extra):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as test_run_with_server
        turns = "What is the capital of France?\nAnd of Italy?\n/bye\n"
        return subprocess.run([sys.executable, "-m", "pocketlm.cli", "chat", "-n", "12", "--temperature", "0", *extra],
                              input=turns, capture_output=True, text=True, timeout=600, env=env)

    remote, local = chat_cli("--server", server), chat_cli()
    assert remote.returncode == 0, remote.stderr
    first, second = remote.stdout.splitlines()
    assert first == local.stdout.splitlines()[0] and "Paris" in first
    # The second answer saw the first turn: the history went along. Not compared with the local text: the
    # server takes the first turn's positions from its prefix cache, where the answer's keys and values were
    # computed one decode step at a time, not in one prefill pass, so a near-tie may go the other way.
    assert "Rome" in second
    unknown = chat_cli("nothing-here", "--server", server)
    assert unknown.returncode == 1 and "nothing-here" in unknown.stderr and "Traceback" not in unknown.stderr
