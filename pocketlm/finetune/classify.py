"""A sequence-classification head on a native backbone (decoder or encoder), saved so it reloads.

The DistilBERT way: one forward pass, a linear layer on a pooled hidden state, argmax -- no generation.
Pooling: "last" takes the last real token's hidden state (a decoder's causal attention has seen the
whole text there; transformers' *ForSequenceClassification does the same), "mean" averages over the
real tokens (an encoder; how all-MiniLM-L6-v2 was trained to pool), "cls" takes the first token's ([CLS]).

A transformers *ForSequenceClassification folder of an encoder family (a DistilBERT fine-tuned on SST-2, say)
loads as a classifier too, with its own head: [CLS], the family's transform (BERT's and MobileBERT's pooler,
dense + tanh; DistilBERT's pre_classifier, dense + ReLU; the model class's `hf_classifier_pre`), its
`classifier` as the score and config.json's id2label as the labels -- logits equal to transformers'. It can
label texts (`pocketlm classify`) and teach a student (`pocketlm distill --task classify`).

Saved as an ordinary model folder of the backbone (so `pocketlm.load.load` and `pocketlm embed/run`
still read it) plus a `classifier/` subfolder: head.safetensors (score.weight, score.bias) and
config.json (labels, pooling, template). The head sits in a subfolder because the loader reads every
*.safetensors file at the top of a model folder.

    clf = Classifier.load("out/banking77-head")
    clf.predict(["I still have not got my card"])   # [("card_arrival", 0.93)]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pocketlm.errors import PocketLMError

HEAD_DIR = "classifier"


class SequenceClassifier(nn.Module):
    """backbone (native model, LoRA layers possibly inside) + score: Linear(D, n_labels)."""

    def __init__(self, backbone: nn.Module, n_labels: int, pooling: str, is_encoder: bool,
                 pre: nn.Module | None = None):
        """pre: a transformers classifier's transform of the pooled state before its score (fp32)."""
        super().__init__()
        self.backbone = backbone
        self.pooling, self.is_encoder = pooling, is_encoder
        self.pre = pre
        dim = backbone.cfg.dim
        self.score = nn.Linear(dim, n_labels)
        nn.init.normal_(self.score.weight, std=dim**-0.5 * 0.1)  # small: start near uniform probabilities
        nn.init.zeros_(self.score.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) -> logits (B, n_labels), fp32."""
        B, T = ids.shape
        mask = torch.arange(T, device=ids.device)[None, :] < lengths[:, None]  # (B, T) real tokens
        if self.is_encoder:
            h = self.backbone(ids, mask.long())  # (B, T, D)
        else:
            h = self.backbone.hidden(ids)  # (B, T, D); right padding is after every real token: causal mask ignores it
        if self.pooling == "last":
            pooled = h[torch.arange(B, device=ids.device), lengths - 1]  # (B, D)
        elif self.pooling == "cls":
            pooled = h[:, 0]  # (B, D)
        else:
            m = mask[..., None].to(h.dtype)  # (B, T, 1)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D)
        pooled = pooled.float()
        if self.pre is not None:
            pooled = self.pre(pooled)  # (B, D)
        return self.score(pooled)  # (B, n_labels)


def encode_text(tokenizer, text: str, template: str, seq_len: int, is_encoder: bool) -> list[int]:
    ids = tokenizer.encode(template.replace("{text}", text), add_special_tokens=True)
    if len(ids) > seq_len:  # keep an encoder's closing [SEP]
        ids = ids[: seq_len - 1] + ids[-1:] if is_encoder else ids[:seq_len]
    return ids


def save_head(folder: Path, clf: SequenceClassifier, labels: list[str], template: str) -> None:
    head = folder / HEAD_DIR
    head.mkdir(parents=True, exist_ok=True)
    save_file({"score.weight": clf.score.weight.detach().contiguous(), "score.bias": clf.score.bias.detach().contiguous()},
              head / "head.safetensors")
    (head / "config.json").write_text(json.dumps({"labels": labels, "pooling": clf.pooling, "template": template}, indent=2))


def hf_classifier(lm) -> tuple[SequenceClassifier, list[str]] | None:
    """A transformers *ForSequenceClassification folder of an encoder, as (classifier, labels); None otherwise.
    The encoder loaded from the file already (models/encoder.py reads it from under its prefix); the head's
    tensors are read here from the same file."""
    from pocketlm.formats.hf import read_config
    from pocketlm.load import read_safetensors

    hf_config = read_config(lm.path)
    architecture = (hf_config.get("architectures") or [""])[0]
    pre_names = getattr(lm.model, "hf_classifier_pre", None)
    if not (lm.is_encoder and pre_names and architecture.endswith("ForSequenceClassification")):
        return None
    if hf_config.get("problem_type") not in (None, "single_label_classification") or hf_config.get("num_labels", 2) == 1:
        raise PocketLMError(f"{lm.path}: a {hf_config.get('problem_type') or 'regression'} head; pocketlm's classifiers "
                            "pick one label of several (single_label_classification)")
    tensors = read_safetensors(lm.path)
    if "classifier.weight" not in tensors:
        raise PocketLMError(f"{lm.path}: config.json says {architecture}, but the weights hold no classifier.weight")
    n_labels = tensors["classifier.weight"].shape[0]
    id2label = {int(k): str(v) for k, v in (hf_config.get("id2label") or {}).items()}
    labels = [id2label.get(i, f"LABEL_{i}") for i in range(n_labels)]  # transformers' names for unnamed labels
    name, act = pre_names
    pre = None
    if f"{name}.weight" in tensors:  # MobileBERT without classifier_activation passes [CLS] through
        weight = tensors[f"{name}.weight"].float()
        dense = nn.Linear(weight.shape[1], weight.shape[0])
        dense.load_state_dict({"weight": weight, "bias": tensors[f"{name}.bias"].float()})
        pre = nn.Sequential(dense, nn.Tanh() if act == "tanh" else nn.ReLU())
    model = SequenceClassifier(lm.model, n_labels, "cls", True, pre)
    model.score.load_state_dict({"weight": tensors["classifier.weight"].float(), "bias": tensors["classifier.bias"].float()})
    return model, labels


@dataclass
class Classifier:
    """A saved classifier, loaded: `predict(texts)` -> [(label, probability)]."""

    model: SequenceClassifier
    tokenizer: object
    labels: list[str]
    template: str
    max_len: int
    meta: dict = field(default_factory=dict)  # the loaded model's (LoadedModel.meta: its weights' quantization, ...)

    @classmethod
    def load(cls, path: str | Path, quant: str = "none") -> Classifier:
        """quant: the body's weights at load (pocketlm.load's; a quantized folder runs its own)."""
        from pocketlm.load import load

        lm = load(str(path), quant=quant)
        head_dir = lm.path / HEAD_DIR
        if not (head_dir / "config.json").is_file():
            hf = hf_classifier(lm)
            if hf is None:
                raise PocketLMError(f"{lm.path}: not a classifier (no {HEAD_DIR}/config.json, nor a transformers "
                                    "*ForSequenceClassification of an encoder); train one with `pocketlm finetune ... --task classify`")
            model, labels = hf
            return cls(model.eval(), lm.tokenizer, labels, "{text}", lm.context_length, lm.meta)
        meta = json.loads((head_dir / "config.json").read_text())
        model = SequenceClassifier(lm.model, len(meta["labels"]), meta["pooling"], lm.is_encoder)
        model.score.load_state_dict({k.removeprefix("score."): v for k, v in load_file(head_dir / "head.safetensors").items()})
        return cls(model.eval(), lm.tokenizer, meta["labels"], meta.get("template", "{text}"), lm.context_length, lm.meta)

    @torch.inference_mode()
    def logits(self, texts: list[str], batch_size: int = 32, on_progress=None) -> torch.Tensor:
        """(N, n_labels) head logits, in the order of texts. Batches are made of texts of about one length
        (sorted by token count), so little of each batch is padding."""
        from pocketlm.finetune.data import collate, Example

        if self.tokenizer is None:  # a transformers classifier saved without its tokenizer
            raise PocketLMError("the classifier's folder has no tokenizer.json: save the tokenizer beside the weights "
                                "(transformers: AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        ids = [encode_text(self.tokenizer, t, self.template, self.max_len, self.model.is_encoder) for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), len(self.labels))
        for begin in range(0, len(order), batch_size):
            rows = order[begin : begin + batch_size]
            batch = collate([Example(ids[i], ids[i]) for i in rows], pad)
            out[rows] = self.model(batch["ids"], batch["lengths"]).float()
            if on_progress is not None:
                on_progress(len(rows))
        return out

    def predict_proba(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """(N, n_labels) probabilities."""
        return F.softmax(self.logits(texts, batch_size), dim=-1)

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        probs = self.predict_proba(texts)
        best = probs.argmax(-1)
        return [(self.labels[i], float(probs[n, i])) for n, i in enumerate(best.tolist())]
