"""`pocketlm train-draft`: teach a draft head (pocketlm.models.draft_head) to guess a target model's next tokens.

The target runs frozen over the data and gives, at every position, its final hidden state h_t and its next-token
distribution p_t. The head starts from h_t and the embedding of the token at t+1, and is trained through
`unroll` chained steps, as speculative decoding chains it:

    state_j = head.step(state_{j-1}, embed(x_{t+j}))     state_0 = h_t
    loss_j  = KL(p_{t+j} restricted to the head's tokens || head's guess) + REG_WEIGHT * smooth_l1(state_j, h_{t+j})

The KL term is distillation on the target's own distribution (EAGLE's classification loss); the regression term
keeps each guessed state close to the target's, so the next step starts from something the head has seen (EAGLE's
feature loss). The loss counts where the token guessed is one of the assistant's (the draft works while the model
answers). The head's tokens are the `n_tokens` most frequent of the training answers (FR-Spec).

With `target_answers`, the data's answers are first replaced by the target's own greedy answers to the same prompts
(Medusa-2's self-distillation): the head then learns exactly the text it will be asked to guess.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pocketlm.errors import PocketLMError
from pocketlm.finetune.data import IGNORE, Example, collate, encode_conversation, read_jsonl, row_kind, to_messages
from pocketlm.models.draft_head import DraftHead, DraftHeadConfig

REG_WEIGHT = 1.0  # the feature loss beside the KL (EAGLE weighs its regression 1.0 and its classification 0.1)
REPEAT_LAST_N = 64  # the tokens the repetition penalty looks at (SamplingParams.repeat_last_n's default)
MIN_LR_RATIO = 0.1  # the cosine schedule ends at a tenth of the peak
STEP_DECAY = 0.8  # a later chained step counts less: it is only reached when the ones before it were right


@dataclass
class DraftTrainConfig:
    target: str
    data: str
    out: str
    n_tokens: int = 8192
    hidden_dim: int = 1536
    unroll: int = 3
    epochs: float = 2.0
    batch_tokens: int = 16384
    max_len: int = 1024
    lr: float = 1e-3
    warmup_steps: int = 50
    eval_split: float = 0.01
    eval_every: int = 500
    target_answers: int = 0  # > 0: regenerate the answers of up to this many prompts with the target (greedy)
    max_new_tokens: int = 256
    repetition_penalty: float = 1.1  # the generation defaults' (pocketlm.engine.params.SamplingParams)
    generate_batch: int = 256
    device: str = "auto"
    seed: int = 0
    resume: bool = False  # continue from OUT/checkpoint.pt (written at every evaluation)
    quiet: bool = False

    def settings(self) -> dict:
        """What a resumed run must share with the run it continues."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "eval_every", "device", "resume", "quiet")}


def encode_rows(tokenizer, path: str, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per row: a conversation in the chat template (labels on the assistant's tokens), raw text
    (labels everywhere), or the token ids of a target_answers.jsonl ({"prompt": [...], "answer": [...]}, labels on
    the answer); cut to max_len."""
    out = []
    for where, n, row in read_jsonl(path):
        kind = row_kind(row)
        if isinstance(row.get("prompt"), list) and isinstance(row.get("answer"), list):  # ids: a target_answers.jsonl
            ids, labels = row["prompt"] + row["answer"], [IGNORE] * len(row["prompt"]) + row["answer"]
        elif kind == "text":
            ids = tokenizer.encode(str(row["text"]), add_special_tokens=True)
            labels = list(ids)
        elif kind:
            ids, labels = encode_conversation(tokenizer, to_messages(row, kind, f"{where}:{n}"))
        else:
            raise PocketLMError(f"{where}:{n}: a row needs 'text', 'messages', 'prompt'/'completion' or 'instruction'/'output'")
        if len(ids) > 2:
            out.append((ids[:max_len], labels[:max_len]))
    return out


def split_prompt(ids: list[int], labels: list[int]) -> list[int]:
    """The ids before the first assistant token: the prompt the target answers."""
    first = next((i for i, t in enumerate(labels) if t != IGNORE), len(ids))
    return ids[:first]


@torch.no_grad()
def target_answers(model, prompts: list[list[int]], stop_ids: set[int], max_new: int, batch: int, device,
                   repetition_penalty: float = 1.0, progress=None) -> list[list[int]]:
    """The target's greedy answers (ids, through its end-of-turn token) to the prompts, under the repetition penalty
    run, chat and serve apply by default (SamplingParams: on the last REPEAT_LAST_N tokens). Prompts of one length
    decode together in one KV cache (a batch shares positions, so no padding or masks), in batches of up to `batch`."""
    from pocketlm.engine.sampling import apply_repetition_penalty

    by_length = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    stops = torch.tensor(sorted(stop_ids), device=device)
    answers: list[list[int]] = [[] for _ in prompts]
    task = progress.add_task("target answers", total=len(prompts)) if progress else None
    for T, members in sorted(by_length.items()):
        for b in range(0, len(members), batch):
            rows = members[b : b + batch]
            model.setup_cache(len(rows), T + max_new)
            ids = torch.tensor([prompts[i] for i in rows], device=device)  # (B, T)
            logits = model(ids, torch.arange(T, device=device))[:, -1]  # (B, V)
            out, done = [], torch.zeros(len(rows), dtype=torch.bool, device=device)
            for step in range(max_new):
                token = apply_repetition_penalty(logits.float(), ids[:, -REPEAT_LAST_N:], repetition_penalty).argmax(-1)  # (B,)
                out.append(token)
                ids = torch.cat([ids, token[:, None]], dim=1)
                done |= torch.isin(token, stops)
                if bool(done.all()) or step == max_new - 1:
                    break
                logits = model(token[:, None], torch.tensor([T + step], device=device))[:, -1]
            for row, seq in zip(rows, torch.stack(out, 1).tolist()):
                end = next((k + 1 for k, t in enumerate(seq) if t in stop_ids), len(seq))
                answers[row] = seq[:end]
            if progress:
                progress.update(task, advance=len(rows))
    model.clear_cache()
    return answers


def frequent_tokens(examples, n_tokens: int, always: list[int]) -> torch.Tensor:
    """The n_tokens ids most often in the examples' labels, plus `always` (end-of-turn tokens)."""
    counts = Counter(t for _, labels in examples for t in labels if t != IGNORE)
    ids = list(dict.fromkeys(t for t in always if t is not None))
    ids += [t for t, _ in counts.most_common() if t not in ids][: max(0, n_tokens - len(ids))]
    return torch.tensor(ids, dtype=torch.long)


def batches(examples, batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by length into batches of at most batch_tokens padded tokens, in random order."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    out, current = [], []
    for i in order:
        if current and (len(current) + 1) * len(examples[i][0]) > batch_tokens:
            out.append(current)
            current = []
        current.append(i)
    out.append(current)
    rng.shuffle(out)
    return out


def batch_tensors(examples, idx: list[int], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (ids, labels) examples at idx, right-padded as fine-tuning pads them -> ids, labels (B, T) on device."""
    batch = collate([Example(*examples[i]) for i in idx], pad_id)
    return batch["ids"].to(device), batch["labels"].to(device)


@torch.no_grad()
def target_view(target, head: DraftHead, ids: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (B, T) -> the target's hidden states (B, T, D), its logits over the head's tokens (B, T, n) and over
    the whole vocabulary's argmax (B, T), fp32."""
    with autocast:
        h = target.hidden(ids)  # (B, T, D)
        full = target.logits(h)  # (B, T, V)
    return h.float(), full[..., head.token_ids].float(), full.argmax(-1)


def unrolled_loss(head: DraftHead, target, ids, labels, h, p_logits, unroll: int):
    """The chained steps' loss, and per step the positions counted and the guesses (for accuracy)."""
    T = ids.size(1)
    wanted = torch.zeros_like(labels, dtype=torch.bool)
    wanted[:, :-1] = labels[:, 1:] != IGNORE  # position p's distribution guesses token p + 1, an answer's
    embedded = target.model.embed_tokens(ids).float().detach()  # (B, T, D)
    n = T - unroll  # start positions t = 0 .. n - 1
    state, total, steps = h[:, :n], 0.0, []
    for j in range(1, unroll + 1):
        state, logits = head.step(state, embedded[:, j : n + j])  # guesses for positions j .. n - 1 + j
        mask = wanted[:, j : n + j]  # (B, n)
        p = F.log_softmax(p_logits[:, j : n + j][mask], dim=-1)  # (N, n_tokens)
        q = F.log_softmax(logits[mask].float(), dim=-1)
        kl = F.kl_div(q, p, log_target=True, reduction="batchmean")
        reg = F.smooth_l1_loss(state[mask], h[:, j : n + j][mask])
        total = total + STEP_DECAY ** (j - 1) * (kl + REG_WEIGHT * reg)
        steps.append((mask, logits.detach()))
    return total, steps


def chained_accuracy(head: DraftHead, steps, argmax, unroll: int) -> list[tuple[int, int]]:
    """Per chained step j: (positions where steps 1..j all guessed the target's greedy token, positions)."""
    n = argmax.size(1) - unroll
    valid = steps[0][0]  # counted where the first guess counts
    alive, out = valid, []
    for j, (_, logits) in enumerate(steps, 1):
        alive = alive & (head.token_ids[logits.argmax(-1)] == argmax[:, j : n + j])  # (B, n)
        out.append((int(alive.sum()), int(valid.sum())))
    return out


def train_draft_head(cfg: DraftTrainConfig) -> dict:
    from pocketlm.finetune.recipe import _log, _plot, _progress, lr_lambda, setup_processes
    from pocketlm.load import load

    procs = setup_processes(cfg)  # the device: auto, cpu or cuda, as fine-tuning chooses it
    device = procs.device
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    lm = load(cfg.target)
    if lm.is_encoder or lm.tokenizer is None or not hasattr(lm.model, "hidden"):
        raise PocketLMError(f"{lm.name}: a draft head needs a generative model (a decoder with a tokenizer)")
    target = lm.model.to(device).eval().requires_grad_(False)
    tok = lm.tokenizer
    examples = encode_rows(tok, cfg.data, cfg.max_len)
    rng.shuffle(examples)
    if cfg.target_answers:
        examples = with_target_answers(target, tok, examples, cfg, device, Path(cfg.out) / "target_answers.jsonl")
        rng.shuffle(examples)
    n_eval = max(1, int(len(examples) * cfg.eval_split)) if len(examples) > 1 else 0
    held_out, train = examples[:n_eval], examples[n_eval:]
    token_ids = frequent_tokens(train, cfg.n_tokens, [tok.eos_id, *sorted(tok.stop_ids)])
    hcfg = DraftHeadConfig(dim=lm.config.dim, hidden_dim=cfg.hidden_dim, n_tokens=len(token_ids),
                           target_vocab_size=lm.config.vocab_size, norm_eps=lm.config.norm_eps)
    head = DraftHead(hcfg)
    with torch.no_grad():
        head.token_ids.copy_(token_ids)
        head.head.weight.copy_(target.lm_head.weight[token_ids].float())  # the target's own head, on its tokens
        head.down.weight.zero_()  # the first step starts as the identity on the state
    head = head.to(device).attach(target)

    pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    per_epoch = len(batches(train, cfg.batch_tokens, random.Random(0)))
    total = max(1, math.ceil(per_epoch * cfg.epochs))
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, cfg.warmup_steps, MIN_LR_RATIO))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, checkpoint = out / "metrics.jsonl", out / "checkpoint.pt"
    step = 0
    if cfg.resume:
        step = resume_from(checkpoint, cfg, head, opt, sched)
        kept = [line for line in metrics_path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step] if metrics_path.exists() else []
        metrics_path.write_text("".join(kept))
    else:
        metrics_path.write_text("")
    orders: dict[int, list[list[int]]] = {}

    def batch_at(i: int) -> list[int]:
        """The i-th training batch: each epoch has its own order from the seed, so a resumed run sees the same."""
        epoch = i // per_epoch
        if epoch not in orders:
            orders.clear()
            orders[epoch] = batches(train, cfg.batch_tokens, random.Random(cfg.seed * 1_000_003 + epoch))
        return orders[epoch][i % per_epoch]

    def evaluate(step: int) -> dict:
        head.eval()
        hits = [[0, 0] for _ in range(cfg.unroll)]
        loss_sum, n = 0.0, 0
        with torch.no_grad():
            for idx in batches(held_out, cfg.batch_tokens, random.Random(0)):
                ids, labels = batch_tensors(held_out, idx, pad_id, device)
                if ids.size(1) <= cfg.unroll + 1:
                    continue
                h, p_logits, argmax = target_view(target, head, ids, autocast)
                loss, steps = unrolled_loss(head, target, ids, labels, h, p_logits, cfg.unroll)
                loss_sum, n = loss_sum + float(loss), n + 1
                for j, (a, b) in enumerate(chained_accuracy(head, steps, argmax, cfg.unroll)):
                    hits[j][0] += a
                    hits[j][1] += b
        head.train()
        acc = [a / max(1, b) for a, b in hits]
        row = {"step": step, "eval_loss": loss_sum / max(1, n), **{f"accept_{j + 1}": round(a, 4) for j, a in enumerate(acc)}}
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    progress = _progress(cfg, procs, total, step, "train-draft")
    head.train()
    seen, start, last = 0, time.perf_counter(), {}
    try:
        while step < total:
            ids, labels = batch_tensors(train, batch_at(step), pad_id, device)
            step += 1
            if ids.size(1) > cfg.unroll + 1:  # else too short to chain unroll steps: the step passes
                h, p_logits, _ = target_view(target, head, ids, autocast)
                with autocast:
                    loss, _ = unrolled_loss(head, target, ids, labels, h, p_logits, cfg.unroll)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                seen += ids.numel()
                with metrics_path.open("a") as f:
                    f.write(json.dumps({"step": step, "loss": round(loss.item(), 5)}) + "\n")
                if progress:
                    progress.update(0, completed=step, loss=loss.item(), tok_s=seen / (time.perf_counter() - start))
            if step % cfg.eval_every == 0 or step == total:
                if held_out:
                    last = evaluate(step)
                    _log(progress, json.dumps(last))
                save_checkpoint(checkpoint, cfg, step, head, opt, sched)
    finally:
        if progress:
            progress.stop()
    save_draft_head(head, out, {"target": lm.name, "data": str(cfg.data), "train": asdict(cfg), "scores": last})
    _plot(metrics_path, out / "loss.png")
    return last


def with_target_answers(target, tok, examples, cfg: DraftTrainConfig, device, path: Path):
    """cfg.target_answers of the examples' prompts with the target's own answers (kept in `path`, and read back from it
    by a later run with the same settings)."""
    prompts = [p for p in (split_prompt(ids, labels) for ids, labels in examples) if 0 < len(p) < cfg.max_len]
    # the most common prompt lengths first: prompts of one length decode as one batch, so N prompts take fewest passes
    rank = {n: r for r, (n, _) in enumerate(Counter(map(len, prompts)).most_common())}
    prompts = sorted(prompts, key=lambda p: rank[len(p)])[: cfg.target_answers]
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if [r["prompt"] for r in rows] == prompts:
            answers = [r["answer"] for r in rows]
        else:
            path.unlink()
    if not path.exists():
        from rich.progress import Progress

        with Progress(disable=cfg.quiet) as progress:
            answers = target_answers(target, prompts, tok.stop_ids, cfg.max_new_tokens, cfg.generate_batch, device,
                                     cfg.repetition_penalty, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers)))
    return [((p + a)[: cfg.max_len], ([IGNORE] * len(p) + a)[: cfg.max_len]) for p, a in zip(prompts, answers) if a]


def save_checkpoint(path: Path, cfg: DraftTrainConfig, step: int, head, opt, sched) -> None:
    """Written whole then renamed: a kill leaves the previous checkpoint."""
    state = {"step": step, "settings": cfg.settings(), "head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def resume_from(path: Path, cfg: DraftTrainConfig, head, opt, sched) -> int:
    """Load OUT/checkpoint.pt into head, optimizer and schedule -> the step it was written at."""
    if not path.exists():
        raise PocketLMError(f"--resume: no checkpoint in {path.parent} (it is written at every evaluation); run without --resume")
    state = torch.load(path, map_location="cpu", weights_only=False)
    theirs, mine = state["settings"], cfg.settings()
    changed = [k for k in mine if theirs.get(k) != mine[k]]
    if changed:
        raise PocketLMError(f"--resume: {path} was written with other settings ({', '.join(f'{k}={theirs.get(k)!r}' for k in changed)}): "
                            "give the same ones, or a new --output")
    head.load_state_dict(state["head"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return int(state["step"])


def save_draft_head(head: DraftHead, out: Path, lineage: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu() for k, v in head.state_dict().items()}
    save_file(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({**head.cfg.to_hf(), "pocketlm": {"lineage": lineage}}, indent=2) + "\n")
