"""Teacher against student: what a smaller model (pruned, distilled, quantized) kept and what it gained.

    pocketlm compare smollm2-135m-instruct out/student --task classify --task-data banking77 --limit 300 --report out/cmp

One table, the teacher's value beside the student's and their ratio: parameters (all, and without the
embedding), size on disk, decode and prompt tokens/s and peak memory (`pocketlm bench`, each model in its
own process), perplexity of a text, KL(teacher || student) and top-1 agreement on the same text, and
optionally a task's accuracy (any `pocketlm eval` task). Every number comes from pocketlm.eval's own
tasks, so it equals what `pocketlm eval` would print for the same settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from pocketlm.errors import PocketLMError

# metric -> (label, higher is better); the order of the table's rows
ROWS = {
    "params": ("parameters (M)", False),
    "non_embedding_params": ("non-embedding parameters (M)", False),
    "disk_mb": ("size on disk (MB)", False),
    "decode_tok_s": ("decode tokens/s", True),
    "prompt_tok_s": ("prompt tokens/s", True),
    "peak_rss_mb": ("peak memory (MB)", False),
    "perplexity": ("perplexity", False),
}


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_size(ref: str) -> dict:
    """Parameters (a tied head counted once) and the bytes of the file or folder the model is read from,
    from its config alone: no weights are read."""
    import torch

    from pocketlm.compress.prune import Names, count_params
    from pocketlm.config import config_from_hf
    from pocketlm.families import is_encoder
    from pocketlm.load import model_folder, read_config
    from pocketlm.models import model_class_for

    name, source, folder = model_folder(ref)
    config = config_from_hf(read_config(folder))
    if is_encoder(config):
        raise PocketLMError(f"{name} is an embedding model: compare takes generative models")
    with torch.device("meta"):  # the architecture's parameters: a quantized model's packed codes would miscount
        skeleton = model_class_for(config)(config)
    tied = getattr(config, "tie_word_embeddings", False)
    counts = count_params(skeleton.state_dict(), tied, Names.of(skeleton).embedding_keys)  # GPT-2's wte, not only Llama's
    return {"model": name, "params": counts["total"] / 1e6, "non_embedding_params": counts["non_embedding"] / 1e6,
            "disk_mb": disk_bytes(Path(source)) / 1e6}


def compare(teacher: str, student: str, text: str | None = None, tokens: int = 4096, task: str | None = None,
            task_data: str | None = None, limit: int | None = None, by: str = "loglikelihood", speed: bool = True,
            quant: str = "auto", progress: bool = True) -> dict:
    """The comparison as a dict: {"teacher": {metric: value}, "student": {...}, "agreement": {...}, ...}."""
    agreement = text_agreement(teacher, student, text, tokens, progress)
    sides = {"teacher": model_size(teacher), "student": model_size(student)}
    sides["teacher"]["perplexity"] = agreement.metrics["reference_perplexity"]
    sides["student"]["perplexity"] = agreement.metrics["perplexity"]
    task_metrics = []
    for side, ref in (("teacher", teacher), ("student", student)):
        sides[side].update(measure(ref, task, task_data, limit, by, speed, quant, progress))
        task_metrics = [k for k in sides[side] if task and k.startswith(f"{task}.")]
    return {
        **sides,
        "agreement": {k: agreement.metrics[k] for k in ("kl_mean", "kl_median", "kl_p99", "top1_agreement")},
        "text": agreement.settings["data"], "tokens": agreement.n, "task": task, "task_data": task_data,
        "task_metrics": task_metrics, "speed_quant": quant if speed else None,
        "kl_per_token": agreement.distributions["KL(reference || model) per token"],
    }


def text_agreement(teacher: str, student: str, text: str | None, tokens: int, progress: bool = True):
    """KL(teacher || student), top-1 agreement and both perplexities on `tokens` tokens of a text (an EvalResult)."""
    from pocketlm.eval.tasks import EvalConfig, evaluate

    return evaluate(student, EvalConfig(task="agreement", data=text, limit=tokens, reference=teacher, progress=progress))


def measure(ref: str, task: str | None = None, task_data: str | None = None, limit: int | None = None,
            by: str = "loglikelihood", speed: bool = True, quant: str = "auto", progress: bool = True) -> dict:
    """One side's speed and memory (a short `pocketlm bench` run, decoding as `pocketlm run` would: --quant auto)
    and an eval task's metrics, named "TASK.metric"."""
    from pocketlm.eval.tasks import EvalConfig, evaluate

    out = {}
    if speed:
        result = evaluate(ref, EvalConfig(task="speed", limit=128, max_tokens=64), quant=quant)
        out.update({k: result.metrics[k] for k in ("decode_tok_s", "prompt_tok_s", "peak_rss_mb")})
    if task:
        result = evaluate(ref, EvalConfig(task=task, data=task_data, limit=limit, by=by, progress=progress))
        out.update({f"{task}.{k}": v for k, v in result.metrics.items()})
    return out


def table_rows(result: dict) -> list[tuple[str, float, float, float]]:
    """(label, teacher, student, student / teacher) for every metric both sides have."""
    from pocketlm.eval.report import LABELS

    rows = []
    names = [*ROWS, *result["task_metrics"]]
    for name in names:
        t, s = result["teacher"].get(name), result["student"].get(name)
        if t is None or s is None:
            continue
        label = ROWS[name][0] if name in ROWS else f"{name.split('.')[0]}: {LABELS.get(name.split('.', 1)[1], name)}"
        rows.append((label, t, s, s / t if t else float("nan")))
    return rows


def print_comparison(result: dict) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"{result['teacher']['model']} (teacher) vs {result['student']['model']} (student)")
    for column in ("metric", "teacher", "student", "student / teacher"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for label, t, s, ratio in table_rows(result):
        table.add_row(label, f"{t:.4g}", f"{s:.4g}", f"{ratio:.3f}")
    console.print(table)
    a = result["agreement"]
    console.print(f"KL(teacher || student): mean {a['kl_mean']:.4f}, median {a['kl_median']:.4f}, 99th percentile "
                  f"{a['kl_p99']:.4f} nats; top-1 agreement {100 * a['top1_agreement']:.2f}% over {result['tokens']} "
                  f"tokens of {result['text']}", highlight=False)


def write_comparison(result: dict, folder: str | Path) -> Path:
    """folder/report.md, compare.png (student / teacher per metric), kl.png (KL per token), results.json."""
    from pocketlm.eval.report import plot_histogram

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({k: v for k, v in result.items() if k != "kl_per_token"}, indent=2) + "\n")
    plot_ratios(table_rows(result), folder / "compare.png")
    plot_histogram("KL(teacher || student) per token (nats)", result["kl_per_token"], folder / "kl.png")
    t, s = result["teacher"], result["student"]
    lines = [f"# {s['model']} against its teacher {t['model']}", "", *report_lines(result),
             "![student / teacher](compare.png)", "", "![KL per token](kl.png)", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def report_lines(result: dict) -> list[str]:
    """The comparison as Markdown: the table of teacher, student and their ratio, then the KL and speed notes."""
    a = result["agreement"]
    speed_note = f"Speed: `pocketlm bench`, a 128-token prompt and 64 new tokens, --quant {result['speed_quant']}."
    return [
        "| metric | teacher | student | student / teacher |", "|---|---:|---:|---:|",
        *[f"| {label} | {tv:.4g} | {sv:.4g} | {ratio:.3f} |" for label, tv, sv, ratio in table_rows(result)], "",
        f"KL(teacher || student) over {result['tokens']} tokens of `{result['text']}`: mean {a['kl_mean']:.4f}, "
        f"median {a['kl_median']:.4f}, 99th percentile {a['kl_p99']:.4f} nats; top-1 agreement "
        f"{100 * a['top1_agreement']:.2f}%.", "",
        *([speed_note, ""] if result["speed_quant"] else []),
    ]


def plot_ratios(rows: list[tuple[str, float, float, float]], path: Path) -> Path:
    """A horizontal bar per metric: student / teacher, with the line at 1 (the same)."""
    from pocketlm.eval.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    labels = [r[0] for r in rows][::-1]
    ratios = [r[3] for r in rows][::-1]
    ax.barh(labels, ratios, color="tab:blue")
    ax.axvline(1.0, color="black", lw=1)
    for y, ratio in enumerate(ratios):
        ax.text(ratio, y, f" {ratio:.2f}", va="center", fontsize=8)
    ax.set_xlabel("student / teacher (1 = the same)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
