"""The default thread count (pocketlm/threads.py): one per core that other processes leave idle, at start and, for
a server or a chat, as the load changes. The machine's /proc/stat is replaced by a simulated one here; the effect
on decode speed is measured by bench/bench_threads.py (docs/BENCHMARKS.md)."""

import pytest
import torch

from pocketlm import threads


class Machine:
    """Two cores; `others` of them busy with other processes; this process idle."""

    def __init__(self, monkeypatch, others: float):
        self.others, self.clock, self.busy = others, 1000.0, 0.0
        monkeypatch.setattr(threads, "cpus", lambda: [0, 1])
        monkeypatch.setattr(threads, "_busy_seconds", lambda: self.busy)
        monkeypatch.setattr(threads, "_own_seconds", lambda: 0.0)
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.clock)
        monkeypatch.setattr(threads.time, "sleep", self.advance)
        monkeypatch.delenv("POCKETLM_THREADS", raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def advance(self, seconds: float) -> None:
        self.clock += seconds
        self.busy += self.others * seconds


@pytest.mark.parametrize("others, chosen", [(0.0, 2), (0.05, 2), (0.3, 1), (1.0, 1), (2.0, 1)])
def test_one_thread_per_idle_core_at_start(monkeypatch, others, chosen):
    machine = Machine(monkeypatch, others)
    threads.start()
    machine.advance(0.5)  # the import of torch
    assert threads.choose(None, most=2) == chosen
    assert threads.choose(2, most=2) == 2  # --threads wins


def test_the_look_lasts_at_least_a_fifth_of_a_second(monkeypatch):
    machine = Machine(monkeypatch, 1.0)
    threads.start()
    assert threads.choose(None, most=2) == 1 and machine.clock == pytest.approx(1000.0 + threads.MIN_WINDOW_S)


def test_a_long_run_follows_the_load(monkeypatch):
    machine = Machine(monkeypatch, 0.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        follow = threads.Follow(most=2)
        machine.others = 1.0  # a job starts beside the server
        machine.advance(1.0)
        follow.check()
        assert torch.get_num_threads() == 2  # looked at most every INTERVAL_S
        machine.advance(threads.Follow.INTERVAL_S)
        follow.check()
        assert torch.get_num_threads() == 1
        machine.others = 0.0  # it ended
        machine.advance(threads.Follow.INTERVAL_S)
        follow.check()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
