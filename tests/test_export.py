"""`pocketlm export`: Hugging Face folders that transformers loads with equal logits, GGUF files that read back equal.

References: transformers (from_pretrained on the folder, and its own GGUF loader on the file), gguf-py's
GGUFReader and dequantizers, and pocketlm's GGUF reader (formats/gguf.py), whose exact inverse the writer is.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from conftest import hf_from_gguf, smollm2_path
from pocketlm.cli import main
from pocketlm.errors import PocketLMError
from pocketlm.export import export
from pocketlm.formats.gguf import gguf_to_hf, read_gguf
from pocketlm.formats.gguf_quants import dequantize
from pocketlm.formats.gguf_write import quantize_q4_k
from pocketlm.load import load
from pocketlm.tokenizer import Tokenizer
from tiny_models import TEXT, logits

TEXTS = [TEXT, "<|im_start|>user\nHi there!<|im_end|>\n", "héllo wörld ñ 123 4567", "  two spaces\n\n\ttab"]


pytestmark = pytest.mark.usefixtures("throwaway_home")


def with_lineage(src: Path, dst: Path) -> Path:
    """A copy of a model folder whose config.json says how the model was made."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["pocketlm"] = {"teacher": "smollm2-135m-instruct", "data": "alpaca", "recipe": {"kl": "forward"}, "scores": {"ppl": 12.5}}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ---- Hugging Face folders ---------------------------------------------------------------------------


def test_hf_export_loads_in_transformers_with_equal_logits(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = load(str(tiny_dir))
    out = tmp_path / "hf"
    report = export(str(tiny_dir), "hf", out)
    assert {p.name for p in out.iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"
    }  # fmt: skip
    assert report["params"] == sum(p.numel() for p in src.model.parameters())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([src.tokenizer.encode(TEXT)])
    with torch.inference_mode():
        ours, theirs = src.model(ids), hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits(load(str(out))), logits(src))
    config = json.loads((out / "config.json").read_text())
    assert config["pocketlm"]["exported_from"] == str(tiny_dir) and config["pocketlm"]["export_type"] == "f32"


def test_hf_export_f16_and_lineage(small_llama_dir, tmp_path):
    src_dir = with_lineage(small_llama_dir, tmp_path / "made")
    out = tmp_path / "hf16"
    export(str(src_dir), "hf", out, "f16")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert config["pocketlm"]["teacher"] == "smollm2-135m-instruct" and config["pocketlm"]["scores"] == {"ppl": 12.5}
    a, b = logits(load(str(src_dir))), logits(load(str(out)))
    torch.testing.assert_close(b, a, rtol=0, atol=2e-2)


# ---- GGUF files ------------------------------------------------------------------------------------


def test_gguf_f32_reads_back_equal(tiny_dir, tmp_path):
    src = load(str(tiny_dir))
    path = tmp_path / "model.gguf"
    export(str(tiny_dir), "gguf", path, "f32")

    # tensors: exactly the source's, through pocketlm's reader (which undoes the Q/K permutation and Gemma's +1)
    config, state_dict = gguf_to_hf(path)
    expected = {k: v for k, v in src.model.state_dict().items() if not (k == "lm_head.weight" and src.config.tie_word_embeddings)}
    assert set(state_dict) == set(expected)
    assert all(torch.equal(state_dict[k], expected[k]) for k in expected)
    source_config = json.loads((tiny_dir / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "bos_token_id", "eos_token_id"):  # fmt: skip
        assert config[key] == source_config[key], key
    if source_config["model_type"] == "gemma3_text":
        assert config["layer_types"] == source_config["layer_types"]
        assert config["sliding_window"] == source_config["sliding_window"]

    # metadata: the same through gguf-py's reader; the tokenizer encodes every text to the same ids
    f = read_gguf(path)
    theirs = {k: field.contents() for k, field in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert f.metadata.keys() == theirs.keys()
    assert all(f.metadata[k] == pytest.approx(theirs[k]) for k in theirs)
    tok = Tokenizer.from_gguf_metadata(f.metadata)
    for text in TEXTS:
        assert tok.encode(text) == src.tokenizer.encode(text), text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (src.tokenizer.bos_id, src.tokenizer.eos_id, src.tokenizer.pad_id, src.tokenizer.add_bos)
    assert tok.stop_ids == src.tokenizer.stop_ids and tok.chat_template == src.tokenizer.chat_template

    # the model: pocketlm.load on the .gguf gives the same logits
    assert torch.equal(logits(load(str(path))), logits(src))


@pytest.mark.parametrize("qtype, matrix_type, atol", [("f16", T.F16, 2e-2), ("q8_0", T.Q8_0, 5e-2), ("q4_0", T.Q4_0, 0.5)])
def test_gguf_quantized(small_llama_dir, tmp_path, qtype, matrix_type, atol):
    path = tmp_path / f"model-{qtype}.gguf"
    export(str(small_llama_dir), "gguf", path, qtype)
    f = read_gguf(path)
    assert f.tensors["blk.0.ffn_up.weight"].ggml_type == matrix_type
    assert f.tensors["token_embd.weight"].ggml_type == matrix_type
    assert f.tensors["blk.0.attn_norm.weight"].ggml_type == T.F32  # 1-D tensors stay F32
    a, b = logits(load(str(small_llama_dir))), logits(load(str(path)))
    torch.testing.assert_close(b, a, rtol=0, atol=atol)
    assert (b.argmax(-1) == a.argmax(-1)).float().mean() > (0.95 if qtype != "q4_0" else 0.7)


def test_gguf_q4_k_falls_back_where_rows_are_not_whole_super_blocks(small_llama_dir, tmp_path):
    # 64-wide rows are not a whole 256-value super-block: llama.cpp's fallback for Q4_K is Q5_0
    path = tmp_path / "model-q4k.gguf"
    export(str(small_llama_dir), "gguf", path, "q4_k")
    f = read_gguf(path)
    assert f.tensors["blk.0.attn_q.weight"].ggml_type == T.Q5_0
    assert f.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_S
    assert torch.isfinite(logits(load(str(path)))).all()


def test_q4_k_quantizer_round_trips():
    a = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    a[3] = 0.0  # an all-zero row: scales of 0, no division by zero
    a[5] += 4.0  # all-positive sub-blocks: the min offset is 0
    q = quantize_q4_k(a)
    assert q.shape == (16, 2 * 144) and q.dtype == np.uint8
    ours = dequantize(torch.from_numpy(q.reshape(-1)), T.Q4_K, a.shape).numpy()
    assert np.array_equal(ours, gguf.quants.dequantize(q, T.Q4_K))  # valid bytes, read the same by gguf-py
    assert np.all(ours[3] == 0)
    rel = np.sqrt(((ours - a) ** 2).mean()) / a.std()
    q4_0 = gguf.quants.dequantize(gguf.quants.quantize(a, T.Q4_0), T.Q4_0)
    assert rel < 1.1 * np.sqrt(((q4_0 - a) ** 2).mean()) / a.std()  # about as good as Q4_0 (4.5 bits vs 4.5)


def test_transformers_loads_the_exported_gguf(tiny_dir, tmp_path):
    src = load(str(tiny_dir))
    path = tmp_path / "for-transformers.gguf"
    export(str(tiny_dir), "gguf", path, "f32")
    hf = hf_from_gguf(path)
    ids = torch.tensor([src.tokenizer.encode(TEXT)])
    with torch.inference_mode():
        torch.testing.assert_close(hf(ids).logits, src.model(ids), rtol=1e-4, atol=1e-4)


def test_gguf_lineage(small_llama_dir, tmp_path):
    src_dir = with_lineage(small_llama_dir, tmp_path / "made")
    path = tmp_path / "lineage.gguf"
    export(str(src_dir), "gguf", path, "q8_0")
    lineage = json.loads(read_gguf(path).metadata["pocketlm.lineage"])
    assert lineage["teacher"] == "smollm2-135m-instruct" and lineage["recipe"] == {"kl": "forward"}
    assert lineage["export_type"] == "q8_0" and lineage["exported_from"] == str(src_dir)
    meta = load(str(path)).meta  # carried on into the converted folder
    assert meta["teacher"] == "smollm2-135m-instruct" and meta["source"] == str(path.resolve())


# ---- Llama 3.x RoPE scaling: the rope_freqs tensor, both ways ------------------------------------------

LLAMA32_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llama32_dir(tmp_path_factory):
    """Llama 3.2's RoPE (base 500,000, llama3 scaling 32 / 1 / 4 / 8192, 131k context, tied embedding) at tiny size.
    head_dim 64: of the 32 rotary pairs 15 keep their frequency, 3 are smoothed and 14 are divided by 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import byte_level_metadata

    folder = tmp_path_factory.mktemp("tiny-llama32")
    tokenizer = Tokenizer.from_gguf_metadata(byte_level_metadata())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=dict(LLAMA32_ROPE), tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def test_gguf_llama3_rope_writes_rope_freqs_as_llama_cpp(tiny_llama32_dir, tmp_path):
    from test_gguf import converter_rope_factors

    path = tmp_path / "llama32.gguf"
    export(str(tiny_llama32_dir), "gguf", path, "q8_0")
    f = read_gguf(path)
    info = f.tensors["rope_freqs.weight"]
    assert list(f.tensors)[0] == "rope_freqs.weight" and info.ggml_type == T.F32 and info.shape == (32,)
    factors = converter_rope_factors(64, 500000.0, LLAMA32_ROPE)
    assert info.data.tobytes() == factors.tobytes()  # bit for bit what llama.cpp's converter writes
    assert (factors == 1).sum() == 15 and ((factors > 1) & (factors < 32)).sum() == 3 and (factors == 32).sum() == 14
    assert not any("rope.scaling" in k for k in f.metadata)  # the converter writes no keys for llama3 RoPE


def test_gguf_llama3_rope_matches_transformers(tiny_llama32_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "llama32.gguf"
    export(str(tiny_llama32_dir), "gguf", path, "f32")
    ours = load(str(path))
    assert ours.config.rope_scaling == LLAMA32_ROPE
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama32_dir, dtype=torch.float32).eval()
    no_scaling = {"rope_type": "default", "rope_theta": 500000.0}
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama32_dir, dtype=torch.float32, rope_parameters=no_scaling)
    # 600 positions: the divided low frequencies turn far enough to change the logits
    ids = torch.randint(0, hf.config.vocab_size, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, expected, unscaled = ours.model(ids), hf(ids).logits, plain.eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the test sees the scaling: plain RoPE is outside the tolerance, ~3000x further off than the GGUF model
    assert not torch.allclose(unscaled, expected, rtol=1e-4, atol=1e-4)
    assert (unscaled - expected).abs().max() > 100 * (got - expected).abs().max()


def test_gguf_llama3_rope_round_trips(tiny_llama32_dir, tmp_path):
    first, second = tmp_path / "first.gguf", tmp_path / "second.gguf"
    export(str(tiny_llama32_dir), "gguf", first, "f32")
    export(str(first), "gguf", second, "f32")  # through pocketlm's reader and back

    # config: the source's, RoPE scaling recovered from the factors alone
    source = json.loads((tiny_llama32_dir / "config.json").read_text())
    config, state_dict = gguf_to_hf(first)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
            "rope_parameters")  # fmt: skip
    assert {k: config[k] for k in keys} == {k: source[k] for k in keys}
    assert config["rope_scaling"] == LLAMA32_ROPE

    # tensors: the source's exactly (no rope_freqs among the weights), and the same file bytes the second time
    src = load(str(tiny_llama32_dir))
    expected = {k: v for k, v in src.model.state_dict().items() if k != "lm_head.weight"}
    assert set(state_dict) == set(expected)
    assert all(torch.equal(state_dict[k], expected[k]) for k in expected)
    a, b = read_gguf(first), read_gguf(second)
    assert list(a.tensors) == list(b.tensors)
    assert all(a.tensors[k].data.tobytes() == b.tensors[k].data.tobytes() for k in a.tensors)
    assert {k: v for k, v in a.metadata.items() if k != "pocketlm.lineage"} == {
        k: v for k, v in b.metadata.items() if k != "pocketlm.lineage"
    }


def test_gguf_llama3_rope_is_refused_where_llama_cpp_has_no_rope_freqs(small_llama_dir, tmp_path):
    from pocketlm.formats.gguf_write import write_gguf

    config = json.loads((small_llama_dir / "config.json").read_text())
    config |= {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "rope_scaling": dict(LLAMA32_ROPE)}
    config.pop("rope_parameters", None)
    tokenizer = Tokenizer.from_hf_dir(small_llama_dir)
    with pytest.raises(PocketLMError, match="llama3 RoPE scaling is not supported for qwen2"):
        write_gguf(tmp_path / "qwen2.gguf", config, {}, tokenizer)
    assert not list(tmp_path.iterdir())


# ---- bad input -------------------------------------------------------------------------------------


def one_line_error(capsys, *argv) -> str:
    assert main(list(argv)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pocketlm: error: "), err
    return err[0]


def test_bad_input_is_one_line(small_llama_dir, tmp_path, capsys):
    d = str(small_llama_dir)
    assert "not available for --format hf" in one_line_error(capsys, "export", d, "--format", "hf", "--type", "q8_0", "-o", str(tmp_path / "x"))
    assert "no such folder" in one_line_error(capsys, "export", d, "--format", "gguf", "-o", str(tmp_path / "no" / "x.gguf"))
    assert "is a folder" in one_line_error(capsys, "export", d, "--format", "gguf", "-o", str(tmp_path))
    assert "unknown model" in one_line_error(capsys, "export", "no-such-model", "--format", "hf", "-o", str(tmp_path / "y"))
    assert "overwrite" in one_line_error(capsys, "export", d, "--format", "hf", "-o", d)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8}))
    from safetensors.torch import save_file

    save_file({"embeddings.word_embeddings.weight": torch.zeros(8, 8)}, bert / "model.safetensors")
    with pytest.raises(PocketLMError, match="model_type 'bert' is not supported"):
        export(str(bert), "gguf", tmp_path / "bert.gguf")


def test_cli_export_prints_a_summary(small_llama_dir, tmp_path, capsys):
    assert main(["export", str(small_llama_dir), "--format", "gguf", "--type", "q8_0", "-o", str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "m.gguf (gguf, q8_0, 0.1M parameters" in out


# ---- the real SmolLM2 ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_round_trip_is_exact(smollm2, tmp_path):
    """SmolLM2 GGUF -> pocketlm -> GGUF F32 -> pocketlm: identical logits, and the same tokenizer metadata."""
    path = tmp_path / "smollm2-f32.gguf"
    export("smollm2-135m-instruct", "gguf", path, "f32")
    assert torch.equal(logits(load(str(path))), logits(smollm2))
    ours, source = read_gguf(path).metadata, read_gguf(smollm2_path()).metadata
    same = [k for k in source if k.startswith(("tokenizer.", "llama.")) and k != "tokenizer.ggml.add_space_prefix"]
    assert {k: ours[k] for k in same} == {k: source[k] for k in same}
    assert ours["general.name"] == source["general.name"] and ours["general.license"] == source["general.license"]


@pytest.mark.slow
def test_smollm2_hf_export_matches_transformers(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2-hf"
    export("smollm2-135m-instruct", "hf", out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    text = "The capital of France is Paris. It has the Eiffel Tower."
    ids = smollm2.tokenizer.encode(text)
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ids
    with torch.inference_mode():
        ours, theirs = smollm2.model(torch.tensor([ids])), hf(torch.tensor([ids])).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
