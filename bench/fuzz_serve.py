"""Fuzz a real `pocketlm serve` with N requests drawn from its own /openapi.json; count 5xx, hangs and tracebacks.

    .venv/bin/python bench/fuzz_serve.py [--requests 10000] [--clients 4] [--model smollm2] [--seed 0]

The requests are tests/fuzz_bodies.py's (the CI-sized tests/test_serve_fuzz.py sends 150 of them to a tiny
model): bodies that follow the schemas, the same with one field replaced by any JSON value, bytes that are no
JSON, other routes and methods. They go to a server of the real models (--model for /v1/chat/completions and
/v1/completions, MiniLM for /v1/embeddings) from --clients threads at once. A body that asks for more than
--max-tokens new tokens (or names none) is given --max-tokens, so that 10,000 requests take minutes rather than
hours; everything else is sent as drawn. A hang is a request without an answer after --timeout seconds. The
server's output goes to a log file, which is searched for tracebacks at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from fuzz_bodies import Probe, probes, send  # noqa: E402


def capped(probe: Probe, max_tokens: int) -> Probe:
    """The probe with its generation bounded: max_tokens (and max_completion_tokens) at most max_tokens."""
    if probe.method != "POST" or probe.path == "/v1/embeddings" or probe.content is None:
        return probe
    try:
        body = json.loads(probe.content)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to read: sent as it is
        return probe
    if not isinstance(body, dict):
        return probe
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None or isinstance(value, int) and not isinstance(value, bool) and value > max_tokens:
            body[name] = max_tokens
    return Probe(probe.method, probe.path, json.dumps(body).encode())


def draw(spec: dict, models: list[str], n: int, seed: int) -> list[Probe]:
    from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings

    drawn: list[Probe] = []

    @hypothesis_seed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(probes(spec, models))
    def collect(p):
        drawn.append(p)

    collect()
    return drawn


def main() -> None:
    import httpx2 as httpx

    from pocketlm import registry

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from serve_process import running_server

    model = registry.lookup(args.model).name if registry.lookup(args.model) else args.model
    log = Path(tempfile.mkdtemp(prefix="fuzz-serve-")) / "server.log"
    started = time.monotonic()
    with running_server(args.model, "minilm", "--max-queue", "64", log=log) as url:
        spec = httpx.get(url + "/openapi.json").json()
        requests = [capped(p, args.max_tokens) for p in draw(spec, [model, "minilm-l6-v2"], args.requests, args.seed)]
        print(f"drew {len(requests)} requests in {time.monotonic() - started:.0f} s; sending them from {args.clients} clients", flush=True)
        statuses, problems, hangs = collections.Counter(), [], []
        lock, sent = threading.Lock(), [0]
        client = httpx.Client(limits=httpx.Limits(max_connections=args.clients))

        def one(probe: Probe) -> None:
            try:
                status, problem = send(client, url, probe, args.timeout)
            except httpx.TimeoutException:
                status, problem = "hang", "no answer in time"
            except httpx.TransportError as e:  # a connection the server dropped is a failure too
                status, problem = "dropped", f"{type(e).__name__}: {e}"
            with lock:
                statuses[status] += 1
                sent[0] += 1
                if problem:
                    (hangs if status == "hang" else problems).append((probe, problem))
                if sent[0] % 1000 == 0:
                    print(f"  {sent[0]} sent, {time.monotonic() - started:.0f} s", flush=True)

        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, requests))
        client.close()
        metrics = httpx.get(url + "/metrics").text
    tracebacks = log.read_text(errors="replace").count("Traceback")
    five = sum(c for s, c in statuses.items() if isinstance(s, int) and s >= 500)
    print(f"\n{sum(statuses.values())} requests in {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{s}: {c}" for s, c in sorted(statuses.items(), key=lambda kv: str(kv[0]))))
    print(f"5xx: {five}, hangs: {len(hangs)}, other problems: {len(problems) - five}, tracebacks in the server log: {tracebacks}")
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if 'status="500"' in line and line.startswith("pocketlm_requests_total"))
    print(f"500s the server counted (/metrics): {counted:.0f}")
    for probe, problem in (problems + hangs)[:20]:
        print(f"  {probe!r}\n    -> {problem}")
    print(f"server log: {log}")
    sys.exit(1 if five or hangs or problems or tracebacks else 0)


if __name__ == "__main__":
    main()
