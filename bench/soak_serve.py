"""A soak test of `pocketlm serve`: N clients for M minutes on loopback; failed requests and memory growth.

    .venv/bin/python bench/soak_serve.py [--clients 16] [--minutes 10] [--model smollm2]

Every client loops until the time is up, each request drawn at random: streamed or not, greedy or
sampled, 8-64 new tokens, and one in eight a stream the client abandons after a few chunks (the server
must cancel it and free its slot). A request fails when it raises or comes back without text; a 429
(queue full) counts apart, as back-pressure, not failure. Resident memory (VmRSS of the server process)
is read every 5 s; growth is the last reading against the one at the end of the first minute (the
model is loaded and the caches have grown by then).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import question  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client_loop(url: str, model: str, deadline: float, seed: int, counts: dict, lock: threading.Lock) -> None:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    rng = random.Random(seed)
    k = 0
    while time.monotonic() < deadline:
        k += 1
        kind = "ok"
        sampling = {"temperature": rng.choice([0, 0.8]), "max_tokens": rng.randint(8, 64), "seed": rng.randint(0, 99)}
        try:
            if rng.random() < 0.125:  # abandoned: read a few chunks, then close the connection
                chunks = client.chat.completions.create(model=model, messages=question(seed, k), stream=True, **sampling)
                for n, _ in enumerate(chunks):
                    if n == 3:
                        break
                chunks.close()
                kind = "abandoned"
            elif rng.random() < 0.5:
                text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model=model, messages=question(seed, k), stream=True, **sampling) if c.choices)
                kind = "ok" if text else "failed"
            else:
                r = client.chat.completions.create(model=model, messages=question(seed, k), **sampling)
                kind = "ok" if r.choices[0].message.content else "failed"
        except openai.RateLimitError:
            kind = "429"
        except Exception as e:  # noqa: BLE001 - a soak counts every kind of failure
            kind = "failed"
            with lock:
                counts.setdefault("errors", []).append(f"{type(e).__name__}: {e}"[:200])
        with lock:
            counts[kind] = counts.get(kind, 0) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--port", type=int, default=8775)
    args = parser.parse_args()

    from pocketlm.serve.client import wait_until_up

    url = f"http://127.0.0.1:{args.port}"
    log = tempfile.TemporaryFile("w+")
    cmd = [sys.executable, "-m", "pocketlm.cli", "serve", args.model, "--port", str(args.port)]
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_up(process, url + "/v1/models", limit_s=300)
        start = time.monotonic()
        deadline = start + 60 * args.minutes
        counts, lock = {}, threading.Lock()
        threads = [threading.Thread(target=client_loop, args=(url, args.model, deadline, i, counts, lock)) for i in range(args.clients)]
        for t in threads:
            t.start()
        samples = []  # (seconds since start, RSS MB)
        while any(t.is_alive() for t in threads):
            samples.append((time.monotonic() - start, rss_mb(process.pid)))
            time.sleep(5)
        for t in threads:
            t.join()
        alive = process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=30)

    base = next(mb for s, mb in samples if s >= 60) if any(s >= 60 for s, _ in samples) else samples[0][1]
    last, peak = samples[-1][1], max(mb for _, mb in samples)
    total = sum(v for k, v in counts.items() if k != "errors")
    print(f"{args.clients} clients, {args.minutes:g} min, {args.model}: {total} requests: {counts.get('ok', 0)} ok, "
          f"{counts.get('abandoned', 0)} abandoned on purpose, {counts.get('429', 0)} answered 429, "
          f"**{counts.get('failed', 0)} failed**; server still up: {alive}")
    print(f"server RSS: {base:.0f} MB after 1 min, {last:.0f} MB at the end ({100 * (last / base - 1):+.1f}%), peak {peak:.0f} MB")
    for error in counts.get("errors", [])[:5]:
        print(f"  {error}")


if __name__ == "__main__":
    main()
