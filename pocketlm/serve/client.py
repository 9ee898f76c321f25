"""A client of a running `pocketlm serve`, for `pocketlm run --server URL`. Standard library only, so the
CLI stays light: the server has the model, this side only streams text."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Iterator

from pocketlm.errors import PocketLMError


def stream(server: str, path: str, body: dict, api_key: str | None = None) -> Iterator[dict]:
    """POST with stream: true; yield each server-sent event's JSON until data: [DONE]."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(server.rstrip("/") + path, data=json.dumps({**body, "stream": True}).encode(), headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=600)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code}"
        raise PocketLMError(f"the server at {server} said: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise PocketLMError(f"no pocketlm server answered at {server} ({getattr(e, 'reason', e)}); start one with `pocketlm serve`") from None
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


def run_remote(args, model: str, prompt: str, params) -> int:
    """`pocketlm run --server URL ...`: the same output as a local run, computed by the server."""
    if args.raw:
        chunks = stream(args.server, "/v1/completions", {"model": model, "prompt": prompt, **request_params(params)}, args.api_key)
        texts = (c["choices"][0]["text"] for c in chunks if c["choices"])
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        chunks = stream(args.server, "/v1/chat/completions", {"model": model, "messages": messages, **request_params(params)}, args.api_key)
        texts = (c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    if args.json:
        print(json.dumps({"model": model, "text": "".join(texts), "server": args.server}))
        return 0
    for text in texts:
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
