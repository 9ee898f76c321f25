"""`pocketlm distill` for a generative student: the teacher may have another tokenizer, the student may learn from
its own samples, and the teacher's own answers may replace the data's. One script, the loop written out.

    pocketlm distill --teacher ./gemma-b77 --student smollm2-135m-instruct --data train.jsonl -o out/student
    pocketlm distill ... --on-policy 0.5      # half of each batch: the student's own answers, scored by the teacher
    pocketlm distill ... --teacher-answers    # the teacher's greedy answers to the prompts are the targets

The same-tokenizer case without those options (the teacher's next-token distribution on the data, online or from
stored top-k logits, torchrun) and `--task classify` are fine-tuning's loop with a teacher
(pocketlm.finetune.recipe); `distill()` hands them over. What happens here, top to bottom in `run()`:

  1. data: rows split into training and held-out (finetune's seeded split); with --teacher-answers the training
     rows' answers become the teacher's greedy answers to their prompts (sequence-level distillation, Kim and
     Rush 2016), generated once into OUT/teacher_answers.jsonl (pocketlm.compress.rollout.TeacherAnswers)
  2. units: each row in the student's tokens; for a teacher with another tokenizer also in the teacher's, the two
     aligned into chunks by the characters they spell (pocketlm.compress.xtok, approximate likelihood matching)
  3. the loop: a global batch of units per step; with --on-policy FRACTION that share of them (stochastically
     rounded) is replaced by the student's own samples to their prompts (GKD, Agarwal et al. 2024: the student
     writes, the teacher scores every token of it); the teacher reads every unit; the loss is
     distill.DistillLoss (same tokenizer: the whole next-token distribution) or xtok.CrossTokenizerLoss (chunk
     likelihoods), with the data's cross-entropy on the data's units only (a sample has no right answer)
  4. eval, checkpoints and --resume (step k's samples come from a generator seeded by (seed, k): a resumed run
     draws what the uninterrupted run drew), the model folder with its lineage, loss.png
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pocketlm.compress.distill_config import OWN_KEYS, DistillConfig
from pocketlm.errors import PocketLMError
from pocketlm.finetune.data import IGNORE, Example

# ------------------------------------------------------------------------------------------ units


@dataclass
class Unit:
    """A training unit: the student's tokens, and for a teacher of another tokenizer the teacher's tokens of the
    same text with the two aligned (chunk per target position, -1: none)."""

    student: Example
    teacher: Example | None = None
    s_chunk: list[int] | None = None
    t_chunk: list[int] | None = None
    n_chunks: int = 0
    prompt: list[dict] | None = None  # the messages before the answer (None: raw text)
    sampled: bool = False  # the student's own sample (on-policy): no cross-entropy

    @property
    def prompt_ids(self) -> list[int]:
        labels = self.student.labels
        return self.student.ids[: next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))]


def paired(tok, t_tok, prompt, answer: str, seq_len: int, t_len: int, end: bool = True, student=None) -> Unit:
    """A unit of `answer` after `prompt` in both tokenizers, aligned. student: the student's side already made (a sample)."""
    from pocketlm.compress.xtok import align, encode_side

    s = student or encode_side(tok, prompt, answer, seq_len)
    t = encode_side(t_tok, prompt, answer, t_len, end=end)
    s_chunk, t_chunk, n = align(s.spans, t.spans)
    return Unit(s.example(), t.example(), s_chunk, t_chunk, n, prompt, sampled=student is not None)


def text_pieces(tok, text: str, seq_len: int) -> list[str]:
    """Raw text cut where the student's tokens reach seq_len - 2 (room for BOS and EOS), at token boundaries, so both
    tokenizers read the same pieces."""
    enc = tok.backend.encode(text, add_special_tokens=False)
    step = max(1, seq_len - 2)
    return [text[enc.offsets[i][0] : enc.offsets[min(i + step, len(enc.ids)) - 1][1]] for i in range(0, len(enc.ids), step)]


def build_units(cfg: DistillConfig, tok, t_tok, rows, t_len: int) -> list[Unit]:
    """Rows -> units: finetune's examples when the teacher shares the tokenizer (t_tok None), else aligned pairs."""
    from pocketlm.finetune.data import build_examples, row_kind, to_messages

    if t_tok is None:
        return [Unit(e) for e in build_examples(tok, rows, cfg)]
    units = []
    for path, n, row in rows:
        kind = row_kind(row)
        if not kind:
            raise PocketLMError(f"{path}:{n}: unknown row kind (keys {sorted(row)}): see pocketlm finetune --help for the formats")
        if kind == "text":
            units += [paired(tok, t_tok, None, piece, cfg.seq_len, t_len) for piece in text_pieces(tok, str(row["text"]), cfg.seq_len)]
            continue
        messages = to_messages(row, kind, f"{path}:{n}", cfg.template, cfg.system)
        if messages[-1]["role"] != "assistant":
            raise PocketLMError(f"{path}:{n}: the conversation must end with the assistant's answer (the text both models read)")
        units.append(paired(tok, t_tok, messages[:-1], messages[-1]["content"], cfg.seq_len, t_len))
    return units


def with_teacher_answers(cfg: DistillConfig, rows, teacher, out: Path, quiet: bool) -> list:
    """The rows with their answers replaced by the teacher's greedy answers to their prompts (stored, resumable)."""
    from pocketlm.compress.rollout import TeacherAnswers
    from pocketlm.eval.tasks import progress_bar
    from pocketlm.finetune.data import row_kind, to_messages

    conversations = []
    for path, n, row in rows:
        kind = row_kind(row)
        if kind in ("", "text"):
            raise PocketLMError(f"{path}:{n}: --teacher-answers needs prompts: rows of {{messages}}, {{prompt, completion}}, {{text, label}} or Alpaca")
        conversations.append(to_messages(row, kind, f"{path}:{n}", cfg.template, cfg.system))
    prompts = [c[: max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in conversations]  # before the last answer
    with progress_bar("teacher answers", len(prompts), not quiet) as advance:
        answers = TeacherAnswers.open_or_build(out / "teacher_answers.jsonl", cfg.teacher, teacher.model, teacher.tokenizer,
                                               prompts, cfg.teacher_answer_tokens, cfg.generate_batch, advance)
    return [(path, n, {"messages": [*p, {"role": "assistant", "content": a}]}) for (path, n, _), p, a in zip(rows, prompts, answers)]


def with_samples(model, tok, t_tok, units: list[Unit], cfg: DistillConfig, generator, t_len: int) -> list[Unit]:
    """units with a share (cfg.on_policy of them, stochastically rounded) replaced by the student's own samples
    to their prompts; which ones, and the samples, come from `generator`."""
    from pocketlm.compress.rollout import sample
    from pocketlm.compress.xtok import sampled_side

    want = cfg.on_policy * len(units)
    k = int(want) + int(torch.rand((), generator=generator).item() < want - int(want))
    chosen = sorted(torch.randperm(len(units), generator=generator)[:k].tolist())
    if not chosen:
        return units
    answers = sample(model, [units[i].prompt_ids for i in chosen], cfg.on_policy_tokens, cfg.on_policy_temperature,
                     tok.stop_ids, generator)
    out = list(units)
    for i, answer in zip(chosen, answers):
        prompt = units[i].prompt_ids
        if t_tok is None:  # the teacher reads the same tokens
            out[i] = Unit(Example(prompt + answer, [IGNORE] * len(prompt) + answer, None, prompt), sampled=True)
        else:  # the teacher reads the sample's text after the same prompt in its own format
            side, text, ended = sampled_side(tok, prompt, answer, tok.stop_ids)
            out[i] = paired(tok, t_tok, units[i].prompt, text, cfg.seq_len, t_len, end=ended, student=side)
    return out


# ------------------------------------------------------------------------------------------ one micro-batch


def micro_loss(loss_module: nn.Module, teacher, micro: list[Unit], pads: tuple[int, int], temperature: float, device,
               top_k: int = 0, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """The summed loss of a micro-batch of units: the teacher reads them (its own tokens, for another tokenizer).
    top_k, vocab (another tokenizer): the teacher's top_k tokens at each chunk's first position that both sides'
    tokens start alike, mapped to the student's tokens that spell them (xtok.vocab_map)."""
    from pocketlm.compress.distill import OnlineTeacher
    from pocketlm.compress.xtok import chunk_logp, chunk_starts, teacher_reads
    from pocketlm.finetune.data import collate, target_count

    batch = {k: t.to(device) for k, t in collate([u.student for u in micro], pads[0]).items()}  # ids, labels (B, T)
    ce_mask = torch.tensor([not u.sampled for u in micro for _ in range(target_count(u.student))], dtype=torch.bool, device=device)  # (N,)
    if micro[0].teacher is None:  # the same tokenizer: the teacher's whole next-token distribution at each target
        teacher_logp = OnlineTeacher(teacher, temperature).targets(batch, [])["teacher_logp"]  # (N, V)
        return loss_module(batch["ids"], batch["labels"], batch["lengths"], teacher_logp, ce_mask=ce_mask)
    t_batch = {k: t.to(device) for k, t in collate([u.teacher for u in micro], pads[1]).items()}
    # the micro-batch's chunks numbered one after another, unit by unit; target positions likewise
    base, s_base, t_base = [0], [0], [0]
    for u in micro:
        base.append(base[-1] + u.n_chunks)
        s_base.append(s_base[-1] + len(u.s_chunk))
        t_base.append(t_base[-1] + len(u.t_chunk))
    s_chunk = torch.tensor([c + b if c >= 0 else -1 for u, b in zip(micro, base) for c in u.s_chunk], device=device)  # (N,)
    t_chunk = torch.tensor([c + b if c >= 0 else -1 for u, b in zip(micro, base) for c in u.t_chunk], device=device)  # (N_t,)
    starts = []  # each chunk's first target on both sides, where both tokenizations start it with the same bytes
    for u, sb, tb in zip(micro, s_base, t_base) if top_k and vocab is not None else ():
        s_targets, t_targets = learned(u.student), learned(u.teacher)
        for s, t in zip(chunk_starts(u.s_chunk, u.n_chunks), chunk_starts(u.t_chunk, u.n_chunks)):
            if s >= 0 and t >= 0 and int(vocab[t_targets[t]]) == s_targets[s]:
                starts.append((s + sb, t + tb))
    s_starts = torch.tensor([s for s, _ in starts], dtype=torch.long, device=device)  # (S,)
    t_starts = torch.tensor([t for _, t in starts], dtype=torch.long, device=device)  # (S,)
    with torch.no_grad():
        token_logp, top, top_ids = teacher_reads(teacher, t_batch["ids"], t_batch["labels"], temperature, t_starts, top_k)
        teacher_chunks = chunk_logp(token_logp, t_chunk, base[-1])  # (C,)
    mapped = vocab.to(device)[top_ids] if top is not None else None  # (S, k) student ids, -1: spelled by none
    return loss_module(batch["ids"], batch["labels"], batch["lengths"], ce_mask, s_chunk, teacher_chunks, s_starts, top, mapped)


def learned(example) -> list[int]:
    """An example's target tokens, in target order (position t predicts t + 1)."""
    from pocketlm.finetune.data import IGNORE

    return [label for label in example.labels[1:] if label != IGNORE]


# ------------------------------------------------------------------------------------------ the recipe


def distill(cfg: DistillConfig) -> dict:
    """`pocketlm distill`: this recipe's loop where it is needed, fine-tuning's with a teacher otherwise."""
    from pocketlm.finetune.recipe import finetune

    if not cfg.teacher:
        raise PocketLMError("distill needs a teacher: --teacher MODEL")
    if cfg.task == "classify" or (not cfg.on_policy and not cfg.teacher_answers and same_tokenizer(cfg.model, cfg.teacher)):
        return finetune(cfg)
    return run(cfg)


def same_tokenizer(student: str, teacher: str) -> bool:
    from pocketlm.load import model_folder
    from pocketlm.tokenizer import Tokenizer

    folders = [model_folder(ref)[2] for ref in (student, teacher)]
    if not all((f / "tokenizer.json").exists() for f in folders):
        return True  # the loader says what is missing
    a, b = (Tokenizer.from_hf_dir(f) for f in folders)
    return a.same_vocabulary(b)


def run(cfg: DistillConfig) -> dict:
    from pocketlm.compress.distill import DistillLoss
    from pocketlm.compress.xtok import CrossTokenizerLoss, vocab_map
    from pocketlm.finetune import checkpoint
    from pocketlm.finetune.data import build_examples, read_jsonl, stream_indices, target_count
    from pocketlm.finetune.lora import apply_lora, enable_grad_checkpointing, merge, save_adapter, trainable_state, unwrap
    from pocketlm.finetune.recipe import (
        CausalLMLoss, _evaluate, _log, _plot, _progress, _publish_model, _read_lines, load_base, lora_method,
        optimizer_and_schedule, setup_processes,
    )
    from pocketlm.load import load

    if not cfg.model or not cfg.data or not cfg.out:
        raise PocketLMError("distill needs --student, --teacher, --data FILE.jsonl and -o OUT_DIR (or the same keys in --config)")
    procs = setup_processes(cfg)
    refused = [(procs.world > 1, "runs in one process (no torchrun)"), (cfg.pack, "reads each example alone (no --pack)"),
               (cfg.teacher_logits, "needs the teacher online (no --teacher-logits)"), (cfg.hidden_weight, "aligns no hidden states")]
    for bad, why in refused:
        if bad:
            raise PocketLMError(f"distillation with --on-policy, --teacher-answers or a teacher of another tokenizer {why}")
    out = Path(cfg.out).expanduser()
    torch.manual_seed(cfg.seed)
    device = procs.device

    # ---- 1. data, and the two models
    rows = read_jsonl(cfg.data)
    eval_rows = read_jsonl(cfg.eval_data) if cfg.eval_data else []
    if not cfg.eval_data and cfg.eval_split > 0:  # finetune's seeded split: the same held-out rows as its runs
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + 1)).tolist()
        n_eval = max(1, int(len(rows) * cfg.eval_split))
        eval_rows, rows = [rows[i] for i in sorted(order[:n_eval])], [rows[i] for i in sorted(order[n_eval:])]
    lm, teacher = load_base(cfg), load(cfg.teacher)  # the student in float, or quantized under LoRA (--quant: QLoRA)
    for side in (lm, teacher):
        if side.is_encoder or side.tokenizer is None:
            raise PocketLMError(f"{side.name} cannot be distilled to or from: it is not a generative model with a tokenizer")
    model, tok = lm.model, lm.tokenizer
    with torch.no_grad():
        for p in model.parameters():  # off the read-only memory map: the optimizer writes them in place
            p.data = p.data.clone()
    model.train()
    cross = not tok.same_vocabulary(teacher.tokenizer)
    if not cross and teacher.config.vocab_size != lm.config.vocab_size:
        raise PocketLMError(f"the teacher's output has {teacher.config.vocab_size} tokens and the student's {lm.config.vocab_size}")
    teacher.model.to(device).eval().requires_grad_(False)
    t_tok, t_len = (teacher.tokenizer if cross else None), teacher.context_length
    vocab = vocab_map(teacher.tokenizer, tok, teacher.config.vocab_size) if cross and cfg.xtok_top_k else None  # teacher id -> student id spelling it
    pad_id = next(i for i in (tok.pad_id, tok.eos_id, 0) if i is not None)
    t_pad = next(i for i in (teacher.tokenizer.pad_id, teacher.tokenizer.eos_id, 0) if i is not None)
    if cfg.teacher_answers:
        rows = with_teacher_answers(cfg, rows, teacher, out, cfg.quiet)

    # ---- 2. units
    units = build_units(cfg, tok, t_tok, rows, t_len)
    if cfg.on_policy and any(not u.prompt_ids for u in units):
        raise PocketLMError("--on-policy needs prompts for the student to answer: rows of {messages}, {prompt, completion}, "
                            "{text, label} or Alpaca, not raw text")
    eval_examples = build_examples(tok, eval_rows, cfg)
    if len(eval_examples) > cfg.eval_max:  # finetune's seeded sample
        keep = torch.randperm(len(eval_examples), generator=torch.Generator().manual_seed(cfg.seed + 3))[: cfg.eval_max]
        eval_examples = [eval_examples[i] for i in sorted(keep.tolist())]
    unit_lengths = [len(u.student.ids) for u in units] if cfg.group_by_length else None
    if not units or sum(target_count(u.student) for u in units) == 0:
        raise PocketLMError(f"{cfg.data}: no tokens to learn (every answer cut off by --seq-len {cfg.seq_len}?)")
    global_batch = cfg.batch_size * cfg.grad_accum
    total_steps = cfg.steps or math.ceil(cfg.epochs * len(units) / global_batch)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)

    # ---- what trains
    if cfg.freeze_embeddings:
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    peft_model = None
    if cfg.lora:
        peft_model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, base_name=cfg.model)
        model = unwrap(peft_model)
    if cfg.grad_checkpoint:
        enable_grad_checkpointing(model)
    if cross:
        loss_module = CrossTokenizerLoss(model, cfg.kd_loss, cfg.kd_temperature, cfg.kd_weight)
    else:
        loss_module = DistillLoss(model, cfg.kd_loss, cfg.kd_temperature, cfg.kd_weight)
    loss_module.to(device)
    eval_loss = CausalLMLoss(model)  # held out: the student's own cross-entropy on the data
    params = {name: p for name, p in loss_module.named_parameters() if p.requires_grad}
    optimizer, scheduler = optimizer_and_schedule(params, cfg, total_steps, warmup)
    step, metrics_path = 0, out / "metrics.jsonl"
    if cfg.resume:
        found = checkpoint.latest(out)
        if found is None:
            raise PocketLMError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        saved = json.loads((found / "state.json").read_text()).get("config", {})
        changed = [k for k in OWN_KEYS if saved.get(k) != getattr(cfg, k)]
        if changed:
            raise PocketLMError(f"--resume: {found} was made with other settings ({', '.join(changed)}); use the same ones")
        state = checkpoint.load(found, params, optimizer, scheduler, cfg.to_dict(), 1)
        step = state["step"]
        metrics_path.write_text("".join(line for line in _read_lines(metrics_path) if json.loads(line)["step"] <= step))
    else:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        metrics_path.write_text("")

    progress = _progress(cfg, procs, total_steps, step, "distill")
    kind = ("cross-tokenizer (aligned chunks)" if cross else "same tokenizer") + (f", on-policy {cfg.on_policy:g}" if cfg.on_policy else "")
    _log(progress, f"{lm.name} <- {teacher.name}, {kind}: {len(units)} examples, {len(eval_examples)} held out; "
         f"{total_steps} steps x batch {global_batch}; training {sum(p.numel() for p in params.values()) / 1e6:.2f}M parameters")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    last_loss, last_eval, tokens_seen, t_start, first_step = None, {}, 0, time.perf_counter(), step

    # ---- 3. the loop
    while step < total_steps:
        t0 = time.perf_counter()
        positions = stream_indices(len(units), step * global_batch, global_batch, cfg.seed, unit_lengths, global_batch)
        batch_units = [units[i] for i in positions]
        if cfg.on_policy:  # the student answers part of the batch's prompts itself (seeded by the step: --resume)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            batch_units = with_samples(model, tok, t_tok, batch_units, cfg, generator, t_len)
        n_targets = max(1, sum(target_count(u.student) for u in batch_units))  # known before any backward: a global mean
        loss_sum, tokens = 0.0, 0
        for k in range(cfg.grad_accum):
            micro = batch_units[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            with autocast:
                loss = micro_loss(loss_module, teacher.model, micro, (pad_id, t_pad), cfg.kd_temperature, device, cfg.xtok_top_k, vocab)
            (loss / n_targets).backward()
            loss_sum += loss.item()
            tokens += sum(len(u.student.ids) for u in micro)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss, tokens_seen = loss_sum / n_targets, tokens_seen + tokens
        tok_s = tokens / (time.perf_counter() - t0)
        row = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens, "tok_s": round(tok_s, 1),
               "sampled": sum(u.sampled for u in batch_units)}
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if progress is not None:
            progress.update(progress.task_ids[0], completed=step, loss=last_loss, tok_s=tok_s)
            if not progress.console.is_terminal and step % max(1, cfg.log_every) == 0:
                eta = (time.perf_counter() - t_start) / (step - first_step) * (total_steps - step)
                progress.console.print(f"step {step}/{total_steps} loss {last_loss:.4f} {tok_s:.0f} tok/s ETA {eta / 60:.1f} min")

        # ---- 4. eval and checkpoint
        if eval_examples and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            last_eval = _evaluate(cfg, procs, eval_loss, model, tok, eval_examples, pad_id, target_count, step, metrics_path, progress)
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            state = {"config": cfg.to_dict(), "global_batch": global_batch, "total_steps": total_steps,
                     "data_position": step * global_batch, "world_size": 1}
            checkpoint.save(out, step, trainable_state(loss_module), optimizer, scheduler, state, cfg.keep_checkpoints)
        if cfg.stop_after and step >= cfg.stop_after:  # tests: leave as a kill right after this checkpoint would
            if progress is not None:
                progress.stop()
            return {"step": step, "loss": last_loss, "stopped": True}

    if eval_examples:
        last_eval = _evaluate(cfg, procs, eval_loss, model, tok, eval_examples, pad_id, target_count, step, metrics_path, progress)
    if progress is not None:
        progress.stop()

    # ---- outputs
    summary = {"steps": step, "final_loss": last_loss, "eval": last_eval, "out": str(out),
               "train_s": round(time.perf_counter() - t_start, 1), "tokens": tokens_seen}
    lineage = {
        "base_model": cfg.model, "base": {k: v for k, v in lm.meta.items() if k != "runtime_quant"},
        "data": str(Path(cfg.data).expanduser().resolve()),
        "recipe": {"name": "distill", "task": cfg.task, "method": lora_method(cfg, lm),
                   "cross_tokenizer": cross,
                   **{k: v for k, v in cfg.to_dict().items() if k in checkpoint.MUST_MATCH or k in OWN_KEYS or k in (
                       "batch_size", "grad_accum", "steps", "epochs", "bf16", "merge")}},
        "steps": step, "global_batch": global_batch, "world_size": 1, "final_loss": last_loss, "eval": last_eval, "quant": None,
    }
    if peft_model is not None:
        save_adapter(peft_model, out / "adapter")
    write_model = not cfg.lora or cfg.merge
    if write_model:
        hf_config = lm.config.to_hf()
        hf_config["pocketlm"] = lineage
        _publish_model(out, hf_config, (merge(peft_model) if peft_model is not None else model).state_dict(), tok)
    (out / "finetune.json").write_text(json.dumps({**summary, "lineage": lineage}, indent=2))
    _plot(metrics_path, out / "loss.png")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    summary["model_written"] = write_model
    return summary
