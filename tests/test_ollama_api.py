"""Ollama's native API (pocketlm/serve/ollama_compat.py) end to end: a real `pocketlm serve` process on the real
weights, driven by the official `ollama` Python client, unchanged. The reference for every answer is the same
server's OpenAI route with the same settings (greedy, few tokens): both translate to one native request."""

import json
import subprocess
import sys
import time

import httpx
import jsonschema
import numpy as np
import ollama
import openai
import pytest
from serve_process import running_server

pytestmark = pytest.mark.slow

CHAT, EMBED = "smollm2-135m-instruct", "minilm-l6-v2"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 12}  # Ollama's default repeat_penalty (1.1) stays on
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}}
PIRATE = "You are a pirate. Answer like one."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # created models go to a throw-away home
        patch.setenv("POCKETLM_HOME", str(tmp_path_factory.mktemp("ollama-home")))
        with running_server("smollm2", "minilm") as url:
            yield url


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server)


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def openai_chat(oa, messages=FRANCE, max_tokens=12, model=CHAT, **extra):
    return oa.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                      extra_body={"repetition_penalty": 1.1, **extra})


def test_chat_and_generate_answer_as_the_openai_route(client, oa):
    reference = openai_chat(oa)
    text = reference.choices[0].message.content
    answer = client.chat(model="smollm2", messages=FRANCE, options=GREEDY)
    assert answer.model == "smollm2" and answer.message.role == "assistant" and answer.message.content == text and "Paris" in text
    assert answer.done and answer.done_reason == reference.choices[0].finish_reason
    assert (answer.prompt_eval_count, answer.eval_count) == (reference.usage.prompt_tokens, reference.usage.completion_tokens)
    assert answer.total_duration >= answer.eval_duration > 0 and answer.prompt_eval_duration > 0 and answer.load_duration >= 0
    assert answer.created_at.endswith("Z")

    parts = list(client.chat(model="smollm2:latest", messages=FRANCE, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True] and len(parts) > 2
    assert "".join(p.message.content for p in parts) == text and parts[-1].eval_count == answer.eval_count

    # /api/generate: the prompt as a user turn of the chat template (streamed by default), or raw text
    pieces = list(client.generate(model="smollm2", prompt=FRANCE[0]["content"], options=GREEDY, stream=True))
    assert "".join(p.response for p in pieces) == text and pieces[-1].done and pieces[-1].done_reason
    assert client.generate(model="smollm2", prompt=FRANCE[0]["content"], options=GREEDY).response == text
    raw = client.generate(model="smollm2", prompt="The capital of France is", raw=True, options={"temperature": 0, "num_predict": 4})
    legacy = oa.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=4, temperature=0,
                                   extra_body={"repetition_penalty": 1.1})
    assert raw.response == legacy.choices[0].text and raw.prompt_eval_count == legacy.usage.prompt_tokens


def test_options_format_and_tools(client):
    def story():
        return client.generate(model="smollm2", prompt="Tell me a story", options={"seed": 7, "temperature": 1.0, "top_k": 20, "num_predict": 8})

    assert story().response == story().response  # seed
    stopped = client.chat(model="smollm2", messages=FRANCE, options={**GREEDY, "stop": ["Paris"]})
    assert "Paris" not in stopped.message.content and stopped.done_reason == "stop"
    person = client.chat(model="smollm2", messages=[{"role": "user", "content": "Make up a person."}], format=PERSON,
                         options={"temperature": 0, "num_predict": 40})
    jsonschema.validate(json.loads(person.message.content), PERSON)
    as_json = client.generate(model="smollm2", prompt="Three colors as JSON", format="json", options={"temperature": 0, "num_predict": 40})
    assert isinstance(json.loads(as_json.response), dict)
    # tools: listed to the model in the system prompt, the output held to "a call or text" by the tool grammar
    plain = client.chat(model="smollm2", messages=FRANCE, options=GREEDY)
    with_tools = client.chat(model="smollm2", messages=FRANCE, tools=[WEATHER], options=GREEDY)
    assert with_tools.prompt_eval_count > plain.prompt_eval_count + 20 and with_tools.message.content
    with pytest.raises(ollama.ResponseError, match="context window") as small:  # num_ctx: a window smaller than the model's
        client.chat(model="smollm2", messages=FRANCE, options={"num_ctx": 16})
    assert small.value.status_code == 400
    for options, named in [({"mirostat": 2}, "options.mirostat"), ({"temprature": 0}, "options.temprature"), ({"top_p": 3}, "options.top_p")]:
        with pytest.raises(ollama.ResponseError, match=named) as bad:
            client.chat(model="smollm2", messages=FRANCE, options=options)
        assert bad.value.status_code == 400
    with pytest.raises(ollama.ResponseError, match="does not exist") as unknown:
        client.chat(model="no-such-model", messages=FRANCE)
    assert unknown.value.status_code == 404


def test_tool_calls_come_back_as_ollamas():
    """What the model writes when it calls a tool becomes message.tool_calls with the arguments as an object."""
    from pocketlm.serve import ollama_compat as oc
    from pocketlm.serve.protocol import Delta, Finished, GenerateRequest, Started
    from pocketlm.engine.sampling import SamplingParams

    plan = oc.Plan("chat", GenerateRequest(CHAT, [FRANCE], SamplingParams()), "smollm2", tools=[WEATHER])
    reply, said = oc.Reply(plan, Started(CHAT, 10)), '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    events = [Delta(0, said[:9]), Delta(0, said[9:]), Finished(0, "stop", 12, 0.1, 10.0)]
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert reply.whole([Started(CHAT, 10), *events])["message"] == {"role": "assistant", "content": "", "tool_calls": [call]}
    chunks = [c for e in events for c in reply.on(e)]
    assert chunks[0]["message"]["tool_calls"] == [call] and chunks[-1]["done"]


def test_embed_and_embeddings(client, oa):
    texts = ["The cat sat on the mat.", "Stock markets fell today."]
    ours = client.embed(model="minilm", input=texts)
    theirs = oa.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    assert np.allclose(ours.embeddings, [d.embedding for d in theirs.data], atol=1e-6)
    assert ours.prompt_eval_count == theirs.usage.prompt_tokens and ours.model == "minilm"
    assert client.embeddings(model="minilm", prompt=texts[0]).embedding == pytest.approx(ours.embeddings[0], abs=1e-6)
    assert len(client.embed(model="minilm", input=texts[0], dimensions=64).embeddings[0]) == 64
    long = "word " * 600  # over MiniLM's 512 tokens: cut to them (Ollama's default), or refused with truncate false
    assert len(client.embed(model="minilm", input=long).embeddings[0]) == 384
    with pytest.raises(ollama.ResponseError, match="context window") as refused:
        client.embed(model="minilm", input=long, truncate=False)
    assert refused.value.status_code == 400


def test_list_show_ps_version_and_keep_alive(client, server):
    assert {CHAT, EMBED} <= {m.model for m in client.list().models}
    shown = client.show("smollm2")
    assert "completion" in shown.capabilities and shown.modelinfo["llama.context_length"] == 8192
    assert "<|im_start|>" in shown.template and shown.details.family == "llama" and shown.details.quantization_level == "Q4_1"
    assert "embedding" in client.show("minilm").capabilities
    client.chat(model="smollm2", messages=FRANCE, options={"num_predict": 1})
    loaded = {m.model: m for m in client.ps().models}
    assert loaded[CHAT].size > 50e6 and loaded[CHAT].context_length == 8192 and loaded[CHAT].details.family == "llama"
    assert client.generate(model="smollm2", keep_alive=0).done_reason == "unload"  # `ollama stop`
    assert CHAT not in {m.model for m in client.ps().models}
    assert client.generate(model="smollm2").done_reason == "load"
    assert CHAT in {m.model for m in client.ps().models}
    stopped = subprocess.run([sys.executable, "-m", "pocketlm.cli", "stop", "smollm2", "--server", server],
                             capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"stopped {CHAT}", stopped.stderr
    assert CHAT not in {m.model for m in client.ps().models}
    client.chat(model="smollm2", messages=FRANCE, options={"num_predict": 1}, keep_alive="1s")
    for _ in range(100):  # unloaded a second after its last request
        if CHAT not in {m.model for m in client.ps().models}:
            break
        time.sleep(0.1)
    assert CHAT not in {m.model for m in client.ps().models}
    assert httpx.get(server + "/api/version").json()["version"]


def test_pull_create_copy_delete(client, oa, server):
    assert client.pull("smollm2").status == "success"
    assert [p.status for p in client.pull("smollm2", stream=True)][-1] == "success"
    with pytest.raises(ollama.ResponseError) as unknown:
        client.pull("no-such-model")
    assert unknown.value.status_code == 404

    assert client.create(model="pirate", from_="smollm2", system=PIRATE,
                         parameters={"temperature": 0, "num_predict": 10, "repeat_penalty": 1.0}).status == "success"
    hello = [{"role": "user", "content": "Hello"}]
    created = client.chat(model="pirate", messages=hello)
    by_hand = client.chat(model="smollm2", messages=[{"role": "system", "content": PIRATE}, *hello],
                          options={"temperature": 0, "num_predict": 10, "repeat_penalty": 1.0})
    assert created.message.content == by_hand.message.content and created.eval_count == by_hand.eval_count
    assert oa.chat.completions.create(model="pirate", messages=hello).choices[0].message.content == created.message.content
    assert client.chat(model="pirate", messages=hello, options={"num_predict": 3}).eval_count == 3  # the request's value wins
    shown = client.show("pirate")
    assert "SYSTEM" in shown.modelfile and "num_predict 10" in shown.parameters and shown.details.parent_model == CHAT

    assert client.copy("pirate", "pirate-copy").status == "success"
    assert {"pirate", "pirate-copy"} <= {m.model for m in client.list().models}
    assert client.chat(model="pirate-copy", messages=hello).message.content == created.message.content
    assert client.delete("pirate-copy").status == "success"
    assert "pirate-copy" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as gone:
        client.delete("pirate-copy")
    assert gone.value.status_code == 404
    with pytest.raises(ollama.ResponseError, match="pocketlm rm"):
        client.delete("smollm2")  # a package, not a record
    with pytest.raises(ollama.ResponseError, match="Jinja"):
        client.create(model="go-template", from_="smollm2", template="{{ .Prompt }}")


def test_the_guard_and_openapi_cover_ollamas_routes(server):
    spec = httpx.get(server + "/openapi.json").json()
    assert {"/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/tags", "/api/show", "/api/ps", "/api/version",
            "/api/pull", "/api/create", "/api/copy", "/api/delete"} <= set(spec["paths"])
    body = {"model": "smollm2", "messages": FRANCE}
    assert httpx.post(server + "/api/chat", json=body, headers={"Origin": "http://evil.example"}).status_code == 403
    assert httpx.get(server + "/api/tags", headers={"Host": "evil.example"}).status_code == 403
    with running_server("smollm2", "--api-key", "sekret") as keyed:
        assert httpx.get(keyed + "/api/tags").status_code == 401
        assert httpx.post(keyed + "/api/generate", json={"model": "smollm2"}).status_code == 401
        with pytest.raises(ollama.ResponseError) as refused:
            ollama.Client(host=keyed).list()
        assert refused.value.status_code == 401
        assert CHAT in {m.model for m in ollama.Client(host=keyed, headers={"Authorization": "Bearer sekret"}).list().models}
