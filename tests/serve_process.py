"""A real `pocketlm serve` process on a free loopback port, for the server tests (one per test module)."""

import socket
import subprocess
import sys
from contextlib import contextmanager

from pocketlm.serve.client import wait_until_up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(*args: str, log=None):
    """log: a file for the server's output (a long run fills a pipe nobody reads); else a pipe, read if it fails to start."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    output = open(log, "w") if log else subprocess.PIPE
    process = subprocess.Popen(
        # --threads 1: the test machine is shared; two OpenMP threads on two busy cores decode 10x slower
        [sys.executable, "-m", "pocketlm.cli", "serve", *args, "--port", str(port), "--threads", "1"],
        stdout=output, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until_up(process, url + "/health")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log:
            output.close()
