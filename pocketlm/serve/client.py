"""A client of a running `pocketlm serve`, for `pocketlm run/chat --server URL`. Standard library only, so
the CLI stays light: the server has the model, this side only streams text."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Iterator

from pocketlm.errors import PocketLMError


def call(server: str, path: str, body: dict | None, api_key: str | None, timeout: float = 600):
    """The server's response to a POST of body (a GET without one); its error message as a PocketLMError."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.rstrip("/") + path, data=data, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            error = json.load(e)["error"]
            message = error if isinstance(error, str) else error["message"]  # Ollama's shape (/api/*), or OpenAI's
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code}"
        raise PocketLMError(f"the server at {server} said: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise PocketLMError(f"no pocketlm server answered at {server} ({getattr(e, 'reason', e)}); start one with `pocketlm serve`") from None


def wait_until_up(process, url: str, limit_s: float = 120) -> None:
    """Poll url until it answers, for a server just started as `process` (tests, benchmarks); a RuntimeError
    (with the output, if it is a pipe) if the process exits first, or when limit_s (a bound on a hung start)
    runs out."""
    import time

    deadline = time.monotonic() + limit_s
    while True:
        if process.poll() is not None:
            output = process.stdout.read()[-3000:] if process.stdout else ""
            raise RuntimeError(f"{' '.join(map(str, process.args[:4]))} exited: {output}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(map(str, process.args[:4]))} did not answer {url}") from None
            time.sleep(0.3)


def stream(server: str, path: str, body: dict, api_key: str | None = None) -> Iterator[dict]:
    """POST with stream: true; yield each server-sent event's JSON until data: [DONE]."""
    response = call(server, path, {**body, "stream": True, "stream_options": {"include_usage": True}}, api_key)
    with response:
        for line in response:
            line = line.decode("utf-8").strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise PocketLMError(f"the server at {server} said: {chunk['error']['message']}")
            yield chunk


def request_params(params) -> dict:
    """SamplingParams -> request fields: OpenAI's, plus top_k, min_p, repetition_penalty and repeat_last_n
    (vLLM's and llama.cpp's names), so that the server samples as a local run would."""
    return {
        "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "top_k": params.top_k, "min_p": params.min_p, "repetition_penalty": params.repetition_penalty,
        "repeat_last_n": params.repeat_last_n, "seed": params.seed, "stop": params.stop or None,
    }


class Streamed:
    """A streamed answer's text chunks, and why it ended (finish_reason: "stop" or "length") once it has."""

    def __init__(self, chunks: Iterator[dict], chat: bool):
        self.chunks, self.chat, self.finish_reason, self.completion_tokens = chunks, chat, None, None

    def __iter__(self) -> Iterator[str]:
        for chunk in self.chunks:
            if chunk.get("usage"):  # the last chunk (stream_options.include_usage)
                self.completion_tokens = chunk["usage"]["completion_tokens"]
            if not chunk["choices"]:
                continue
            choice = chunk["choices"][0]
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            yield (choice["delta"].get("content") or "") if self.chat else choice["text"]


def texts(args, model: str, params, messages: list[dict] | None = None, prompt: str | None = None) -> Streamed:
    """The server's answer as it streams: to chat messages, or a raw prompt continued."""
    constraint = constraint_fields(args)  # --grammar / --json-schema: the server constrains the answer
    if messages is None:
        body = {"model": model, "prompt": prompt, **request_params(params), **constraint}
        return Streamed(stream(args.server, "/v1/completions", body, args.api_key), chat=False)
    body = {"model": model, "messages": messages, **request_params(params), **constraint}
    return Streamed(stream(args.server, "/v1/chat/completions", body, args.api_key), chat=True)


def constraint_fields(args) -> dict:
    """run and chat's --grammar FILE (GBNF, or Lark) and --json-schema FILE as the request fields llama.cpp's server
    names them ({"grammar": text} or {"json_schema": schema}); a local run compiles the same (constrain.compile_grammar)."""
    grammar, schema = getattr(args, "grammar", None), getattr(args, "json_schema", None)
    if grammar and schema:
        raise PocketLMError("give --grammar or --json-schema, not both")
    flag, path = ("--grammar", grammar) if grammar else ("--json-schema", schema)
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PocketLMError(f"cannot read {flag} {path}: {getattr(e, 'strerror', None) or e}") from None
    if grammar:
        return {"grammar": text}
    try:
        return {"json_schema": json.loads(text)}
    except ValueError as e:
        raise PocketLMError(f"{flag} {path} is not JSON ({e})") from None


def model_info(args, model: str) -> tuple[str, str]:
    """-> (the server's name for model, its kind: "chat", "base" or "embed")"""
    from pocketlm import registry

    entry = registry.lookup(model)
    name = entry.name if entry else model
    with call(args.server, f"/v1/models/{name}", None, args.api_key) as response:
        return name, json.load(response)["kind"]


def model_defaults(args, model: str) -> dict:
    """The served model's sampling defaults (a created model's parameters, its generation_config.json), which a
    local run of it would apply to the flags left out."""
    from pocketlm import registry

    entry = registry.lookup(model)
    with call(args.server, f"/v1/models/{entry.name if entry else model}", None, args.api_key) as response:
        return json.load(response).get("defaults") or {}


def remote_answer(args, model: str, prompt: str, params):
    """`pocketlm run --server URL ...`: the answer's text chunks as the server streams them, computed from the
    same request a local run would make (raw text, or a chat with the optional system prompt)."""
    if args.raw:
        return texts(args, model, params, prompt=prompt)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return texts(args, model, params, messages + [{"role": "user", "content": prompt}])
