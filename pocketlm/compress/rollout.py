"""Answers a model writes during distillation: the student's own samples (on-policy distillation, GKD) and the
teacher's answers to the training prompts (sequence-level distillation, Kim and Rush 2016), the latter stored.

    samples = sample(student, prompts, max_new=64, temperature=1.0, stop_ids=tok.stop_ids, generator=g)
    answers = TeacherAnswers.open_or_build("out/teacher_answers.jsonl", "gemma3-270m", teacher, tok, prompts, 128)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pocketlm.errors import PocketLMError


@torch.no_grad()
def sample(model, prompts: list[list[int]], max_new: int, temperature: float, stop_ids, generator=None) -> list[list[int]]:
    """Each prompt's continuation (ids, through the stop token when it wrote one; at most max_new), the prompts
    decoded together: each is read alone into its own row of the KV cache, then one forward pass per new token
    feeds every unfinished row its last token at the row's own position (the server's slots path: no padding,
    no masks). temperature 0 is greedy; otherwise the softmax at that temperature, unfiltered, as GKD samples."""
    device = next(model.parameters()).device
    stops = set(stop_ids)
    out: list[list[int]] = [[] for _ in prompts]
    model.setup_cache(len(prompts), max(map(len, prompts)) + max_new)
    try:
        rows = []
        for b, p in enumerate(prompts):  # (1, T) into cache row b
            h = model.hidden(torch.tensor([p], device=device), torch.arange(len(p), device=device)[None], torch.tensor([b], device=device))
            rows.append(model.logits(h[:, -1]))  # (1, V)
        logits, live = torch.cat(rows).float(), list(range(len(prompts)))  # (B, V), the rows still writing
        for step in range(max_new):
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)  # (n, V)
                token = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].tolist()
            else:
                token = logits.argmax(-1).tolist()
            for row, t in zip(live, token):
                out[row].append(t)
            live = [row for row, t in zip(live, token) if t not in stops]
            if not live or step == max_new - 1:
                break
            last = torch.tensor([[out[row][-1]] for row in live], device=device)  # (n, 1)
            pos = torch.tensor([[len(prompts[row]) + len(out[row]) - 1] for row in live], device=device)  # (n, 1)
            h = model.hidden(last, pos, torch.tensor(live, device=device))  # (n, 1, D)
            logits = model.logits(h[:, -1]).float()  # (n, V)
    finally:
        model.clear_cache()
    return out


class TeacherAnswers:
    """The teacher's greedy answers to the training prompts, as text, in a JSONL file written a batch at a time
    ({"prompt": messages, "answer": text} per line) beside teacher.json (the teacher and settings): a killed build
    resumes after the last batch it wrote, and a later run with the same prompts reads them back."""

    @staticmethod
    def open_or_build(path: str | Path, teacher_name: str, model, tokenizer, prompts: list[list[dict]], max_new: int,
                      batch: int = 16, on_progress=None) -> list[str]:
        """prompts: each a list of messages (the conversation before the answer). model: the teacher, or a
        callable that loads it (called only when something must be generated)."""
        from pocketlm.compress.xtok import prompt_ids

        path = Path(path).expanduser()
        meta_path = path.with_suffix(".json")
        want = {"teacher": teacher_name, "max_new_tokens": max_new, "prompts": len(prompts)}
        if meta_path.is_file() and json.loads(meta_path.read_text()) != want:
            raise PocketLMError(f"{path}: the stored teacher answers were made with other settings "
                                f"({json.loads(meta_path.read_text())}); delete it or write them elsewhere")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(want))
        done = []
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            done = [json.loads(line) for line in lines if line.endswith("}")]  # a line cut by a kill is dropped
            if any(r["prompt"] != p for r, p in zip(done, prompts)):
                raise PocketLMError(f"{path}: the stored teacher answers are for other prompts; delete it or write them elsewhere")
            if len(done) != len(lines):  # rewrite without the cut line, whole (then renamed)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done), encoding="utf-8")
                os.replace(tmp, path)
        if on_progress is not None and done:
            on_progress(len(done))
        if len(done) < len(prompts):
            model = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
            model.eval()
            with path.open("a", encoding="utf-8") as f:
                for begin in range(len(done), len(prompts), batch):
                    todo = prompts[begin : begin + batch]
                    ids = [prompt_ids(tokenizer, p) for p in todo]
                    for p, answer in zip(todo, sample(model, ids, max_new, 0.0, tokenizer.stop_ids)):
                        text = tokenizer.decode([t for t in answer if t not in tokenizer.stop_ids]).strip()
                        row = {"prompt": p, "answer": text}
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                        done.append(row)
                    f.flush()
                    if on_progress is not None:
                        on_progress(len(todo))
        return [r["answer"] for r in done]
