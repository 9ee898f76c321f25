"""Evaluation metrics as pure functions: predictions and references in, numbers out.

Classification metrics follow scikit-learn's definitions (accuracy_score, f1_score(average="macro") over the
labels seen in either list, confusion_matrix with rows = true labels); ROUGE and BLEU/chrF are the reference
libraries themselves (Google's rouge-score, sacrebleu), so the numbers compare with published ones.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------ classification


def accuracy(y_true: list[str], y_pred: list[str]) -> float:
    if not y_true:
        return 0.0
    return sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / len(y_true)


def label_set(y_true: list[str], y_pred: list[str]) -> list[str]:
    """The labels seen in either list, sorted (scikit-learn's unique_labels)."""
    return sorted(set(y_true) | set(y_pred))


def per_label_f1(y_true: list[str], y_pred: list[str], labels: list[str] | None = None) -> dict[str, float]:
    """F1 per label; a label with no true and no predicted example counts 0 (scikit-learn's zero_division=0)."""
    labels = labels if labels is not None else label_set(y_true, y_pred)
    pairs = Counter(zip(y_true, y_pred, strict=True))
    true_counts, pred_counts = Counter(y_true), Counter(y_pred)
    f1 = {}
    for label in labels:
        tp = pairs[(label, label)]
        # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (true count + predicted count); the same as 2PR / (P + R)
        denominator = true_counts[label] + pred_counts[label]
        f1[label] = 2 * tp / denominator if denominator else 0.0
    return f1


def macro_f1(y_true: list[str], y_pred: list[str], labels: list[str] | None = None) -> float:
    """Unweighted mean of per-label F1 (f1_score(average="macro"))."""
    scores = per_label_f1(y_true, y_pred, labels)
    return sum(scores.values()) / len(scores) if scores else 0.0


def confusion_matrix(y_true: list[str], y_pred: list[str], labels: list[str]) -> list[list[int]]:
    """matrix[i][j] = how many examples of true label labels[i] were predicted labels[j]. A prediction outside
    `labels` (a generated answer that matched no label) is not counted in any column."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred, strict=True):
        if t in index and p in index:
            matrix[index[t]][index[p]] += 1
    return matrix


# ------------------------------------------------------------------------------------ generation


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: list[str], references: list[list[str]]) -> tuple[dict[str, float], list[float]]:
    """Mean ROUGE-1/2/L F-measure x 100 (rouge-score with the Porter stemmer, as Hugging Face evaluate's "rouge").

    Each prediction may have several references; the best-scoring one counts (rouge-score's score_multi).
    Returns (means, per-example ROUGE-L)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    per_example = []
    for prediction, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi(refs, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
        per_example.append(100 * scores["rougeL"].fmeasure)
    n = max(len(predictions), 1)
    return {name: 100 * total / n for name, total in totals.items()}, per_example


def bleu_chrf(predictions: list[str], references: list[list[str]]) -> tuple[dict[str, float], list[float]]:
    """Corpus BLEU and chrF with sacrebleu's defaults (13a tokenization, chrF with char order 6, beta 2),
    the numbers WMT reports. Every prediction needs the same number of references (sacrebleu's streams).
    Returns (corpus scores, per-example chrF)."""
    import sacrebleu

    n_refs = {len(r) for r in references}
    if len(n_refs) > 1:
        raise ValueError("every prediction needs the same number of references for corpus BLEU")
    streams = [list(stream) for stream in zip(*references)]  # (n_refs, n_examples)
    scores = {
        "bleu": sacrebleu.corpus_bleu(predictions, streams).score,
        "chrf": sacrebleu.corpus_chrf(predictions, streams).score,
    }
    per_example = [sacrebleu.sentence_chrf(p, list(r)).score for p, r in zip(predictions, references)]
    return scores, per_example


# ------------------------------------------------------------------------------------ agreement


def kl_and_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(ref || model) in nats and whether both put their top token on the same id.

    ref_logits, logits (N, V) -> kl (N,) fp32, agree (N,) bool. KL(P || Q) = sum_v P(v) (log P(v) - log Q(v)),
    P the reference's distribution: the measure llama.cpp's `perplexity --kl-divergence` reports for a
    quantized model against the full-precision one.
    """
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)  # (N, V)
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # (N,)
    agree = ref_logits.argmax(-1) == logits.argmax(-1)  # (N,)
    return kl, agree
