"""Evaluation data: local files only. JSONL records, text files, and the shared data sets by name.

The shared data folder (../shared/data beside the repository, or $POCKETLM_DATA) holds banking77, sst2,
dialogsum, multi30k_en_de and wikitext2_raw; a name such as `banking77` stands for its evaluation split,
and its train split (where there is one) is where few-shot examples come from.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from pocketlm.errors import PocketLMError

DATA_ENV = "POCKETLM_DATA"


@dataclass(frozen=True)
class SharedSet:
    eval_split: str  # path inside the shared data folder
    shots_split: str | None  # where few-shot examples come from (never the evaluation split)


SHARED_SETS = {
    "banking77": SharedSet("banking77/test.jsonl", "banking77/train.jsonl"),
    "sst2": SharedSet("sst2/dev.jsonl", "sst2/train.jsonl"),
    "dialogsum": SharedSet("dialogsum/test.jsonl", "dialogsum/dev.jsonl"),
    "multi30k": SharedSet("multi30k_en_de/test_2016_flickr.jsonl", "multi30k_en_de/train.jsonl"),
    "wikitext2": SharedSet("wikitext2_raw/test.txt", None),
}


def shared_data_dir() -> Path:
    """$POCKETLM_DATA, else ../shared/data next to the repository (or the current directory)."""
    if os.environ.get(DATA_ENV):
        folder = Path(os.environ[DATA_ENV]).expanduser()
        if not folder.is_dir():
            raise PocketLMError(f"${DATA_ENV} is {folder}, which is not a folder")
        return folder
    repo = Path(__file__).resolve().parents[2]
    for folder in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if folder.is_dir():
            return folder
    raise PocketLMError(
        f"no shared data folder (looked for {repo.parent / 'shared' / 'data'}): set ${DATA_ENV} to it or pass --data FILE"
    )


def resolve_data(ref: str) -> tuple[Path, Path | None]:
    """A shared set's name or a file path -> (evaluation file, default few-shot file or None).

    A file's default few-shot source is a train.jsonl beside it (never the file itself)."""
    if ref in SHARED_SETS:
        folder, entry = shared_data_dir(), SHARED_SETS[ref]
        path = folder / entry.eval_split
        if not path.exists():
            raise PocketLMError(f"{path}: missing from the shared data folder")
        return path, (folder / entry.shots_split if entry.shots_split else None)
    path = Path(ref).expanduser()
    if not path.is_file():
        names = ", ".join(SHARED_SETS)
        raise PocketLMError(f"{ref}: no such file (give a JSONL or text file, or a shared data set: {names})")
    sibling = path.parent / "train.jsonl"
    return path, (sibling if sibling.exists() and sibling.resolve() != path.resolve() else None)


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Every non-blank line a JSON object holding the `required` keys; a bad line is named by its number."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PocketLMError(f"{path}: cannot read ({e})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:  # its own "line 1 column 27" would name the line wrongly
            raise PocketLMError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise PocketLMError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        missing = [key for key in required if key not in record]
        if missing:
            raise PocketLMError(f"{path}, line {number}: no {', '.join(repr(k) for k in missing)} field")
        records.append(record)
    if not records:
        raise PocketLMError(f"{path}: no records")
    return records


def read_text(path: Path, wikitext: bool = False) -> str:
    """A text file. wikitext: rebuild the Hugging Face rows and join them with blank lines, the usual
    WikiText-2 perplexity recipe (see the shared data folder's wikitext2_raw/README.md)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PocketLMError(f"{path}: cannot read ({e})") from None
    if wikitext:
        rows = [line + "\n" if line else "" for line in text.split("\n")[:-1]]
        text = "\n\n".join(rows)
    if not text.strip():
        raise PocketLMError(f"{path}: the file is empty")
    return text


def subset(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A seeded random sample of `limit` records, kept in file order (the same for every model at one seed).

    Random rather than the first N: banking77's test file is sorted by label, so its first 200 lines hold
    only 5 of the 77 intents."""
    if limit is None or limit >= len(records):
        return records
    if limit < 1:
        raise PocketLMError("--limit must be at least 1")
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def pick_shots(records: list[dict], k: int, label_key: str | None, seed: int) -> list[dict]:
    """k few-shot examples, fixed for the whole run (so the shared prompt prefix is computed once).

    With a label key the examples cycle through the labels in a seeded random order, one example each,
    so k >= the number of labels shows every label (lm-evaluation-harness samples k at random instead)."""
    if k <= 0:
        return []
    rng = random.Random(seed)
    if label_key is None:
        return rng.sample(records, min(k, len(records)))
    by_label: dict[str, list[dict]] = {}
    for record in records:
        by_label.setdefault(str(record[label_key]), []).append(record)
    labels = sorted(by_label)
    rng.shuffle(labels)
    for pool in by_label.values():
        rng.shuffle(pool)
    shots, round_ = [], 0
    while len(shots) < k and any(len(pool) > round_ for pool in by_label.values()):
        shots += [by_label[label][round_] for label in labels if len(by_label[label]) > round_][: k - len(shots)]
        round_ += 1
    rng.shuffle(shots)  # no label order the model could pick up
    return shots
