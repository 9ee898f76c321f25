"""A real `pocketlm serve` process on a free loopback port, for the server tests (one per test module)."""

import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(*args: str):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        # --threads 1: the test machine is shared; two OpenMP threads on two busy cores decode 10x slower
        [sys.executable, "-m", "pocketlm.cli", "serve", *args, "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120  # a bound on a hung start, not a speed check
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"pocketlm serve exited: {process.stdout.read()}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("pocketlm serve did not answer /health") from None
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
