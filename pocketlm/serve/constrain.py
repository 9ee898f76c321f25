"""Constrained decoding: a grammar becomes a token mask at every step, so the output always matches.

llguidance (Microsoft's Rust grammar engine behind Guidance; also used by llama.cpp and vLLM) does the
work: it compiles a JSON schema or a Lark grammar against our own tokenizer.json, computes a mask over
the 49k-token vocabulary in well under a millisecond on the CPU, and lets only end tokens through once
the value is complete. It was picked after trying it on SmolLM2's tokenizer (see the README).
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch

from pocketlm.errors import PocketLMError


def _llg():
    import llguidance

    return llguidance


def json_schema_grammar(schema: dict) -> str:
    """A JSON schema -> a grammar (compact JSON: no whitespace between tokens, fewer tokens to decode)."""
    llg = _llg()
    grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    return check(grammar)


def tool_call_schema(tools: list[dict]) -> dict:
    """The JSON of one call to one of `tools` (OpenAI function definitions): {"name", "arguments"}."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                "arguments": closed(tool["function"].get("parameters") or {"type": "object"}),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def closed(schema: dict) -> dict:
    """An object schema that says nothing of extra properties gets none (as OpenAI's strict mode): a
    small model otherwise keeps inventing keys until max_tokens runs out."""
    if schema.get("type") == "object" and "additionalProperties" not in schema and "properties" in schema:
        return {**schema, "additionalProperties": False}
    return schema


def tool_grammar(tools: list[dict], required: bool) -> str:
    """required: the answer is a tool call. Otherwise ("auto") it is a call or plain text; text may not
    start with "{" or whitespace, so the first token decides which one it is."""
    schema = tool_call_schema(tools)
    if required:
        return json_schema_grammar(schema)
    lark = f"start: TEXT | call\nTEXT: /[^{{\\s][\\s\\S]*/\ncall: %json {json.dumps(schema)}\n"
    return check(_llg().LLMatcher.grammar_from_lark(lark))


def check(grammar: str, what: str = "schema") -> str:
    """Raise PocketLMError for a grammar llguidance refuses (an unsupported or broken schema, grammar or regex)."""
    error = _llg().LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise PocketLMError(f"cannot use this {what}: {one_line(error)}")
    return grammar


def one_line(error: str) -> str:
    """llguidance's message (a first line, the source with a caret under the spot, an "error: ..." line) in one line."""
    lines = [line.strip() for line in error.strip().splitlines()]
    return " ".join([lines[0], *(line for line in lines[1:] if line.startswith("error:"))])


def compile_grammar(kind: str, source) -> str:
    """A constraint as the requests of other servers give it -> an llguidance grammar. kind: "grammar" (GBNF, as
    llama.cpp's grammars/README.md; Lark's syntax is told apart and taken too), "regex" (the whole answer matches it;
    Rust's regex syntax), "json_schema" (a schema, as a dict or its JSON text) or "choice" (a list of strings: the
    answer is one of them). llguidance converts each (its grammar_from, as vLLM's guidance backend uses it)."""
    llg = _llg()
    what = {"grammar": "grammar", "regex": "regex", "json_schema": "schema", "choice": "choice"}[kind]
    if kind == "json_schema":
        if isinstance(source, str):
            try:
                source = json.loads(source)
            except ValueError as e:
                raise PocketLMError(f"the JSON schema is not valid JSON ({e})") from None
        if not isinstance(source, (dict, bool)):
            raise PocketLMError("a JSON schema must be an object")
        return json_schema_grammar(source)
    if kind == "choice":
        if not (isinstance(source, list) and source and all(isinstance(c, str) and c for c in source)):
            raise PocketLMError("the choices must be a non-empty array of non-empty strings")
        source = json.dumps(source)
    elif not isinstance(source, str) or not source.strip():
        raise PocketLMError(f"the {what} must be a non-empty string")
    try:
        grammar = llg.grammar_from("gbnf" if kind == "grammar" else kind, source)
    except ValueError as e:  # GBNF that does not parse
        raise PocketLMError(f"cannot use this {what}: {one_line(str(e))}") from None
    return check(grammar, what)


@lru_cache(maxsize=4)
def ll_tokenizer(tokenizer):
    """llguidance's view of our tokenizer (about 0.4 s to build: once per loaded model)."""
    return _llg().LLTokenizer(tokenizer.backend.to_str(), eos_token=sorted(tokenizer.stop_ids))


def grammar_processor(tokenizer, grammar: str, vocab_size: int):
    """A logits processor (see engine.generate.Generation) that masks every token the grammar forbids."""
    matcher = _llg().LLMatcher(ll_tokenizer(tokenizer), grammar)
    if matcher.is_error():
        raise PocketLMError(f"cannot use this schema: {matcher.get_error()}")
    consumed = 0

    def process(logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        nonlocal consumed
        for token in generated[consumed:]:  # the tokens sampled since the last step
            matcher.consume_token(token)
        consumed = len(generated)
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.zeros(vocab_size, dtype=bool)
        n = min(vocab_size, bits.size)
        allowed[:n] = bits[:n]
        return logits.float().masked_fill(~torch.from_numpy(allowed), float("-inf"))  # (1, V)

    return process
