"""`pocketlm prune` on the families outside Llama's layout, through each family's Cuts in families.py: GPT-2 (its
transposed Conv1D weights, learned positions), GPT-Neo (local and global layers), GPT-J and Phi-2 (parallel blocks,
a head with a bias).

Each tiny random model is built by transformers' own classes with one block silenced (its output projections
zero: influence 0) and every other MLP channel dead (its input row and bias zero: act(0) = 0). Dropping one block
and half the channels must then drop exactly those, so the pruned model equals the source: pocketlm's logits and
transformers' logits of the pruned folder both equal the source's. GPT-2, GPT-Neo and GPT-J derive head_dim as
dim / n_heads (transformers does too), so heads and hidden channels are refused there in one line; Phi-2's config
keeps a head_dim of its own and cuts them.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from test_families import tiny_hf  # noqa: E402
from test_gpt_families import tiny  # noqa: E402
from tiny_models import TEXT, byte_level_metadata  # noqa: E402

from pocketlm.cli import main  # noqa: E402
from pocketlm.errors import PocketLMError  # noqa: E402
from pocketlm.export import export  # noqa: E402
from pocketlm.families import family  # noqa: E402
from pocketlm.load import load  # noqa: E402

FAMILIES = ["gpt2", "gpt_neo", "gptj", "phi"]
SILENT = 0  # the block whose output projections are zeroed

pytestmark = pytest.mark.usefixtures("throwaway_home")


def blocks_of(hf) -> nn.ModuleList:
    return next(m for m in hf.modules() if isinstance(m, nn.ModuleList))


def with_dead_parts(hf, model_type: str):
    """Block SILENT adds nothing to the residual stream; in every block the even MLP channels output 0."""
    cuts = family(model_type).cuts
    with torch.no_grad():
        for i, block in enumerate(blocks_of(hf)):
            for name in cuts.ffn_in:
                proj = block.get_submodule(name)
                # a Conv1D's weight is (in, out): the channel is a column; a Linear's (out, in): a row
                (proj.weight[:, ::2] if cuts.conv1d else proj.weight[::2]).zero_()
                proj.bias[::2].zero_()
            if i == SILENT:
                for name in (cuts.heads_out, cuts.ffn_out):
                    proj = block.get_submodule(name)
                    proj.weight.zero_()
                    if proj.bias is not None:
                        proj.bias.zero_()
    return hf


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """model_type -> an HF folder saved by transformers (dead parts as above) with a byte-level BPE tokenizer."""
    from pocketlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(byte_level_metadata())
    out = {}
    for model_type in FAMILIES:
        if model_type == "phi":
            hf = tiny_hf("phi", tokenizer.vocab_size)
        else:
            hf = tiny(model_type, tokenizer.vocab_size)
        folder = tmp_path_factory.mktemp(f"dead-{model_type}")
        with_dead_parts(hf, model_type).save_pretrained(folder)
        tokenizer.save(folder)
        out[model_type] = folder
    return out


def logits_of(lm) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(torch.tensor([lm.tokenizer.encode(TEXT)]))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_prune_drops_the_silent_block_and_the_dead_channels(model_type, folders, tmp_path, capsys):
    folder = folders[model_type]
    src = load(str(folder))
    cfg = src.config
    L, F, D = cfg.n_layers, cfg.intermediate_size, cfg.dim
    out = tmp_path / "pruned"
    argv = ["prune", str(folder), "-o", str(out), "--drop-layers", "1", "--ffn", str(F // 2), "--calib-tokens", "256"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert f"dropped [{SILENT}]" in report["changes"][-1]

    lm = load(str(out))
    assert (lm.config.n_layers, lm.config.intermediate_size, lm.config.dim) == (L - 1, F // 2, D)
    kept = [i for i in range(L) if i != SILENT]
    assert lm.config.layer_types == [cfg.layer_types[i] for i in kept]  # GPT-Neo's local / global kinds follow
    # one block fewer, and in each kept block half the channels: F/2 rows of ffn_in (with bias), F/2 columns of ffn_out
    block = sum(t.numel() for k, t in src.model.state_dict().items() if ".0." in k and k.split(".0.")[0].endswith(("layers", "h")))
    before, after = report["params_before"]["total"], report["params_after"]["total"]
    assert after == before - block - (L - 1) * (F // 2) * (2 * D + 1)
    assert after == sum(p.numel() for p in lm.model.parameters())

    # the dropped parts did nothing: the pruned model is the source model
    ours = logits_of(lm)
    torch.testing.assert_close(ours, logits_of(src), rtol=0, atol=1e-5)
    # a valid transformers folder of the same family, and it agrees
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.model_type == model_type and hf.num_parameters() == after
    with torch.inference_mode():
        torch.testing.assert_close(hf(torch.tensor([lm.tokenizer.encode(TEXT)])).logits, ours, rtol=1e-4, atol=1e-4)
    if family(model_type).gguf is not None:  # GPT-2 and Phi-2 have llama.cpp architectures: the GGUF reads back equal
        export(str(out), "gguf", tmp_path / "pruned.gguf", "f32")
        torch.testing.assert_close(logits_of(load(str(tmp_path / "pruned.gguf"))), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "phi"])
def test_keeping_every_channel_is_the_identity(model_type, folders, tmp_path, capsys):
    folder = folders[model_type]
    src = load(str(folder))
    out = tmp_path / "same"
    assert main(["prune", str(folder), "-o", str(out), "--ffn", str(src.config.intermediate_size), "--calib-tokens", "256"]) == 0
    assert torch.equal(logits_of(load(str(out))), logits_of(src))


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])
def test_heads_and_hidden_are_refused_in_one_line(model_type, folders, tmp_path, capsys):
    for flag in ("--heads", "--hidden"):
        assert main(["prune", str(folders[model_type]), "-o", str(tmp_path / "x"), flag, "2"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and model_type in err[0] and "--ffn, --drop-layers" in err[0], err
    assert not (tmp_path / "x").exists()


def test_shrink_counts_the_blocks_of_a_gpt2_teacher(folders):
    """shrink's depth pruning finds GPT-2's blocks under transformer.h and its embedding under transformer.wte."""
    from pocketlm.compress.shrink import blocks_to_drop

    lm = load(str(folders["gpt2"]))  # 2 blocks and the learned positions make the non-embedding parameters
    assert blocks_to_drop(lm, 0.6) == 1


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])
def test_vocab_trimming_cuts_the_head_and_its_bias(model_type, folders, tmp_path):
    """GPT-2's head is tied to transformer.wte; GPT-J's is its own, with a bias: both keep the kept tokens' logits."""
    from pocketlm.compress.prune import PruneSpec, prune_model

    src = load(str(folders[model_type]))
    domain = tmp_path / "domain.txt"
    domain.write_text(TEXT)
    prune_model(str(folders[model_type]), tmp_path / "trimmed", PruneSpec(vocab_from=str(domain)))
    lm = load(str(tmp_path / "trimmed"))
    kept = [src.tokenizer.token_to_id(lm.tokenizer.id_to_token(i)) for i in range(lm.tokenizer.vocab_size)]
    assert len(kept) < src.tokenizer.vocab_size
    torch.testing.assert_close(logits_of(lm), logits_of(src)[..., kept], rtol=0, atol=1e-5)


def test_phi_heads_and_hidden_keep_their_head_dim(folders, tmp_path):
    """Phi-2's config reads a head_dim of its own (transformers' PhiAttention does too): heads and hidden channels cut,
    LayerNorm weights and biases with them, and transformers agrees with pocketlm."""
    from pocketlm.compress.prune import PruneSpec, prune_model

    src = load(str(folders["phi"]))
    out = tmp_path / "narrow"
    prune_model(str(folders["phi"]), out, PruneSpec(drop_layers=1, heads=2, kv_groups=2, ffn=48, hidden=40), calib_tokens=256)
    lm = load(str(out))
    cfg = lm.config
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.rotary_dim) == (2, 2, src.config.head_dim, 40, src.config.rotary_dim)
    assert lm.model.state_dict()["model.layers.0.input_layernorm.bias"].shape == (40,)
    ours = logits_of(lm)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        torch.testing.assert_close(hf(torch.tensor([lm.tokenizer.encode(TEXT)])).logits, ours, rtol=1e-4, atol=1e-4)
    # llama.cpp's phi2 sizes q and the output projection by the hidden size: no GGUF of this shape, said in one line
    with pytest.raises(PocketLMError, match="2 heads of 16 in a hidden size of 40 .* export it as hf"):
        export(str(out), "gguf", tmp_path / "narrow.gguf", "f32")


def test_compare_counts_gpt2s_embedding_as_embedding(folders):
    from pocketlm.eval.compare import model_size

    lm = load(str(folders["gpt2"]))
    sd = lm.model.state_dict()  # the head is tied to transformer.wte: counted once
    total = sum(t.numel() for k, t in sd.items() if k != "lm_head.weight")
    size = model_size(str(folders["gpt2"]))
    assert round(size["params"] * 1e6) == total
    assert round(size["non_embedding_params"] * 1e6) == total - sd["transformer.wte.weight"].numel()
