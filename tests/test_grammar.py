"""Grammars: llama.cpp's `grammar` (GBNF), `regex`, vLLM's guided_grammar / guided_regex / guided_choice / guided_json
(and its newer structured_outputs), TGI's grammar object, and run/chat's --grammar / --json-schema flags all go
through the one constrained decoding (serve/constrain.py, llguidance); a constraint-like field the server does not
know is a 400 naming it, never ignored.

A real `pocketlm serve` on the tiny random Llama with SmolLM2's tokenizer (conftest.tiny_llama_dir), through the
official `openai` client (extra_body, as a user of those servers sends them): a random model follows no grammar on
its own, so a text that matches is the constraint's work.
"""

import json
import re
import sys

import httpx2 as httpx  # the HTTP client the openai package itself uses
import jsonschema
import openai
import pytest
from serve_process import running_server

from pocketlm.cli import main

pytestmark = pytest.mark.slow

GBNF = 'root ::= "The answer is " digit digit "." \ndigit ::= [0-9]\n'
GBNF_MATCH = r"The answer is [0-9]{2}\."
LARK = 'start: "The answer is " DIGIT DIGIT "."\nDIGIT: /[0-9]/\n'
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["kiwi", "plum", "mango pie"]
SCHEMA = {  # bounded: a random model would write digits until max_tokens
    "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"], "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Answer me."}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_server(str(tiny_llama_dir)) as url:
        yield url, tiny_llama_dir.name


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def texts(client, model, constraint: dict, **kwargs) -> list[str]:
    """The answer of both routes, greedy and sampled, with the constraint in extra_body."""
    out = []
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
        settings = {"model": model, "max_tokens": 40, "extra_body": constraint, **sampling, **kwargs}
        out.append(client.completions.create(prompt="Say something:", **settings).choices[0].text)
        out.append(client.chat.completions.create(messages=ASK, **settings).choices[0].message.content)
    return out


@pytest.mark.parametrize("constraint", [{"grammar": GBNF}, {"guided_grammar": GBNF}, {"guided_grammar": LARK},
                                        {"structured_outputs": {"grammar": GBNF}}])
def test_a_grammar_constrains_the_output(server, client, constraint):
    for text in texts(client, server[1], constraint):
        assert re.fullmatch(GBNF_MATCH, text), text


@pytest.mark.parametrize("constraint", [{"regex": REGEX}, {"guided_regex": REGEX},
                                        {"grammar": {"type": "regex", "value": REGEX}}])  # TGI's grammar object
def test_a_regex_constrains_the_output(server, client, constraint):
    for text in texts(client, server[1], constraint):
        assert re.fullmatch(REGEX, text), text


def test_guided_choice_answers_one_of_the_choices(server, client):
    answers = set(texts(client, server[1], {"guided_choice": CHOICES}))
    for seed in range(4):
        reply = client.completions.create(model=server[1], prompt="Pick:", temperature=1.0, seed=seed, max_tokens=10,
                                          extra_body={"guided_choice": CHOICES})
        answers.add(reply.choices[0].text)
    assert answers <= set(CHOICES)


@pytest.mark.parametrize("constraint", [{"guided_json": SCHEMA}, {"json_schema": SCHEMA}, {"guided_json": json.dumps(SCHEMA)}])
def test_a_json_schema_constrains_the_output(server, client, constraint):
    for text in texts(client, server[1], constraint):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_streamed_answer_matches_too(server, client):
    chunks = client.completions.create(model=server[1], prompt="Say:", max_tokens=40, temperature=1.0, seed=2, stream=True,
                                       extra_body={"grammar": GBNF})
    assert re.fullmatch(GBNF_MATCH, "".join(c.choices[0].text for c in chunks))


@pytest.mark.parametrize("field, value", [
    ("guided_decoding_backend", "xgrammar"),  # vLLM's: which engine, not what to match; still never dropped silently
    ("guided_whitespace_pattern", " "),
    ("structural_tag", "{}"),
    ("grammar_lazy", True),  # llama.cpp's
    ("grammar_triggers", [{"type": "word", "value": "x"}]),
    ("format", "json"),  # Ollama's, sent to the OpenAI API
    ("ebnf_grammar", "root ::= x"),
    ("allowed_token_ids", [1, 2]),
    ("structured_outputs.json_object", True),
])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_an_unknown_constraint_field_is_400_naming_it(server, field, value, route):
    url, model = server
    top, _, inner = field.partition(".")
    body = {"model": model, "prompt": "x", "messages": ASK, "max_tokens": 2, top: {inner: value} if inner else value}
    response = httpx.post(url + route, json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and f"'{field}'" in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"grammar": "root ::= foo"}, "grammar"),  # an undefined rule
    ({"grammar": 'root ::= "unclosed'}, "grammar"),
    ({"regex": "[0-9"}, "regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"regex": "a", "grammar": GBNF}, "regex"),  # one constraint per request
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "response_format"),
])
def test_a_bad_or_doubled_constraint_is_one_400_line(server, body, param):
    url, model = server
    response = httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": ASK, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "\n" not in error["message"]


def test_other_unknown_fields_are_still_ignored(server):
    """Clients send fields of their own (OpenAI's metadata, user...): only constraint-like names are refused."""
    url, model = server
    body = {"model": model, "messages": ASK, "max_tokens": 2, "user": "me", "metadata": {"a": "b"}, "reasoning_format": "none"}
    assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


# ---------------------------------------------------------------------------------- run and chat


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_and_chat_take_a_grammar_or_a_json_schema_file(tiny_llama_dir, server, tmp_path, capsys, monkeypatch):
    grammar, schema = tmp_path / "answer.gbnf", tmp_path / "schema.json"
    grammar.write_text(GBNF)
    schema.write_text(json.dumps(SCHEMA))
    for where in ([], ["--server", server[0]]):  # here, and through the server (the same request fields)
        model = server[1] if where else tiny_llama_dir
        code, out, err = run_cli(capsys, "run", model, "Say:", "--grammar", grammar, "--temperature", "1", "--seed", "3", *where)
        assert code == 0 and re.fullmatch(GBNF_MATCH, out.strip()), err
        code, out, err = run_cli(capsys, "run", model, "Say:", "--json-schema", schema, "--temperature", "0", "--raw", *where)
        assert code == 0, err
        jsonschema.validate(json.loads(out), SCHEMA)
        monkeypatch.setattr(sys, "stdin", open(grammar.parent / "lines.txt", "w+"))
        sys.stdin.write("Hi\nAnd again?\n")
        sys.stdin.seek(0)
        code, out, err = run_cli(capsys, "chat", model, "--grammar", grammar, "--temperature", "1", *where)
        answers = [line for line in out.splitlines() if line]
        assert code == 0 and len(answers) == 2 and all(re.fullmatch(GBNF_MATCH, a) for a in answers), (out, err)


@pytest.mark.parametrize("args, message", [
    (["--grammar", "missing.gbnf"], "cannot read --grammar"),
    (["--json-schema", "{bad}"], "is not JSON"),
    (["--grammar", "bad.gbnf"], "cannot use this grammar"),
    (["--grammar", "bad.gbnf", "--json-schema", "{bad}"], "not both"),
])
def test_a_bad_grammar_flag_is_one_line(tiny_llama_dir, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.gbnf").write_text("root ::= nothing\n")
    (tmp_path / "{bad}").write_text("{bad")
    code, out, err = run_cli(capsys, "run", tiny_llama_dir, "Say:", *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
