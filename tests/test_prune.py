"""`pocketlm prune`: pruned shapes and a forward run, keeping everything is the identity, importance picks
what a constructed model makes unimportant, and vocabulary trimming keeps kept tokens' ids and logits."""

from __future__ import annotations

import json

import pytest
import torch

from pocketlm.cli import main
from pocketlm.compress.prune import PruneSpec, prune_model
from pocketlm.export import export
from pocketlm.formats.gguf import gguf_to_hf
from pocketlm.load import load
from tiny_models import TEXT, logits

CALIB = 256  # calibration tokens: enough for the tiny models, quick on a busy machine


pytestmark = pytest.mark.usefixtures("throwaway_home")


def edit_weights(src, dst, edit):
    """A copy of model folder src with edit(state_dict) applied."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


def test_keeping_everything_is_the_identity(tiny_dir, tmp_path):
    src = load(str(tiny_dir))
    cfg = src.config
    for i, spec in enumerate([
        PruneSpec(),
        PruneSpec(heads=cfg.n_heads, kv_groups=cfg.n_kv_heads, ffn=cfg.intermediate_size, hidden=cfg.dim),
    ]):  # fmt: skip
        out = tmp_path / f"same{i}"
        report = prune_model(str(tiny_dir), out, spec, calib_tokens=CALIB)
        assert report["params_after"] == report["params_before"]
        assert torch.equal(logits(load(str(out))), logits(src))


def test_pruned_shapes_forward_and_export(tiny_dir, tmp_path):
    src = load(str(tiny_dir))
    out = tmp_path / "pruned"
    spec = PruneSpec(drop_layers=1, heads=2, kv_groups=1, ffn=48, hidden=40)
    report = prune_model(str(tiny_dir), out, spec, calib_tokens=CALIB)
    lm = load(str(out))
    cfg = lm.config
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size, cfg.dim) == (src.config.n_layers - 1, 2, 1, 48, 40)
    assert cfg.head_dim == src.config.head_dim
    sd = lm.model.state_dict()
    hd = cfg.head_dim
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (2 * hd, 40)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (hd, 40)
    assert sd["model.layers.0.self_attn.o_proj.weight"].shape == (40, 2 * hd)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (40, 48)
    assert sd["model.embed_tokens.weight"].shape == (src.config.vocab_size, 40)
    out_logits = logits(lm)
    assert out_logits.shape == logits(src).shape and torch.isfinite(out_logits).all()
    assert report["params_after"]["non_embedding"] < report["params_before"]["non_embedding"]
    assert report["params_after"]["total"] == sum(p.numel() for p in lm.model.parameters())
    config = json.loads((out / "config.json").read_text())
    assert config["pocketlm"]["recipe"]["prune"] == {"drop_layers": 1, "heads": 2, "kv_groups": 1, "ffn": 48, "hidden": 40}
    if src.config.model_type == "gemma3_text":  # the kept layers keep their kind (local / global)
        assert len(config["layer_types"]) == src.config.n_layers - 1
    # a valid model of the same family: transformers loads the folder and agrees
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = hf(torch.tensor([lm.tokenizer.encode(TEXT)])).logits
    torch.testing.assert_close(theirs, out_logits, rtol=1e-4, atol=1e-4)
    # ... and it exports: the GGUF reads back equal
    path = tmp_path / "pruned.gguf"
    export(str(out), "gguf", path, "f32")
    _, gg = gguf_to_hf(path)
    assert all(torch.equal(gg[k], sd[k]) for k in gg)
    assert torch.equal(logits(load(str(path))), out_logits)


def test_gemma_hidden_pruning_keeps_the_embedding_scale(tiny_gemma_dir, tmp_path):
    # Gemma multiplies embeddings by sqrt(D): pruning D must not change what the first block sees
    src = load(str(tiny_gemma_dir))
    out = tmp_path / "gemma-hidden"
    prune_model(str(tiny_gemma_dir), out, PruneSpec(hidden=48), calib_tokens=CALIB)
    lm = load(str(out))
    ids = torch.tensor([src.tokenizer.encode(TEXT)])
    with torch.inference_mode():
        x_src = src.model.model.embed_tokens(ids) * src.model.model.embed_scale  # (1, T, 64)
        x_new = lm.model.model.embed_tokens(ids) * lm.model.model.embed_scale  # (1, T, 48)
    # every kept channel of the first block's input has its old values
    assert all(any(torch.allclose(x_new[..., j], x_src[..., c], atol=1e-5) for c in range(64)) for j in range(48))


def test_block_influence_drops_the_block_that_does_nothing(small_llama_dir, tmp_path):
    def silence_layer_1(sd):  # block 1 adds nothing to the residual stream: influence 0
        sd["model.layers.1.self_attn.o_proj.weight"].zero_()
        sd["model.layers.1.mlp.down_proj.weight"].zero_()

    src_dir = edit_weights(small_llama_dir, tmp_path / "src", silence_layer_1)
    out = tmp_path / "shallow"
    report = prune_model(str(src_dir), out, PruneSpec(drop_layers=1), calib_tokens=CALIB)
    assert "dropped [1]" in report["changes"][-1]
    torch.testing.assert_close(logits(load(str(out))), logits(load(str(src_dir))), rtol=0, atol=1e-5)


def test_importance_prunes_dead_heads_and_channels(small_llama_dir, tmp_path):
    def kill(sd):
        for i in range(3):
            sd[f"model.layers.{i}.self_attn.v_proj.weight"][16:32].zero_()  # KV group 1: its heads output 0
            sd[f"model.layers.{i}.mlp.gate_proj.weight"][::2].zero_()  # even channels: silu(0) * up = 0

    src_dir = edit_weights(small_llama_dir, tmp_path / "src", kill)
    out = tmp_path / "narrow"
    prune_model(str(src_dir), out, PruneSpec(kv_groups=1, heads=2, ffn=64), calib_tokens=CALIB)
    torch.testing.assert_close(logits(load(str(out))), logits(load(str(src_dir))), rtol=0, atol=1e-5)


def test_vocab_trimming_keeps_kept_tokens_and_their_logits(tiny_dir, tmp_path):
    src = load(str(tiny_dir))
    domain = tmp_path / "domain.txt"
    domain.write_text(TEXT)
    out = tmp_path / "trimmed"
    report = prune_model(str(tiny_dir), out, PruneSpec(vocab_from=str(domain)))
    lm = load(str(out))
    kept = [src.tokenizer.token_to_id(lm.tokenizer.id_to_token(i)) for i in range(lm.tokenizer.vocab_size)]
    assert kept == sorted(kept) and len(kept) < src.tokenizer.vocab_size
    assert lm.config.vocab_size == len(kept) == report["params_after"]["embedding"] // lm.config.dim
    old_ids = src.tokenizer.encode(TEXT)
    assert [kept[i] for i in lm.tokenizer.encode(TEXT)] == old_ids  # same tokens, new ids
    assert lm.tokenizer.decode(lm.tokenizer.encode(TEXT)) == src.tokenizer.decode(old_ids)
    assert {kept[i] for i in lm.tokenizer.stop_ids} == src.tokenizer.stop_ids
    assert kept[lm.tokenizer.bos_id] == src.tokenizer.bos_id and kept[lm.tokenizer.eos_id] == src.tokenizer.eos_id
    torch.testing.assert_close(logits(lm), logits(src)[..., kept], rtol=0, atol=1e-5)
    assert lm.tokenizer.encode("zebra!") and lm.tokenizer.decode(lm.tokenizer.encode("zebra!")) == "zebra!"  # still encodes anything


def test_vocab_size_tops_up_with_the_most_frequent_tokens_in_the_texts_characters(small_llama_dir, tmp_path):
    from pocketlm.compress.prune import trim_vocab

    src = load(str(small_llama_dir))
    sample = "Hello world hex"  # its tokens: Hello, Ġworld, Ġ, he, x; letters H e l o w r d h x and Ġ
    (tmp_path / "domain.txt").write_text(sample)
    only = {src.tokenizer.id_to_token(i) for i in trim_vocab(src.tokenizer, sample)[0].tolist()}
    prune_model(str(small_llama_dir), tmp_path / "out", PruneSpec(vocab_from=str(tmp_path / "domain.txt"), vocab_size=len(only) + 2))
    lm = load(str(tmp_path / "out"))
    kept = {lm.tokenizer.id_to_token(i) for i in range(lm.tokenizer.vocab_size)}
    # merges in rank order not yet kept: Ġt (no t), Ġthe, Ġo (yes), Ġof (no f), Ġx (yes), Ġh, Ġhe, ...: the first two
    assert kept - only == {"Ġo", "Ġx"}
    assert lm.tokenizer.encode(" x") == [lm.tokenizer.token_to_id("Ġx")]  # whole, where the sample-only trim splits it


def test_bad_input_is_one_line(small_llama_dir, tmp_path, capsys):
    def error(*argv):
        assert main(["prune", str(small_llama_dir), "-o", str(tmp_path / "x"), *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pocketlm: error: "), err
        return err[0]

    assert "has 3 layers" in error("--drop-layers", "3")
    assert "multiple of 2" in error("--heads", "3")
    assert "2 key/value groups" in error("--kv-groups", "5")
    assert "MLP has 128 channels" in error("--ffn", "500")
    assert "no such calibration file" in error("--calib", str(tmp_path / "missing.txt"), "--ffn", "64")
    assert "no such --vocab-from file" in error("--vocab-from", str(tmp_path / "missing.txt"))
    assert "give --vocab-from FILE too" in error("--vocab-size", "100")
    assert "overwrite" in error("-o", str(small_llama_dir))


def test_cli_prune_reports_parameter_counts(small_llama_dir, tmp_path, capsys):
    assert main(["prune", str(small_llama_dir), "-o", str(tmp_path / "p"), "--drop-layers", "1", "--ffn", "64", "--calib-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert "non-embedding" in out and "layers: 3 -> 2" in out and "MLP: 128 -> 64" in out


@pytest.mark.slow
def test_smollm2_prune_runs_and_generates(smollm2, tmp_path):
    from pocketlm.engine.generate import encode_raw, generate
    from pocketlm.engine.sampling import SamplingParams

    out = tmp_path / "smollm2-pruned"
    report = prune_model("smollm2-135m-instruct", out, PruneSpec(drop_layers=4, ffn=1024), calib_tokens=512)
    before, after = report["params_before"], report["params_after"]
    assert before["total"] == 134_515_008 and after["total"] < before["total"]
    lm = load(str(out))
    assert lm.config.n_layers == 26 and lm.config.intermediate_size == 1024
    text = generate(lm, encode_raw(lm.tokenizer, "The capital of France is"), SamplingParams(max_new_tokens=8, temperature=0)).text()
    assert isinstance(text, str)
