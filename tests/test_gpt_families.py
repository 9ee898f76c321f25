"""GPT-2, GPT-Neo and GPT-J end to end (issue 24), each a tiny random model built by transformers' own classes:

- the decoder contract against transformers (test_models.check_decoder: logits to 1e-4 in fp32, cached equals
  uncached, meta loading, to_hf round trip, 30 greedy tokens)
- an HF folder loaded by `pocketlm.load` (GPT-2's transposed Conv1D weights read through the state_dict hooks)
  gives transformers' logits, and a model folder pocketlm writes loads back in transformers
- int8 / int4 quantization runs and generates; the fused decode step declines these families (LayerNorm, learned
  positions, plain MLPs are not cpu.cpp's) and the modules run, quantized too
- LoRA with the family's default targets trains (loss falls) and the merged model equals the adapted one
- GGUF where llama.cpp has the architecture (GPT-2; GPT-Neo and GPT-J have no llama.cpp converter or model):
  written, read back, same logits and greedy text as transformers; a q8_0 file read straight into int8 layers
- continuous batching (cache rows at their own positions) equals each sequence alone
- files saved from the base model (openai-community/gpt2's: no "transformer.", causal-mask buffers) load and export
- settings the models do not compute are refused in one line
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from test_models import V, check_decoder  # noqa: E402

from pocketlm.config import config_from_hf  # noqa: E402
from pocketlm.models import model_class_for  # noqa: E402


def tiny(family: str, vocab: int = V):
    """A tiny random transformers model of `family`, every LayerNorm and bias perturbed (HF starts them at 1 and 0)."""
    ids = dict(bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        hc = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, **ids)
        cls = transformers.GPT2LMHeadModel
    elif family == "gpt2-scaled":  # per-layer score scaling, a narrower MLP, an untied head
        hc = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96,
                                     scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False, **ids)
        cls = transformers.GPT2LMHeadModel
    elif family == "gpt_neo":  # global, local, local with a window shorter than the sequence
        hc = transformers.GPTNeoConfig(vocab_size=vocab, hidden_size=64, num_layers=3, num_heads=4, max_position_embeddings=64,
                                       window_size=4, attention_types=[[["global", "local"], 1], [["local"], 1]], **ids)
        cls = transformers.GPTNeoForCausalLM
    else:  # gptj: rotary on half of each head
        hc = transformers.GPTJConfig(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8, **ids)
        cls = transformers.GPTJForCausalLM
    torch.manual_seed(0)
    hf = cls(hc)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return hf.eval()


@pytest.mark.parametrize("family", ["gpt2", "gpt2-scaled", "gpt_neo", "gptj"])
def test_matches_transformers(family):
    hf = tiny(family)
    cfg = check_decoder(hf, model_class_for(config_from_hf(hf.config.to_dict())))
    assert cfg.model_type == family.split("-")[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (an HF folder saved by transformers with a byte-level BPE tokenizer, the transformers model)."""
    from tiny_models import byte_level_metadata

    from pocketlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(byte_level_metadata())
    out = {}
    for family in ("gpt2", "gpt_neo", "gptj"):
        hf = tiny(family, tokenizer.vocab_size)
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        tokenizer.save(folder)
        out[family] = folder, hf
    return out


def ids_of(lm, text="Hello world. The hello world of x"):
    from pocketlm.engine.generate import encode_raw

    return torch.tensor([encode_raw(lm.tokenizer, text)])


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gptj"])
def test_folder_loads_and_writes_as_transformers(folders, family, tmp_path):
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.load import load

    folder, hf = folders[family]
    lm = load(str(folder))
    ids = ids_of(lm)
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(lm.model(ids), ref, rtol=1e-4, atol=1e-5)
    # pocketlm's own writer (finetune, prune, export): transformers reads its folder back as the same model
    write_model_folder(tmp_path / "out", lm.config.to_hf(), lm.model.state_dict(), lm.tokenizer)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gptj"])
def test_quantized_runs_through_the_modules(folders, family, quant):
    from pocketlm.engine.generate import generate
    from pocketlm.engine.sampling import SamplingParams
    from pocketlm.load import load

    folder, hf = folders[family]
    lm = load(str(folder), quant=quant)
    assert not any(type(m) is nn.Linear for m in lm.model.modules())
    ids = ids_of(lm)
    with torch.no_grad():
        cosine = torch.cosine_similarity(lm.model(ids).flatten(), hf(ids).logits.flatten(), dim=0)
    assert cosine.item() > (0.999 if quant == "int8" else 0.98)
    g = generate(lm, ids[0].tolist(), SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    g.text()
    assert g.stats.completion_tokens == 6
    lm.model.setup_cache(1, 8)
    with torch.inference_mode():
        lm.model(ids[:, :1], torch.tensor([0]))  # a decoded token: where the fused step would be built
    assert lm.model.decode_step is False  # it declined (fused_spec raised Unsupported): the modules ran


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gptj"])
def test_lora_default_targets_train_and_merge(folders, family, tmp_path):
    from pocketlm.families import family as row
    from pocketlm.finetune import finetune
    from pocketlm.finetune.config import FinetuneConfig
    from pocketlm.finetune.lora import load_adapter
    from pocketlm.load import load

    folder, _ = folders[family]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "Hello world. The hello world of x is a world of hello."}) + "\n" for _ in range(8)))
    out = tmp_path / "lora"
    finetune(FinetuneConfig(model=str(folder), data=str(data), out=str(out), batch_size=4, steps=5, lr=2e-2, lora_r=4,
                            lora_alpha=8, merge=True, save_every=0, quiet=True, seq_len=32))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(row(family).lora)
    merged = load(str(out)).model
    unmerged = load_adapter(load(str(folder)).model, out / "adapter")
    idx = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), unmerged(idx), rtol=1e-5, atol=1e-5)


def test_gpt2_gguf_both_ways(folders, tmp_path, throwaway_home):
    from gguf import GGUFReader

    from pocketlm.export import export
    from pocketlm.load import load
    from test_models import check_greedy

    folder, hf = folders["gpt2"]
    path = tmp_path / "gpt2.gguf"
    export(str(folder), "gguf", path, qtype="f32")
    reader = GGUFReader(path)
    names = {t.name for t in reader.tensors}
    # llama.cpp's names (gguf-py tensor_mapping.py for MODEL_ARCH.GPT2); the tied head is not written
    assert {"token_embd.weight", "position_embd.weight", "output_norm.bias", "blk.0.attn_qkv.weight",
            "blk.0.attn_output.bias", "blk.1.ffn_up.weight", "blk.1.ffn_down.bias", "blk.1.ffn_norm.weight"} <= names
    assert "output.weight" not in names
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "gpt2"
    qkv = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    assert [int(n) for n in qkv.shape] == [64, 192]  # ggml's (in, out): rows of 64, as convert_hf_to_gguf's GPT2Model
    lm = load(str(path))
    ids = ids_of(lm)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), hf(ids).logits, rtol=1e-4, atol=1e-5)
    check_greedy(hf, lm.model)
    # a q8_0 file read straight into int8 layers (quant/from_gguf.py): ggml's (out, in) rows are the modules' own
    export(str(folder), "gguf", tmp_path / "q8.gguf", qtype="q8_0")
    int8 = load(str(tmp_path / "q8.gguf"), quant="int8")
    assert int8.meta["weights"] == "int8"
    with torch.no_grad():
        cosine = torch.cosine_similarity(int8.model(ids).flatten(), hf(ids).logits.flatten(), dim=0)
    assert cosine.item() > 0.999


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gptj"])
def test_rows_at_their_own_positions_equal_each_sequence_alone(family):
    """Continuous batching (the server's Batch): sequences prefilled into cache rows of their own, then decoded together
    at different positions, get the logits each gets alone; lengths cross GPT-Neo's local window (4)."""
    hf = tiny(family)
    cfg = config_from_hf(hf.config.to_dict())
    model = model_class_for(cfg)(cfg).eval()
    model.load_state_dict(hf.state_dict())
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (3, 9, 2)]
    fed = torch.randint(0, V, (len(prompts), 5), generator=g)  # the tokens each row decodes, teacher-forced
    with torch.no_grad():
        alone = []
        for prompt, tokens in zip(prompts, fed):
            model.setup_cache(1, 16)
            logits = [model(prompt[None], torch.arange(len(prompt)))[0, -1]]
            logits += [model(token.view(1, 1), torch.tensor([len(prompt) + t]))[0, -1] for t, token in enumerate(tokens)]
            alone.append(torch.stack(logits))  # (6, V)
        model.setup_cache(4, 16)
        slots = torch.tensor([2, 0, 3])
        batched = [[model(p[None], torch.arange(len(p))[None], torch.tensor([s]))[0, -1]] for p, s in zip(prompts, slots.tolist())]
        pos = torch.tensor([len(p) for p in prompts])
        for t in range(fed.shape[1]):
            logits = model(fed[:, t : t + 1], (pos + t)[:, None], slots)  # (3, 1, V)
            for i in range(len(prompts)):
                batched[i].append(logits[i, -1])
    for ours, ref in zip(batched, alone):
        torch.testing.assert_close(torch.stack(ours), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo"])
def test_base_model_checkpoints_with_mask_buffers_load(folders, family, tmp_path, throwaway_home):
    """openai-community/gpt2's own file was saved from GPT2Model: no "transformer." in its names, and (as GPT-Neo's and
    GPT-J's older files) each attention's causal-mask buffers beside the weights. Both read as transformers reads them,
    by `load` and by `export`."""
    from safetensors.torch import load_file, save_file

    from pocketlm.export import export
    from pocketlm.load import load

    folder, hf = folders[family]
    base = tmp_path / "base"
    base.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (base / f.name).write_bytes(f.read_bytes())
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(folder / "model.safetensors").items()}
    attn = "attn.attention" if family == "gpt_neo" else "attn"
    for i in range(hf.config.num_hidden_layers):
        tensors[f"h.{i}.{attn}.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
        tensors[f"h.{i}.{attn}.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, base / "model.safetensors")
    lm = load(str(base))
    ids = ids_of(lm)
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(lm.model(ids), ref, rtol=1e-4, atol=1e-5)
    export(str(base), "hf", tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(load(str(tmp_path / "hf")).model(ids), ref, rtol=1e-4, atol=1e-5)
    if family == "gpt2":
        export(str(base), "gguf", tmp_path / "m.gguf", qtype="f32")
        with torch.no_grad():
            torch.testing.assert_close(load(str(tmp_path / "m.gguf")).model(ids), ref, rtol=1e-4, atol=1e-5)


def test_settings_the_models_do_not_compute_are_refused_in_one_line(folders, tmp_path):
    from pocketlm.errors import PocketLMError
    from pocketlm.formats.gguf_write import write_gguf
    from pocketlm.tokenizer import Tokenizer

    gpt2 = tiny("gpt2").config.to_dict()
    with pytest.raises(PocketLMError, match="activation_function 'swish' is not supported for gpt2"):
        config_from_hf(gpt2 | {"activation_function": "swish"})
    with pytest.raises(PocketLMError, match="cross-attention"):
        config_from_hf(gpt2 | {"add_cross_attention": True})
    with pytest.raises(PocketLMError, match="rotary_dim None must be even"):
        config_from_hf(tiny("gptj").config.to_dict() | {"rotary_dim": None})
    with pytest.raises(PocketLMError, match="attention_layers must be 3 entries of 'global' or 'local'"):
        config_from_hf(tiny("gpt_neo").config.to_dict() | {"attention_layers": ["global", "sparse", "local"]})
    # GGUF: what llama.cpp's gpt2 graph does not compute; no GGUF architecture for GPT-Neo and GPT-J
    scaled = tiny("gpt2-scaled")
    tokenizer = Tokenizer.from_hf_dir(folders["gpt2"][0])
    with pytest.raises(PocketLMError, match="attention scaling"):
        write_gguf(tmp_path / "x.gguf", scaled.config.to_dict(), scaled.state_dict(), tokenizer)
    for family in ("gpt_neo", "gptj"):
        hf = tiny(family)
        with pytest.raises(PocketLMError, match=f"GGUF export of model_type '{family}' is not supported"):
            write_gguf(tmp_path / "x.gguf", hf.config.to_dict(), hf.state_dict(), tokenizer)


def test_calibrated_quantization_refuses_these_families_in_one_line(folders, tmp_path, capsys):
    from pocketlm.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("Hello world. The hello world of x is a world of hello, he said.\n" * 20)
    assert main(["quantize", str(folders["gpt2"][0]), "--to", "int4", "--calib", str(calib), "--method", "gptq", "-o", str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not support gpt2" in err and "without --calib" in err
