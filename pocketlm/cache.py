"""Converted-weights cache: dequantizing a GGUF takes seconds, so the result is kept as a Hugging Face
folder under $POCKETLM_HOME/converted/<sha256 prefix>/ and the next start memory-maps it.

The key is the file's sha256 (a file replaced in place gets a new entry); the hash itself is
remembered per (path, size, mtime) so a warm start does not read the whole file again.

An entry is made under `building()`: a lock, so that of two processes converting one model one writes and the
other waits and reads its copy; the folder is written under a temporary name and renamed whole (formats/hf.py),
so a kill or a full disk leaves no half-written entry that a later start would read; and a progress display,
since a first start can take a while (Gemma 3 270M in float: dequantizing, then writing 1 GB).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from pocketlm.errors import PocketLMError


FORMAT_VERSION = 1  # bump when the converted layout changes, so old entries are not reused


def home() -> Path:
    """Where pocketlm keeps assembled and converted weights ($POCKETLM_HOME, else ~/.cache/pocketlm)."""
    return Path(os.environ.get("POCKETLM_HOME", Path.home() / ".cache" / "pocketlm"))


def _index_path() -> Path:
    return home() / "converted" / "index.json"


def _read_index() -> dict:
    try:
        return json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path: Path) -> str:
    path = path.resolve()
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    index = _read_index()
    hit = index.get(str(path))
    if hit and hit["stamp"] == stamp:
        return hit["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    index[str(path)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    write_atomic(_index_path(), json.dumps(index, indent=1))
    return digest.hexdigest()


def converted_dir(path: Path) -> Path:
    return home() / "converted" / f"{file_sha256(path)[:24]}-v{FORMAT_VERSION}"


def forget(path: Path) -> None:
    """Delete the converted copy of `path`, if any (used by `pocketlm rm`)."""
    if path.is_file():  # a Hugging Face folder is used in place; a missing file was never converted
        folder = converted_dir(path)
        for copy in [folder, *folder.parent.glob(f"{folder.name}-*"), *folder.parent.glob(f"{folder.name}.tmp*")]:  # and its quantized copies
            shutil.rmtree(copy, ignore_errors=True)
        for lock in folder.parent.glob(f"{folder.name}*.lock"):
            lock.unlink(missing_ok=True)
    index = _read_index()
    if index.pop(str(path.resolve()), None) is not None:
        write_atomic(_index_path(), json.dumps(index, indent=1))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ building an entry


@contextmanager
def building(folder: Path, title: str) -> Iterator["Progress | None"]:
    """Make cache entry `folder` (written by the caller under a temporary name and renamed, as
    formats/hf.py's write_model_folder does) while holding its lock. Yields a Progress to tell the user
    each step, or None when another process finished the entry while this one waited: use its copy."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"pocketlm: waiting for another pocketlm process that is {title[0].lower()}{title[1:]}", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").exists():
            yield None
            return
        for stale in folder.parent.glob(f"{folder.name}.tmp*"):  # a killed writer's: no one else writes them now
            shutil.rmtree(stale, ignore_errors=True)
        try:
            with Progress(title) as progress:
                yield progress
        except Exception as e:
            for mine in folder.parent.glob(f"{folder.name}.tmp{os.getpid()}"):
                shutil.rmtree(mine, ignore_errors=True)
            if out_of_space(e, folder.parent):
                raise PocketLMError(f"no space left on the device for {folder} ({title}): free some space, or set "
                                    f"POCKETLM_HOME to a disk with room") from None
            raise


def out_of_space(e: BaseException, folder: Path) -> bool:
    """A write that failed because the disk is full. safetensors says so in its message, torch.save only that
    the file came out short ("unexpected pos"): then the disk's free space tells."""
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e) or "os error 28" in str(e):
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


Poll = Callable[[], "tuple[float, float]"]  # -> (done, total) of a step, read from another thread while it runs


class Progress:
    """What a long first start is doing, from its first second: a line for each step with a bar and an ETA
    where the step's progress can be read from outside (bytes made in memory or written), else a spinner. On a
    terminal the display is transient and leaves one summary line; in a log each step is a line (with its share
    done and the time left every LOG_EVERY_S) after the first second, so that a file which fails its checks at
    once prints only the error."""

    QUIET_S = 1.0
    LOG_EVERY_S = 15.0

    def __init__(self, title: str):
        self.title, self.started = title, time.monotonic()
        self.what, self.poll, self.step_started = "", None, self.started
        self.logged_what, self.logged_at = "", 0.0
        self.stop = threading.Event()
        self.live = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bars

            class TitledBars(Bars):  # the title on a line of its own above the step's bar
                def get_renderables(bars):
                    yield f"pocketlm: {title}"
                    yield bars.make_tasks_table(bars.tasks)

            self.live = TitledBars(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24), TaskProgressColumn(),
                                   TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                                   transient=True)
            self.task = self.live.add_task("reading", total=None)

    def __enter__(self) -> "Progress":
        if self.live is not None:
            self.live.start()
        self.thread = threading.Thread(target=self._watch, name="pocketlm-progress", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.stop.set()
        self.thread.join()
        if self.live is not None:
            self.live.stop()
        took = time.monotonic() - self.started
        if kind is None and took >= self.QUIET_S:
            print(f"pocketlm: {self.title}: done in {took:.0f} s (later starts read the copy)", file=sys.stderr, flush=True)

    def step(self, what: str, poll: Poll | None = None) -> None:
        """The next step; poll() tells its progress if that can be read while it runs."""
        self.what, self.poll, self.step_started = what, poll, time.monotonic()
        if self.live is not None:
            self.live.reset(self.task, description=what, total=None)

    def _watch(self) -> None:
        while not self.stop.wait(0.25):
            what, poll, began = self.what, self.poll, self.step_started
            done = total = 0
            if poll is not None:
                try:
                    done, total = poll()
                except Exception:  # what it reads is being changed under it: the next look will do
                    continue
            now = time.monotonic()
            if self.live is not None:
                self.live.update(self.task, description=what, completed=min(done, total) if total else 0, total=total or None)
            elif now - self.started >= self.QUIET_S and (what != self.logged_what or total and now - self.logged_at >= self.LOG_EVERY_S):
                line = f"pocketlm: {self.title}: {what}"
                if total:
                    line += f" {min(done / total, 1):.0%}"
                    line += f", about {(now - began) * (total - done) / done:.0f} s left" if 0 < done < total else ""
                print(line, file=sys.stderr, flush=True)
                self.logged_what, self.logged_at = what, now


def anonymous_memory_growth(total_bytes: int) -> Poll:
    """Progress of a step that builds `total_bytes` of new tensors in memory (dequantizing): how much this
    process's anonymous memory has grown since the step began (Linux; nothing to show elsewhere)."""
    def anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    base = anon()
    return lambda: (max(0, anon() - base), total_bytes)


def folder_write(folder: Path, total_bytes: int) -> Poll:
    """Progress of writing entry `folder`: the size of its model.safetensors under the temporary name."""
    def written():
        return sum(p.stat().st_size for p in folder.parent.glob(f"{glob.escape(folder.name)}.tmp*/*.safetensors")), total_bytes

    return written
