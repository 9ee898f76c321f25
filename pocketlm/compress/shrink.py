"""`pocketlm shrink`: one command from a teacher and its data to a smaller, faster student, measured against the
teacher on held-out data, exported, and served if asked.

    pocketlm shrink --teacher out/b77-head --data banking77/train.jsonl --eval-data banking77/test.jsonl -o out/b77-small
    pocketlm shrink --config recipes/shrink-banking77.yaml -o out/b77-small

The recipe is the list STAGES, run in order by the loop in `shrink()`. Each stage writes into its own folder,
OUT/stages/NN-name/, and ends by writing stage.json there: its results and a fingerprint of what it read (the
settings it uses, chained with the stages before it). A rerun keeps every stage whose stage.json matches, so a
killed or repeated command goes on at the stage it stopped in (a distillation killed mid-way resumes from its
last checkpoint); a changed setting redoes its stage and the ones after it.

  1 split      D -> train.jsonl and held_out.jsonl (seeded; or --eval-data), calib.txt (training text)
  2 teacher    the teacher on the held-out split: the task's metric (accuracy; for a generator without labels the
               answers' perplexity), its size, a classifier's label distributions
  3 prune      the teacher's blocks of least influence on calib.txt dropped (ShortGPT, pocketlm.compress.prune)
               until the non-embedding parameters are at most --size of the teacher's, or with --speed until the
               student, quantized as it will be, measures that many times the teacher's speed (a bisection)
  4 distill    the pruned student learns the teacher (pocketlm distill: a classifier's label distribution, a
               generator's next-token distribution stored as top-k)
  5 quantize   weight-only int4/int8 calibrated on the training text, GPTQ by default (--method gptq|awq, through
               pocketlm.quant.calibrate: `calibrated_quantization` is the one place it plugs in), or --method rtn,
               round-to-nearest (pocketlm quantize)
  6 evaluate   the student as the teacher was, KL and top-1 agreement with the teacher, and both models' speed,
               timed in turn (--speed-rounds, the median; this machine's load moves single timings by 25%)
  7 report     report.md, first line "X% of the teacher's quality kept, at Y% of its size and Z times its speed",
               plots, results.json (copied to OUT/)
  8 export     a Hugging Face folder and a GGUF file of the distilled student
then OUT/student links to the quantized student, and --serve serves it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pocketlm.compress.shrink_config import DISTILL_DEFAULTS, ShrinkConfig
from pocketlm.errors import PocketLMError

STOP_ENV = "POCKETLM_SHRINK_STOP"  # tests: "prune" stops after that stage; "distill:2" after distillation step 2, as a kill
CALIB_ROWS = 4000  # training texts written to calib.txt (the pruning reads its first calib_tokens)
SPEED_TEXTS = 512  # held-out texts a classifier labels per timed round


class Stopped(PocketLMError):
    """The run left where STOP_ENV said, as a kill would."""


@dataclass
class Run:
    cfg: ShrinkConfig
    out: Path
    results: dict  # stage name -> its results (stage.json's "results")
    display: Display

    def __getitem__(self, stage: str) -> dict:
        return self.results[stage]

    @property
    def classifier(self) -> bool:
        return self.results["split"]["task"] == "classify"

    @property
    def speed_key(self) -> str:
        """The speed the report's headline (and --speed) compares: texts labelled or tokens decoded per second."""
        return "classify.texts_per_s" if self.classifier else "decode_tok_s"


# ------------------------------------------------------------------------------------------ 1 split


def split(run: Run, folder: Path) -> dict:
    from pocketlm.finetune.data import read_jsonl

    cfg = run.cfg
    rows = [r for _, _, r in read_jsonl(cfg.data)]
    task = cfg.task if cfg.task != "auto" else ("classify" if is_classifier(cfg.teacher) else "sft")
    if task == "classify" and not is_classifier(cfg.teacher):
        raise PocketLMError(f"{cfg.teacher} has no classification head: shrink it with task sft, or train one with finetune --task classify")
    if cfg.serve and task == "classify":
        raise PocketLMError("--serve serves generative models; label texts with the student through `pocketlm classify`")
    if cfg.eval_data:
        train, held = rows, [r for _, _, r in read_jsonl(cfg.eval_data)]
    else:  # seeded: the same held-out rows on every rerun
        order = list(range(len(rows)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, int(len(rows) * cfg.eval_split))
        held, train = [rows[i] for i in sorted(order[:n_eval])], [rows[i] for i in sorted(order[n_eval:])]
    if task == "classify":
        for name, part in (("data", train), ("held-out data", held)):
            if any("text" not in r or "label" not in r for r in part):
                raise PocketLMError(f"{name}: a classifier learns from {{text, label}} rows")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.jsonl" for name in ("train", "held_out")}
    for name, part in (("train", train), ("held_out", held)):
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    texts = [str(r["text"]) if task == "classify" else row_text(r) for r in train]  # what the teacher reads
    random.Random(cfg.seed).shuffle(texts)
    (folder / "calib.txt").write_text("\n".join(texts[:CALIB_ROWS]) + "\n", encoding="utf-8")
    (folder / "held_out.txt").write_text("\n\n".join(row_text(r) for r in held) + "\n", encoding="utf-8")
    run.display.log(f"split: {len(train)} training rows, {len(held)} held out ({task})")
    return {"task": task, "prompt": teacher_prompt(cfg.teacher, task), "train": str(paths["train"]),
            "held_out": str(paths["held_out"]), "calib": str(folder / "calib.txt"), "held_out_text": str(folder / "held_out.txt"),
            "n_train": len(train), "n_held_out": len(held), "labelled": all("text" in r and "label" in r for r in held)}


def teacher_prompt(ref: str, task: str) -> dict:
    """How the teacher was asked during its fine-tuning ({"template", "system"}, from its head's config or its
    lineage): the student is distilled and both are evaluated with the same prompt."""
    from pocketlm.finetune.classify import HEAD_DIR
    from pocketlm.load import model_folder, read_config

    folder = model_folder(ref)[2]
    if task == "classify":
        return {"template": json.loads((folder / HEAD_DIR / "config.json").read_text()).get("template", "{text}")}
    recipe = read_config(folder).get("pocketlm", {}).get("recipe") or {}
    return {k: recipe[k] for k in ("template", "system") if recipe.get(k)}


def is_classifier(ref: str) -> bool:
    from pocketlm.finetune.classify import HEAD_DIR
    from pocketlm.load import model_folder

    return (model_folder(ref)[2] / HEAD_DIR / "config.json").is_file()


def row_text(row: dict) -> str:
    """A row's text as plain text: what calibration and the held-out perplexity read."""
    if "messages" in row:
        return "\n".join(str(m.get("content", "")) for m in row["messages"])
    keys = [k for k in ("instruction", "input", "prompt", "text", "completion", "output", "label") if row.get(k)]
    return "\n".join(str(row[k]) for k in keys)


# ------------------------------------------------------------------------------------------ 2 teacher, 6 evaluate


def quality(run: Run, ref: str, folder: Path) -> dict:
    """A model's held-out quality: a classifier's accuracy and macro-F1 by its head (its label logits kept in
    folder/logits.safetensors for the agreement); a generator's accuracy by greedy answers for {text, label} rows,
    else the perplexity of the held-out answers. Plus its size (compare.model_size)."""
    from pocketlm.eval.compare import model_size
    from pocketlm.eval.tasks import EvalConfig, evaluate, prepare

    cfg, split_ = run.cfg, run["split"]
    out = model_size(ref)
    if run.classifier:
        from safetensors.torch import save_file

        from pocketlm.eval.tasks import classification_result
        from pocketlm.finetune.classify import Classifier

        prepared = prepare(EvalConfig(task="classify", data=split_["held_out"], limit=cfg.eval_limit, seed=cfg.seed, by="head"))
        texts, truth = [str(r["text"]) for r in prepared.records], [str(r["label"]) for r in prepared.records]
        clf = Classifier.load(ref)
        run.display.stage_total(len(texts))
        logits = clf.logits(texts, on_progress=run.display.advance)  # (N, C)
        predicted = [clf.labels[i] for i in logits.argmax(-1).tolist()]
        result = classification_result(prepared.spec, ref, truth, predicted, sorted(set(clf.labels)), [])
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"logits": logits.contiguous()}, folder / "logits.safetensors", metadata={"labels": json.dumps(clf.labels)})
        out.update({f"classify.{k}": v for k, v in result.metrics.items()}, logits=str(folder / "logits.safetensors"))
        return out
    settings = {**DISTILL_DEFAULTS["sft"], **split_["prompt"], **cfg.distill}
    if split_["labelled"]:  # {text, label} rows: answered by greedy generation, as `pocketlm eval --by generate`
        result = evaluate(ref, EvalConfig(task="classify", data=split_["held_out"], limit=cfg.eval_limit, seed=cfg.seed, by="generate",
                                          template=settings.get("template"), system=settings.get("system"), progress=False))
        out.update({f"classify.{k}": v for k, v in result.metrics.items()})
    else:
        out["answer_perplexity"] = answer_perplexity(ref, split_["held_out"], settings, cfg.eval_limit, cfg.seed)
    return out


def answer_perplexity(ref: str, path: str, settings: dict, limit: int | None, seed: int) -> float:
    """exp(mean NLL) of the held-out answers' tokens (what distillation learns), in the model's chat format."""
    import torch

    from pocketlm.finetune.config import FinetuneConfig
    from pocketlm.finetune.data import build_examples, collate, read_jsonl, target_count
    from pocketlm.finetune.recipe import CausalLMLoss
    from pocketlm.load import load

    lm = load(ref)
    rows = read_jsonl(path)
    if limit is not None and limit < len(rows):
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]
    keys = ("template", "system", "seq_len")
    examples = build_examples(lm.tokenizer, rows, FinetuneConfig(**{k: settings[k] for k in keys if k in settings}))
    pad = next(i for i in (lm.tokenizer.pad_id, lm.tokenizer.eos_id, 0) if i is not None)
    loss, n = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(examples), 8):
            batch = collate(examples[b : b + 8], pad)
            loss += CausalLMLoss(lm.model)(batch["ids"], batch["labels"], batch["lengths"]).item()
            n += sum(target_count(e) for e in examples[b : b + 8])
    return math.exp(loss / max(1, n))


def brief(side: dict) -> str:
    if "classify.accuracy" in side:
        return f"accuracy {side['classify.accuracy']:.2%}"
    return f"held-out answers' perplexity {side['answer_perplexity']:.3f}"


def measure_teacher(run: Run, folder: Path) -> dict:
    side = quality(run, run.cfg.teacher, folder)
    run.display.log(f"teacher: {side['non_embedding_params']:.1f}M non-embedding parameters, {brief(side)}")
    return side


def evaluate_student(run: Run, folder: Path) -> dict:
    """The student as the teacher was measured, its agreement with the teacher, and both timed in turn."""
    cfg = run.cfg
    student = run["quantize"]["model"]
    side = quality(run, student, folder)
    agreement = label_agreement(run, folder) if run.classifier else token_agreement(run, student, folder)
    run.display.stage_total(cfg.speed_rounds * 2)
    speed = timed_in_turn(run, cfg.teacher, student, on_round=run.display.advance)
    run.display.log(f"student: {side['non_embedding_params']:.1f}M non-embedding parameters, {brief(side)}; KL(teacher || student) "
                    f"{agreement['kl_mean']:.4f}, top-1 agreement {agreement['top1_agreement']:.1%}")
    return {"student": side, "agreement": agreement, "speed": speed}


def label_agreement(run: Run, folder: Path) -> dict:
    """KL(teacher || student) of the label distributions and how often the top labels agree, on the held-out texts."""
    import torch
    from safetensors import safe_open

    from pocketlm.compress.distill import divergence

    def read(path):
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("logits"), json.loads(f.metadata()["labels"])

    (t_logits, t_labels), (s_logits, s_labels) = read(Path(run["teacher"]["logits"])), read(folder / "logits.safetensors")
    columns = torch.tensor([t_labels.index(label) for label in s_labels])  # the teacher's columns in the student's order
    logp, logq = t_logits[:, columns].log_softmax(-1), s_logits.log_softmax(-1)
    kl = divergence("forward_kl", logp, logq).clamp_min(0)  # (N,)
    (folder / "kl.json").write_text(json.dumps(kl.tolist()))
    return {"kl_mean": kl.mean().item(), "kl_median": kl.median().item(), "kl_p99": torch.quantile(kl, 0.99).item(),
            "top1_agreement": (logp.argmax(-1) == logq.argmax(-1)).float().mean().item(), "n": len(kl), "unit": "text"}


def token_agreement(run: Run, student: str, folder: Path) -> dict:
    """compare's text agreement on the held-out rows as text: KL and top-1 of next-token distributions, perplexities."""
    from pocketlm.eval.compare import text_agreement

    result = text_agreement(run.cfg.teacher, student, run["split"]["held_out_text"], run.cfg.agreement_tokens, progress=False)
    (folder / "kl.json").write_text(json.dumps(result.distributions["KL(reference || model) per token"]))
    m = result.metrics
    return {"kl_mean": m["kl_mean"], "kl_median": m["kl_median"], "kl_p99": m["kl_p99"], "top1_agreement": m["top1_agreement"],
            "teacher_perplexity": m["reference_perplexity"], "student_perplexity": m["perplexity"], "n": result.n,
            "unit": "token"}


def timed_in_turn(run: Run, teacher: str, student: str, bench: bool | None = None, n_texts: int = SPEED_TEXTS,
                  on_round=None) -> dict:
    """{"teacher": {...}, "student": {...}}: each metric the median of speed_rounds rounds, teacher then student in
    each. A classifier's texts/s labelling held-out texts (batches of 32 of about one length, as `pocketlm classify`);
    with bench, `pocketlm bench` of each (decode and prompt tokens/s, peak memory; --quant auto: the student runs
    its int4/int8 weights), each in its own process, as `pocketlm compare` measures them."""
    from pocketlm.eval.compare import measure

    cfg = run.cfg
    bench = cfg.bench if bench is None else bench
    rounds: dict[str, list[dict]] = {"teacher": [], "student": []}
    texts, models = [], {}
    if run.classifier:
        from pocketlm.finetune.classify import Classifier
        from pocketlm.finetune.data import read_jsonl

        texts = [str(r["text"]) for _, _, r in read_jsonl(run["split"]["held_out"])][:n_texts]
        models = {"teacher": Classifier.load(teacher), "student": Classifier.load(student)}
        for clf in models.values():
            clf.logits(texts[:32])  # warm-up: first calls pay for allocation and kernel set-up
    for _ in range(cfg.speed_rounds):
        for side, ref in (("teacher", teacher), ("student", student)):
            row = measure(ref, speed=True) if bench else {}
            if models:
                start = time.perf_counter()
                models[side].logits(texts)
                row["classify.texts_per_s"] = len(texts) / (time.perf_counter() - start)
            rounds[side].append(row)
            if on_round is not None:
                on_round()
    return {side: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for side, rows in rounds.items()}


# ------------------------------------------------------------------------------------------ 3 prune


def prune(run: Run, folder: Path) -> dict:
    from pocketlm.compress.prune import PruneSpec, calibration_importance, read_text
    from pocketlm.compress.prune import prune as prune_model
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.load import load

    cfg = run.cfg
    lm = load(cfg.teacher)
    importance = calibration_importance(lm, read_text(run["split"]["calib"], "calibration"), cfg.calib_tokens)
    measured = {}
    if cfg.speed is None:
        n_drop = blocks_to_drop(lm, cfg.size)
    else:
        n_drop, measured = blocks_for_speed(run, lm, importance, folder / "speed")
    hf_config, sd, tokenizer, report = prune_model(lm, PruneSpec(drop_layers=n_drop), calib_tokens=cfg.calib_tokens, importance=importance)
    write_model_folder(folder / "model", hf_config, sd, tokenizer)
    before, after = report["params_before"], report["params_after"]
    run.display.log(f"prune: {lm.config.n_layers} -> {lm.config.n_layers - n_drop} blocks, non-embedding parameters "
                    f"{before['non_embedding'] / 1e6:.1f}M -> {after['non_embedding'] / 1e6:.1f}M")
    return {"model": str(folder / "model"), "drop_layers": n_drop, "layers": lm.config.n_layers - n_drop, **report,
            **({"speed_target": cfg.speed, "speed_by_drop": measured} if measured else {})}


def blocks_to_drop(lm, size: float) -> int:
    """The fewest whole blocks whose removal leaves at most `size` of the non-embedding parameters."""
    from pocketlm.compress.prune import Names, count_params

    sd, names = lm.model.state_dict(), Names.of(lm.model)  # model.layers.0. / GPT-2's transformer.h.0.
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    non_embedding = count_params(sd, tied, names.embedding_keys)["non_embedding"]
    per_block = sum(t.numel() for k, t in sd.items() if k.startswith(f"{names.blocks}.0."))
    n = math.ceil(((1 - size) * non_embedding) / per_block - 1e-9)
    if n >= lm.config.n_layers:
        raise PocketLMError(f"--size {size}: the teacher's {lm.config.n_layers} blocks hold {per_block * lm.config.n_layers / non_embedding:.0%} "
                            "of its non-embedding parameters; keeping one block is the smallest student")
    return n


def blocks_for_speed(run: Run, lm, importance, folder: Path) -> tuple[int, dict[int, float]]:
    """The fewest blocks to drop for a student cfg.speed times the teacher's speed, and {blocks dropped: speed} as
    measured. Each try is the teacher without its least influential blocks, quantized as the student will be
    (round-to-nearest: GPTQ's weights run on the same kernels), timed in turn with the teacher (student_speed).
    The speed grows with the blocks dropped, so a bisection finds the count in about log2(blocks) tries."""
    cfg, n_layers = run.cfg, lm.config.n_layers
    measured: dict[int, float] = {}

    def reaches(n_drop: int) -> bool:
        measured[n_drop] = student_speed(run, lm, importance, n_drop, folder)
        shutil.rmtree(folder, ignore_errors=True)  # a try's weights: the teacher's size again, at 1-8B gigabytes
        run.display.log(f"prune: {n_layers - n_drop} of {n_layers} blocks, {cfg.quant}: {measured[n_drop]:.2f}x the teacher's speed "
                        f"(target {cfg.speed:g}x)")
        run.display.advance()
        return measured[n_drop] >= cfg.speed

    run.display.stage_total(math.ceil(math.log2(n_layers)) + 1)
    low, high = 0, n_layers - 1  # the answer lies in [low, high] once `high` reaches the target
    if not reaches(high):
        raise PocketLMError(f"--speed {cfg.speed:g}x: one block of {n_layers}, {cfg.quant}, measures {measured[high]:.2f}x the teacher's "
                            "speed on this machine; ask for less")
    while low < high:
        mid = (low + high) // 2
        if reaches(mid):
            high = mid
        else:
            low = mid + 1
    return high, {k: round(v, 3) for k, v in sorted(measured.items())}


def student_speed(run: Run, lm, importance, n_drop: int, folder: Path) -> float:
    """A student without lm's n_drop least influential blocks, quantized round-to-nearest as cfg.quant says, over
    the teacher, in the report's measure (timed_in_turn): texts/s for a classifier, decode tokens/s for a generator."""
    from pocketlm.compress.prune import PruneSpec
    from pocketlm.compress.prune import prune as prune_model
    from pocketlm.finetune.classify import HEAD_DIR
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.load import load
    from pocketlm.quant import QuantScheme, write_quantized

    hf_config, sd, tokenizer, _ = prune_model(lm, PruneSpec(drop_layers=n_drop), importance=importance)
    write_model_folder(folder / "float", hf_config, sd, tokenizer)
    student = folder / "float"
    if run.cfg.quant != "none":
        student = folder / "model"
        write_quantized(load(str(folder / "float"), quant="none"), QuantScheme.parse(run.cfg.quant), student)
    if (lm.path / HEAD_DIR).is_dir():  # a classifier: the teacher's head reads the last hidden state as before
        shutil.copytree(lm.path / HEAD_DIR, student / HEAD_DIR, dirs_exist_ok=True)
    speed = timed_in_turn(run, run.cfg.teacher, str(student), bench=not run.classifier, n_texts=SPEED_TEXTS // 4)
    return speed["student"][run.speed_key] / speed["teacher"][run.speed_key]


# ------------------------------------------------------------------------------------------ 4 distill


def distill(run: Run, folder: Path) -> dict:
    from pocketlm.compress.distill_config import DistillConfig
    from pocketlm.compress.distill_recipe import distill as run_distill
    from pocketlm.finetune import checkpoint

    cfg, split_ = run.cfg, run["split"]
    task = split_["task"]
    settings = {"eval_every": 0, "eval_max": 200, "seed": cfg.seed, **DISTILL_DEFAULTS[task], **split_["prompt"], **cfg.distill}
    if task == "classify" or not (settings.get("on_policy") or settings.get("teacher_answers")):
        settings.setdefault("teacher_logits", str(folder / "teacher-logits"))  # the teacher's targets, computed once
    model_dir = folder / "model"
    stop = os.environ.get(STOP_ENV, "")
    dc = DistillConfig(model=run["prune"]["model"], teacher=cfg.teacher, data=split_["train"], eval_data=split_["held_out"],
                       out=str(model_dir), task=task, quiet=True, resume=checkpoint.latest(model_dir) is not None,
                       stop_after=int(stop.split(":")[1]) if stop.startswith("distill:") else 0, **settings)
    total = dc.steps or math.ceil(dc.epochs * split_["n_train"] / (dc.batch_size * dc.grad_accum))
    run.display.stage_total(total)
    if dc.resume:
        run.display.log(f"distill: resuming from {checkpoint.latest(model_dir).name}")
    with watch_steps(model_dir / "metrics.jsonl", run.display):
        summary = run_distill(dc)
    if summary.get("stopped"):
        raise Stopped(f"stopped after distillation step {summary['step']} ({STOP_ENV}={stop}); run the command again to go on")
    held_out = ", ".join(f"{k} {v:.4f}" for k, v in (summary.get("eval") or {}).items() if k != "step")
    run.display.log(f"distill: {summary['steps']} steps in {summary['train_s']:.0f} s" + (f"; held out: {held_out}" if held_out else ""))
    return {"model": str(model_dir), **{k: summary[k] for k in ("steps", "final_loss", "eval", "train_s")}}


class watch_steps:
    """While the recipe trains (quietly), the steps it logged to metrics.jsonl move the stage's bar."""

    def __init__(self, metrics: Path, display: Display):
        self.metrics, self.display, self.done = metrics, display, threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while not self.done.wait(1.0):
            try:
                lines = self.metrics.read_text().splitlines()
            except OSError:
                continue
            steps = [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]
            if steps:
                self.display.stage_set(steps[-1])

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


# ------------------------------------------------------------------------------------------ 5 quantize


def quantize(run: Run, folder: Path) -> dict:
    from pocketlm.finetune.classify import HEAD_DIR
    from pocketlm.load import load
    from pocketlm.quant import QuantScheme, write_quantized

    cfg = run.cfg
    student = Path(run["distill"]["model"])
    if cfg.quant == "none":
        return {"model": str(student), "scheme": "none", "method": None}
    scheme = QuantScheme.parse(cfg.quant)
    target = folder / "model"
    method = "gptq" if cfg.method == "auto" else cfg.method
    if method == "rtn":
        write_quantized(load(str(student), quant="none"), scheme, target)
    else:
        calibrated_quantization(str(student), target, scheme, method, run["split"]["calib"], cfg.quiet)
    if (student / HEAD_DIR).is_dir():  # a classifier: its head reads the quantized backbone's last hidden state
        shutil.copytree(student / HEAD_DIR, target / HEAD_DIR, dirs_exist_ok=True)
    run.display.log(f"quantize: {scheme.name} ({method})")
    return {"model": str(target), "scheme": scheme.name, "method": method}


def calibrated_quantization(student: str, target: Path, scheme, method: str, calib: str, quiet: bool) -> dict:
    """The hook for calibrated quantization (--method gptq | awq): pocketlm.quant.calibrate quantizes the float
    student layer by layer on the training text (calib.txt) and writes the folder `target` as write_quantized
    does. Everything else in the pipeline is the same for any method."""
    try:
        from pocketlm.quant.calibrate import CalibConfig, quantize_calibrated
    except ImportError:
        raise PocketLMError(f"--method {method}: this pocketlm has no calibrated quantization (pocketlm.quant.calibrate); "
                            "use --method rtn") from None
    return quantize_calibrated(student, target, scheme, calib, CalibConfig(method=method, quiet=quiet))


# ------------------------------------------------------------------------------------------ 7 report


def report(run: Run, folder: Path) -> dict:
    from pocketlm.eval.compare import plot_ratios, table_rows
    from pocketlm.eval.report import plot_histogram

    folder.mkdir(parents=True, exist_ok=True)
    teacher, ev = run["teacher"], run["evaluate"]
    a = ev["agreement"]
    result = {"teacher": {**teacher, **ev["speed"]["teacher"]}, "student": {**ev["student"], **ev["speed"]["student"]}}
    result["task_metrics"] = [k for k in result["student"] if k.startswith("classify.")]
    if "teacher_perplexity" in a:  # the held-out text's perplexity: a row of compare's table
        result["teacher"]["perplexity"], result["student"]["perplexity"] = a["teacher_perplexity"], a["student_perplexity"]
    rows = table_rows(result)
    if "answer_perplexity" in result["student"]:
        t, s = result["teacher"]["answer_perplexity"], result["student"]["answer_perplexity"]
        rows.append(("held-out answers' perplexity", t, s, s / t))
    q, size, speed, lines = headline(run, result)
    plot_ratios(rows, folder / "compare.png")
    plot_histogram(f"KL(teacher || student) per held-out {a['unit']} (nats)",
                   json.loads((run.out / "stages" / "06-evaluate" / "kl.json").read_text()), folder / "kl.png")
    loss_png = Path(run["distill"]["model"]) / "loss.png"
    if loss_png.is_file():
        shutil.copy(loss_png, folder / "loss.png")
    stages = read_json(run.out / "stages" / "timings.json")
    md = [
        *lines, "",
        f"Teacher `{run.cfg.teacher}`, student `{run['quantize']['model']}` ({run['prune']['layers']} of "
        f"{run['prune']['layers'] + run['prune']['drop_layers']} blocks, distilled {run['distill']['steps']} steps, "
        f"weights {run['quantize']['scheme']}{'' if run['quantize']['method'] in (None, 'rtn') else ' ' + run['quantize']['method']}).", "",
        "| metric | teacher | student | student / teacher |", "|---|---:|---:|---:|",
        *[f"| {label} | {tv:.4g} | {sv:.4g} | {ratio:.3f} |" for label, tv, sv, ratio in rows], "",
        f"KL(teacher || student) over {a['n']} held-out {a['unit']}s: mean {a['kl_mean']:.4f}, median {a['kl_median']:.4f}, 99th percentile "
        f"{a['kl_p99']:.4f} nats; top-1 agreement {100 * a['top1_agreement']:.2f}%.", "",
        f"Speed: the median of {run.cfg.speed_rounds} round{'s' if run.cfg.speed_rounds > 1 else ''}, the teacher then the student in each"
        + ("; texts/s labelling held-out texts in batches of 32" if run.classifier else "")
        + ("; decode and prompt tokens/s and peak memory from `pocketlm bench` (a 128-token prompt, 64 new tokens, "
           "each model in its own process, the student on its quantized weights)." if run.cfg.bench else "."), "",
        "![student / teacher](compare.png)", "", "![KL](kl.png)", "",
        *(["![distillation loss](loss.png)", ""] if loss_png.is_file() else []),
        "| stage | seconds |", "|---|---:|", *[f"| {name} | {sec:.0f} |" for name, sec in stages.items()], "",
    ]
    (folder / "report.md").write_text("\n".join(md))
    (folder / "results.json").write_text(json.dumps({**result, "agreement": a, "quality_kept": q, "size": size, "speed": speed}, indent=2) + "\n")
    for name in ("report.md", "results.json", "compare.png", "kl.png", "loss.png"):
        if (folder / name).is_file():
            shutil.copy(folder / name, run.out / name)
    run.display.log(lines[0])
    return {"headline": lines[0], "quality_kept": q, "size": size, "speed": speed, "report": str(run.out / "report.md")}


def headline(run: Run, result: dict) -> tuple[float, float, float | None, list[str]]:
    """(quality kept, size, speed, the report's first lines): quality is the task's metric of student over teacher
    (accuracy; for a generator without labels, the teacher's answer perplexity over the student's), size the
    non-embedding parameters, speed texts/s for a classifier and decode tokens/s for a generator."""
    t, s = result["teacher"], result["student"]
    if "classify.accuracy" in s:
        n = run["split"]["n_held_out"] if run.cfg.eval_limit is None else min(run.cfg.eval_limit, run["split"]["n_held_out"])
        q = s["classify.accuracy"] / t["classify.accuracy"] if t["classify.accuracy"] else math.nan
        what = f"accuracy on {n} held-out examples, {s['classify.accuracy']:.2%} against {t['classify.accuracy']:.2%}"
    else:
        q = t["answer_perplexity"] / s["answer_perplexity"]
        what = f"the held-out answers' perplexity, {s['answer_perplexity']:.3f} against {t['answer_perplexity']:.3f} (teacher / student)"
    size = s["non_embedding_params"] / t["non_embedding_params"]
    key = run.speed_key
    speed = s[key] / t[key] if key in s and key in t else None
    kept = f"{q:.1%} of the teacher's quality kept" if math.isfinite(q) else "None of the teacher's quality to keep (it scores 0)"
    faster = f"{speed:.2f} times its speed" if speed is not None else "its speed not measured (--no-bench)"
    first = f"{kept}, at {size:.0%} of its size and {faster}"
    second = (f"Quality: {what}. Size: non-embedding parameters, {s['non_embedding_params']:.1f}M against "
              f"{t['non_embedding_params']:.1f}M (all parameters {s['params']:.1f}M against {t['params']:.1f}M; on disk "
              f"{s['disk_mb']:.0f} MB against {t['disk_mb']:.0f} MB). Speed: "
              + ("texts labelled per second" if run.classifier else "decoded tokens per second") + ", on this machine.")
    return q, size, speed, [first, "", second]


# ------------------------------------------------------------------------------------------ 8 export


def export(run: Run, folder: Path) -> dict:
    from pocketlm.export import export as export_model
    from pocketlm.finetune.classify import HEAD_DIR

    cfg = run.cfg
    student = Path(run["distill"]["model"])  # the float student: GGUF block quants round from floats
    gguf_type = cfg.gguf_type or {"int8": "q8_0", "none": "f16"}.get(cfg.quant, "q4_0")
    folder.mkdir(parents=True, exist_ok=True)
    hf = export_model(str(student), "hf", folder / "hf")
    if (student / HEAD_DIR).is_dir():
        shutil.copytree(student / HEAD_DIR, folder / "hf" / HEAD_DIR, dirs_exist_ok=True)
    gguf = export_model(str(student), "gguf", folder / f"student-{gguf_type}.gguf", gguf_type)
    run.display.log(f"export: {hf['path']} and {gguf['path']} ({gguf['bytes'] / 1e6:.0f} MB)"
                    + (" (the GGUF holds the backbone: llama.cpp has no place for the classification head)" if run.classifier else ""))
    return {"hf": hf["path"], "gguf": gguf["path"], "gguf_type": gguf_type}


# ------------------------------------------------------------------------------------------ the recipe

# (name, the settings it reads, what it does), in order
STAGES = [
    ("split", ("teacher", "data", "eval_data", "eval_split", "task", "seed", "serve"), split),
    ("teacher", ("eval_limit",), measure_teacher),
    ("prune", ("prune_target", "calib_tokens"), prune),
    ("distill", ("distill",), distill),
    ("quantize", ("quant", "method"), quantize),
    ("evaluate", ("speed_rounds", "bench", "agreement_tokens"), evaluate_student),
    ("report", (), report),
    ("export", ("gguf_type",), export),
]


def shrink(cfg: ShrinkConfig) -> dict:
    """Run the stages that are not done yet; returns every stage's results."""
    if not cfg.teacher or not cfg.data or not cfg.out:
        raise PocketLMError("shrink needs --teacher MODEL, --data FILE.jsonl and -o OUT_DIR (or the same keys in --config)")
    out = Path(cfg.out).expanduser()
    (out / "stages").mkdir(parents=True, exist_ok=True)
    (out / "shrink.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    stop = os.environ.get(STOP_ENV, "")
    timings_path = out / "stages" / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    fingerprint = ""
    with Display(len(STAGES), cfg.quiet) as display:
        run = Run(cfg, out, {}, display)
        for n, (name, settings, stage) in enumerate(STAGES, 1):
            folder = out / "stages" / f"{n:02d}-{name}"
            # what this stage reads, chained with the stages before it: a change redoes it and every later stage
            fingerprint = hashlib.sha256(json.dumps([fingerprint, name, {k: getattr(cfg, k) for k in settings}],
                                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
            done = read_json(folder / "stage.json")
            if done.get("fingerprint") == fingerprint:
                run.results[name] = done["results"]
                display.kept(n, name)
                continue
            if read_json(folder / "started.json").get("fingerprint") != fingerprint:
                shutil.rmtree(folder, ignore_errors=True)  # made for other settings: nothing in it can be reused
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / "started.json", {"fingerprint": fingerprint})
            display.start(n, name)
            start = time.perf_counter()
            run.results[name] = stage(run, folder)
            timings[name] = time.perf_counter() - start
            write_json(timings_path, timings)
            write_json(folder / "stage.json", {"stage": name, "fingerprint": fingerprint, "seconds": round(timings[name], 1),
                                               "results": run.results[name]})
            display.finish(n, name, timings[name])
            if stop == name:
                raise Stopped(f"stopped after stage {name} ({STOP_ENV}={stop}); run the command again to go on")
    link = out / "student"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(run["quantize"]["model"]).resolve().relative_to(out.resolve()))
    if cfg.serve:
        serve(run)
    return run.results


def serve(run: Run) -> None:
    from pocketlm.serve.app import serve as serve_models
    from pocketlm.serve.config import ServerConfig

    serve_models(ServerConfig(models=[str(run.out / "student")], port=run.cfg.port))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    """Written whole, then renamed: a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ the display


class Display:
    """One progress display for the run on stderr: the stage (k of N) and the time since the start, and under it the
    current stage's own bar and ETA where the stage knows its length (texts scored, distillation steps, timed
    rounds). Lines a stage logs print above it. quiet: nothing."""

    def __init__(self, n_stages: int, quiet: bool):
        self.n, self.quiet, self.progress = n_stages, quiet, None

    def __enter__(self) -> Display:
        if not self.quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))
            self.overall = self.progress.add_task("shrink", total=self.n)
            self.stage = self.progress.add_task("", total=None)
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message, highlight=False, markup=False)

    def start(self, n: int, name: str) -> None:
        if self.progress is not None:
            self.progress.update(self.overall, description=f"shrink: stage {n}/{self.n} {name}", completed=n - 1)
            self.progress.reset(self.stage, description=f"  {name}", total=None, completed=0)

    def kept(self, n: int, name: str) -> None:
        self.log(f"stage {n}/{self.n} {name}: done before, kept")
        if self.progress is not None:
            self.progress.update(self.overall, completed=n)

    def finish(self, n: int, name: str, seconds: float) -> None:
        self.log(f"stage {n}/{self.n} {name}: done in {seconds:.0f} s")
        if self.progress is not None:
            self.progress.update(self.overall, completed=n)

    def stage_total(self, total: int) -> None:
        if self.progress is not None:
            self.progress.reset(self.stage, total=total, completed=0)

    def advance(self, k: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.stage, k)

    def stage_set(self, completed: int) -> None:
        if self.progress is not None:
            self.progress.update(self.stage, completed=completed)
