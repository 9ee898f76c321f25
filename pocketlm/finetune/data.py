"""Training data: JSONL rows -> conversations -> token ids with a loss mask -> (packed) batches.

Rows, one JSON object per line, same kind on every line:
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
    {"prompt": ..., "completion": ...}
    {"text": ..., "label": ...}              classification as chat: the label is the assistant's answer
    {"instruction": ..., "input": ..., "output": ...}   (Alpaca)
    {"text": ...}                            raw text (no label): every token is learned, long texts are
                                             cut into seq_len pieces; a .txt file is one such row

Every conversation is rendered with the model's own chat template and only the assistant's tokens
count in the loss (labels are -100 elsewhere). The assistant's spans are found by rendering prefixes
of the conversation (what transformers' `{% generation %}` tracking gives, but for any template): the
text up to an assistant turn is the template's render of the earlier messages plus the generation
prompt; the turn ends where the render including it ends. The full text is tokenized once and a token
is the assistant's when its characters overlap such a span, so the ids are exactly what the model sees
at inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketlm.errors import PocketLMError

IGNORE = -100  # label of a token that does not count in the loss (torch cross_entropy's ignore_index)

KINDS = {  # row kind -> the keys it needs
    "messages": ("messages",),
    "prompt": ("prompt", "completion"),
    "label": ("text", "label"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # ids where the loss counts, IGNORE elsewhere; same length as ids
    answer: str | None = None  # the label text of a {text, label} row (accuracy by generation)
    prompt_ids: list[int] | None = None  # the ids up to the answer (generation at eval time)


# ------------------------------------------------------------------------------------------ reading


def read_jsonl(path: str | Path) -> list[dict]:
    """Every row of a JSONL file; a bad line is an error naming the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PocketLMError(f"{path}: no such data file")
    if path.suffix == ".txt":  # plain text: one raw-text row
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise PocketLMError(f"{path}: no text")
        return [(str(path), 1, {"text": text})]
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise PocketLMError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise PocketLMError(f"{path}:{n}: a row must be a JSON object, not {type(row).__name__}")
            rows.append((n, row))
    if not rows:
        raise PocketLMError(f"{path}: no rows")
    return [(str(path), n, row) for n, row in rows]


def row_kind(row: dict) -> str:
    if "text" in row and "label" not in row:
        return "text"
    for kind, keys in KINDS.items():
        if keys[0] in row:
            return kind
    return ""


def to_messages(row: dict, kind: str, where: str, template: str = "{text}", system: str | None = None) -> list[dict]:
    """One row -> a conversation (list of {"role", "content"}). `where` ("file:line") names the row in errors."""
    for key in KINDS[kind]:
        if key not in row or row[key] is None:
            raise PocketLMError(f"{where}: missing field {key!r} (a {kind} row needs {', '.join(KINDS[kind])})")
    if kind == "messages":
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise PocketLMError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects")
        if not any(m["role"] == "assistant" for m in messages):
            raise PocketLMError(f"{where}: the conversation has no assistant message to learn")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif kind == "prompt":
        messages = [{"role": "user", "content": str(row["prompt"])}, {"role": "assistant", "content": str(row["completion"])}]
    elif kind == "label":
        user = template.replace("{text}", str(row["text"]))  # not str.format: the text may hold braces
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(row["label"])}]
    else:  # alpaca
        user = str(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": str(row["output"])}]
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


# --------------------------------------------------------------------------------------- tokenizing


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of each assistant turn, end token included."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            # a template that rewrites earlier turns (e.g. drops past reasoning) has no stable prefixes
            raise PocketLMError(
                "the chat template does not render a conversation's prefixes as prefixes of the whole; "
                "cannot tell the assistant's tokens apart"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode_conversation(tokenizer, messages: list[dict], first_answer: int = 0) -> tuple[list[int], list[int]]:
    """ids and labels (ids on the assistant's tokens, IGNORE elsewhere) of a conversation in the chat template;
    the assistant turns before the `first_answer`-th are context only (a preference pair's prompt)."""
    full, spans = assistant_spans(tokenizer, messages)
    spans = spans[first_answer:]
    # add_special_tokens=False: the template writes BOS itself (as encode_chat does at inference)
    enc = tokenizer.backend.encode(full, add_special_tokens=False)
    ids, labels = list(enc.ids), []
    for token_id, (a, b) in zip(ids, enc.offsets):
        inside = any(a < end and b > start for start, end in spans) if b > a else any(start <= a < end for start, end in spans)
        labels.append(token_id if inside else IGNORE)
    return ids, labels


def encode_raw_pair(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """A model without a chat template (a base model): prompt as raw text, then the answer and EOS."""
    p = tokenizer.encode(prompt, add_special_tokens=True)
    a = tokenizer.encode(answer, add_special_tokens=False)
    if tokenizer.eos_id is not None:
        a = a + [tokenizer.eos_id]
    return p + a, [IGNORE] * len(p) + a


def build_examples(tokenizer, rows, cfg) -> list[Example]:
    """JSONL rows -> tokenized Examples (truncated to cfg.seq_len). All rows must be of one kind."""
    if not rows:
        return []
    first_where = f"{rows[0][0]}:{rows[0][1]}"
    kind = row_kind(rows[0][2])
    if not kind:
        raise PocketLMError(
            f"{first_where}: unknown row kind: expected one of {{messages}}, {{prompt, completion}}, "
            f"{{text, label}}, {{instruction, input, output}}, {{text}}; got keys {sorted(rows[0][2])}"
        )
    templated = tokenizer.has_chat_template
    examples = []
    for path, n, row in rows:
        where = f"{path}:{n}"
        if row_kind(row) != kind:
            missing = next((k for k in KINDS[kind] if k not in row), KINDS[kind][0])
            raise PocketLMError(f"{where}: missing field {missing!r} (every row must be of the first row's kind: {kind})")
        if kind == "text":  # language modelling on raw text: no template, every token a target
            ids = tokenizer.encode(str(row["text"]), add_special_tokens=True)
            ids += [tokenizer.eos_id] if tokenizer.eos_id is not None else []
            examples += [Example(ids[i : i + cfg.seq_len], ids[i : i + cfg.seq_len]) for i in range(0, len(ids), cfg.seq_len)]
            continue
        messages = to_messages(row, kind, where, cfg.template, cfg.system)
        if templated:
            ids, labels = encode_conversation(tokenizer, messages)
        else:
            if sum(m["role"] == "assistant" for m in messages) != 1 or messages[-1]["role"] != "assistant":
                raise PocketLMError(f"{where}: this model has no chat template: only single-turn rows (prompt -> answer) can be used")
            prompt = "\n\n".join(m["content"] for m in messages[:-1])
            ids, labels = encode_raw_pair(tokenizer, prompt + "\n", messages[-1]["content"])
        answer = str(row["label"]) if kind == "label" else None
        prompt_ids = None
        if answer is not None:  # the ids before the first answer token: what generation starts from
            first = next(i for i, label in enumerate(labels) if label != IGNORE)
            prompt_ids = ids[:first]
        examples.append(Example(ids[: cfg.seq_len], labels[: cfg.seq_len], answer, prompt_ids))
    return examples


# ------------------------------------------------------------------------------------ preference pairs


def build_pairs(tokenizer, rows, cfg) -> list[tuple[Example, Example]]:
    """{"prompt", "chosen", "rejected"} rows (TRL's preference format: strings, or lists of messages) -> (chosen,
    rejected) Examples over the same prompt, labels on the answer's tokens only, cut to cfg.seq_len."""
    pairs = []
    for path, n, row in rows:
        where = f"{path}:{n}"
        for key in ("prompt", "chosen", "rejected"):
            if row.get(key) is None:
                raise PocketLMError(f"{where}: missing field {key!r} (dpo needs {{prompt, chosen, rejected}} rows)")
        pair = tuple(_answer_example(tokenizer, row["prompt"], row[key], where, cfg) for key in ("chosen", "rejected"))
        pairs.append(pair)
    return pairs


def _messages(value, role: str, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise PocketLMError(f"{where}: prompt, chosen and rejected are strings or lists of {{\"role\", \"content\"}} messages")


def _answer_example(tokenizer, prompt, answer, where: str, cfg) -> Example:
    prompt_messages, answer_messages = _messages(prompt, "user", where), _messages(answer, "assistant", where)
    if cfg.system and prompt_messages[0]["role"] != "system":
        prompt_messages = [{"role": "system", "content": cfg.system}, *prompt_messages]
    if tokenizer.has_chat_template:
        earlier = sum(m["role"] == "assistant" for m in prompt_messages)
        ids, labels = encode_conversation(tokenizer, prompt_messages + answer_messages, first_answer=earlier)
    else:  # a base model: the prompt as raw text, the answer after it (TRL's plain-text pairs), EOS at the end
        prompt_text = "\n\n".join(m["content"] for m in prompt_messages)
        ids, labels = encode_raw_pair(tokenizer, prompt_text, "".join(m["content"] for m in answer_messages))
    ids, labels = ids[: cfg.seq_len], labels[: cfg.seq_len]
    if all(label == IGNORE for label in labels[1:]):
        raise PocketLMError(f"{where}: no answer token within --seq-len {cfg.seq_len}: give a larger one")
    return Example(ids, labels)


# ------------------------------------------------------------------------------------------ packing


def pack(examples: list[Example], seq_len: int, order: list[int]) -> list[Example]:
    """Examples (in `order`) -> blocks of at most seq_len tokens, first fit in order, no example split.

    Attention stays causal over the whole block: a later example can see the earlier ones in its block
    (no document masking: the native models take no per-token positions or block masks, and adding them
    would put a training-only switch in the inference forward). Positions run on across the block. Only
    the assistant's tokens count in the loss, so the cost is that context, not wrong targets.
    """
    blocks, ids, labels = [], [], []
    for i in order:
        ex = examples[i]
        if ids and len(ids) + len(ex.ids) > seq_len:
            blocks.append(Example(ids, labels))
            ids, labels = [], []
        ids, labels = ids + ex.ids, labels + ex.labels
    if ids:
        blocks.append(Example(ids, labels))
    return blocks


# ------------------------------------------------------------------------------------------ batches


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ids (B, T), labels (B, T) with IGNORE on padding, lengths (B,)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        labels[b, : len(e.labels)] = torch.tensor(e.labels)
    lengths = torch.tensor([len(e.ids) for e in examples])
    return {"ids": ids, "labels": labels, "lengths": lengths}


def target_count(example: Example) -> int:
    """Tokens that count in the loss: labels shift by one (position t predicts token t+1), so the first never does."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def stream_indices(n_units: int, start: int, count: int, seed: int, lengths: list[int] | None = None, batch: int = 0) -> list[int]:
    """Positions start..start+count-1 of the endless data stream: epoch e is a seeded permutation of the units.

    The stream depends only on (seed, position), so a resumed run continues from the step's position
    with no data-loader state to save. With `lengths` (group by length), each run of 50 global batches of
    the permutation is sorted longest first, so a batch holds units of about one length and pads little
    (transformers' LengthGroupedSampler: "megabatches" of 50 batches).
    """
    out, perms = [], {}
    for p in range(start, start + count):
        epoch = p // n_units
        if epoch not in perms:
            perm = torch.randperm(n_units, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
            if lengths is not None:
                mega = 50 * batch
                perm = [i for m in range(0, n_units, mega) for i in sorted(perm[m : m + mega], key=lambda i: -lengths[i])]
            perms[epoch] = perm
        out.append(perms[epoch][p % n_units])
    return out
