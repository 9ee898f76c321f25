"""The encoder families beside BERT/MiniLM: DistilBERT and MobileBERT, each end to end on tiny random models built by
transformers' own classes (width 32, 2 layers).

- hidden states equal transformers' DistilBertModel / MobileBertModel (fp32, 1e-4 relative) on a padded batch, for
  MobileBERT's variants too (NoNorm or LayerNorm, trigram input or not, bottleneck attention, shared key/query
  bottleneck, stacked FFNs, no bottleneck); a task model's file (*ForMaskedLM) loads as its encoder
- a transformers *ForSequenceClassification folder is a classifier with transformers' logits and id2label's labels
- `pocketlm embed` on a saved folder gives transformers' mean-pooled, normalized vectors
- `finetune --task classify` lowers the loss; `quantize` writes a folder that embeds as the float model does
- `distill --task classify`: one family teaches the other (a transformers classifier as the teacher)
- an unsupported model_type is refused in one line that names it, the families there are and what to do
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from pocketlm import families, registry  # noqa: E402
from pocketlm.cli import main  # noqa: E402
from pocketlm.config import config_from_hf  # noqa: E402
from pocketlm.finetune import FinetuneConfig, finetune  # noqa: E402
from pocketlm.finetune.classify import Classifier  # noqa: E402
from pocketlm.load import load  # noqa: E402
from pocketlm.models import model_class_for  # noqa: E402
from pocketlm.tokenizer import Tokenizer  # noqa: E402

V = 128  # vocab of the models that need no tokenizer
T = 12
LABELS = ["negative", "neutral", "positive"]

SMALL = dict(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
CONFIGS = {  # name -> (transformers config class, its arguments)
    "distilbert": (transformers.DistilBertConfig, dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=64)),
    # transformers' defaults: NoNorm, trigram input, key/query bottleneck shared, 4 stacked FFNs, relu
    "mobilebert": (transformers.MobileBertConfig, dict(SMALL, hidden_size=32, intermediate_size=24, embedding_size=16,
                                                       intra_bottleneck_size=16, initializer_range=0.2)),
    "mobilebert-layernorm": (transformers.MobileBertConfig, dict(
        SMALL, hidden_size=32, intermediate_size=24, embedding_size=24, intra_bottleneck_size=16, normalization_type="layer_norm",
        trigram_input=False, use_bottleneck_attention=True, key_query_shared_bottleneck=False, num_feedforward_networks=2,
        hidden_act="gelu", classifier_activation=False, layer_norm_eps=1e-7)),
    "mobilebert-no-bottleneck": (transformers.MobileBertConfig, dict(
        SMALL, hidden_size=32, intermediate_size=24, embedding_size=32, use_bottleneck=False, trigram_input=False,
        num_feedforward_networks=1)),
    "bert": (transformers.BertConfig, dict(SMALL, hidden_size=32, intermediate_size=48)),
}


def hf_config(name: str, vocab_size: int = V, **extra):
    cls, kwargs = CONFIGS[name]
    return cls(vocab_size=vocab_size, **kwargs, **extra)


def randomized(hf_model, seed: int = 1):
    """transformers starts norms (NoNorm too) at 1 and biases at 0: perturb them so they are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return hf_model.eval()


def assert_close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def padded_batch():
    """(ids, attention_mask, lengths): two rows, the second padded with id 0 (the pad token) after 7 tokens."""
    ids = torch.randint(1, V, (2, T), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([T, 7])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return ids * mask, mask, lengths


@pytest.mark.parametrize("name", ["distilbert", "mobilebert", "mobilebert-layernorm", "mobilebert-no-bottleneck"])
def test_hidden_states_equal_transformers(name):
    hc = hf_config(name)
    torch.manual_seed(0)
    hf = randomized(transformers.AutoModel.from_config(hc))
    cfg = config_from_hf(hc.to_dict())
    model = model_class_for(cfg)(cfg).eval()
    model.load_state_dict(hf.state_dict())  # strict: every name is transformers'
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        assert_close(model(ids, mask), hf(input_ids=ids, attention_mask=mask).last_hidden_state)
        if "token_type_ids" in hf.forward.__code__.co_varnames:  # MobileBERT reads token types; DistilBERT has none
            types = torch.randint(0, 2, (2, T), generator=torch.Generator().manual_seed(3))
            assert_close(model(ids, mask, types), hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state)
        # padding does not change a sentence's embedding
        assert_close(model.embed(ids[1:, :7], mask[1:, :7]), model.embed(ids[1:], mask[1:]))
    # to_hf() round trip: transformers reads it back as the same config
    assert config_from_hf(transformers.AutoConfig.for_model(**cfg.to_hf()).to_dict()) == cfg


@pytest.mark.parametrize("name", ["distilbert", "mobilebert", "mobilebert-layernorm", "bert"])
def test_a_transformers_classifier_gives_its_logits(tmp_path, name):
    """*ForSequenceClassification saved by transformers -> pocketlm's Classifier: its head on [CLS] (DistilBERT's
    pre_classifier + ReLU, BERT's and MobileBERT's pooler, or none) and id2label; a masked-LM file is its encoder."""
    id2label = dict(enumerate(LABELS))
    hc = hf_config(name, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(0)
    hf = randomized(transformers.AutoModelForSequenceClassification.from_config(hc))
    hf.save_pretrained(tmp_path / "clf")
    clf = Classifier.load(tmp_path / "clf")
    assert clf.labels == LABELS
    ids, mask, lengths = padded_batch()
    with torch.no_grad():
        assert_close(clf.model(ids, lengths), hf(input_ids=ids, attention_mask=mask).logits)

    torch.manual_seed(0)
    mlm = randomized(transformers.AutoModelForMaskedLM.from_config(hf_config(name)))
    mlm.save_pretrained(tmp_path / "mlm")
    lm = load(str(tmp_path / "mlm"))  # "distilbert.transformer..." beside the masked-LM head
    with torch.no_grad():
        ref = mlm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_close(lm.model(ids, mask), ref)


# ------------------------------------------------------------------------ through the CLI, with a real tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_hf_dir(registry.resolve("minilm-l6-v2")[1])  # MiniLM's WordPiece vocabulary (BERT's)


def save_tiny(folder, name: str, tokenizer, task: str = "", scale: float = 1.0):
    """A tiny random model of `name` saved by transformers with MiniLM's tokenizer; task "classify": a
    *ForSequenceClassification of LABELS, its classifier scaled by `scale` (a confident teacher)."""
    extra = {"id2label": dict(enumerate(LABELS)), "label2id": {v: k for k, v in enumerate(LABELS)}} if task else {}
    hc = hf_config(name, vocab_size=tokenizer.vocab_size, **extra)
    torch.manual_seed(0)
    auto = transformers.AutoModelForSequenceClassification if task else transformers.AutoModel
    hf = randomized(auto.from_config(hc))
    if task:
        with torch.no_grad():
            hf.classifier.weight.mul_(scale)
    hf.save_pretrained(folder)
    tokenizer.save(folder)
    return folder, hf


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("encoders")
    return {name: save_tiny(root / name, name, tokenizer) for name in ("distilbert", "mobilebert")}


@pytest.fixture(scope="module")
def label_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "labels.jsonl"
    rows = [{"text": f"review {i}: it was {LABELS[i % 3]} overall", "label": LABELS[i % 3]} for i in range(36)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_embeddings(hf, tokenizer, texts) -> torch.Tensor:
    """sentence-transformers' Pooling(mean) + Normalize over transformers' hidden states, one text at a time."""
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text)])
            h = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state  # (1, T, D)
            rows.append(torch.nn.functional.normalize(h.mean(1), dim=1)[0])
    return torch.stack(rows)


def embedded(capsys, *args) -> torch.Tensor:
    assert main(["embed", *args]) == 0
    return torch.tensor([json.loads(line) for line in capsys.readouterr().out.splitlines()])


@pytest.mark.parametrize("name", ["distilbert", "mobilebert"])
def test_embed_cli_and_quantized(tmp_path, capsys, tiny_dirs, tokenizer, name):
    folder, hf = tiny_dirs[name]
    texts = ["A man is eating food.", "Offline language models on a laptop, two cores only."]
    assert load(str(folder)).tokenizer.encode("hi") == tokenizer.encode("hi")  # saved and read back: [CLS] hi [SEP]
    got = embedded(capsys, str(folder), *texts)
    torch.testing.assert_close(got, reference_embeddings(hf, tokenizer, texts), atol=1e-5, rtol=1e-4)

    assert main(["quantize", str(folder), "--to", "int8", "-o", str(tmp_path / "q8")]) == 0
    capsys.readouterr()
    assert load(str(tmp_path / "q8")).meta["weights"] == "int8"
    quantized = embedded(capsys, str(tmp_path / "q8"), *texts)
    assert not torch.equal(quantized, got) and (quantized * got).sum(1).min() > 0.99
    from pocketlm.engine.embed import embed
    from pocketlm.quant.int4 import Int4Linear

    int4 = load(str(folder), quant="int4")  # layers 32 wide in are int4 (whole groups of 32), the others int8
    assert any(isinstance(m, Int4Linear) for m in int4.model.modules())
    assert (embed(int4, texts) * got).sum(1).min() > 0.95


@pytest.mark.parametrize("name", ["distilbert", "mobilebert"])
def test_classify_finetune_lowers_the_loss(tmp_path, tiny_dirs, label_data, name):
    out = tmp_path / "head"
    finetune(FinetuneConfig(model=str(tiny_dirs[name][0]), data=str(label_data), out=str(out), task="classify", steps=12,
                            batch_size=6, lr=1e-2, quiet=True, save_every=0))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    got = [r["loss"] for r in sorted(rows, key=lambda r: r["step"]) if "loss" in r]
    assert sum(got[-4:]) < sum(got[:4])  # it learns (the label is a word of the text)
    clf = Classifier.load(out)
    assert clf.model.pooling == "mean" and clf.labels == LABELS
    assert clf.predict(["review 99: it was neutral overall"])[0][0] in LABELS


@pytest.mark.parametrize("teacher,student", [("distilbert", "mobilebert"), ("mobilebert", "distilbert")])
def test_one_family_distills_a_classifier_into_the_other(tmp_path, capsys, tiny_dirs, label_data, teacher, student):
    """A classifier fine-tuned on one family teaches a student of the other its label distribution alone (kd_weight
    1: the labels are not used) through `pocketlm distill --task classify`. The student ends closer to the teacher
    than any one distribution for every text could be: it learned what the teacher reads in each text."""
    teacher_dir = tmp_path / "teacher"
    finetune(FinetuneConfig(model=str(tiny_dirs[teacher][0]), data=str(label_data), out=str(teacher_dir), task="classify",
                            steps=40, batch_size=6, lr=1e-2, head_lr=1e-1, quiet=True, save_every=0))
    texts = [json.loads(line)["text"] for line in label_data.read_text().splitlines()]
    logp = Classifier.load(teacher_dir).logits(texts).log_softmax(-1)  # (N, 3), the labels in LABELS' order
    marginal = logp.exp().mean(0).log()  # the best text-blind student
    out = tmp_path / "student"
    assert main(["distill", "--student", str(tiny_dirs[student][0]), "--teacher", str(teacher_dir), "--data", str(label_data),
                 "--task", "classify", "-o", str(out), "--steps", "40", "--batch-size", "6", "--lr", "1e-2", "--head-lr", "1e-1",
                 "--kd-weight", "1", "--kd-temperature", "1", "--quiet"]) == 0
    assert "done: 40 steps" in capsys.readouterr().out
    logq = Classifier.load(out).logits(texts).log_softmax(-1)
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1).mean().item()  # noqa: E731
    # measured: 0.011 against 1.05 (DistilBERT teaching MobileBERT), 0.009 against 0.87 (the other way)
    assert kl(logp, logq) < 0.2 * kl(logp, marginal), (kl(logp, logq), kl(logp, marginal))


def test_a_transformers_classifier_teaches(tmp_path, capsys, tiny_dirs, tokenizer, label_data):
    """A *ForSequenceClassification folder as the teacher: the stored teacher logits are transformers' own, in the
    student's label order; the student's head starts from scratch (the teacher's reads another transform of [CLS])."""
    from safetensors.torch import load_file

    teacher_dir, hf = save_tiny(tmp_path / "teacher", "distilbert", tokenizer, task="classify")
    data = tmp_path / "two-labels.jsonl"  # two of the teacher's three labels: its columns are picked by name
    rows = [json.loads(line) for line in label_data.read_text().splitlines()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] != "negative"))
    out = tmp_path / "student"
    finetune(FinetuneConfig(model=str(tiny_dirs["distilbert"][0]), teacher=str(teacher_dir), data=str(data), out=str(out),
                            task="classify", steps=1, batch_size=4, lr=1e-12, quiet=True, save_every=0))
    stored = load_file(out / "teacher-logits" / "classifier-logits.safetensors")["logits"]  # (N, 2)
    texts = [r["text"] for r in rows if r["label"] != "negative"]
    with torch.no_grad():
        ref = torch.cat([hf(input_ids=torch.tensor([tokenizer.encode(t)])).logits for t in texts])[:, 1:]  # neutral, positive
    assert_close(stored, ref)
    student_head = load_file(out / "classifier" / "head.safetensors")["score.weight"]
    assert not torch.allclose(student_head, hf.classifier.weight[1:])
    assert main(["classify", str(teacher_dir), "it was neutral", "--json"]) == 0  # and it labels texts itself
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["label"] in LABELS


def test_an_unsupported_model_type_is_refused_in_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    save_file({"shared.weight": torch.zeros(4, 8)}, folder / "model.safetensors")
    assert main(["embed", str(folder), "hello"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unsupported model_type 't5'" in err
    assert all(name in err for name in families.supported())
    assert "Export the model from transformers" in err and "Adding a model family" in err
