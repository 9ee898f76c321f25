"""pocketlm finetune on tiny random models: the loss mask, resume, LoRA merge, DDP, pinned losses, outputs, errors.

The tiny models are native pocketlm models (2 layers, width 32) with SmolLM2's real tokenizer and chat
template (read from the converted SmolLM2 folder; no weights are loaded), so every run takes about a second.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.cli import main
from pocketlm.finetune import FinetuneConfig, finetune
from pocketlm.finetune.data import IGNORE, collate, encode_conversation, pack, stream_indices, Example

LABELS = ["positive", "negative", "neutral"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_folder():
    """SmolLM2's converted folder: the tokenizer (ChatML template) without loading the weights."""
    from pocketlm import registry
    from pocketlm.load import convert_gguf

    return convert_gguf(registry.resolve("smollm2-135m-instruct")[1])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_folder):
    from pocketlm.config import LlamaConfig
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.models.llama import LlamaForCausalLM
    from pocketlm.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(smollm2_folder)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                      tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF's initializer_range: logits near zero, loss near ln(V) at the start
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    return write_model_folder(tmp_path_factory.mktemp("ft") / "tiny", cfg.to_hf(), model.state_dict(), tok)


@pytest.fixture(scope="session")
def label_data(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "labels.jsonl"
    with path.open("w") as f:
        for i in range(48):
            label = rng.choice(LABELS)
            f.write(json.dumps({"text": f"review {i}: it was {label} overall", "label": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with path.open("w") as f:
        for i in range(24):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i} plus one?"},
                {"role": "assistant", "content": f"{i + 1}."},
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": f"{2 * (i + 1)}."},
            ]}) + "\n")
    return path


def run(tiny_model, data, out, **kw):
    settings = dict(model=str(tiny_model), data=str(data), out=str(out), batch_size=4, steps=6, lr=3e-3,
                    save_every=0, quiet=True, seq_len=64)
    return finetune(FinetuneConfig(**{**settings, **kw}))


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# ------------------------------------------------------------------------------------------ the mask


def test_assistant_mask_equals_hand_built(smollm2_folder):
    from pocketlm.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(smollm2_folder)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    # ChatML by hand: what the model sees, and which pieces are the assistant's (its end token included)
    pieces = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello! How can I help?<|im_end|>\n", True),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>\n", True),
    ]
    want_ids, want_labels = [], []
    for text, learn in pieces:
        ids = tok.encode(text, add_special_tokens=False)
        want_ids += ids
        want_labels += ids if learn else [IGNORE] * len(ids)
    ids, labels = encode_conversation(tok, messages)
    assert ids == want_ids
    assert labels == want_labels


def test_loss_counts_only_assistant_tokens(tiny_model):
    from pocketlm.finetune.recipe import CausalLMLoss
    from pocketlm.load import load

    lm = load(str(tiny_model))
    a = encode_conversation(lm.tokenizer, [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "Yes."}])
    b = encode_conversation(lm.tokenizer, [{"role": "user", "content": "Count to three please"}, {"role": "assistant", "content": "1 2 3"}])
    batch = collate([Example(*a), Example(*b)], pad_id=0)
    got = CausalLMLoss(lm.model)(batch["ids"], batch["labels"], batch["lengths"])
    # reference: full logits, a hand-built mask from the answer's token count (+ <|im_end|> and "\n")
    want, n = 0.0, 0
    for ids, answer in ((a[0], "Yes."), (b[0], "1 2 3")):
        k = len(lm.tokenizer.encode(answer, add_special_tokens=False)) + 2
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[-k:] = True
        logits = lm.model(torch.tensor([ids]))[0]  # (T, V)
        target = torch.tensor(ids)
        want += F.cross_entropy(logits[:-1][mask[1:]], target[1:][mask[1:]], reduction="sum")
        n += k
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == n
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packing_keeps_examples_whole():
    examples = [Example(list(range(n)), [IGNORE] + list(range(1, n))) for n in (5, 7, 3, 9, 2)]
    blocks = pack(examples, seq_len=12, order=[0, 1, 2, 3, 4])
    assert [len(b.ids) for b in blocks] == [12, 12, 2]  # 5+7 | 3+9 | 2
    assert sum(len(b.ids) for b in blocks) == 26
    assert blocks[1].labels == examples[2].labels + examples[3].labels


def test_group_by_length_batches_alike_lengths_and_still_covers_each_epoch():
    lengths = [random.Random(i).randint(2, 80) for i in range(1000)]
    padded = lambda order: sum(8 * max(lengths[i] for i in order[b : b + 8]) for b in range(0, len(order), 8))
    plain = stream_indices(1000, 0, 2000, seed=3)
    grouped = stream_indices(1000, 0, 2000, seed=3, lengths=lengths, batch=8)
    for epoch in (grouped[:1000], grouped[1000:]):
        assert sorted(epoch) == list(range(1000))  # every unit once per epoch
    assert grouped[:1000] != grouped[1000:]  # each epoch its own order
    assert padded(grouped[:1000]) < 0.6 * padded(plain[:1000])  # padding to the longest of a batch: about half
    # the stream is a function of (seed, position): a resumed run draws the same batches
    assert stream_indices(1000, 1496, 8, seed=3, lengths=lengths, batch=8) == grouped[1496:1504]


# ---------------------------------------------------------------------------------------- the runs


# The first losses of a tiny full fine-tuning run (seed 0, lr 3e-3, batch 4): a change here means the
# data, the mask, the loop or the optimizer changed the numbers.
PINNED = {1: 10.7344, 2: 10.4586, 3: 10.2560, 4: 10.1457}


def test_pinned_losses_of_a_tiny_run(tiny_model, label_data, tmp_path):
    run(tiny_model, label_data, tmp_path / "out", steps=4)
    got = losses(tmp_path / "out")
    assert {k: round(v, 4) for k, v in got.items()} == pytest.approx(PINNED, abs=2e-4)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_resume_after_a_kill_reproduces_the_run(tiny_model, chat_data, tmp_path, lora_r):
    kw = dict(steps=6, save_every=3, lora_r=lora_r, grad_accum=2, batch_size=2, warmup_steps=2)
    run(tiny_model, chat_data, tmp_path / "whole", **kw)
    stopped = run(tiny_model, chat_data, tmp_path / "killed", stop_after=4, **kw)  # killed after step 4
    assert stopped["stopped"]
    assert (tmp_path / "killed" / "checkpoints" / "step-000003" / "state.json").is_file()
    run(tiny_model, chat_data, tmp_path / "killed", resume=True, **kw)  # continues from step 3
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(whole[step], abs=1e-5)


def test_lora_merged_equals_unmerged_and_adapter_is_peft_format(tiny_model, chat_data, tmp_path):
    from pocketlm.finetune.lora import load_adapter
    from pocketlm.load import load

    out = tmp_path / "lora"
    run(tiny_model, chat_data, out, lora_r=4, lora_alpha=8, lr=2e-2, steps=4, merge=True)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_model)
    merged = load(str(out)).model
    base = load(str(tiny_model)).model
    with torch.no_grad():
        for p in base.parameters():
            p.data = p.data.clone()
    unmerged = load_adapter(base, out / "adapter")
    idx = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = unmerged(idx), merged(idx)
        before = load(str(tiny_model)).model(idx)
    assert not torch.allclose(got, before, atol=1e-4)  # the adapter did change the model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process(tiny_model, label_data, tmp_path):
    # one process: micro-batch 2 x 2 accumulation; two processes: micro-batch 2 each. Global batch 4 both.
    run(tiny_model, label_data, tmp_path / "one", steps=3, batch_size=2, grad_accum=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "pocketlm.cli", "finetune", str(tiny_model), "--data", str(label_data),
           "-o", str(tmp_path / "two"), "--steps", "3", "--batch-size", "2", "--lr", "3e-3", "--seq-len", "64",
           "--save-every", "0", "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5)
    lineage = json.loads((tmp_path / "two" / "config.json").read_text())["pocketlm"]
    assert lineage["world_size"] == 2 and lineage["global_batch"] == 4


def test_output_folder_loads_and_generates(tiny_model, label_data, tmp_path):
    from pocketlm.engine.generate import encode_chat, generate
    from pocketlm.engine.sampling import SamplingParams
    from pocketlm.load import load

    out = tmp_path / "out"
    summary = run(tiny_model, label_data, out, steps=3, eval_split=0.1, eval_every=2, pack=True)
    assert summary["eval"]["eval_accuracy"] >= 0
    lm = load(str(out))
    text = generate(lm, encode_chat(lm.tokenizer, [{"role": "user", "content": "hi"}]),
                    SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)).text()
    assert isinstance(text, str)
    lineage = lm.meta
    assert lineage["base_model"] == str(tiny_model) and lineage["recipe"]["method"] == "full"
    assert lineage["final_loss"] == pytest.approx(summary["final_loss"]) and lineage["recipe"]["pack"] is True
    assert (out / "loss.png").stat().st_size > 1000
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_grad_checkpointing_gives_the_same_gradients(tiny_model, quant):
    """Full fine-tuning's weight gradients, and QLoRA's adapter gradients through the int4 kernels' backward."""
    from pocketlm.finetune.config import DEFAULT_LORA_TARGETS
    from pocketlm.finetune.lora import apply_lora, enable_grad_checkpointing, unwrap
    from pocketlm.finetune.recipe import CausalLMLoss
    from pocketlm.load import load

    idx = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = load(str(tiny_model), quant=quant).model
        if quant == "int4":
            torch.manual_seed(0)
            model = unwrap(apply_lora(model, 4, 8, 0.0, DEFAULT_LORA_TARGETS))
            for name, p in model.named_parameters():  # LoRA's B starts at zero: A's gradient would be zero too
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02)
        if checkpointing:
            enable_grad_checkpointing(model)
        CausalLMLoss(model)(idx, idx, None).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    assert quant == "none" or all("lora_" in name for name in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


# ------------------------------------------------------------------------------------ classification


@pytest.mark.parametrize("lora_r", [0, 4])
def test_classification_head_trains_saves_and_predicts(tiny_model, label_data, tmp_path, capsys, lora_r):
    from pocketlm.finetune.classify import Classifier

    out = tmp_path / "head"
    summary = run(tiny_model, label_data, out, task="classify", steps=16, lr=1e-2, eval_split=0.2, lora_r=lora_r)
    got = [loss for _, loss in sorted(losses(out).items())]
    assert sum(got[-4:]) < sum(got[:4])  # it learns (the label is a word of the text)
    assert summary["eval"]["eval_accuracy"] >= 0
    clf = Classifier.load(out)
    assert sorted(clf.labels) == sorted(LABELS)
    preds = clf.predict(["review 1: it was positive overall", "something else"])
    assert all(label in LABELS and 0 < p <= 1 for label, p in preds)
    assert main(["classify", str(out), "it was negative", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["label"] in LABELS
    # pocketlm eval scores the head on a labelled file: the accuracy of its own predictions
    rows = [json.loads(line) for line in label_data.read_text().splitlines()]
    expected = sum(pred == r["label"] for (pred, _), r in zip(clf.predict([r["text"] for r in rows]), rows)) / len(rows)
    assert main(["eval", str(out), "--task", "classify", "--by", "head", "--data", str(label_data), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"]["accuracy"] == pytest.approx(expected)
    assert report["n"] == len(rows) and report["settings"]["scoring"] == "head" and report["metrics"]["texts_per_s"] > 0
    assert report["settings"]["quant"] == "none"
    # --quant reaches the classifier's body (it once ran float whatever it said)
    int8 = Classifier.load(out, quant="int8")
    expected = sum(pred == r["label"] for (pred, _), r in zip(int8.predict([r["text"] for r in rows]), rows)) / len(rows)
    assert main(["eval", str(out), "--task", "classify", "--by", "head", "--data", str(label_data), "--quant", "int8", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["quant"] == "int8" and report["metrics"]["accuracy"] == pytest.approx(expected)


def test_classification_head_on_a_bert_encoder(tmp_path, label_data):
    from pocketlm import registry
    from pocketlm.config import BertConfig
    from pocketlm.finetune.classify import Classifier
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.models.bert import BertModel
    from pocketlm.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(registry.resolve("minilm-l6-v2")[1])
    cfg = BertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    folder = write_model_folder(tmp_path / "tiny-bert", cfg.to_hf(), BertModel(cfg).state_dict(), tok)
    out = tmp_path / "bert-head"
    finetune(FinetuneConfig(model=str(folder), data=str(label_data), out=str(out), task="classify", steps=4,
                            batch_size=4, lr=1e-2, quiet=True, save_every=0))
    clf = Classifier.load(out)
    assert clf.model.pooling == "mean"
    assert clf.predict(["it was neutral"])[0][0] in LABELS


# ------------------------------------------------------------------------------------------ QLoRA and DPO


def tensor_bytes(model, skip_lora: bool = False) -> int:
    """Bytes of every tensor a model holds: parameters, buffers and the kernels' own layouts (Int4Linear.packed,
    Int8Linear.packed_weight), each storage once."""
    seen, total = set(), 0
    for name, module in model.named_modules():
        if skip_lora and "lora_" in name:
            continue
        tensors = list(module._parameters.values()) + list(module._buffers.values())
        tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t is not None and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def test_qlora_keeps_the_base_quantized_and_trains(tiny_model, chat_data, smollm2_folder):
    from pocketlm.finetune.config import DEFAULT_LORA_TARGETS
    from pocketlm.finetune.data import build_examples, read_jsonl
    from pocketlm.finetune.lora import apply_lora, unwrap
    from pocketlm.finetune.qlora import QuantLoraLinear
    from pocketlm.finetune.recipe import CausalLMLoss
    from pocketlm.load import load
    from pocketlm.quant.int4 import Int4Linear

    float_bytes = tensor_bytes(load(str(tiny_model)).model)
    lm = load(str(tiny_model), quant="int4")
    model = unwrap(apply_lora(lm.model, 4, 8, 0.0, DEFAULT_LORA_TARGETS))
    wrapped = [m for m in model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(wrapped) == 7 * 2 and all(isinstance(m.base_layer, Int4Linear) for m in wrapped)  # q/k/v, gate/up split again
    # the base stays int4 (and an int8 head, which keeps its plain rows for the tied embedding beside its kernel layout)
    assert tensor_bytes(model, skip_lora=True) < 0.6 * float_bytes
    codes = [m.base_layer.qweight.clone() for m in wrapped]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.ndim == 2 and p.numel() <= 4 * 64 for p in trainable)  # only the adapters
    cfg = FinetuneConfig(model=str(tiny_model), data=str(chat_data), out="x", seq_len=64)
    batch = collate(build_examples(lm.tokenizer, read_jsonl(chat_data)[:8], cfg), 0)
    optimizer = torch.optim.AdamW(trainable, lr=2e-2)
    loss_fn, got = CausalLMLoss(model), []
    for _ in range(6):
        loss = loss_fn(batch["ids"], batch["labels"], batch["lengths"]) / (batch["labels"] != IGNORE).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        got.append(loss.item())
    assert got[-1] < got[0] - 0.2, got  # it trains through the int4 layers
    assert all(torch.equal(m.base_layer.qweight, c) for m, c in zip(wrapped, codes))  # and they stayed as they were


def test_a_qlora_base_keeps_its_embedding_and_head_float(tiny_model, chat_data):
    """QLoRA's base (load_base with --quant): int4 layers, but the token embedding and the tied head float, as
    bitsandbytes leaves them: the file's values exactly, where int8 rows of SmolLM2's Q8_0 embedding had cost
    banking77 QLoRA 1.5-2.6 points against LoRA (docs/BENCHMARKS.md). A GGUF (gguf-py's dequantize is the
    reference) and a float folder alike."""
    import gguf

    from conftest import smollm2_path
    from pocketlm.finetune.recipe import load_base
    from pocketlm.load import load
    from pocketlm.quant.int4 import Int4Linear

    reader = gguf.GGUFReader(smollm2_path())
    table = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = torch.from_numpy(gguf.quants.dequantize(table.data, table.tensor_type).astype(np.float32))  # (V, D)
    for source, want_table in ((smollm2_path(), want), (tiny_model, load(str(tiny_model)).model.lm_head.weight)):
        cfg = FinetuneConfig(model=str(source), data=str(chat_data), out="x", quant="int4", lora_r=4)
        model = load_base(cfg).model
        assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)  # the body stays int4
        assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, want_table)
        assert type(model.model.embed_tokens) is nn.Embedding and torch.equal(model.model.embed_tokens.weight, want_table)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still one table


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_unfused_quantized_projections_compute_what_the_fused_ones_did(tiny_model, quant):
    from pocketlm.load import load
    from pocketlm.quant import dequantize_model, unfuse_projections

    lm = load(str(tiny_model), quant=quant)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = lm.model(ids)
        unfuse_projections(lm.model)
        assert lm.model.model.layers[0].self_attn.qkv_proj is None and lm.model.model.layers[0].mlp.up_proj is not None
        torch.testing.assert_close(lm.model(ids), fused, rtol=1e-5, atol=1e-5)
        dequantize_model(lm.model)  # the float model the quantized one computes (QLoRA merges into it)
        assert not any("Int" in type(m).__name__ for m in lm.model.modules())
        torch.testing.assert_close(lm.model(ids), fused, rtol=0.02, atol=0.02 * fused.abs().max().item())


def test_qlora_recipe_writes_a_peft_adapter_and_a_merged_float_model(tiny_model, chat_data, tmp_path, capsys):
    from pocketlm.finetune.lora import load_adapter
    from pocketlm.load import load

    out = tmp_path / "qlora"
    run(tiny_model, chat_data, out, lora_r=4, lora_alpha=8, lr=2e-2, steps=6, quant="int4", merge=True)
    got = losses(out)
    assert got[6] < got[1]
    names = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(out / "adapter" / "adapter_model.safetensors"))
    assert any(".q_proj.lora_A" in n for n in names) and not any("qkv_proj" in n for n in names)  # the float base's names
    merged = load(str(out))
    assert merged.meta["recipe"]["method"] == "qlora r=4 on int4" and merged.meta["weights"] == "float32"
    adapted = load_adapter(load(str(tiny_model), quant="int4", head="float").model, out / "adapter")  # on the QLoRA base
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got_ = adapted(ids), merged.model(ids)
    assert ((got_ - want).abs().max() / want.abs().max()).item() < 0.02  # the int4 kernel's 8-bit activations
    # a quantized base trains adapters only
    assert main(["finetune", str(tiny_model), "--data", str(chat_data), "-o", str(tmp_path / "o"), "--quant", "int4"]) == 1
    assert "QLoRA" in capsys.readouterr().err


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"Is {i} a number?", "chosen": "Yes, it is.", "rejected": "No, it is not."}) + "\n")
    return path


def pair_margin(model_dir, pair_data) -> float:
    """Mean log pi(chosen) - log pi(rejected) over the pairs."""
    from pocketlm.finetune.data import build_pairs, read_jsonl
    from pocketlm.finetune.dpo import sequence_logps
    from pocketlm.load import load

    lm = load(str(model_dir))
    pairs = build_pairs(lm.tokenizer, read_jsonl(pair_data), FinetuneConfig(model="m", data="d", out="o", seq_len=64))
    batch = collate([c for c, _ in pairs] + [r for _, r in pairs], 0)
    with torch.no_grad():
        logps = sequence_logps(lm.model, batch["ids"], batch["labels"])
    return (logps[: len(pairs)] - logps[len(pairs) :]).mean().item()


@pytest.mark.parametrize("lora_r, quant", [(0, "none"), (4, "none"), (4, "int4")])
def test_dpo_raises_the_chosen_over_rejected_margin(tiny_model, pair_data, tmp_path, lora_r, quant):
    out = tmp_path / "dpo"
    before = pair_margin(tiny_model, pair_data)
    summary = run(tiny_model, pair_data, out, task="dpo", steps=6, lr=1e-2 if lora_r else 1e-3, lora_r=lora_r, lora_alpha=8,
                  quant=quant, merge=True, eval_split=0.25, dpo_beta=0.1)
    after = pair_margin(out, pair_data)
    assert after > before + 1.0, (before, after)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    margins = [r["margin"] for r in rows if "margin" in r]
    assert margins[-1] > margins[0] and summary["eval"]["eval_accuracy"] == 1.0
    assert load_lineage(out)["recipe"]["name"] == "dpo"


def test_dpo_resume_after_a_kill_reproduces_the_run(tiny_model, pair_data, tmp_path):
    kw = dict(task="dpo", steps=4, save_every=2, lora_r=4, batch_size=2, grad_accum=2, lr=1e-2)
    run(tiny_model, pair_data, tmp_path / "whole", **kw)
    assert run(tiny_model, pair_data, tmp_path / "killed", stop_after=3, **kw)["stopped"]
    run(tiny_model, pair_data, tmp_path / "killed", resume=True, **kw)  # from the step-2 checkpoint
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in whole:
        assert resumed[step] == pytest.approx(whole[step], abs=1e-5)


def load_lineage(out) -> dict:
    return json.loads((Path(out) / "config.json").read_text())["pocketlm"]


def test_dpo_rows_need_prompt_chosen_rejected(tiny_model, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "hello"}) + "\n")
    assert main(["finetune", str(tiny_model), "--data", str(data), "-o", str(tmp_path / "o"), "--task", "dpo", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ":1: missing field 'rejected'" in err


# ------------------------------------------------------------------------------------------ the CLI


def test_recipe_yaml_with_cli_override(tiny_model, label_data, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model}\ndata: {label_data}\nsteps: 5\nbatch_size: 4\nlr: 0.003\nseq_len: 64\nquiet: true\nsave_every: 0\n")
    assert main(["finetune", "--config", str(recipe), "--steps", "2", "-o", str(tmp_path / "o")]) == 0
    assert sorted(losses(tmp_path / "o")) == [1, 2]
    assert json.loads((tmp_path / "o" / "config.json").read_text())["pocketlm"]["steps"] == 2


def test_shipped_recipes_parse():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        if path.name.startswith("shrink-"):
            continue  # `pocketlm shrink`'s own config (tests/test_shrink.py)
        cfg = FinetuneConfig.from_yaml(path, {"out": "x"})
        assert (cfg.model or cfg.teacher) and Path(cfg.data).name.endswith(".jsonl"), path  # distill: --student gives the model


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": \n', ":2: not valid JSON"),
    ('{"text": "a", "label": "x"}\n{"text": "b"}\n', ":2: missing field 'label'"),
    ('{"foo": 1}\n', ":1: unknown row kind"),
])
def test_bad_data_is_one_line_naming_the_line(tiny_model, tmp_path, capsys, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    assert main(["finetune", str(tiny_model), "--data", str(data), "-o", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "bad.jsonl" in err and "Traceback" not in err


def test_device_cuda_without_cuda_and_an_unknown_device_are_one_line(tiny_model, label_data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["finetune", str(tiny_model), "--data", str(label_data), "-o", str(tmp_path / "o"), "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--device cpu" in err
    assert main(["finetune", str(tiny_model), "--data", str(label_data), "-o", str(tmp_path / "o"), "--device", "tpu"]) == 1
    assert "device must be auto, cpu or cuda" in capsys.readouterr().err


def test_missing_file_and_missing_label_for_classify(tiny_model, tmp_path, capsys):
    assert main(["finetune", str(tiny_model), "--data", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o")]) == 1
    assert "no such data file" in capsys.readouterr().err
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"text": "no label here", "labels": "x"}) + "\n")
    assert main(["finetune", str(tiny_model), "--data", str(data), "-o", str(tmp_path / "o"), "--task", "classify"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ":1: missing field 'label'" in err
    assert main(["finetune", str(tiny_model), "--data", str(data), "-o", str(tmp_path / "o"), "--resume", "--task", "classify"]) == 1
