"""pocketlm distill: the divergences against hand-computed values, stored top-k targets (round trip, resume,
mismatch), the loss module, and distilling a tiny student that gets closer to its teacher; and the same for
a classifier (--task classify): the student learns a teacher classifier's label distribution.

Teacher and student are native tiny Llamas with the byte-level vocabulary of tests/tiny_models.py (278
tokens), so a whole distillation run takes a few seconds. The teacher's weights are drawn wide, so its
next-token distributions are peaked and a student starting near uniform has much to learn.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from pocketlm.cli import main
from pocketlm.compress import distill
from pocketlm.compress.distill import (
    ClassifierTeacher, ClassifyDistillLoss, DistillLoss, OnlineTeacher, StoredTeacher, coarsen, divergence,
)
from pocketlm.errors import PocketLMError
from pocketlm.finetune import FinetuneConfig, finetune
from pocketlm.finetune.data import Example, collate
from pocketlm.finetune.recipe import CausalLMLoss

WORDS = "hello world the of x is a he said hello world of the x".split()


def make_llama(folder, dim: int, n_layers: int, std: float, seed: int):
    from tiny_models import byte_level_metadata

    from pocketlm.config import LlamaConfig
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.models.llama import LlamaForCausalLM
    from pocketlm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(byte_level_metadata())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                      intermediate_size=2 * dim, tie_word_embeddings=True, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    return write_model_folder(folder, cfg.to_hf(), model.state_dict(), tok)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("distill") / "teacher", dim=64, n_layers=2, std=0.3, seed=1)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("distill") / "student", dim=32, n_layers=1, std=0.02, seed=2)


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(64, 0)))
    return path


# ----------------------------------------------------------------------------------------- the losses


P, Q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.9, 0.1]]).log()


@pytest.mark.parametrize("kind, expected", [
    # 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1)
    ("forward_kl", 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)),
    # 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5)
    ("reverse_kl", 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)),
    # m = (0.7, 0.3): (KL(p||m) + KL(q||m)) / 2
    ("jsd", 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3))
     + 0.5 * (0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3))),
])
def test_divergence_matches_hand_computed_value(kind, expected):
    assert divergence(kind, P, Q).item() == pytest.approx(expected, abs=1e-6)
    assert divergence(kind, P, P).item() == pytest.approx(0.0, abs=1e-7)


def test_divergence_is_finite_where_a_probability_underflows():
    logp = torch.tensor([[0.0, -200.0]])  # exp(-200) is 0 in float32
    logq = torch.tensor([[-0.1, -2.35]]).log_softmax(-1).requires_grad_()
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        d = divergence(kind, logp, logq)
        d.backward()
        assert torch.isfinite(d).all() and torch.isfinite(logq.grad).all(), kind
        logq.grad = None


def test_coarsen_keeps_top_k_and_sums_the_rest():
    logp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    out = coarsen(logp, torch.tensor([[1, 0]])).exp()
    assert out[0].tolist() == pytest.approx([0.3, 0.5, 0.2], abs=1e-6)


def test_distill_loss_weights_temperature_and_pure_cross_entropy(student_dir, teacher_dir):
    from pocketlm.load import load

    student, teacher = load(str(student_dir)).model, load(str(teacher_dir)).model
    batch = collate([Example(list(range(3, 15)), list(range(3, 15))), Example(list(range(20, 28)), list(range(20, 28)))], 2)
    args = batch["ids"], batch["labels"], batch["lengths"]
    T = 2.0
    targets = OnlineTeacher(teacher, T).targets(batch, [0, 1])
    with torch.no_grad():
        ce_only = DistillLoss(student, "forward_kl", T, kd_weight=0.0)(*args, **targets)
        kd_only = DistillLoss(student, "forward_kl", T, kd_weight=1.0)(*args, **targets)
        half = DistillLoss(student, "forward_kl", T, kd_weight=0.5)(*args, **targets)
        assert ce_only.item() == pytest.approx(CausalLMLoss(student)(*args).item(), rel=1e-6)
        keep = batch["labels"][:, 1:] != -100
        logq = torch.log_softmax(student(batch["ids"])[:, :-1][keep] / T, -1)
        hand = T * T * (targets["teacher_logp"].exp() * (targets["teacher_logp"] - logq)).sum()
        assert kd_only.item() == pytest.approx(hand.item(), rel=1e-5)
        assert half.item() == pytest.approx(0.5 * ce_only.item() + 0.5 * kd_only.item(), rel=1e-6)


# ---------------------------------------------------------------------------------- stored teacher targets


def units_of(n: int) -> list[Example]:
    rng = random.Random(3)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, 270) for _ in range(rng.randint(5, 12))]
        labels = [i if rng.random() < 0.7 else -100 for i in ids]
        out.append(Example(ids, labels))
    return out


def test_stored_targets_round_trip_and_equal_online_loss_with_all_but_one_token(tmp_path, teacher_dir, student_dir, monkeypatch):
    from pocketlm.load import load

    monkeypatch.setattr(distill, "SHARD_UNITS", 4)  # several shards from 10 units
    teacher, student = load(str(teacher_dir)).model, load(str(student_dir)).model
    units = units_of(10)
    k = teacher.cfg.vocab_size - 1  # the rest bucket holds one token: the coarse distribution is the full one
    store = StoredTeacher.open_or_build(tmp_path / "t", "teacher", lambda: teacher, units, 1.5, k, 3, 2)
    assert sorted(p.name for p in (tmp_path / "t").glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    online = OnlineTeacher(teacher, 1.5)
    for i, unit in enumerate(units):
        batch = collate([unit], 2)
        logp, idx = store.unit(i)
        full = online.targets(batch, [i])["teacher_logp"]  # (n, V)
        assert idx.shape == (int((batch["labels"][:, 1:] != -100).sum()), k)
        assert torch.allclose(logp, coarsen(full, idx), atol=2e-2)  # stored as float16
        assert (full.gather(-1, idx[:, :1]) == full.max(-1, keepdim=True).values).all()  # sorted: the top token first

    batch = collate(units[3:7], 2)
    with torch.no_grad():
        loss = DistillLoss(student, "jsd", 1.5, kd_weight=1.0)
        from_store = loss(batch["ids"], batch["labels"], batch["lengths"], **store.targets(batch, [3, 4, 5, 6]))
        from_online = loss(batch["ids"], batch["labels"], batch["lengths"], **online.targets(batch, [3, 4, 5, 6]))
    assert from_store.item() == pytest.approx(from_online.item(), rel=2e-2)


def test_stored_targets_resume_a_killed_build_and_refuse_other_data(tmp_path, teacher_dir, monkeypatch):
    from pocketlm.load import load

    monkeypatch.setattr(distill, "SHARD_UNITS", 4)
    teacher = load(str(teacher_dir)).model
    units = units_of(10)
    StoredTeacher.open_or_build(tmp_path / "t", "teacher", lambda: teacher, units, 1.0, 8, 4, 2)
    first = StoredTeacher(tmp_path / "t").unit(9)
    (tmp_path / "t" / "shard-00002.safetensors").unlink()  # as if killed before the last shard
    loads = []
    store = StoredTeacher.open_or_build(tmp_path / "t", "teacher", lambda: loads.append(1) or teacher, units, 1.0, 8, 4, 2)
    assert loads == [1] and torch.equal(store.unit(9)[0], first[0])
    StoredTeacher.open_or_build(tmp_path / "t", "teacher", lambda: loads.append(1) or teacher, units, 1.0, 8, 4, 2)
    assert loads == [1]  # complete: the teacher is not even loaded
    with pytest.raises(PocketLMError, match="other data or settings"):
        StoredTeacher.open_or_build(tmp_path / "t", "teacher", lambda: teacher, units[:9], 1.0, 8, 4, 2)
    with pytest.raises(PocketLMError, match="temperature"):
        StoredTeacher.open_or_build(tmp_path / "t", "teacher", lambda: teacher, units, 2.0, 8, 4, 2)


# --------------------------------------------------------------------------------------- the recipe


def held_out_kl(student_dir, teacher_dir) -> float:
    from pocketlm.eval.agreement import agreement_stats
    from pocketlm.load import load

    student, teacher = load(str(student_dir)), load(str(teacher_dir))
    ids = torch.tensor(student.tokenizer.encode(" ".join(sentences(12, 99))))
    return agreement_stats(student.model, teacher.model, ids, window=128, stride=64)["kl_mean"]


@pytest.mark.parametrize("kd_loss, offline", [("forward_kl", True), ("reverse_kl", False), ("jsd", False)])
def test_distilling_a_tiny_student_lowers_its_kl_to_the_teacher(tmp_path, student_dir, teacher_dir, text_data, kd_loss, offline):
    before = held_out_kl(student_dir, teacher_dir)
    cfg = FinetuneConfig(model=str(student_dir), teacher=str(teacher_dir), data=str(text_data), out=str(tmp_path / "out"),
                         kd_loss=kd_loss, kd_weight=1.0, steps=40, batch_size=8, lr=1e-2, seq_len=64, quiet=True,
                         teacher_logits=str(tmp_path / "top-k") if offline else "", teacher_top_k=16)
    summary = finetune(cfg)
    after = held_out_kl(tmp_path / "out", teacher_dir)
    # measured: 2.35 -> 1.76 (forward KL, stored top-16), 1.76 (reverse KL), 1.69 (JSD); the data alone: 6.3
    assert after < 0.8 * before, (before, after)
    lineage = json.loads((tmp_path / "out" / "config.json").read_text())["pocketlm"]
    assert lineage["recipe"]["name"] == "distill" and lineage["recipe"]["teacher"] == str(teacher_dir)
    assert summary["steps"] == 40


def test_hidden_alignment_trains_a_projection_that_is_not_saved(tmp_path, student_dir, teacher_dir, text_data):
    from pocketlm.load import load

    cfg = FinetuneConfig(model=str(student_dir), teacher=str(teacher_dir), data=str(text_data), out=str(tmp_path / "out"),
                         hidden_weight=1.0, steps=3, batch_size=4, lr=1e-3, seq_len=64, quiet=True, save_every=2)
    finetune(cfg)
    saved = load(str(tmp_path / "out"))
    assert saved.config.dim == 32 and saved.config.vocab_size == load(str(student_dir)).config.vocab_size


def test_freeze_embeddings_keeps_the_embedding_and_head_and_trains_the_blocks(tmp_path, student_dir, teacher_dir, text_data):
    from safetensors.torch import load_file

    cfg = FinetuneConfig(model=str(student_dir), teacher=str(teacher_dir), data=str(text_data), out=str(tmp_path / "out"),
                         freeze_embeddings=True, steps=3, batch_size=4, lr=1e-2, seq_len=64, quiet=True, save_every=2)
    finetune(cfg)
    before, after = load_file(student_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # tied: the head too
    assert not torch.equal(after["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"])
    with pytest.raises(PocketLMError, match="freeze_embeddings is for full fine-tuning"):
        FinetuneConfig(model="m", data="d", out="o", freeze_embeddings=True, lora_r=8)


def test_distill_resume_reproduces_the_uninterrupted_run(tmp_path, student_dir, teacher_dir, text_data):
    def run(out, **kw):
        return finetune(FinetuneConfig(model=str(student_dir), teacher=str(teacher_dir), data=str(text_data), out=str(out),
                                       steps=6, save_every=3, batch_size=4, lr=1e-3, seq_len=64, quiet=True,
                                       teacher_logits=str(tmp_path / "top-k"), **kw))

    whole = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=3)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], abs=1e-5)


def test_two_process_distillation_equals_one_process(tmp_path, student_dir, teacher_dir, text_data):
    """torchrun, 2 processes with micro-batch 2 against 1 process with 2 x 2 accumulation; the stored
    targets are built by process 0 while the other waits, then read by both."""
    import os
    import socket
    import subprocess
    import sys

    common = ["--student", str(student_dir), "--teacher", str(teacher_dir), "--data", str(text_data), "--steps", "3",
              "--batch-size", "2", "--lr", "1e-3", "--seq-len", "64", "--save-every", "0", "--quiet"]
    assert main(["distill", *common, "-o", str(tmp_path / "one"), "--grad-accum", "2", "--teacher-logits", str(tmp_path / "t1")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "pocketlm.cli", "distill", *common, "-o", str(tmp_path / "two"),
           "--teacher-logits", str(tmp_path / "t2")]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)


def test_distill_refuses_a_teacher_with_another_tokenizer(tmp_path, student_dir, tiny_gemma_dir, text_data):
    cfg = FinetuneConfig(model=str(student_dir), teacher=str(tiny_gemma_dir), data=str(text_data), out=str(tmp_path / "o"),
                         steps=1, quiet=True)
    with pytest.raises(PocketLMError, match="different tokenizers"):
        finetune(cfg)


def test_distill_cli(tmp_path, student_dir, teacher_dir, capsys):
    text = tmp_path / "corpus.txt"  # a plain-text file is data too
    text.write_text("\n".join(sentences(40, 5)))
    out = tmp_path / "out"
    rc = main(["distill", "--student", str(student_dir), "--teacher", str(teacher_dir), "--data", str(text),
               "-o", str(out), "--steps", "2", "--seq-len", "32", "--kd-loss", "jsd", "--kd-temperature", "2", "--quiet"])
    assert rc == 0 and (out / "model.safetensors").is_file() and (out / "loss.png").is_file()
    assert "done: 2 steps" in capsys.readouterr().out
    assert main(["distill", "--student", str(student_dir), "--teacher", str(teacher_dir), "--data", str(text),
                 "-o", str(out), "--kd-loss", "nope"]) != 0
    assert "kd_loss must be one of forward_kl, reverse_kl, jsd" in capsys.readouterr().err


def test_compare_teacher_and_student(tmp_path, teacher_dir, student_dir, capsys):
    text = tmp_path / "held-out.txt"
    text.write_text(" ".join(sentences(20, 7)))
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps({"text": s, "label": s.split()[0]}) + "\n" for s in sentences(12, 8)))
    report = tmp_path / "report"
    assert main(["compare", str(teacher_dir), str(student_dir), "--data", str(text), "--task", "classify",
                 "--task-data", str(data), "--report", str(report), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    teacher, student = result["teacher"], result["student"]
    assert student["non_embedding_params"] < 0.2 * teacher["non_embedding_params"]
    assert student["disk_mb"] < teacher["disk_mb"] and student["decode_tok_s"] > 0 and teacher["peak_rss_mb"] > 0
    assert 0 <= student["classify.accuracy"] <= 1 and "classify.accuracy" in result["task_metrics"]
    assert result["agreement"]["kl_mean"] > 0 and student["perplexity"] > 1
    md = (report / "report.md").read_text()
    assert "| decode tokens/s |" in md and "classify: accuracy" in md
    assert (report / "compare.png").stat().st_size > 1000 and (report / "kl.png").is_file()


# ------------------------------------------------------------------------------ classifier distillation

LABELS = ["hello", "said", "world"]


@pytest.fixture(scope="module")
def label_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "labels.jsonl"
    rows = [{"text": f"{LABELS[i % 3]} {s}", "label": LABELS[i % 3]} for i, s in enumerate(sentences(48, 3))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def teacher_classifier(tmp_path_factory, teacher_dir, label_data):
    out = tmp_path_factory.mktemp("distill") / "teacher-classifier"
    finetune(FinetuneConfig(model=str(teacher_dir), data=str(label_data), out=str(out), task="classify", steps=24,
                            batch_size=8, lr=1e-2, head_lr=3e-2, quiet=True, save_every=0))
    return out


def texts_of(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_classify_distill_loss_matches_hand_computed_value():
    class Fixed(torch.nn.Module):  # a classifier whose output is p = (0.9, 0.1)
        def forward(self, ids, lengths):
            return torch.tensor([[0.9, 0.1]]).log()

    loss = ClassifyDistillLoss(Fixed(), "forward_kl", temperature=2.0, kd_weight=0.25)
    got = loss(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, 1, 1]]), torch.tensor([3]), torch.tensor([[5.0, 5.0]]))
    # at T = 2 the student's (0.9, 0.1) becomes (3, 1) / 4 and the teacher's equal logits stay (0.5, 0.5):
    # 0.75 * CE(label 1) + 0.25 * T^2 * KL((0.5, 0.5) || (0.75, 0.25))
    expected = 0.75 * -math.log(0.1) + 0.25 * 4 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_a_student_of_the_teachers_width_starts_from_its_head_in_the_students_label_order(tmp_path, teacher_classifier, label_data):
    """The student is the teacher's own backbone, trained on data with two of its three labels at a learning
    rate too small to move anything: its logits are the teacher's columns for those two labels."""
    from pocketlm.finetune.classify import Classifier

    data = tmp_path / "two-labels.jsonl"
    rows = [json.loads(line) for line in label_data.read_text().splitlines()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] != "hello"))
    out = tmp_path / "student"
    finetune(FinetuneConfig(model=str(teacher_classifier), teacher=str(teacher_classifier), data=str(data), out=str(out),
                            task="classify", steps=1, batch_size=4, lr=1e-12, quiet=True, save_every=0))
    teacher, student = Classifier.load(teacher_classifier), Classifier.load(out)
    assert student.labels == ["said", "world"]
    texts = texts_of(data)[:8]
    columns = [teacher.labels.index(label) for label in student.labels]
    torch.testing.assert_close(student.logits(texts), teacher.logits(texts)[:, columns], atol=1e-4, rtol=1e-4)


def label_kl(student_path, teacher_path, texts) -> float:
    """Mean KL(teacher || student) of the label distributions."""
    from pocketlm.finetune.classify import Classifier

    logp = Classifier.load(teacher_path).logits(texts).log_softmax(-1)
    logq = Classifier.load(student_path).logits(texts).log_softmax(-1)
    return divergence("forward_kl", logp, logq).mean().item()


def test_distilling_a_classifier_brings_a_narrower_student_to_the_teacher(tmp_path, student_dir, teacher_classifier, label_data):
    """A student half the teacher's width (a head from scratch) learns the teacher's label distribution alone
    (kd_weight 1: the labels are not used); a run resumed after a kill reuses the stored teacher logits and
    ends where the uninterrupted run does."""
    def run(out, **kw):
        settings = dict(kd_weight=1.0, kd_temperature=1.0, steps=40, batch_size=8, lr=1e-2, quiet=True, save_every=10)
        return finetune(FinetuneConfig(model=str(student_dir), teacher=str(teacher_classifier), data=str(label_data),
                                       out=str(out), task="classify", **{**settings, **kw}))

    texts = texts_of(label_data)
    before = run(tmp_path / "before", steps=1, lr=1e-12)  # the student's head at its start, saved
    whole = run(tmp_path / "whole")
    kl_before, kl_after = label_kl(tmp_path / "before", teacher_classifier, texts), label_kl(tmp_path / "whole", teacher_classifier, texts)
    # measured: 1.06 -> 0.05
    assert kl_after < 0.2 * kl_before, (kl_before, kl_after)
    assert before["steps"] == 1 and (tmp_path / "whole" / "teacher-logits" / "classifier-logits.safetensors").is_file()

    run(tmp_path / "killed", stop_after=10)
    resumed = run(tmp_path / "killed", resume=True)
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], abs=1e-5)


def test_stored_teacher_classifier_logits_are_reused_only_for_the_same_texts(tmp_path, teacher_classifier):
    from pocketlm.finetune.classify import Classifier

    teacher = Classifier.load(teacher_classifier)
    calls = []
    compute = teacher.logits
    teacher.logits = lambda texts, on_progress=None: calls.append(len(texts)) or compute(texts)
    path = tmp_path / "logits.safetensors"
    first = ClassifierTeacher.open_or_build(path, teacher, "t", ["hello a", "said b"], ["world", "hello"])
    again = ClassifierTeacher.open_or_build(path, teacher, "t", ["hello a", "said b"], ["world", "hello"])
    other = ClassifierTeacher.open_or_build(path, teacher, "t", ["hello a", "said c"], ["world", "hello"])
    assert calls == [2, 2]  # the second call read the file
    torch.testing.assert_close(first.logits, again.logits)
    assert first.logits.shape == (2, 2) and not torch.equal(first.logits, other.logits)
    torch.testing.assert_close(first.targets({}, [1])["teacher_logits"], first.logits[[1]])


def test_classifier_distillation_refuses_a_teacher_without_the_labels_or_without_a_head(tmp_path, student_dir, teacher_dir, teacher_classifier):
    data = tmp_path / "other.jsonl"
    data.write_text("".join(json.dumps({"text": f"x {i}", "label": ["hello", "goodbye"][i % 2]}) + "\n" for i in range(8)))
    cfg = dict(model=str(student_dir), data=str(data), out=str(tmp_path / "o"), task="classify", steps=1, quiet=True)
    with pytest.raises(PocketLMError, match="does not know the label.*goodbye"):
        finetune(FinetuneConfig(teacher=str(teacher_classifier), **cfg))
    with pytest.raises(PocketLMError, match="not a classifier"):
        finetune(FinetuneConfig(teacher=str(teacher_dir), **cfg))
