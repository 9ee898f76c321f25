"""The progress of a long command (quantize, prune, export) on stderr: a bar with an ETA per step, then one line.

    with Progress("export", quiet=args.quiet) as progress:   # the command makes it ...
        export(..., progress=progress)                       # ... the library reports to it, or to None
    # in the library:
    progress.step("calibration sequences", total=len(batch))  # then progress.advance() after each
    progress.step("writing", poll=lambda: (file_size(), expected_bytes))  # or read from outside while a call runs

On a terminal, once the command has run SHOW_AFTER_S and a step has begun, the step shows as a rich bar (done /
total, elapsed, ETA) that disappears when the command ends. Then, on a terminal or in a log, one line says what
was done and how long it took (a command quicker than SHOW_AFTER_S says nothing). quiet: nothing at all. stdout
is never written, so `--json` output stays one JSON document.

A library function takes `progress=None` (nothing shown: `pocketlm shrink` calls export and prune under its own
display, and rich allows one live display at a time) and reports to NO_PROGRESS then. Steps begin after the model
is loaded, so this display never overlaps the one of a first-use GGUF conversion (pocketlm/cache.py's).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

SHOW_AFTER_S = 1.0  # a command this quick shows no bar and no final line
POLL_S = 0.25

Poll = Callable[[], tuple[int, int]]  # -> (done, total), read on the display's thread while a step runs


class Progress:
    def __init__(self, title: str, quiet: bool = False):
        self.title, self.quiet = title, quiet
        self.what, self.done, self.total, self.poll = "", 0, None, None
        self.steps: list[str] = []
        self.started = time.monotonic()
        self.bars = None  # rich's Progress, once shown (terminal only)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        self.started = time.monotonic()
        if not self.quiet and sys.stderr.isatty():
            self.thread = threading.Thread(target=self._show, name="pocketlm-progress", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.bars is not None:
            self.bars.stop()  # transient: the bar leaves the screen
        took = time.monotonic() - self.started
        if kind is None and not self.quiet and took >= SHOW_AFTER_S:  # after an error, only the error's line
            done = f" ({', '.join(self.steps)})" if self.steps else ""
            print(f"pocketlm: {self.title}: done in {took:.1f} s{done}", file=sys.stderr, flush=True)

    def step(self, what: str, total: int | None = None, poll: Poll | None = None) -> None:
        """Begin the next step: `total` units counted by advance(), or poll() read while it runs (else a spinner)."""
        self.what, self.done, self.total, self.poll = what, 0, total, poll
        self.steps.append(what)

    def advance(self, n: int = 1) -> None:
        self.done += n

    def _show(self) -> None:
        """The display's thread: after SHOW_AFTER_S with a step begun, draw the bar and keep it current; once the
        command ends, draw the last step once more, so the bar's final frame is the step the command ended in."""
        task = None
        while True:
            ending = self.stop.wait(POLL_S)
            if ending and self.bars is None:
                return  # never shown: a quick command starts no bar on its way out
            if self.what and time.monotonic() - self.started >= SHOW_AFTER_S:
                if self.bars is None:
                    self.bars, task = self._start_bars()
                self._draw(task)
            if ending:
                return

    def _draw(self, task) -> None:
        """The bar of the current step: its name always, its count where it can be read now."""
        done, total, poll = self.done, self.total, self.poll
        if poll is not None:
            try:
                done, total = poll()
            except (OSError, RuntimeError):  # a file not made yet or being renamed, a module dict being changed
                self.bars.update(task, description=self.what)  # the count at the next look
                return
        completed = min(done, total) if total else 0
        self.bars.update(task, description=self.what, completed=completed, total=total or None)

    def _start_bars(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress as Bars, SpinnerColumn, TaskProgressColumn, TextColumn
        from rich.progress import TimeElapsedColumn, TimeRemainingColumn

        bars = Bars(SpinnerColumn(), TextColumn(f"{self.title}: {{task.description}}"), BarColumn(bar_width=28),
                    TaskProgressColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True, force_terminal=True), transient=True,
                    redirect_stdout=False, redirect_stderr=False)  # stdout untouched: --json stays parseable
        task = bars.add_task(self.what, total=None)
        bars.start()
        return bars, task


class _NoProgress:
    """What a library function reports to when its caller shows nothing."""

    def step(self, what: str, total: int | None = None, poll: Poll | None = None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


NO_PROGRESS = _NoProgress()


def file_growth(path_of: Callable[[], object], total: int) -> Poll:
    """A step that writes about `total` bytes to a file whose path path_of() gives (a writer's temporary name):
    its size so far."""
    return lambda: (os.path.getsize(path_of()), total)
