"""Knowledge distillation: the losses, the teacher's targets (online, or top-k logits stored once on disk),
and the loss module the fine-tuning recipe trains with when a teacher is given.

    pocketlm distill --teacher smollm2-135m-instruct --student ./pruned --data alpaca.jsonl -o out/student
    pocketlm distill ... --teacher-logits cache/teacher-top32     # offline: computed once, reused by every run

The loss per target token (the tokens fine-tuning learns: the assistant's, or every token of raw text):

    kd_weight * T^2 * D(p_teacher^T || q_student^T) + (1 - kd_weight) * CE(student, data)
        + hidden_weight * |W h_student - h_teacher|^2 / d_teacher

with D one of forward KL (Hinton et al. 2015; mode-covering), reverse KL (MiniLLM, Gu et al. 2023;
mode-seeking) or the Jensen-Shannon divergence (GKD, Agarwal et al. 2024, beta = 0.5), p^T the softmax at
temperature T, and T^2 keeping the gradient's scale as T changes (Hinton). The hidden term aligns the
final hidden states through a learned projection W (DistilBERT's cosine loss, as MSE; TinyBERT), for a
student narrower than its teacher; W is dropped when training ends.

A classifier (`--task classify`, DistilBERT's task-specific distillation) learns the teacher classifier's
label distribution instead, per example:

    kd_weight * T^2 * D(p_teacher^T || q_student^T) + (1 - kd_weight) * CE(student, label)

with p and q over the labels; the teacher's logits for every training example are computed once (one
forward pass each) and kept beside the run, and the student's head starts as the teacher's when they
have the same width. The teacher tokenizes the text itself, so the two need not share a tokenizer.

Offline targets keep the teacher's top-k tokens and one bucket for all the rest, so each divergence is
computed exactly on that coarser (k+1)-outcome distribution; with k = V it is the online loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from array import array
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.finetune.config import KD_LOSSES
from pocketlm.finetune.data import IGNORE, Example, collate

SHARD_UNITS = 1024  # training units (examples or packed blocks) per file of stored teacher targets
STORE_FORMAT = 1
NEG = -1e4  # a log-probability that is 0 in probability yet finite (and a float16)


# -------------------------------------------------------------------------------------------- losses


def divergence(kind: str, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """D(p || q) per row for log-probabilities logp (teacher) and logq (student), (N, K) -> (N,).
    A zero-probability outcome adds nothing (x log x -> 0), so underflowed probabilities stay finite."""
    p, q = logp.exp(), logq.exp()
    if kind == "forward_kl":  # sum p (log p - log q)
        return (p * (logp - logq)).sum(-1)
    if kind == "reverse_kl":  # sum q (log q - log p)
        return (q * (logq - logp)).sum(-1)
    if kind == "jsd":  # (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2
        logm = torch.logaddexp(logp, logq) - math.log(2)
        return 0.5 * (p * (logp - logm)).sum(-1) + 0.5 * (q * (logq - logm)).sum(-1)
    raise PocketLMError(f"unknown distillation loss {kind!r}; choose one of {', '.join(KD_LOSSES)}")


def coarsen(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """logp (N, V) log-probabilities, idx (N, k) token ids -> (N, k+1): those tokens' log-probabilities and,
    last, the log-probability of every other token together."""
    top = logp.gather(-1, idx)  # (N, k)
    # the kept tokens masked by a finite NEG, not -inf: with k = V the rest is then a finite ~NEG whose
    # gradient is 0, where -inf would give logsumexp's backward NaN (exp(-inf - -inf))
    rest = logp.scatter(-1, idx, NEG).logsumexp(-1, keepdim=True)  # (N, 1)
    return torch.cat([top, rest], dim=-1)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) -> bool (B, T-1): the positions whose next token is learned (position t predicts t+1).
    Row-major order of the True entries is the order of every per-target tensor below."""
    return labels[:, 1:] != IGNORE


class DistillLoss(nn.Module):
    """The student's summed loss over a batch's target tokens, given the teacher's targets at the same
    positions (from OnlineTeacher or StoredTeacher). Summed, like the recipe's CausalLMLoss, so the recipe's
    division by the global target count makes any batch split compute the same gradient."""

    def __init__(self, student: nn.Module, kd_loss: str, temperature: float, kd_weight: float,
                 hidden_weight: float = 0.0, teacher_dim: int | None = None):
        super().__init__()
        if kd_loss not in KD_LOSSES:
            raise PocketLMError(f"unknown distillation loss {kd_loss!r}; choose one of {', '.join(KD_LOSSES)}")
        self.model = student  # the name CausalLMLoss uses too: checkpoints name parameters alike
        self.kd_loss, self.temperature, self.kd_weight, self.hidden_weight = kd_loss, temperature, kd_weight, hidden_weight
        # student width -> teacher width; trained with the student, not part of the saved model
        self.project = nn.Linear(student.cfg.dim, teacher_dim, bias=False) if hidden_weight else None

    def forward(self, ids, labels, lengths, teacher_logp, teacher_idx=None, teacher_hidden=None, ce_mask=None) -> torch.Tensor:
        # ids, labels (B, T); teacher_logp (N, V) online or (N, k+1) stored, teacher_idx None or (N, k),
        # teacher_hidden None or (N, D_teacher); N = target positions in the batch; ce_mask None or (N,) bool: the
        # targets the data's cross-entropy counts (not a student's own sample, which has no right answer)
        keep = target_positions(labels)  # (B, T-1)
        h = self.model.hidden(ids)[:, :-1][keep]  # (N, D)
        logits = self.model.logits(h).float()  # (N, V)
        rows = slice(None) if ce_mask is None else ce_mask
        loss = (1 - self.kd_weight) * F.cross_entropy(logits[rows], labels[:, 1:][keep][rows], reduction="sum")
        logq = torch.log_softmax(logits / self.temperature, dim=-1)  # (N, V)
        if teacher_idx is not None:
            logq = coarsen(logq, teacher_idx)  # (N, k+1)
        kd = divergence(self.kd_loss, teacher_logp.float(), logq).sum()
        loss = loss + self.kd_weight * self.temperature**2 * kd
        if self.project is not None:
            if teacher_hidden is None:
                raise PocketLMError("hidden-state alignment needs the teacher online (no --teacher-logits)")
            err = F.mse_loss(self.project(h).float(), teacher_hidden.float(), reduction="sum")
            loss = loss + self.hidden_weight * err / teacher_hidden.shape[-1]
        return loss


# ------------------------------------------------------------------------------------------ teachers


class OnlineTeacher:
    """The teacher runs beside the student on every batch: any temperature, the full vocabulary, and its
    hidden states for alignment; it costs a teacher forward per step."""

    def __init__(self, model: nn.Module, temperature: float, with_hidden: bool = False):
        self.model, self.temperature, self.with_hidden = model.eval().requires_grad_(False), temperature, with_hidden

    @torch.no_grad()
    def targets(self, batch: dict, units: list[int]) -> dict:
        keep = target_positions(batch["labels"])  # (B, T-1)
        h = self.model.hidden(batch["ids"])[:, :-1][keep]  # (N, D_teacher)
        logp = torch.log_softmax(self.model.logits(h).float() / self.temperature, dim=-1)  # (N, V)
        return {"teacher_logp": logp, "teacher_hidden": h if self.with_hidden else None}


def fingerprint(units: list[Example]) -> str:
    """A hash of the training units' ids and labels: stored targets belong to exactly these units."""
    digest = hashlib.sha256()
    for unit in units:
        digest.update(array("q", unit.ids).tobytes())
        digest.update(array("q", unit.labels).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:32]


class StoredTeacher:
    """The teacher's top-k log-probabilities (plus the rest's) at every target position of every training
    unit, computed once by `build` and read back by unit index. A folder:

        teacher.json                 teacher, temperature, top_k, number of units, the units' fingerprint
        shard-00000.safetensors      units 0..1023: logp (n, k+1) float16, idx (n, k) int32, offsets (1025,) int64

    Shards are written whole (a temporary name, then renamed), so a build that was killed resumes at the
    first missing shard. float16 keeps a log-probability to about 0.01 (relative 1e-3 in probability).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        meta_path = self.folder / "teacher.json"
        if not meta_path.is_file():
            raise PocketLMError(f"{self.folder}: no stored teacher targets (teacher.json is missing)")
        self.meta = json.loads(meta_path.read_text())
        self._shards: dict[int, tuple] = {}  # shard -> (open safetensors file, offsets)

    @staticmethod
    def meta_for(teacher: str, temperature: float, top_k: int, units: list[Example]) -> dict:
        return {"format": STORE_FORMAT, "teacher": teacher, "temperature": temperature, "top_k": top_k,
                "units": len(units), "shard_units": SHARD_UNITS, "fingerprint": fingerprint(units)}

    @classmethod
    def open_or_build(cls, folder, teacher_name: str, load_teacher, units: list[Example], temperature: float,
                      top_k: int, batch_size: int, pad_id: int, on_progress=None) -> StoredTeacher:
        """Use the targets in `folder` when they were made for these units and settings; compute what is
        missing (all of it, or the shards a killed build did not finish). load_teacher() -> the teacher model,
        called only when something must be computed."""
        folder = Path(folder).expanduser()
        want = cls.meta_for(teacher_name, temperature, top_k, units)
        meta_path = folder / "teacher.json"
        if meta_path.is_file():
            have = json.loads(meta_path.read_text())
            changed = [k for k in want if have.get(k) != want[k]]
            if changed:
                detail = ", ".join(f"{k} {have.get(k)!r} -> {want[k]!r}" for k in changed[:3])
                raise PocketLMError(f"{folder}: the stored teacher targets were made for other data or settings "
                                    f"({detail}); use another --teacher-logits folder or delete this one")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            meta_path.write_text(json.dumps(want, indent=2))
        n_shards = math.ceil(len(units) / SHARD_UNITS)
        missing = [s for s in range(n_shards) if not (folder / f"shard-{s:05d}.safetensors").is_file()]
        if missing:
            model = load_teacher().eval().requires_grad_(False)
            for s in missing:
                cls._build_shard(folder, s, model, units, temperature, top_k, batch_size, pad_id, on_progress)
        return cls(folder)

    @staticmethod
    @torch.no_grad()
    def _build_shard(folder, s, model, units, temperature, top_k, batch_size, pad_id, on_progress) -> None:
        from safetensors.torch import save_file

        first, last = s * SHARD_UNITS, min(len(units), (s + 1) * SHARD_UNITS)
        logps, idxs, counts = [], [], []
        for begin in range(first, last, batch_size):
            micro = units[begin : min(last, begin + batch_size)]
            batch = collate(micro, pad_id)
            keep = target_positions(batch["labels"])  # (B, T-1)
            h = model.hidden(batch["ids"])[:, :-1][keep]  # (N, D)
            logp = torch.log_softmax(model.logits(h).float() / temperature, dim=-1)  # (N, V)
            idx = logp.topk(min(top_k, logp.shape[-1]), dim=-1).indices  # (N, k)
            logps.append(coarsen(logp, idx).half())
            idxs.append(idx.int())
            counts += keep.sum(1).tolist()
            if on_progress is not None:
                on_progress(len(micro))
        offsets = torch.tensor([0, *counts]).cumsum(0)  # (units in shard + 1,)
        tmp = folder / f"shard-{s:05d}.tmp"
        save_file({"logp": torch.cat(logps), "idx": torch.cat(idxs), "offsets": offsets}, tmp)
        os.replace(tmp, folder / f"shard-{s:05d}.safetensors")

    def unit(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit i's targets: logp (n_i, k+1) float32, idx (n_i, k) int64. Read through a memory map: training
        draws units in a shuffled order, across every shard."""
        from safetensors import safe_open

        s, j = divmod(i, self.meta["shard_units"])
        if s not in self._shards:
            path = self.folder / f"shard-{s:05d}.safetensors"
            if not path.is_file():
                raise PocketLMError(f"{path}: missing; run the distillation again to compute it")
            handle = safe_open(str(path), framework="pt")
            self._shards[s] = (handle, handle.get_tensor("offsets"))
        handle, offsets = self._shards[s]
        a, b = int(offsets[j]), int(offsets[j + 1])
        return handle.get_slice("logp")[a:b].float(), handle.get_slice("idx")[a:b].long()

    def targets(self, batch: dict, units: list[int]) -> dict:
        parts = [self.unit(i) for i in units]  # in batch order = row-major order of the target positions
        return {"teacher_logp": torch.cat([p[0] for p in parts]), "teacher_idx": torch.cat([p[1] for p in parts])}


# ------------------------------------------------------------------------------------ classifiers


class ClassifyDistillLoss(nn.Module):
    """The student classifier's summed loss over a batch of examples, given the teacher classifier's logits
    for the same examples (B, C). Named like the recipe's ClassifyLoss (`classifier`), so checkpoints agree."""

    def __init__(self, classifier: nn.Module, kd_loss: str, temperature: float, kd_weight: float):
        super().__init__()
        if kd_loss not in KD_LOSSES:
            raise PocketLMError(f"unknown distillation loss {kd_loss!r}; choose one of {', '.join(KD_LOSSES)}")
        self.classifier = classifier
        self.kd_loss, self.temperature, self.kd_weight = kd_loss, temperature, kd_weight

    def forward(self, ids, labels, lengths, teacher_logits) -> torch.Tensor:
        # ids, labels (B, T) with the class index in labels[:, 0]; teacher_logits (B, C)
        logits = self.classifier(ids, lengths)  # (B, C) fp32
        loss = (1 - self.kd_weight) * F.cross_entropy(logits, labels[:, 0], reduction="sum")
        logp = torch.log_softmax(teacher_logits.float() / self.temperature, dim=-1)  # (B, C)
        logq = torch.log_softmax(logits / self.temperature, dim=-1)  # (B, C)
        return loss + self.kd_weight * self.temperature**2 * divergence(self.kd_loss, logp, logq).sum()


def label_columns(teacher, teacher_name: str, labels: list[str]) -> torch.Tensor:
    """(C,) the teacher classifier's column for each of the student's labels, in the student's order."""
    missing = sorted(set(labels) - set(teacher.labels))
    if missing:
        raise PocketLMError(f"the teacher {teacher_name} does not know the label(s) {', '.join(missing[:5])}: "
                            f"it was trained on {len(teacher.labels)} others ({', '.join(teacher.labels[:5])}, ...)")
    return torch.tensor([teacher.labels.index(label) for label in labels])


class ClassifierTeacher:
    """A teacher classifier's logits for every training example, in the student's label order, computed
    once and stored in one safetensors file (written whole, then renamed) that a resumed or repeated run
    reads back when it was made by the same teacher for the same texts."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits  # (n_examples, C)

    @classmethod
    def open_or_build(cls, path: str | Path, teacher, teacher_name: str, texts: list[str], labels: list[str],
                      on_progress=None) -> ClassifierTeacher:
        """teacher: a pocketlm.finetune.classify.Classifier; labels: the student's, in its order."""
        from safetensors.torch import load_file, save_file

        columns = label_columns(teacher, teacher_name, labels)
        digest = hashlib.sha256("\x00".join([teacher_name, teacher.template, *labels, *texts]).encode()).hexdigest()[:32]
        path = Path(path).expanduser()
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") == digest:
                    return cls(load_file(path)["logits"])
        logits = teacher.logits(texts, on_progress=on_progress)[:, columns]  # (n, C)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"logits": logits.contiguous()}, tmp, metadata={"fingerprint": digest, "teacher": teacher_name})
        os.replace(tmp, path)
        return cls(logits)

    def targets(self, batch: dict, units: list[int]) -> dict:
        return {"teacher_logits": self.logits[units]}
