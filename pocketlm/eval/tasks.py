"""`pocketlm eval` tasks: prompts built from local JSONL or text files, scored, summed up as metrics.

Every JSONL task is one TaskSpec: a prompt template (instruction, per-example prompt, target) and a kind of
scoring. The built-in classify / summarize / translate are presets in a table; a custom task is the same
fields read from a YAML file. perplexity and agreement read a text file instead.

Scoring kinds:
  loglikelihood  pick the label whose text is most likely after the prompt (loglik.ChoiceScorer)
  generate       greedy-generate an answer and match it to a label (for fine-tuned classifiers)
  rouge          greedy-generate a summary; ROUGE-1/2/L against the reference(s)
  bleu           greedy-generate a translation; BLEU and chrF against the reference

A prompt is `instruction`, then the few-shot examples (prompt + target each), then the example's prompt,
joined by `separator` (lm-evaluation-harness's description + fewshot_delimiter layout). With the model's
chat template the shots become earlier user/assistant turns instead. The whole prompt is one string, tokenized in
one piece as lm-evaluation-harness tokenizes a request's context (loglik.encode_choices); the shots are fixed for a
run, so the tokens every example's prompt starts with are computed once.
"""

from __future__ import annotations

import math
import string
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from pocketlm.errors import PocketLMError
from pocketlm.eval import data as eval_data

SCORINGS = ("loglikelihood", "generate", "head", "rouge", "bleu")
TEXT_TASKS = ("perplexity", "agreement")
SPEED_TASK = "speed"  # the engine's benchmark (pocketlm.bench): tokens/s, time to first token, peak memory
CONTENT_FREE = ("N/A", "", "[MASK]")  # --calibrate's inputs, as Zhao et al. 2021
NO_MATCH = "(no match)"  # a generated answer that is none of the labels
SENTINEL = "\x00POCKETLM-EXAMPLE\x00"  # marks where the example starts in a rendered chat prompt


@dataclass
class TaskSpec:
    """A JSONL task: how to turn a record into a prompt and what to score. Config only (no torch)."""

    name: str
    scoring: str
    prompt: str  # the example's prompt, with {field}s of the record
    target: str  # the answer after the prompt: the label's text (loglikelihood) or the reference
    instruction: str = ""  # before everything; {labels} lists the labels
    separator: str = "\n\n"
    stop: list[str] = field(default_factory=lambda: ["\n"])  # end of a generated answer (raw prompts)
    max_tokens: int = 64
    data: str | None = None  # default data: a shared set's name or a file
    label_key: str = "label"
    labels: dict[str, str] | None = None  # label -> its text in prompts; None: every label in the data
    label_text: str = "as_is"  # "spaced": card_arrival is written "card arrival" in prompts
    references_key: str | None = None  # a record's list of references (dialogsum test has 3); else the target

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise PocketLMError(f"task {self.name}: unknown scoring {self.scoring!r}: choose one of {', '.join(SCORINGS)}")
        for key in ("instruction", "prompt", "target"):
            names = template_fields(getattr(self, key), f"task {self.name}: {key}")
            if key == "instruction" and names - {"labels"}:
                raise PocketLMError(f"task {self.name}: the instruction can name only {{labels}}, not {{{sorted(names - {'labels'})[0]}}}")

    @property
    def is_classification(self) -> bool:
        return self.scoring in ("loglikelihood", "generate", "head")

    def record_fields(self) -> tuple[str, ...]:
        """The fields every record needs: those the prompt and target name, and the label."""
        names = template_fields(self.prompt, "prompt") | template_fields(self.target, "target")
        if self.is_classification:
            names.add(self.label_key)
        return tuple(sorted(names))


def template_fields(text: str, where: str) -> set[str]:
    """The {field} names of a str.format template; positional or broken ones are the user's mistake."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise PocketLMError(f"{where}: not a valid template ({e}; write a literal brace as {{{{ or }}}})") from None
    if any(not name.isidentifier() for name in names):
        raise PocketLMError(f"{where}: template fields must be named, like {{text}} (found {sorted(names)})")
    return names


# The built-in JSONL tasks (the custom YAML task takes the same keys). The prompts are plain completions that
# a base model can follow; `--chat` puts them in the chat template of an instruct model.
TASKS = {
    "classify": TaskSpec(
        name="classify",
        scoring="loglikelihood",
        instruction="Classify the text into one of these labels: {labels}.",
        prompt="Text: {text}\nLabel:",
        target=" {label}",
        max_tokens=16,
        label_text="spaced",
    ),
    "summarize": TaskSpec(
        name="summarize",
        scoring="rouge",
        instruction="Summarize the dialogue in one or two sentences.",
        prompt="Dialogue:\n{document}\nSummary:",
        target=" {summary}",
        max_tokens=96,
        data="dialogsum",
        references_key="references",
    ),
    "translate": TaskSpec(
        name="translate",
        scoring="bleu",
        instruction="Translate English to German.",
        prompt="English: {src}\nGerman:",
        target=" {tgt}",
        max_tokens=128,
        data="multi30k",
    ),
}
TASK_NAMES = (*TEXT_TASKS, *TASKS, SPEED_TASK)


@dataclass
class EvalConfig:
    """What `pocketlm eval` was asked to do: the CLI's flags, one to one."""

    task: str
    data: str | None = None
    limit: int | None = None  # records (JSONL tasks) or tokens (perplexity, agreement)
    seed: int = 0
    shots: int = 0
    shots_from: str | None = None
    by: str = "loglikelihood"  # classify: loglikelihood, generate, or head (a model made by finetune --task classify)
    norm: str = "none"  # loglikelihood: "none" (sum of log-probs) or "chars" (per character of the label)
    calibrate: bool = False  # loglikelihood: contextual calibration against content-free inputs (CONTENT_FREE)
    chat: str = "auto"  # auto: the chat template when the model has one; on; off
    method: str = "cache"  # loglikelihood: "cache" or "batch" (loglik.METHODS)
    max_tokens: int | None = None
    window: int | None = None
    stride: int | None = None
    template: str | None = None  # classify --by generate: the user message, with {text} (default: the fine-tune's)
    system: str | None = None  # a system prompt (chat template)
    reference: str | None = None
    reference_dtype: str = "float32"
    reference_quant: str = "none"
    progress: bool = True

    def __post_init__(self):
        choices = {"by": ("loglikelihood", "generate", "head"), "norm": ("none", "chars"), "chat": ("auto", "on", "off"),
                   "method": ("cache", "batch")}  # method: loglik.METHODS (not imported here: no torch in config)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise PocketLMError(f"--{name} must be {' or '.join(allowed)}, not {getattr(self, name)!r}")
        for name in ("limit", "window", "stride", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PocketLMError(f"--{name.replace('_', '-')} must be at least 1")
        if self.shots < 0:
            raise PocketLMError("--shots must be 0 or more")


@dataclass
class EvalResult:
    task: str
    model: str
    metrics: dict[str, float]
    n: int  # examples scored (tokens for perplexity and agreement)
    unit: str  # "examples" or "tokens"
    settings: dict
    seconds: float = 0.0
    examples: list[dict] = field(default_factory=list)  # one row per example: prompt, target, prediction, score
    confusion: dict | None = None  # {"labels": [...], "matrix": [[...]]} rows = true labels
    distributions: dict[str, list[float]] = field(default_factory=dict)  # per-example or per-token values to plot

    def summary(self) -> dict:
        return {"task": self.task, "model": self.model, "n": self.n, "unit": self.unit,
                "seconds": round(self.seconds, 2), "metrics": self.metrics, "settings": self.settings}


# ------------------------------------------------------------------------------------ the task and its data


def task_spec(name: str) -> TaskSpec:
    """A built-in JSONL task by name, or a custom task from a .yaml file."""
    if name in TASKS:
        return TASKS[name]
    if name.endswith((".yaml", ".yml")):
        return load_custom_task(Path(name))
    raise PocketLMError(f"unknown task {name!r}: choose one of {', '.join(TASK_NAMES)}, or give a task's .yaml file")


def load_custom_task(path: Path) -> TaskSpec:
    """A YAML file with TaskSpec's keys: scoring, prompt and target required; `data` is relative to the file."""
    import yaml

    if not path.is_file():
        raise PocketLMError(f"{path}: no such task file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PocketLMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise PocketLMError(f"{path}: expected a mapping of keys (scoring, prompt, target, ...)")
    known = {f.name for f in fields(TaskSpec)} - {"name"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PocketLMError(f"{path}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    missing = [key for key in ("scoring", "prompt", "target") if key not in raw]
    if missing:
        raise PocketLMError(f"{path}: missing {', '.join(missing)}")
    if isinstance(raw.get("stop"), str):
        raw["stop"] = [raw["stop"]]
    labels = raw.get("labels")
    if isinstance(labels, list):
        raw["labels"] = {str(label): str(label) for label in labels}
    elif isinstance(labels, dict):
        raw["labels"] = {str(k): str(v) for k, v in labels.items()}
    elif labels is not None:
        raise PocketLMError(f"{path}: labels must be a list, or a mapping of label -> text")
    if raw.get("data") and not Path(raw["data"]).is_absolute() and raw["data"] not in eval_data.SHARED_SETS:
        raw["data"] = str(path.parent / raw["data"])
    try:
        return TaskSpec(name=path.stem, **raw)
    except TypeError as e:
        raise PocketLMError(f"{path}: {e}") from None


@dataclass
class Prepared:
    """A task with its records read and checked, before any model is loaded (bad input fails fast)."""

    spec: TaskSpec
    records: list[dict]  # the ones to score (after --limit)
    shots: list[dict]
    labels: dict[str, str]  # label -> its text in prompts (classification); {} otherwise
    data_path: Path


def prepare(cfg: EvalConfig) -> Prepared:
    if cfg.task in TEXT_TASKS:
        raise ValueError("perplexity and agreement read text, not records")
    spec = task_spec(cfg.task)
    if cfg.task == "classify":
        spec = replace(spec, scoring=cfg.by)
        if cfg.by == "generate":
            # A fine-tuned classifier saw {"text", "label"} rows as a chat: the user message is the text (through
            # pocketlm finetune's --template) and the answer the bare label, so ask it the same way.
            spec = replace(spec, instruction="", prompt=cfg.template or "{text}", target=" {label}", label_text="as_is")
    if cfg.template is not None:
        spec = replace(spec, prompt=cfg.template)
    data_ref = cfg.data or spec.data
    if data_ref is None:
        raise PocketLMError(f"task {spec.name} needs --data: a JSONL file or a shared set ({', '.join(eval_data.SHARED_SETS)})")
    path, default_shots = eval_data.resolve_data(data_ref)
    needed = spec.record_fields()
    all_records = eval_data.read_jsonl(path, needed)
    records = eval_data.subset(all_records, cfg.limit, cfg.seed)
    shots = []
    if cfg.shots > 0:
        shots_path = Path(cfg.shots_from).expanduser() if cfg.shots_from else default_shots
        if shots_path is None:
            raise PocketLMError(f"--shots {cfg.shots}: no train.jsonl beside {path} to take examples from; give --shots-from FILE")
        if not shots_path.is_file():
            raise PocketLMError(f"{shots_path}: no such file (--shots-from)")
        if shots_path.resolve() == path.resolve():
            raise PocketLMError("--shots-from is the evaluation file itself: take few-shot examples from another split")
        shots = eval_data.pick_shots(eval_data.read_jsonl(shots_path, needed), cfg.shots,
                                     spec.label_key if spec.is_classification else None, cfg.seed)
    labels = {}
    if spec.is_classification:
        if spec.labels is not None:
            labels = dict(spec.labels)
            unknown = sorted({str(r[spec.label_key]) for r in all_records} - set(labels))
            if unknown:
                raise PocketLMError(f"{path}: labels not in the task's label list: {', '.join(unknown[:5])}")
        else:
            names = sorted({str(r[spec.label_key]) for r in all_records})
            labels = {name: spaced(name) if spec.label_text == "spaced" else name for name in names}
        if len(labels) < 2:
            raise PocketLMError(f"{path}: classification needs at least 2 labels, found {len(labels)}")
    return Prepared(spec, records, shots, labels, path)


def spaced(label: str) -> str:
    """card_arrival -> "card arrival"; a lone capital first word is lowered too (banking77's one
    "Refund_not_showing_up" among 76 lower-case labels otherwise wins every chat-template answer, which starts
    with a capital letter). Acronyms ("ATM") stay."""
    words = label.replace("_", " ").split(" ")
    if words[0][:1].isupper() and words[0][1:].islower():
        words[0] = words[0].lower()
    return " ".join(words)


# ------------------------------------------------------------------------------------ prompts


@dataclass
class Prompter:
    """Renders records as (prefix, query) token ids: the prefix is the same for every example."""

    spec: TaskSpec
    tokenizer: object
    labels: dict[str, str]
    shots: list[dict]
    chat: bool
    system: str | None = None

    def values(self, record: dict) -> dict:
        """A record's fields for the templates, its label written as the label's text."""
        out = dict(record)
        if self.spec.is_classification:
            out[self.spec.label_key] = self.labels.get(str(record[self.spec.label_key]), str(record[self.spec.label_key]))
        return out

    def target_text(self, record: dict) -> str:
        text = self.spec.target.format_map(self.values(record))
        return text.strip() if self.chat else text  # a chat answer starts right after the assistant header

    def render(self, record: dict) -> tuple[str, str]:
        spec = self.spec
        instruction = spec.instruction.format(labels=", ".join(self.labels.values())) if spec.instruction else ""
        head = instruction + spec.separator if instruction else ""
        query = spec.prompt.format_map(self.values(record))
        if not self.chat:
            shots = "".join(spec.prompt.format_map(self.values(s)) + self.target_text(s) + spec.separator for s in self.shots)
            system = self.system + spec.separator if self.system else ""
            return system + head + shots, query
        messages = []
        for shot in self.shots:
            messages += [{"role": "user", "content": spec.prompt.format_map(self.values(shot))},
                         {"role": "assistant", "content": self.target_text(shot)}]
        messages.append({"role": "user", "content": SENTINEL + query})
        messages[0]["content"] = head + messages[0]["content"]  # the instruction opens the first user turn
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prefix, _, rest = rendered.partition(SENTINEL)
        return prefix, rest

    def context(self, record: dict) -> str:
        """The whole prompt of a record, one string: what lm-evaluation-harness's request holds as its context."""
        prefix, query = self.render(record)
        return prefix + query

    def context_ids(self, record: dict) -> list[int]:
        """The prompt tokenized in one piece (a chat template writes BOS itself; a raw prompt gets it where the model
        wants one), as lm-evaluation-harness tokenizes a generation request's context."""
        return self.tokenizer.encode(self.context(record), add_special_tokens=not self.chat)

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """(prefix ids, query ids) tokenized apart: not what is scored (context_ids, loglik.encode_choices); kept
        for bench/bench_eval_loglik.py, which times the scorer on a fixed prefix."""
        prefix, query = self.render(record)
        if self.chat:  # the template writes BOS itself
            return self.tokenizer.encode(prefix, add_special_tokens=False), self.tokenizer.encode(query, add_special_tokens=False)
        return self.tokenizer.encode(prefix, add_special_tokens=True), self.tokenizer.encode(query, add_special_tokens=False)


def use_chat(cfg: EvalConfig, tokenizer) -> bool:
    if cfg.chat == "on" and not tokenizer.has_chat_template:
        raise PocketLMError("--chat on: this model has no chat template (a base model); use --chat off")
    return cfg.chat == "on" or (cfg.chat == "auto" and tokenizer.has_chat_template)


# ------------------------------------------------------------------------------------ progress


@contextmanager
def progress_bar(description: str, total: int, enabled: bool):
    """Yields advance(n=1): a rich bar with count, elapsed time and ETA on stderr (stdout stays for results)."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task_id = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task_id, n)


# ------------------------------------------------------------------------------------ running


def evaluate(model_ref: str, cfg: EvalConfig, dtype: str = "float32", quant: str = "none") -> EvalResult:
    """Check the task and its data, load the model, run the task. The one entry point of `pocketlm eval`."""
    start = time.perf_counter()
    if cfg.task == SPEED_TASK:
        result = run_speed(model_ref, cfg, dtype, quant)
        result.seconds = time.perf_counter() - start
        return result
    if cfg.task not in TEXT_TASKS:
        prepared = prepare(cfg)  # before loading: a bad file fails in a fraction of a second
    else:
        text_path = text_source(cfg)
        if cfg.task == "agreement" and not cfg.reference:
            raise PocketLMError("--task agreement needs --reference MODEL (e.g. the same model without --quant)")
    if cfg.task == "classify" and cfg.by == "head":
        result = run_head(model_ref, prepared, cfg, quant)
        result.seconds = time.perf_counter() - start
        return result
    lm = load_generative(model_ref, dtype, quant)
    settings = {"dtype": dtype, "quant": quant_that_ran(lm)}
    if cfg.task == "perplexity":
        result = run_perplexity(lm, cfg, text_path)
    elif cfg.task == "agreement":
        ref = load_generative(cfg.reference, cfg.reference_dtype, cfg.reference_quant)
        result = run_agreement(lm, ref, cfg, text_path)
        settings.update(reference=ref.name, reference_dtype=cfg.reference_dtype, reference_quant=quant_that_ran(ref))
    else:
        result = run_records(lm, prepared, cfg)
    result.settings = {**settings, **result.settings}
    result.seconds = time.perf_counter() - start
    return result


def quant_that_ran(lm) -> str:
    """The quantization of the weights the run read: the loader's "weights" ("int4-mixed", "int8", "int4-g64", ...;
    a folder written by `pocketlm quantize` runs its own scheme, whatever --quant said), "none" for float weights.
    Not the --quant asked for: "auto" resolves per file, and a quantized folder says "none" there."""
    weights = lm.meta.get("weights") or lm.meta.get("runtime_quant") or "none"
    return "none" if weights in ("float32", "bfloat16", "float16") else weights


def load_generative(ref: str, dtype: str, quant: str):
    import torch

    from pocketlm.load import load

    lm = load(ref, dtype=getattr(torch, dtype), quant=quant)
    if lm.is_encoder:
        raise PocketLMError(f"{lm.name} is an embedding model: eval needs a language model")
    return lm


def run_records(lm, prepared: Prepared, cfg: EvalConfig) -> EvalResult:
    spec = prepared.spec
    chat = use_chat(cfg, lm.tokenizer)
    system = cfg.system
    recipe = lm.meta.get("recipe") or {}
    if spec.name == "classify" and spec.scoring == "generate" and recipe.get("name") == "finetune":
        # the prompt the model was fine-tuned on (pocketlm finetune keeps --template and --system in its lineage)
        if cfg.template is None and recipe.get("template"):
            spec = replace(spec, prompt=recipe["template"])
            prepared = replace(prepared, spec=spec)
        system = system if system is not None else recipe.get("system")
    prompter = Prompter(spec, lm.tokenizer, prepared.labels, prepared.shots, chat, system)
    settings = {"data": str(prepared.data_path), "limit": cfg.limit, "seed": cfg.seed, "shots": len(prepared.shots),
                "scoring": spec.scoring, "chat": chat, "prompt": spec.prompt, "system": system}
    if spec.scoring == "loglikelihood":
        result = score_loglikelihood(lm, prepared, prompter, cfg)
        settings.update(norm=cfg.norm, calibrate=cfg.calibrate, method=cfg.method)
    else:
        result = score_generated(lm, prepared, prompter, cfg)
        settings["max_tokens"] = cfg.max_tokens or spec.max_tokens
    result.settings = {**settings, **result.settings}
    return result


def run_head(model_ref: str, prepared: Prepared, cfg: EvalConfig, quant: str = "none") -> EvalResult:
    """classify --by head: the classification head of a `pocketlm finetune --task classify` folder labels each
    text in one forward pass (no prompt, no generation), its body's weights quantized as `quant` asks."""
    from pocketlm.finetune.classify import Classifier

    classifier = Classifier.load(model_ref, quant)
    spec = prepared.spec
    unknown = sorted(set(prepared.labels) - set(classifier.labels))
    if unknown:
        raise PocketLMError(f"{prepared.data_path}: labels the head was not trained on: {', '.join(unknown[:5])} "
                            f"(it knows {len(classifier.labels)}: {', '.join(classifier.labels[:5])}, ...)")
    texts = [str(r["text"]) for r in prepared.records]  # the classify task's records: {text, label}
    y_true = [str(r[spec.label_key]) for r in prepared.records]
    with progress_bar("classify (head)", len(texts), cfg.progress) as advance:
        start = time.perf_counter()
        probs = classifier.logits(texts, on_progress=advance).softmax(-1)  # (N, n_labels)
        seconds = time.perf_counter() - start
    y_pred, examples = [], []
    for text, truth, row in zip(texts, y_true, probs):
        pred = classifier.labels[int(row.argmax())]
        y_pred.append(pred)
        examples.append({"text": text, "label": truth, "prediction": pred, "probability": round(float(row.max()), 4),
                         "correct": truth == pred})
    result = classification_result(spec, str(model_ref), y_true, y_pred, sorted(set(classifier.labels)), examples)
    result.settings = {"data": str(prepared.data_path), "limit": cfg.limit, "seed": cfg.seed, "scoring": "head",
                       "template": classifier.template, "quant": quant_that_ran(classifier)}
    result.metrics["texts_per_s"] = len(texts) / seconds  # the classifier's throughput, batches of 32 sorted by length
    return result


def score_loglikelihood(lm, prepared: Prepared, prompter: Prompter, cfg: EvalConfig) -> EvalResult:
    """Every label's log-likelihood after each record's prompt, tokenized as lm-evaluation-harness does
    (loglik.encode_choices); the tokens all prompts start with run once (loglik.shared_prefix)."""
    from pocketlm.eval.loglik import ChoiceScorer, encode_choices, shared_prefix

    spec, labels = prepared.spec, list(prepared.labels)
    targets = [prompter.target_text({**prepared.records[0], spec.label_key: label}) for label in labels]
    # Contextual calibration's content-free inputs (below): every field of a record set to "N/A", "" or "[MASK]".
    content_free = [{**{key: text for key in prepared.records[0]}, spec.label_key: labels[0]} for text in CONTENT_FREE]

    def encoded(record: dict, with_labels: bool = True) -> tuple[list[int], list[list[int]]]:
        return encode_choices(lm.tokenizer, prompter.context(record), targets if with_labels else [], not prompter.chat)

    contexts = [encoded(r, False)[0] for r in prepared.records + (content_free if cfg.calibrate else [])]
    prefix_ids = shared_prefix(contexts)
    P = len(prefix_ids)
    scorer = ChoiceScorer(lm.model, prefix_ids, None, lm.context_length, cfg.method)
    # lm-evaluation-harness's acc_norm divides by the continuation's length in bytes; "chars" is that, in characters
    lengths = [max(len(t), 1) if cfg.norm == "chars" else 1 for t in targets]
    # Contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): divide each label's probability by its
    # mean probability after the content-free inputs "N/A", "" and "[MASK]" (every field of the record set to
    # one), which removes the prompt's own bias toward some labels. In log space: subtract log of that mean.
    bias = [0.0] * len(labels)
    if cfg.calibrate:
        import torch

        cf = []
        for record in content_free:
            context, conts = encoded(record)
            cf.append(scorer.score(context[P:], conts))
        cf = torch.stack(cf)  # (3, L)
        bias = (torch.logsumexp(cf, dim=0) - math.log(len(CONTENT_FREE))).tolist()  # log mean probability
    y_true, y_pred, examples = [], [], []
    with progress_bar(f"{spec.name} ({len(labels)} labels)", len(prepared.records), cfg.progress) as advance:
        for record in prepared.records:
            context, conts = encoded(record)
            scores = scorer.score(context[P:], conts).tolist()
            normed = [(s - b) / n for s, b, n in zip(scores, bias, lengths)]
            best = max(range(len(labels)), key=normed.__getitem__)
            truth = str(record[spec.label_key])
            y_true.append(truth)
            y_pred.append(labels[best])
            examples.append({"prompt": prompter.render(record)[1], "label": truth, "prediction": labels[best],
                             "correct": truth == labels[best], "logprob_prediction": round(scores[best], 4),
                             "logprob_label": round(scores[labels.index(truth)], 4) if truth in labels else None})
            advance()
    result = classification_result(spec, lm.name, y_true, y_pred, labels, examples)
    result.settings = {"shared_prefix_tokens": P}
    return result


def normalize(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").strip(" \t\n.:;,!\"'").split())


def match_label(answer: str, labels: dict[str, str]) -> str:
    """A generated answer -> the label it names: the same text (case, underscores, spacing and end punctuation
    ignored), else the longest label the answer starts with, else NO_MATCH."""
    said = normalize(answer)
    forms = {label: {normalize(label), normalize(text)} for label, text in labels.items()}
    for label, names in forms.items():
        if said in names:
            return label
    starts = [(len(name), label) for label, names in forms.items() for name in names if name and said.startswith(name)]
    return max(starts)[1] if starts else NO_MATCH


def generate_answer(lm, ids: list[int], max_tokens: int, stop: list[str]) -> str:
    from pocketlm.engine.generate import generate
    from pocketlm.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, repetition_penalty=1.0, stop=stop)
    return generate(lm, ids, params).text().strip()


def score_generated(lm, prepared: Prepared, prompter: Prompter, cfg: EvalConfig) -> EvalResult:
    from pocketlm.eval import metrics

    spec = prepared.spec
    max_tokens = cfg.max_tokens or spec.max_tokens
    # A chat turn ends with the model's end token; a raw completion ends at the stop strings (a new line).
    stop = [] if prompter.chat else spec.stop
    predictions, references, examples = [], [], []
    with progress_bar(f"{spec.name} (generating)", len(prepared.records), cfg.progress) as advance:
        for record in prepared.records:
            answer = generate_answer(lm, prompter.context_ids(record), max_tokens, stop)
            predictions.append(answer)
            refs = record.get(spec.references_key) if spec.references_key else None
            references.append([str(r) for r in refs] if refs else [prompter.target_text(record).strip()])
            examples.append({"prompt": prompter.render(record)[1], "references": references[-1], "prediction": answer})
            advance()
    if spec.scoring == "generate":
        labels = list(prepared.labels)
        y_true = [str(r[spec.label_key]) for r in prepared.records]
        y_pred = [match_label(p, prepared.labels) for p in predictions]
        for example, truth, pred in zip(examples, y_true, y_pred):
            example.update(label=truth, answer=example.pop("prediction"), prediction=pred, correct=truth == pred)
            example.pop("references")
        result = classification_result(spec, lm.name, y_true, y_pred, labels, examples)
        result.metrics["no_match"] = y_pred.count(NO_MATCH) / len(y_pred)
        return result
    if spec.scoring == "rouge":
        scores, per_example = metrics.rouge(predictions, references)
        name = "rougeL"
    else:
        n_refs = {len(r) for r in references}
        if len(n_refs) > 1:  # sacrebleu's reference streams need as many references for every example
            references = [r[:1] for r in references]
        scores, per_example = metrics.bleu_chrf(predictions, references)
        name = "chrf"
    for example, value in zip(examples, per_example):
        example[name] = round(value, 2)
    return EvalResult(task=spec.name, model=lm.name, metrics=scores, n=len(predictions), unit="examples",
                      settings={}, examples=examples, distributions={f"{name} per example": per_example})


def classification_result(spec, model_name, y_true, y_pred, labels, examples) -> EvalResult:
    from pocketlm.eval import metrics

    columns = labels + ([NO_MATCH] if NO_MATCH in y_pred else [])
    return EvalResult(
        task=spec.name, model=model_name, n=len(y_true), unit="examples", settings={}, examples=examples,
        metrics={"accuracy": metrics.accuracy(y_true, y_pred), "macro_f1": macro_f1_of_labels(y_true, y_pred)},
        confusion={"labels": columns, "matrix": metrics.confusion_matrix(y_true, y_pred, columns)},
    )


def macro_f1_of_labels(y_true: list[str], y_pred: list[str]) -> float:
    """Macro-F1 over the labels that occur (true or predicted), scikit-learn's default; an unmatched generated
    answer is a miss for its true label, not a class of its own."""
    from pocketlm.eval import metrics

    labels = [label for label in metrics.label_set(y_true, y_pred) if label != NO_MATCH]
    return metrics.macro_f1(y_true, y_pred, labels)


# ------------------------------------------------------------------------------------ text tasks


def text_source(cfg: EvalConfig) -> tuple[Path, bool]:
    """(file, is WikiText-2's row dump): --data, or the shared WikiText-2 test split."""
    ref = cfg.data or "wikitext2"
    path, _ = eval_data.resolve_data(ref)
    return path, ref == "wikitext2"


def text_ids(lm, text_path: tuple[Path, bool], cfg: EvalConfig) -> list[int]:
    from pocketlm.engine.generate import encode_raw

    path, wikitext = text_path
    ids = encode_raw(lm.tokenizer, eval_data.read_text(path, wikitext))
    if cfg.limit is not None:
        if cfg.limit < 2:
            raise PocketLMError("--limit must be at least 2 tokens for perplexity and agreement")
        ids = ids[: cfg.limit]
    if len(ids) < 2:
        raise PocketLMError(f"{path}: fewer than 2 tokens of text")
    return ids


def windows(cfg: EvalConfig, context_length: int) -> tuple[int, int]:
    window = cfg.window or min(1024, context_length)
    stride = cfg.stride or window // 2
    if not 1 <= stride <= window <= context_length:
        raise PocketLMError(f"need 1 <= --stride ({stride}) <= --window ({window}) <= the model's context ({context_length})")
    return window, stride


def run_perplexity(lm, cfg: EvalConfig, text_path) -> EvalResult:
    from pocketlm.eval.perplexity import perplexity

    ids = text_ids(lm, text_path, cfg)
    window, stride = windows(cfg, lm.context_length)
    with progress_bar("perplexity (tokens)", len(ids) - 1, cfg.progress) as advance:
        out = perplexity(lm.model, ids, window=window, stride=stride, on_scored=advance)
    return EvalResult(task="perplexity", model=lm.name, n=out["tokens"], unit="tokens",
                      metrics={"perplexity": out["perplexity"], "nll": out["nll"]},
                      settings={"data": str(text_path[0]), "limit": cfg.limit, "window": window, "stride": stride})


def run_agreement(lm, ref, cfg: EvalConfig, text_path) -> EvalResult:
    """KL(ref || model) and top-1 agreement per token over the text, in the perplexity's windows: the yardstick
    of a quantized, pruned or distilled model against its reference (llama.cpp's --kl-divergence numbers)."""
    import torch

    from pocketlm.eval.agreement import agreement_stats

    ids = text_ids(lm, text_path, cfg)
    ref_ids = text_ids(ref, text_path, cfg)
    if ids != ref_ids or lm.tokenizer.vocab_size != ref.tokenizer.vocab_size:
        raise PocketLMError(f"{lm.name} and the reference {ref.name} tokenize the text differently: agreement needs one vocabulary")
    window, stride = windows(cfg, min(lm.context_length, ref.context_length))
    with progress_bar("agreement (tokens)", len(ids) - 1, cfg.progress) as advance:
        stats = agreement_stats(lm.model, ref.model, torch.tensor(ids), window, stride, on_scored=advance)
    kl = stats.pop("kl_per_token")
    return EvalResult(task="agreement", model=lm.name, n=stats.pop("tokens"), unit="tokens", metrics=stats,
                      settings={"data": str(text_path[0]), "limit": cfg.limit, "window": window, "stride": stride},
                      distributions={"KL(reference || model) per token": kl})


def run_speed(model_ref: str, cfg: EvalConfig, dtype: str, quant: str) -> EvalResult:
    """pocketlm's own benchmark (`pocketlm bench`, in a child process so the peak memory is the model's own):
    a prompt of --limit tokens (default 512), then -n new tokens (default 128), greedy, median of 3 runs."""
    from pocketlm.bench import run_bench

    prompt_tokens, new_tokens = cfg.limit or 512, cfg.max_tokens or 128
    out = run_bench(model_ref, prompt_tokens=prompt_tokens, new_tokens=new_tokens, dtype=dtype, quant=quant)
    row = out["results"][0]
    metrics = {"prompt_tok_s": row["prompt_tok_s"], "decode_tok_s": row["decode_tok_s"], "ttft_s": row["ttft_s"],
               "peak_rss_mb": row["peak_rss_mb"], "fraction_of_roofline": row["fraction_of_roofline"]}
    return EvalResult(task=SPEED_TASK, model=out["model"], metrics=metrics, n=new_tokens, unit="new tokens",
                      settings={"dtype": dtype, "quant": row["weights"], "prompt_tokens": prompt_tokens,
                                "threads": out["threads"], "repeats": out["repeats"]})
