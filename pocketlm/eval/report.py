"""An EvalResult as a terminal table, as JSON, or as a folder: report.md with PNG plots, results.json and
predictions.jsonl (one line per example, to see what the model got wrong)."""

from __future__ import annotations

import json
from pathlib import Path

from pocketlm.errors import PocketLMError

FRACTIONS = {"accuracy", "macro_f1", "top1_agreement", "no_match"}  # shown as percentages
LABELS = {
    "accuracy": "accuracy", "macro_f1": "macro-F1", "no_match": "answers matching no label",
    "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu": "BLEU", "chrf": "chrF",
    "perplexity": "perplexity", "nll": "mean NLL (nats/token)",
    "kl_mean": "KL(ref || model) mean (nats)", "kl_median": "KL median", "kl_p99": "KL 99th percentile",
    "top1_agreement": "top-1 agreement", "reference_perplexity": "reference perplexity",
    "prompt_tok_s": "prompt tokens/s", "decode_tok_s": "decode tokens/s", "ttft_s": "time to first token (s)",
    "peak_rss_mb": "peak memory (MB)", "fraction_of_roofline": "decode / memory-bandwidth bound",
    "texts_per_s": "texts/s",
}
FRACTIONS.add("fraction_of_roofline")


def format_value(name: str, value: float) -> str:
    if name in FRACTIONS:
        return f"{100 * value:.2f}%"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.2f}"


def print_table(result, console=None) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)  # no wrapping when piped
    console.print(f"[bold]{result.task}[/bold] on {result.model}: {result.n} {result.unit} in {result.seconds:.1f} s",
                  highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(LABELS.get(name, name), format_value(name, value))
    console.print(table)
    settings = ", ".join(f"{k}={v}" for k, v in result.settings.items() if v is not None)
    console.print(f"[dim]{settings}[/dim]", highlight=False)


def to_json(result) -> str:
    return json.dumps(result.summary(), indent=2)


def write_report(result, folder: Path) -> Path:
    """folder/report.md with the metrics, settings and plots; results.json; predictions.jsonl."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PocketLMError(f"{folder}: cannot create the report folder ({e.strerror})") from None
    (folder / "results.json").write_text(to_json(result) + "\n")
    with open(folder / "predictions.jsonl", "w", encoding="utf-8") as f:
        for example in result.examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")
    plots = []
    if result.confusion:
        plots.append(("Confusion matrix", plot_confusion(result.confusion, folder / "confusion_matrix.png")))
    for i, (name, values) in enumerate(result.distributions.items()):
        if values:
            plots.append((name, plot_histogram(name, values, folder / f"distribution_{i}.png")))
    lines = [f"# pocketlm eval: {result.task} on {result.model}", "",
             f"{result.n} {result.unit}, {result.seconds:.1f} s.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {LABELS.get(k, k)} | {format_value(k, v)} |" for k, v in result.metrics.items()]
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {cell(v)} |" for k, v in result.settings.items()]
    for title, path in plots:
        lines += ["", f"## {title}", "", f"![{title}]({path.name})"]
    if result.examples:
        lines += ["", f"Per-example predictions: [predictions.jsonl](predictions.jsonl) ({len(result.examples)} lines)."]
    report = folder / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def cell(value) -> str:
    """A value inside a Markdown table row: its new lines and pipes would break the row."""
    return str(value).replace("\n", "\\n").replace("|", "\\|")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server, and no GUI toolkit import
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: dict, path: Path) -> Path:
    """Rows = true label, columns = prediction, each row scaled to its count (so rare labels show as well);
    counts written in the cells while the matrix is small enough to read them."""
    import numpy as np

    plt = _pyplot()
    labels, counts = confusion["labels"], np.array(confusion["matrix"], dtype=float)  # (L_true, L)
    rows = counts.sum(1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = min(4 + 0.22 * len(labels), 28)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    font = 9 if len(labels) <= 20 else max(3, 9 - len(labels) // 15)
    ax.set_xticks(range(len(labels)), labels, rotation=0 if len(labels) <= 4 else 90, fontsize=font)
    ax.set_yticks(range(len(labels)), labels, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 20:
        for i in range(counts.shape[0]):
            for j in range(counts.shape[1]):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=font,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histogram(name: str, values: list[float], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=min(50, max(10, len(values) // 10)), color="tab:blue")
    ax.set_xlabel(name)
    ax.set_ylabel("count")
    if name.startswith("KL"):
        ax.set_yscale("log")  # most tokens agree closely; the tail is what matters
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
