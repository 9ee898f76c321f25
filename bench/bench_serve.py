"""`pocketlm serve` under concurrent clients, against llama-cpp-python's server on the same GGUF file, as Markdown.

    .venv/bin/python bench/bench_serve.py [--model smollm2] [--streams 1 4 8 16] [--new-tokens 64]
        [--threads 2] [--rounds 3] [--vs llama.cpp | --vs none] [--client raw | --client openai] [--baseline REV]

Each server runs in its own process (all started at once, each idle while another is measured) and is driven by
one client thread per stream, every stream a streamed chat completion with its own question and the end tokens
banned (logit_bias), so every stream decodes exactly --new-tokens tokens. The client (--client) runs on the same cores as the server: by default a plain one
(http.client, json.loads per chunk), since the official `openai` client's parsing costs about 0.64 ms of CPU
per chunk, which at 8 streams took 15-25% of pocketlm's aggregate here; `--client openai` uses it. Aggregate tokens/s, two ways: end to end (all streams'
completion tokens over the wall time from the first request to the last stream's end, prompts included), and
decoding (tokens after each stream's first over the time streams were decoding: no prompts); the medians of
--rounds rounds, each round running every server and stream count in turn (a count's scaling is the median of its
ratios to the first count of the same round, and two servers' ratio the median of their ratios round by round, so
the machine's drift between rounds leaves them). `--baseline REV` adds pocketlm as it was at a git revision (a
worktree of it), to measure a change of the server against what it replaces. Then time to first token with 8 streams at
once, 3 rounds: every stream with a system prompt of its own (nothing to reuse), and all streams sharing
one system prompt that an earlier request already sent (the prefix cache's case).
pocketlm serve runs with its defaults (--quant auto, --max-batch 8 unless --max-batch is given; --draft passes a
draft model on).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from contextlib import ExitStack, contextmanager
from pathlib import Path

LLAMA_SERVER_EXTRAS = ("sse_starlette", "starlette_context", "pydantic_settings")
INSTALL_LLAMA_SERVER = ".venv/bin/pip install sse-starlette starlette-context pydantic-settings"
TOPICS = ["the sea", "a city at night", "an old clock", "the first snow", "a lost key", "a mountain road",
          "a quiet library", "a summer storm", "a red kite", "a train station", "a lighthouse", "a garden",
          "a desert", "a bridge", "a market", "a violin"]  # fmt: skip


@contextmanager
def server(cmd: list[str], port: int, root: Path | None = None):
    """A server process, once /v1/models answers; stopped at the end. Its output goes to a file: a pipe nobody
    reads would fill up with llama.cpp's per-request logs and stop the server. root: a checkout whose pocketlm
    it runs (its folder first on the import path, ahead of the installed one)."""
    from pocketlm.serve.client import wait_until_up

    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")
    env = None if root is None else {**os.environ, "PYTHONPATH": str(root)}
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=root, env=env)
    try:
        try:
            wait_until_up(process, url + "/v1/models", limit_s=300)
        except RuntimeError as e:
            log.seek(0)
            raise RuntimeError(f"{e}\n{log.read()[-3000:]}") from None
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


class OpenAIClient:
    """The official `openai` client: each chunk becomes a pydantic object (about 0.64 ms of CPU per chunk here,
    taken from the server's 2 cores while it decodes)."""

    def __init__(self, url: str):
        import openai

        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)

    def texts(self, body: dict):
        for chunk in self.client.chat.completions.create(**body):
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content


class RawClient:
    """The same request over http.client, each `data:` line read with json.loads (about 0.15 ms per chunk)."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port

    def texts(self, body: dict):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=3600)
        try:
            connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
            for line in response:
                if line.startswith(b"data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        yield choices[0]["delta"]["content"]
        finally:
            connection.close()


CLIENTS = {"raw": RawClient, "openai": OpenAIClient}


def stream_once(client, model: str, messages: list[dict], new_tokens: int, no_end: dict) -> tuple[float, list[float]]:
    """One streamed chat completion -> (seconds to its first text, the clock time of each token's chunk)."""
    start, arrivals = time.perf_counter(), []
    body = dict(model=model, messages=messages, max_tokens=new_tokens, temperature=0, logit_bias=no_end, stream=True)
    for _ in client.texts(body):
        arrivals.append(time.perf_counter())  # both servers send one chunk per token
    return arrivals[0] - start, arrivals


def concurrent(client, model: str, conversations: list[list[dict]], new_tokens: int, no_end: dict):
    """Every conversation as its own stream, all at once -> (wall seconds, [(first-token seconds, chunk times)])."""
    results = [None] * len(conversations)

    def run(i):
        results[i] = stream_once(client, model, conversations[i], new_tokens, no_end)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(conversations))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def question(i: int, round_: int = 0) -> list[dict]:
    return [{"role": "user", "content": f"Write a short poem about {TOPICS[i % len(TOPICS)]} ({round_}.{i})."}]


def system_prompt(tag: str) -> dict:
    """About 250 tokens of instructions; `tag` makes it one of a kind from its first words."""
    rules = " ".join(f"Rule {k}: keep every line under twelve words and never repeat an image." for k in range(1, 16))
    return {"role": "system", "content": f"[{tag}] You are a poet who writes for children. {rules}"}


def measure(urls: dict[str, str], model: str, streams: list[int], new_tokens: int, no_end: dict, rounds: int,
            client_kind: str) -> dict:
    """Every server (name -> URL) in turn within each round -> {name: its numbers}."""
    clients = {engine: CLIENTS[client_kind](url) for engine, url in urls.items()}
    for client in clients.values():
        stream_once(client, model, question(0), 4, no_end)  # loads the model, fills the caches
    ends = {e: {n: [] for n in streams} for e in urls}
    decodes = {e: {n: [] for n in streams} for e in urls}
    # Rounds outermost: each round runs every server and stream count once, so the machine's drift (up to 2x within
    # minutes here) moves a round's numbers alike; each count's scaling is taken against the first count of its own
    # round, and servers are compared round by round
    for r in range(rounds):
        for engine, client in clients.items():
            for n in streams:  # new questions each round; their common start (template, "Write a short poem") is reused
                wall, results = concurrent(client, model, [question(i, 100 * n + r) for i in range(n)], new_tokens, no_end)
                ends[engine][n].append(sum(len(arrivals) for _, arrivals in results) / wall)
                decodes[engine][n].append(decode_rate([arrivals for _, arrivals in results]))
            print(f"  round {r + 1}, {engine}: " + ", ".join(
                f"{n} streams {ends[engine][n][-1]:.1f} tok/s (decoding {decodes[engine][n][-1]:.1f})" for n in streams), file=sys.stderr)
    out = {}
    for engine, client in clients.items():
        out[engine] = {"rounds": {"throughput": ends[engine], "decode": decodes[engine]}, "ttft": {},
                       "throughput": {}, "decode": {}, "scaling": {"throughput": {}, "decode": {}}}
        for key, values in (("throughput", ends[engine]), ("decode", decodes[engine])):
            for n in streams:
                out[engine][key][n] = statistics.median(values[n])
                out[engine]["scaling"][key][n] = statistics.median(v / first for v, first in zip(values[n], values[streams[0]]))
        shared = system_prompt("shared")
        stream_once(client, model, [shared, *question(0)], 4, no_end)  # the system prompt was seen before
        for case in ("own system prompt", "shared system prompt"):
            firsts = []
            for r in range(3):
                conversations = [[shared if case.startswith("shared") else system_prompt(f"{r}.{i}"), *question(i, r)] for i in range(8)]
                firsts += [first for first, _ in concurrent(client, model, conversations, 16, no_end)[1]]
            out[engine]["ttft"][case] = (statistics.median(firsts), percentile(firsts, 99))
            print(f"  {engine}, 8 streams, {case}: first token p50 {out[engine]['ttft'][case][0]:.2f} s", file=sys.stderr)
    return out


def decode_rate(arrivals: list[list[float]]) -> float:
    """Tokens/s while decoding: every stream's tokens after its first, over the time at least one stream was
    between its first token and its last (the union of those spans). Prompts, and the first tokens that come out
    of them, fall outside (they are in the end-to-end column); a server that runs one request at a time gets the
    rate of one stream, as it should."""
    spans, covered, reach = sorted((a[0], a[-1]) for a in arrivals), 0.0, float("-inf")
    for begin, end in spans:
        covered += max(0.0, end - max(begin, reach))
        reach = max(reach, end)
    return sum(len(a) - 1 for a in arrivals) / covered if covered else float("nan")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every stream count in turn; the table gives medians")
    parser.add_argument("--max-batch", type=int, default=None, help="pocketlm serve --max-batch (default: its own)")
    parser.add_argument("--draft", metavar="MODEL", help="pocketlm serve --draft MODEL (speculative decoding of a lone greedy stream)")
    parser.add_argument("--vs", default="llama.cpp", choices=["llama.cpp", "none"])
    parser.add_argument("--baseline", metavar="REV", help="also serve pocketlm as it was at git revision REV (a worktree), "
                        "in turns with this one: a change's effect, round by round")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--client", default="raw", choices=list(CLIENTS),
                        help="raw: http.client and json.loads (default); openai: the official client, whose parsing "
                             "takes about 4x the CPU per chunk from the cores the server decodes on")
    args = parser.parse_args()

    from pocketlm import registry
    from pocketlm.load import convert_gguf
    from pocketlm.tokenizer import Tokenizer

    name, path = registry.resolve(args.model)
    stop_ids = Tokenizer.from_hf_dir(convert_gguf(path)).stop_ids
    no_end = {str(i): -100 for i in stop_ids}  # every stream runs to --new-tokens

    cmd = [sys.executable, "-m", "pocketlm.cli", "serve", name, "--threads", str(args.threads)]
    cmd += ["--max-batch", str(args.max_batch)] if args.max_batch else []
    cmd += ["--draft", args.draft] if args.draft else []
    servers = {"pocketlm": (cmd, None)}  # name -> (command without its port, checkout to run it in)
    skipped = None
    with ExitStack() as stack:
        if args.baseline:
            servers[f"pocketlm@{args.baseline}"] = (cmd, stack.enter_context(checkout(args.baseline)))
        if args.vs == "llama.cpp":
            missing = [m for m in ("llama_cpp", *LLAMA_SERVER_EXTRAS) if not importable(m)]
            if missing:
                skipped = f"llama-cpp-python's server: skipped, {', '.join(missing)} not installed ({INSTALL_LLAMA_SERVER})"
            else:
                # It runs one request at a time (a lock; no parallel slots) and by default cuts a stream short when
                # another request arrives: --interrupt_requests False lets every stream run to its end.
                servers["llama.cpp"] = ([sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", name,
                                         "--n_threads", str(args.threads), "--n_ctx", "2048", "--interrupt_requests", "False"], None)
        urls = {}
        for i, (engine, (command, root)) in enumerate(servers.items()):  # all up at once; an idle server takes no CPU
            port = args.port + i
            print(f"{engine}: {name} ({path.name}) on port {port}", file=sys.stderr)
            urls[engine] = stack.enter_context(server([*command, "--port", str(port)], port, root))
        engines = measure(urls, name, args.streams, args.new_tokens, no_end, args.rounds, args.client)
    report(engines, args.streams, args.new_tokens, args.client)
    if skipped:
        print(f"\n{skipped}")


@contextmanager
def checkout(rev: str):
    """A detached git worktree of rev (pocketlm as it was there), removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="pocketlm-baseline-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(root), rev], check=True, capture_output=True)
    try:
        yield root
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(root)], check=False, capture_output=True)


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def report(engines: dict, streams: list[int], new_tokens: int, client: str) -> None:
    ours, others = engines["pocketlm"], [e for e in engines if e != "pocketlm"]
    for key, what in (("throughput", f"end to end: all completion tokens over the wall time, prompts included, "
                                     f"{new_tokens} tokens per stream"),
                      ("decode", "decoding: tokens after each stream's first, over the time some stream decoded (decode_rate)")):
        header = "| streams | pocketlm tok/s | vs pocketlm 1 stream |"
        for e in others:
            header += f" {e} tok/s | vs its 1 stream | pocketlm / {e} |"
        print(header)
        print("|---|---|---|" + "---|---|---|" * len(others))
        for n in streams:
            row = f"| {n} | {ours[key][n]:.1f} | {ours['scaling'][key][n]:.2f}x |"
            for e in others:
                theirs = engines[e]
                ratio = statistics.median(a / b for a, b in zip(ours["rounds"][key][n], theirs["rounds"][key][n]))
                row += f" {theirs[key][n]:.1f} | {theirs['scaling'][key][n]:.2f}x | {ratio:.2f}x |"
            print(row)
        print(f"\n(aggregate tokens/s, {what}; the {client} client; medians of the rounds, of each round's ratio to "
              f"its own {streams[0]} stream{'s' if streams[0] > 1 else ''}, and of the servers' ratios round by round)\n")
    print("| 8 streams | engine | first token p50 | p99 |")
    print("|---|---|---|---|")
    for engine, result in engines.items():
        for case, (p50, p99) in result["ttft"].items():
            print(f"| {case} | {engine} | {p50 * 1000:.0f} ms | {p99 * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
