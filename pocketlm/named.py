"""Named models, as Ollama's: `pocketlm create NAME --from MODEL` writes a small record (the base it points to, a
system prompt, a chat template, sampling parameters, an adapter) under $POCKETLM_HOME/named/NAME.json; the weights
stay where the base keeps them. A record may point to another record: each one overrides what it sets.

Also the generation defaults a model folder ships in generation_config.json (transformers' GenerationConfig:
temperature, top_k, top_p, repetition_penalty, max_new_tokens, do_sample). `defaults_for` gives both, merged:
run, chat, serve and the server's two APIs apply them to whatever the request or the flags leave unset.

No torch and no registry here: registry.resolve reads these records to find a created model's weights.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pocketlm.cache import home, write_atomic
from pocketlm.errors import PocketLMError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A record's parameters, by SamplingParams' field names. Ollama's Modelfile names (num_predict, repeat_penalty) and
# transformers' (max_new_tokens, repetition_penalty) are read too; num_ctx is the context window.
PARAMS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "repetition_penalty": float,
          "repeat_last_n": int, "max_new_tokens": int, "seed": int, "stop": list, "num_ctx": int}
ALIASES = {"num_predict": "max_new_tokens", "repeat_penalty": "repetition_penalty", "max_tokens": "max_new_tokens"}
MAX_DEPTH = 8  # records pointing to records; more is a loop


@dataclass
class Named:
    name: str
    base: str  # a registry name, a path, or another created model
    system: str | None = None
    template: str | None = None  # a Jinja chat template (Hugging Face's form), in place of the base's
    parameters: dict = field(default_factory=dict)  # SamplingParams field -> value (see PARAMS)
    # A LoRA adapter folder to apply on the base at load time: the hook for `create --adapter` (recorded here;
    # load.py applies it once adapters load unmerged).
    adapter: str | None = None
    created_at: float = 0.0


@dataclass
class Defaults:
    """What a model brings to a request that does not set it."""

    params: dict = field(default_factory=dict)  # SamplingParams field -> value, and num_ctx
    system: str | None = None
    template: str | None = None
    adapter: str | None = None


def folder() -> Path:
    return home() / "named"


def canonical(name: str) -> str:
    """Ollama's tag ":latest" is the name without a tag."""
    return name[: -len(":latest")] if name.endswith(":latest") else name


def record_path(name: str) -> Path:
    return folder() / f"{canonical(name).lower()}.json"


def lookup(name: str) -> Named | None:
    name = canonical(name)
    if not NAME.fullmatch(name):
        return None
    try:
        data = json.loads(record_path(name).read_text())
    except (OSError, ValueError):
        return None
    known = {k: v for k, v in data.items() if k in Named.__dataclass_fields__}
    return Named(**known) if isinstance(known.get("base"), str) else None


def all_named() -> list[Named]:
    found = [lookup(p.stem) for p in sorted(folder().glob("*.json"))] if folder().is_dir() else []
    return [n for n in found if n is not None]


def check_name(name: str) -> str:
    name = canonical(name)
    if not NAME.fullmatch(name):
        raise PocketLMError(f"'{name}' is not a usable model name: letters, digits, '.', '_' and '-', at most 64, "
                            "starting with a letter or digit")
    return name


def parse_parameters(pairs: dict) -> dict:
    """{"temperature": "0.2", "num_predict": 64, "stop": "###"} -> checked values by SamplingParams' names."""
    out = {}
    for key, value in pairs.items():
        name = ALIASES.get(key, key)
        kind = PARAMS.get(name)
        if kind is None:
            raise PocketLMError(f"unknown parameter '{key}': use {', '.join(sorted([*PARAMS, *ALIASES]))}")
        if kind is list:
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) and v for v in values):
                raise PocketLMError(f"parameter '{key}' must be a text or a list of texts")
            out[name] = out.get(name, []) + values
            continue
        try:
            number = kind(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (kind is int and isinstance(value, float) and value != int(value)):
            raise PocketLMError(f"parameter '{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        out[name] = number
    from pocketlm.engine.params import SamplingParams

    SamplingParams(**{k: v for k, v in out.items() if k not in ("num_ctx",)})  # its own checks: one clear line each
    if out.get("num_ctx", 1) < 1:
        raise PocketLMError("parameter 'num_ctx' must be >= 1")
    return out


def create(name: str, base: str, system: str | None = None, template: str | None = None, parameters: dict | None = None,
           adapter: str | None = None) -> Named:
    """Write the record (replacing one of that name). The caller has checked that `base` resolves."""
    name = check_name(name)
    if canonical(base).lower() == name.lower():
        raise PocketLMError(f"a model cannot be created from itself ('{name}')")
    if template is not None:
        check_template(template)
    record = Named(name, canonical(base), system, template, parse_parameters(parameters or {}),
                   str(Path(adapter).expanduser().resolve()) if adapter else None, time.time())
    write_atomic(record_path(name), json.dumps(asdict(record), indent=2))
    return record


def check_template(template: str) -> None:
    """A chat template must compile (Jinja, as the tokenizer runs it): said now, not at the first request."""
    from jinja2 import TemplateSyntaxError

    from pocketlm.tokenizer import _compile_chat_template

    try:
        _compile_chat_template(template)  # the environment the tokenizer renders it in (loop controls, ...)
    except TemplateSyntaxError as e:
        raise PocketLMError(f"the template is not a Jinja chat template: {e.message} (line {e.lineno})") from None


def copy(source: str, destination: str) -> Named:
    """A created model's record under a new name; a registry model or a path gets a record that points to it."""
    found = lookup(source)
    destination = check_name(destination)
    if found is None:
        return create(destination, source)
    record = Named(**{**asdict(found), "name": destination, "created_at": time.time()})
    write_atomic(record_path(destination), json.dumps(asdict(record), indent=2))
    return record


def remove(name: str) -> bool:
    try:
        os.remove(record_path(check_name(name)))
        return True
    except FileNotFoundError:
        return False


def chain(name: str) -> list[Named]:
    """The records from `name` down to the first base that is not one (empty for a registry model or a path)."""
    out = []
    found = lookup(name)
    while found is not None:
        if len(out) == MAX_DEPTH or any(r.name.lower() == found.name.lower() for r in out):
            raise PocketLMError(f"model '{name}' is created from itself through {' -> '.join(r.name for r in out)}")
        out.append(found)
        found = lookup(found.base)
    return out


def base_of(name: str) -> str:
    records = chain(name)
    return records[-1].base if records else name


def generation_config(source: Path) -> dict:
    """A model folder's generation_config.json as SamplingParams fields (a .gguf file carries none). do_sample false
    means greedy, as transformers' generate decodes it."""
    path = source / "generation_config.json" if source.is_dir() else None
    try:
        config = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    out = {}
    for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens"):
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    if config.get("do_sample") is False:  # transformers' default is greedy: its sampling settings are not used
        out = {k: v for k, v in out.items() if k in ("repetition_penalty", "max_new_tokens")}
        out["temperature"] = 0.0
    try:
        return parse_parameters(out)
    except PocketLMError:  # a value our sampler refuses (top_p 0): the file's settings are not used
        return {}


def defaults_for(name: str, source: Path) -> Defaults:
    """The defaults of the model `name` (a created model, a registry name or a path), whose weights are at `source`:
    the base folder's generation_config.json, then each record from the base up to `name` over it."""
    out = Defaults(params=generation_config(source))
    for record in reversed(chain(name)):
        out.params.update(record.parameters)
        out.system = record.system if record.system is not None else out.system
        out.template = record.template if record.template is not None else out.template
        out.adapter = record.adapter or out.adapter
    return out


def apply(params, given: set[str], defaults: dict):
    """SamplingParams with each field `given` does not hold taken from `defaults` (a model's): the request's or the
    flags' values win, then the model's, then the caller's own defaults already in `params`."""
    from dataclasses import replace

    changes = {k: v for k, v in defaults.items() if k in params.__dataclass_fields__ and k not in given}
    if not changes:
        return params
    params = replace(params, **changes)
    if params.temperature < 1e-6:  # as the server's SMALLEST and the CLI: greedy
        params.temperature = 0.0
    return params
