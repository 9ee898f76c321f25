"""OpenAI's API <-> pocketlm's native types: the thin translation layer (as Ollama's openai.go).

Requests: a JSON body is checked field by field and becomes a GenerateRequest or EmbedRequest; a bad
value is an APIError that names the field (OpenAI's error shape, status 400). Responses: the worker's
events (protocol.py) become OpenAI's response objects or stream chunks. No torch, no model here.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field

from pocketlm.engine.sampling import SamplingParams
from pocketlm.errors import PocketLMError
from pocketlm.serve.protocol import Delta, EmbedRequest, Finished, GenerateRequest, Started

COMPLETION_MAX_TOKENS = 16  # /v1/completions' default max_tokens (OpenAI's legacy API)
MAX_LOGPROBS = 20  # completions' logprobs, as vLLM's default max_logprobs (OpenAI's legacy API took 5)
# OpenAI takes 4 stop strings; lm-evaluation-harness sends a task's `until` list plus the end token (6 for humaneval)
MAX_STOPS = 16
MAX_WINDOW = 2**31 - 1  # repeat_last_n: more than any context (torch warns of slices past int64)
SMALLEST = 1e-6  # a temperature or top_p below this samples as 0 does: the most likely token
ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_PROMPT = (
    "You can call these functions:\n{tools}\n"
    'To call one, reply with only a JSON object: {{"name": <function name>, "arguments": <its arguments>}}.'
)


class APIError(Exception):
    """Becomes {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------------- checks

MAX_DEPTH = 64  # arrays and objects inside one another; a JSON schema in response_format needs about 2 per level
SURROGATE = re.compile(r"[\ud800-\udfff]")  # json.loads lets "\\ud800" (and CESU-8 bytes) through as a lone surrogate


def parse_body(raw: bytes) -> dict:
    """A request body -> its JSON object, or an APIError (400): not JSON, not an object, nested deeper than
    MAX_DEPTH, or a string that is not valid Unicode (an unpaired UTF-16 surrogate, which the tokenizer and
    the UTF-8 encoder of every response would refuse). Checked here once, so no later step meets either."""
    try:
        data = json.loads(raw)
    except RecursionError:  # json's C parser stops at the interpreter's recursion limit (about 1,000 levels)
        raise APIError(400, f"the request body nests arrays and objects more than {MAX_DEPTH} deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_tree(data)
    return data


def check_tree(data: dict) -> None:
    """Depth and surrogates, walked without recursion; the error names the field (messages[0].content)."""
    stack = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            top = re.match(r"[^.\[]*", path).group()  # the request's field that holds it
            raise APIError(400, f"'{top}' nests arrays and objects more than {MAX_DEPTH} deep", top)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and SURROGATE.search(key):
                where = path or "the request body"
                raise APIError(400, f"a key in '{where}' is not valid Unicode (an unpaired UTF-16 surrogate)", path or None)
            field_path = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
            lone = SURROGATE.search(item) if isinstance(item, str) else None
            if lone:
                raise APIError(400, f"'{field_path}' is not valid Unicode: it holds an unpaired UTF-16 surrogate "
                               f"(\\u{ord(lone.group()):04x}); send UTF-8 text", field_path)
            if isinstance(item, (dict, list)):
                stack.append((item, field_path, depth + 1))


def get(body: dict, name: str, types: tuple, default=None, *, lo=None, hi=None, nullable: bool = True):
    """body[name] if it has one of `types` (and lies in [lo, hi]), else an APIError naming it."""
    value = body.get(name, default)
    if value is None:
        if not nullable and name in body:
            raise APIError(400, f"'{name}' must not be null", name)
        return default
    is_number = float in types or int in types
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        expected = " or ".join({bool: "a boolean", int: "an integer", float: "a number", str: "a string",
                                list: "an array", dict: "an object"}[t] for t in types)
        raise APIError(400, f"'{name}' must be {expected}, got {json.dumps(value)[:60]}", name)
    if is_number and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise APIError(400, f"'{name}' must be a finite number", name)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def pick_model(body: dict, available: list[str], default: str | None) -> str:
    from pocketlm import registry

    name = get(body, "model", (str,), default)
    if not name:
        raise APIError(400, "'model' is required", "model")
    entry = registry.lookup(name)
    canonical = entry.name if entry else name
    if canonical not in available:
        raise APIError(404, f"model '{name}' does not exist here; available models: {', '.join(available)}",
                       "model", "model_not_found")
    return canonical


def sampling(body: dict, config, max_tokens_names=("max_tokens",)) -> SamplingParams:
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = max_tokens or get(body, name, (int,), lo=1)
    temperature = get(body, "temperature", (int, float), 1.0, lo=0, hi=2)
    top_p = get(body, "top_p", (int, float), 1.0, lo=0, hi=1)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop)):
        raise APIError(400, f"'stop' must be a string or an array of at most {MAX_STOPS} strings", "stop")
    # top_p 0 keeps only the top token: greedy. So do values too small for float32 (a temperature of 1e-38
    # overflows the logits it divides; a top_p of 1e-49 is 0 in float32, which would drop every token).
    greedy = top_p < SMALLEST or temperature < SMALLEST
    return SamplingParams(
        max_new_tokens=max_tokens or config.default_max_tokens,
        temperature=0.0 if greedy else float(temperature),
        top_p=1.0 if greedy else float(top_p),
        # OpenAI's sampler has no top-k, min-p or repetition penalty: off unless asked for by the names
        # vLLM and llama.cpp's server accept (`pocketlm run --server` sends them)
        top_k=get(body, "top_k", (int,), 0, lo=0),
        min_p=float(get(body, "min_p", (int, float), 0.0, lo=0, hi=0.99)),
        repetition_penalty=float(get(body, "repetition_penalty", (int, float), 1.0, lo=0.01, hi=10)),
        repeat_last_n=get(body, "repeat_last_n", (int,), 64, lo=-1, hi=MAX_WINDOW),
        seed=get(body, "seed", (int,), lo=-(2**63), hi=2**64 - 1),  # what torch.Generator takes
        stop=stop or [],
    )


def logit_bias(body: dict) -> dict[int, float]:
    bias = get(body, "logit_bias", (dict,), {})
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100 <= value <= 100:
            raise APIError(400, "'logit_bias' maps token ids (as strings) to numbers between -100 and 100", "logit_bias")
        out[int(key)] = float(value)
    return out


def stream_options(body: dict) -> tuple[bool, bool]:
    stream = get(body, "stream", (bool,), False)
    options = get(body, "stream_options", (dict,), {})
    if options and not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    return stream, bool(options.get("include_usage", False))


def common(body: dict, config, prompts, model: str, max_tokens_names) -> GenerateRequest:
    return GenerateRequest(
        model=model,
        prompts=prompts,
        params=sampling(body, config, max_tokens_names),
        n=get(body, "n", (int,), 1, lo=1, hi=config.max_n),
        logit_bias=logit_bias(body),
        presence_penalty=float(get(body, "presence_penalty", (int, float), 0.0, lo=-2, hi=2)),
        frequency_penalty=float(get(body, "frequency_penalty", (int, float), 0.0, lo=-2, hi=2)),
        given=given_fields(body, max_tokens_names),
    )


# request field -> SamplingParams field: what a request sets is its own, the rest the model's defaults (named.py)
GIVEN = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed", "stop": "stop",
         "repetition_penalty": "repetition_penalty", "repeat_last_n": "repeat_last_n"}


def given_fields(body: dict, max_tokens_names) -> set[str]:
    given = {GIVEN[k] for k in GIVEN if body.get(k) is not None}
    if any(body.get(k) is not None for k in max_tokens_names):
        given.add("max_new_tokens")
    if isinstance(body.get("top_p"), (int, float)) and body["top_p"] < SMALLEST:  # greedy, whatever the model's temperature
        given.add("temperature")
    return given


# ----------------------------------------------------------------------------------------- requests


@dataclass
class Plan:
    """How to answer one request: the native request plus what only the OpenAI side cares about."""

    kind: str  # "chat" or "completion"
    request: GenerateRequest
    stream: bool = False
    include_usage: bool = False
    tools: list[dict] = field(default_factory=list)  # when set, an output that is a call becomes tool_calls
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_chat(body: dict, config, available: list[str], default: str | None) -> Plan:
    from pocketlm.serve import constrain

    model = pick_model(body, available, default)
    messages = [message_text(m, i) for i, m in enumerate(get(body, "messages", (list,), []))]
    if not messages:
        raise APIError(400, "'messages' must be a non-empty array of messages", "messages")
    request = common(body, config, [messages], model, ("max_completion_tokens", "max_tokens"))
    stream, include_usage = stream_options(body)
    if get(body, "logprobs", (bool,), False):
        request.logprobs = get(body, "top_logprobs", (int,), 0, lo=0, hi=20)
    elif body.get("top_logprobs") is not None:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")

    tools, required = tool_choice(body)
    try:
        request.grammar = output_constraint(body)
        if tools and request.grammar:
            raise APIError(400, "use either 'tools' or an output constraint ('response_format', 'grammar', ...), not both", "tools")
        if tools:
            messages[:] = with_tool_prompt(messages, tools)  # the list request.prompts holds
            request.grammar = constrain.tool_grammar(tools, required)
    except PocketLMError as e:  # a schema llguidance cannot compile
        raise APIError(400, str(e), "tools" if tools else "response_format") from None
    return Plan("chat", request, stream, include_usage, tools)


def message_text(message, i: int) -> dict:
    """An OpenAI message -> {"role", "content"} with plain-text content, as chat templates expect."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise APIError(400, f"'{where}' must be an object", where)
    role = message.get("role")
    if role not in ROLES:
        raise APIError(400, f"'{where}.role' must be one of {', '.join(ROLES)}", f"{where}.role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only (this server has no vision model)
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"'{where}.content' parts must be text parts ({{\"type\": \"text\", \"text\": ...}})", f"{where}.content")
        content = "".join(p["text"] for p in content)
    calls = message.get("tool_calls")
    if role == "assistant" and calls:  # the model's earlier call, written as it produced it
        try:
            content = "\n".join(json.dumps({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])})
                                for c in calls)
        except (KeyError, TypeError, ValueError):
            raise APIError(400, f"'{where}.tool_calls' must be OpenAI function calls with JSON arguments", f"{where}.tool_calls") from None
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise APIError(400, f"'{where}.content' must be a string or an array of text parts", f"{where}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def tool_choice(body: dict) -> tuple[list[dict], bool]:
    """-> (the tools the answer may call, whether it must call one). "none" offers no tools."""
    tools = get(body, "tools", (list,), [])
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(fn, dict) and tool.get("type", "function") == "function" and isinstance(fn.get("name"), str)
                and isinstance(fn.get("parameters", {}), dict)):
            raise APIError(400, f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}", f"tools[{i}]")
    choice = body.get("tool_choice") or ("auto" if tools else "none")
    if choice == "none":
        return [], False
    if not tools:
        raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice")
    if choice in ("auto", "required"):
        return tools, choice == "required"
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise APIError(400, "'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                       "{\"name\": ...}} naming one of 'tools'", "tool_choice")
    return named, True


def with_tool_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Tell the model about the tools in the system message (SmolLM2's template has no tools section)."""
    listed = "\n".join(json.dumps({k: t["function"].get(k) for k in ("name", "description", "parameters")}) for t in tools)
    text = TOOL_PROMPT.format(tools=listed)
    if messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def response_format_grammar(body: dict) -> str | None:
    from pocketlm.serve import constrain

    fmt = get(body, "response_format", (dict,), {"type": "text"})
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return constrain.json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "'response_format.json_schema.schema' must be a JSON schema object", "response_format")
        return constrain.json_schema_grammar(schema)
    raise APIError(400, "'response_format.type' must be text, json_object or json_schema", "response_format")


def parse_completion(body: dict, config, available: list[str], default: str | None) -> Plan:
    model = pick_model(body, available, default)
    prompts = completion_prompts(body.get("prompt"))
    max_tokens = get(body, "max_tokens", (int,), lo=0)  # 0: the prompt alone (with echo: scored), as vLLM
    request = common({**body, "max_tokens": max_tokens or None}, config, prompts, model, ("max_tokens",))
    if max_tokens is None:  # the legacy API's default; null means the default too, as in OpenAI's API
        request.params.max_new_tokens = COMPLETION_MAX_TOKENS
    request.no_new_tokens = max_tokens == 0
    stream, include_usage = stream_options(body)
    request.logprobs = get(body, "logprobs", (int,), None, lo=0, hi=MAX_LOGPROBS)
    request.echo = get(body, "echo", (bool,), False)
    request.end_token_logprob = True
    if body.get("suffix") or get(body, "best_of", (int,), 1, lo=1, hi=1) != 1:
        raise APIError(400, "'suffix' and 'best_of' are not supported", "suffix" if body.get("suffix") else "best_of")
    request.grammar = output_constraint(body)
    return Plan("completion", request, stream, include_usage)


def completion_prompts(prompt) -> list[str | list[int]]:
    """'prompt': a string, an array of strings, an array of token ids, or an array of token-id arrays (what
    lm-evaluation-harness sends: its own tokenization of each request)."""
    def token_ids(p) -> bool:
        return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p)

    if isinstance(prompt, str) or token_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or token_ids(p) for p in prompt):
        return prompt
    raise APIError(400, "'prompt' must be a string, an array of strings, an array of token ids (integers >= 0) or an "
                   "array of such arrays", "prompt")


# Output constraints as other servers name them (request field -> constrain.compile_grammar's kind). Every one goes
# through the same constrained decoding as response_format and tools.
CONSTRAINT_FIELDS = {
    "grammar": "grammar",  # llama.cpp's server: GBNF (TGI's {"type": "json" | "regex", "value"} is taken too)
    "json_schema": "json_schema",  # llama.cpp's server, SGLang
    "regex": "regex",  # SGLang
    "ebnf": "grammar",  # SGLang (xgrammar's EBNF, which is GBNF)
    "guided_grammar": "grammar",  # vLLM's guided decoding (GBNF, or Lark: told apart)
    "guided_regex": "regex",
    "guided_json": "json_schema",
    "guided_choice": "choice",
}
STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}  # vLLM's newer object
# An unknown field whose name says it constrains the output is refused (400, naming it), never ignored: vLLM's
# guided_decoding_backend, guided_whitespace_pattern, structural_tag, llama.cpp's grammar_lazy, grammar_triggers,
# Ollama's format, ... Other unknown fields are ignored, as in OpenAI's API: clients send many of their own.
CONSTRAINT_LIKE = re.compile(r"grammar|regex|guided|schema|structur|constrain|ebnf|lark|choice|^format$|allowed_token|bad_words")
CONSTRAINTS_HANDLED = {*CONSTRAINT_FIELDS, "structured_outputs", "response_format", "tool_choice"}
SUPPORTED_CONSTRAINTS = "grammar (GBNF), regex, json_schema, guided_grammar, guided_regex, guided_json, guided_choice, response_format"


def output_constraint(body: dict) -> str | None:
    """The llguidance grammar the output must match, from whichever field gives it (one per request), or None."""
    from pocketlm.serve import constrain

    unknown = sorted(k for k in body if k not in CONSTRAINTS_HANDLED and CONSTRAINT_LIKE.search(k) and body[k] not in (None, False))
    if unknown:
        raise APIError(400, f"'{unknown[0]}' is not supported by this server, and an output constraint is never ignored; "
                       f"constrain the output with one of {SUPPORTED_CONSTRAINTS}", unknown[0])
    given = {name: body[name] for name in CONSTRAINT_FIELDS if body.get(name) is not None}
    for key, value in get(body, "structured_outputs", (dict,), {}).items():
        if key not in STRUCTURED_OUTPUTS:
            raise APIError(400, f"'structured_outputs.{key}' is not supported; use one of {', '.join(STRUCTURED_OUTPUTS)}",
                           f"structured_outputs.{key}")
        if value is not None:
            given[f"structured_outputs.{key}"] = value
    if get(body, "response_format", (dict,), {"type": "text"}).get("type") != "text":
        given["response_format"] = body["response_format"]
    if len(given) > 1:
        raise APIError(400, f"give one output constraint, not several ({', '.join(given)})", list(given)[1])
    if not given:
        return None
    name, value = given.popitem()
    kind = CONSTRAINT_FIELDS.get(name) or STRUCTURED_OUTPUTS.get(name.rpartition(".")[2])
    if name == "grammar" and isinstance(value, dict):  # TGI's grammar object
        kind = {"json": "json_schema", "json_object": "json_schema", "regex": "regex"}.get(value.get("type"))
        if kind is None:
            raise APIError(400, "'grammar' must be a GBNF grammar (a string) or {\"type\": \"json\" or \"regex\", \"value\": ...}", name)
        value = value.get("value")
    try:
        return response_format_grammar(body) if name == "response_format" else constrain.compile_grammar(kind, value)
    except PocketLMError as e:
        raise APIError(400, f"'{name}': {e}", name) from None


def parse_embedding(body: dict, available: list[str], default: str | None) -> EmbedRequest:
    model = pick_model(body, available, default)
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise APIError(400, "'input' must be a string or a non-empty array of strings (token arrays are not supported)", "input")
    if get(body, "encoding_format", (str,), "float") not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be float or base64", "encoding_format")
    return EmbedRequest(model, texts)


# ---------------------------------------------------------------------------------------- responses


def finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf (a token the grammar masked)


def chat_logprobs(delta: Delta) -> dict:
    def entry(token, logprob):
        return {"token": token, "logprob": finite(logprob), "bytes": list(token.encode())}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(s, p) for s, p in t.top]} for t in delta.logprobs]}


def completion_logprobs(deltas: list[Delta], offset: int) -> dict:
    """OpenAI's legacy logprobs of one choice's deltas. text_offset counts characters from the prompt's start
    (offset: where the first delta's text starts); a prompt's first token (echo) has null log-probs."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for delta in deltas:
        at = offset
        for t in delta.logprobs:
            out["tokens"].append(t.token)
            out["token_logprobs"].append(None if t.logprob is None else finite(t.logprob))
            out["top_logprobs"].append(None if t.top is None else {s: finite(p) for s, p in t.top})
            out["text_offset"].append(at)
            at += len(t.token)
        offset += len(delta.text)
    return out


def text_start(plan: Plan, started: Started, i: int) -> int:
    """Where choice i's text starts, counted from its prompt's start: 0 when it echoes the prompt."""
    if plan.request.echo or not started.prompt_chars:
        return 0
    return started.prompt_chars[i // plan.request.n]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def cached_tokens(plan: Plan, finished: Finished) -> int:
    """The prefix cache's share of the prompt, counted once per prompt (as prompt_tokens): its first choice's."""
    return finished.cached_tokens if finished.index % plan.request.n == 0 else 0


def tool_call(plan: Plan, text: str) -> dict | None:
    """The output as an OpenAI tool call, if it is one of plan.tools' calls."""
    if not plan.tools or not text.startswith("{"):
        return None
    try:
        call = json.loads(text)
    except ValueError:  # cut off by max_tokens
        return None
    if not isinstance(call, dict) or call.get("name") not in {t["function"]["name"] for t in plan.tools}:
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}}


def response(plan: Plan, events: list) -> dict:
    """The whole answer, from every event of one request."""
    started = next(e for e in events if isinstance(e, Started))
    n_choices = len(plan.request.prompts) * plan.request.n
    texts, lps = [""] * n_choices, [[] for _ in range(n_choices)]
    deltas = [[] for _ in range(n_choices)]
    finished = {e.index: e for e in events if isinstance(e, Finished)}
    for e in events:
        if isinstance(e, Delta):
            texts[e.index] += e.text
            lps[e.index].extend(e.logprobs)
            deltas[e.index].append(e)
    want_logprobs = plan.request.logprobs is not None
    choices = []
    for i in range(n_choices):
        reason = finished[i].finish_reason
        if plan.kind == "chat":
            message = {"role": "assistant", "content": texts[i]}
            call = tool_call(plan, texts[i])
            if call:
                message, reason = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
            logprobs = chat_logprobs(Delta(i, "", lps[i])) if want_logprobs else None
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
        else:
            logprobs = completion_logprobs(deltas[i], text_start(plan, started, i)) if want_logprobs else None
            choices.append({"index": i, "text": texts[i], "logprobs": logprobs, "finish_reason": reason})
    completion_tokens = sum(f.completion_tokens for f in finished.values())
    return {
        "id": ("chatcmpl-" if plan.kind == "chat" else "cmpl-") + plan.id,
        "object": "chat.completion" if plan.kind == "chat" else "text_completion",
        "created": plan.created,
        "model": started.model,
        "choices": choices,
        "usage": usage(started.prompt_tokens, completion_tokens, sum(cached_tokens(plan, f) for f in finished.values())),
    }


class Streamer:
    """Events -> OpenAI stream chunks, one request's worth (it keeps per-choice state)."""

    def __init__(self, plan: Plan, started: Started):
        self.plan, self.started = plan, started
        self.completion_tokens = self.cached_tokens = 0
        self.offsets: dict[int, int] = {}  # completion logprobs' text_offset
        self.buffered: dict[int, str] = {}  # with tools, a choice's text is held until it ends
        self.opened: set[int] = set()

    def chunk(self, choices: list[dict], **extra) -> dict:
        chat = self.plan.kind == "chat"
        return {"id": ("chatcmpl-" if chat else "cmpl-") + self.plan.id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": self.plan.created, "model": self.started.model, "choices": choices, **extra}

    def on(self, event) -> list[dict]:
        plan, out = self.plan, []
        if isinstance(event, Delta):
            i = event.index
            if plan.kind == "completion":
                offset = self.offsets.get(i, text_start(plan, self.started, i))
                self.offsets[i] = offset + len(event.text)
                logprobs = completion_logprobs([event], offset) if plan.request.logprobs is not None else None
                return [self.chunk([{"index": i, "text": event.text, "logprobs": logprobs, "finish_reason": None}])]
            if plan.tools:  # a call is only known to be one (and complete) at the end
                self.buffered[i] = self.buffered.get(i, "") + event.text
                return []
            out += self.open(i)
            logprobs = chat_logprobs(event) if plan.request.logprobs is not None else None
            out.append(self.chunk([{"index": i, "delta": {"content": event.text}, "logprobs": logprobs, "finish_reason": None}]))
        elif isinstance(event, Finished):
            i, reason = event.index, event.finish_reason
            self.completion_tokens += event.completion_tokens
            self.cached_tokens += cached_tokens(plan, event)
            if plan.kind == "completion":
                return [self.chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": reason}])]
            out += self.open(i)
            if plan.tools:
                text = self.buffered.pop(i, "")
                call = tool_call(plan, text)
                if call:
                    delta, reason = {"tool_calls": [{"index": 0, **call}]}, "tool_calls"
                else:
                    delta = {"content": text}
                out.append(self.chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]))
            out.append(self.chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}]))
        return out

    def open(self, i: int) -> list[dict]:
        """A chat stream's first chunk for a choice says the role."""
        if i in self.opened:
            return []
        self.opened.add(i)
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])]

    def final(self) -> list[dict]:
        if not self.plan.include_usage:
            return []
        return [self.chunk([], usage=usage(self.started.prompt_tokens, self.completion_tokens, self.cached_tokens))]


def embedding_response(event, base64: bool = False) -> dict:
    """base64: little-endian float32 bytes, what the openai client asks for by default (smaller JSON)."""
    import base64 as b64
    import struct

    def encode(v):
        return b64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if base64 else v

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(event.vectors)],
        "model": event.model,
        "usage": {"prompt_tokens": event.prompt_tokens, "total_tokens": event.prompt_tokens},
    }
