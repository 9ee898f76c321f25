"""How many threads a command computes with: --threads, else $POCKETLM_THREADS, else $OMP_NUM_THREADS, else one
per core that other processes leave idle.

Why not one thread per core, torch's default: a decode step's OpenMP threads (torch's and pocketlm's kernels',
which take torch.get_num_threads()) meet at a barrier after every op, about 150 times a token. When another
process holds one of two cores, the thread on that core runs only in the time slices the scheduler gives it and
the other waits for it at every barrier: `pocketlm run` decoded 6-10x slower with two threads than with one
(docs/BENCHMARKS.md, "Threads on a busy machine"). So the default looks at how busy the cores are while the
command starts (from /proc/stat, less this process's own CPU time, over the window from `start()` to
`configure()`: the import of torch, no wait of its own) and takes one thread per idle core, at least one, at
most torch's default; `Follow` keeps looking, for a server or a chat that runs for hours. Nothing here imports
torch at module level: the CLI calls `start()` before anything heavy.
"""

from __future__ import annotations

import os
import time

ENV = "POCKETLM_THREADS"
MIN_WINDOW_S = 0.2  # a shorter look at /proc/stat is padded with a sleep to this
IDLE_ENOUGH = 0.9  # a core counts as free when this much of it was idle: a thread on a half-busy core stalls the rest

_start: tuple[float, float, float] | None = None  # (busy CPU seconds of the allowed cores, own CPU seconds, monotonic)


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _busy_seconds() -> float | None:
    """CPU seconds the cores this process may run on have spent busy since boot (None off Linux)."""
    allowed = {f"cpu{i}" for i in cpus()}
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = 0
    for fields in lines:
        if fields[0] in allowed:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
            busy += user + nice + system + irq + softirq + steal
    return busy / tick


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def start() -> None:
    """Begin the look at the other processes' load (the CLI calls this first thing)."""
    global _start
    busy = _busy_seconds()
    _start = None if busy is None else (busy, _own_seconds(), time.monotonic())


def idle_cores() -> float | None:
    """Cores (of those allowed) that other processes left idle since `start()`; None when unknown."""
    if _start is None:
        return None
    busy0, own0, t0 = _start
    wait = MIN_WINDOW_S - (time.monotonic() - t0)
    if wait > 0:
        time.sleep(wait)
    busy, own, now = _busy_seconds(), _own_seconds(), time.monotonic()
    if busy is None:
        return None
    others = max(0.0, (busy - busy0) - (own - own0)) / (now - t0)
    return max(0.0, len(cpus()) - others)


def explicit(threads: int | None) -> int | None:
    """--threads, else $POCKETLM_THREADS, else $OMP_NUM_THREADS (the user's own setting); None: choose."""
    from pocketlm.errors import PocketLMError

    if threads is not None:
        if threads < 1:
            raise PocketLMError(f"--threads must be >= 1, got {threads}")
        return threads
    for name in (ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise PocketLMError(f"${name} must be a whole number >= 1, got {value!r}")
            return int(value)
    return None


def choose(threads: int | None, most: int) -> int:
    """The thread count: explicit(threads), else one per idle core (at least 1, at most `most`)."""
    chosen = explicit(threads)
    if chosen is not None:
        return chosen
    idle = idle_cores()
    if idle is None:
        return most
    return max(1, min(most, int(idle + (1 - IDLE_ENOUGH))))


class Follow:
    """For a process that computes for a long time (serve, chat): every INTERVAL_S, look again at what the other
    processes leave idle and take that many threads. A server started on a quiet machine would otherwise keep
    two threads when a job starts beside it hours later. Call `check()` from the computing thread between steps."""

    INTERVAL_S = 5.0

    def __init__(self, most: int):
        self.most = most
        self.mark = (_busy_seconds(), _own_seconds(), time.monotonic())

    def check(self) -> None:
        busy0, own0, t0 = self.mark
        now = time.monotonic()
        if busy0 is None or now - t0 < self.INTERVAL_S:
            return
        busy, own = _busy_seconds(), _own_seconds()
        self.mark = (busy, own, now)
        others = max(0.0, (busy - busy0) - (own - own0)) / (now - t0)
        n = max(1, min(self.most, int(len(cpus()) - others + (1 - IDLE_ENOUGH))))
        import torch

        if n != torch.get_num_threads():
            torch.set_num_threads(n)


def configure(threads: int | None) -> int:
    """Set torch's intra-op threads (and so the kernels') for this command; -> the count chosen."""
    import torch

    n = choose(threads, torch.get_num_threads())
    torch.set_num_threads(n)
    return n
