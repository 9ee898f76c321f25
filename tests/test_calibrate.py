"""Calibrated quantization (pocketlm/quant/calibrate.py): GPTQ and AWQ against round-to-nearest at the same bits,
AWQ's folds leave the float function unchanged, a calibrated folder runs on the kernels as its dequantized weights
do, and the KL-budget search meets its budget. Tiny models (tests/tiny_models.py): seconds each."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.eval.agreement import agreement_stats
from pocketlm.load import load
from pocketlm.quant import QuantScheme
from pocketlm.quant.calibrate import (
    CalibConfig, Int4Grid, awq_fold, awq_scale, budget_search, calibrate, calibration_ids, fit_grid, gptq, output_error,
    quantize_calibrated, refit_grid,
)
from pocketlm.quant.int4 import Int4Linear, unpack_nibbles
from pocketlm.quant.int8 import Int8Linear

from conftest import FIXTURES

TEXT = (FIXTURES / "wikitext2_test_excerpt.txt").read_text()


def correlated_inputs(n: int, K: int, outliers: int = 0, seed: int = 0) -> torch.Tensor:
    """Activations as a language model's are: correlated channels of unequal size, a few of them outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, K // 4, generator=g) @ torch.randn(K // 4, K, generator=g) / (K // 4) ** 0.5  # (n, K)
    x *= torch.rand(K, generator=g) * 1.5 + 0.25
    x[:, :outliers] *= 30
    return x


def rtn_weight(kind: str, linear: nn.Linear) -> torch.Tensor:
    """What plain `quantize()` makes of the linear (quantize_groups' min/max grid, Int8Linear's per-row scale)."""
    if kind == "int8":
        q = Int8Linear.from_linear(linear)
        return q.weight.float() * q.scales.float()[:, None]
    return Int4Linear.from_linear(linear, int(kind[6:])).dequantized()


@pytest.mark.parametrize("kind", ["int4-g32", "int4-g128", "int8"])
def test_gptq_lowers_the_layer_output_error_against_rtn(kind):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=False)
    x = correlated_inputs(2048, 256)
    H = x.T @ x / x.shape[0]
    w = linear.weight.detach()
    rtn = output_error(w, rtn_weight(kind, linear), H)
    grid = fit_grid(kind, w, H, CalibConfig().clip)
    codes = gptq(w, H, grid)
    q = _deq(grid.module(codes, None))  # the weight the written layer holds
    ours = output_error(w, q, H)
    assert ours == pytest.approx(float(((x @ (w - q).T) ** 2).sum() / x.shape[0]), rel=1e-3)  # ||X (W - Q)^T||^2 / n
    assert ours < 0.7 * rtn, (ours, rtn)
    # with GPTQ's codes fixed, least-squares scales and zeros lower the error further (never raise it)
    refitted = refit_grid(w, codes, H, grid)
    assert output_error(w, _deq(refitted.module(codes, None)), H) <= ours
    # the codes are the format's: 0..15 (int4) or -127..127 (int8), and the grid's scales are bf16 values
    assert codes.dtype == (torch.int8 if kind == "int8" else torch.uint8)
    assert int(codes.max()) <= (127 if kind == "int8" else 15) and int(codes.min()) >= (-127 if kind == "int8" else 0)


def test_gptq_without_act_order_finds_each_group_as_it_goes():
    torch.manual_seed(1)
    linear = nn.Linear(128, 64, bias=False)
    x = correlated_inputs(1024, 128, seed=1)
    H = x.T @ x / x.shape[0]
    w = linear.weight.detach()
    clip = CalibConfig().clip
    grid = Int4Grid.fit(w, 32, H, clip)
    codes = gptq(w, H, grid, act_order=False, clip=clip)
    assert output_error(w, _deq(grid.module(codes, None)), H) < 0.7 * output_error(w, rtn_weight("int4-g32", linear), H)


def _deq(layer) -> torch.Tensor:
    if isinstance(layer, Int4Linear):
        return layer.dequantized()
    return layer.weight.float() * layer.scales.float()[:, None]


def test_awq_is_not_worse_than_rtn_and_helps_on_outlier_channels():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False)
    w = linear.weight.detach()
    for outliers, most in ((0, 1.0), (4, 0.8)):
        x = correlated_inputs(2048, 256, outliers=outliers)
        H = x.T @ x / x.shape[0]
        s, err, plain = awq_scale(w, H, x.abs().mean(0), "int4-g32")
        assert plain == pytest.approx(output_error(w, fit_grid("int4-g32", w).quantize(w)[1], H))
        assert err <= most * plain, (outliers, err, plain)
    assert s.shape == (256,) and s[:4].mean() > s[4:].mean()  # the outlier channels' weights are scaled up


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_awq_folds_leave_the_float_model_unchanged(kind, small_llama_dir, tiny_gemma_dir):
    """Every scale goes into the op before its linear: the norm (Llama's weight, Gemma's 1 + weight), the v rows
    for o_proj (grouped-query attention: shared across a KV head's query heads), the up rows for down_proj."""
    lm = load(str(small_llama_dir if kind == "llama" else tiny_gemma_dir))
    ids = torch.tensor([lm.tokenizer.encode("Hello world. The hello world of x is a world of hello, he said.")])
    with torch.no_grad():
        before = lm.model(ids)
    lm.model.fuse_projections()
    attn = lm.model.model.layers[0].self_attn
    assert attn.n_kv_heads < attn.n_heads  # grouped-query attention, so o_proj's scale is tied
    g = torch.Generator().manual_seed(0)
    for layer in lm.model.model.layers:
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            K = layer.get_submodule(name).in_features
            s = torch.rand(K, generator=g) * 3 + 0.2
            if name == "self_attn.o_proj":  # one scale per (KV head, channel)
                n_kv, hd = attn.n_kv_heads, attn.head_dim
                s = s[: n_kv * hd].view(n_kv, 1, hd).expand(n_kv, attn.n_heads // n_kv, hd).reshape(-1)
            awq_fold(layer, name, s)
    with torch.no_grad():
        after = lm.model(ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def peaked(folder, tmp_path, scale: float = 4.0):
    """The tiny model with its weights scaled up: confident next-token distributions, so quantization shows in KL
    (HF's 0.02 initialization gives near-uniform ones)."""
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.load import read_config

    lm = load(str(folder))
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if p.ndim == 2:
                p.mul_(scale)
    out = tmp_path / "peaked"
    write_model_folder(out, read_config(folder), lm.model.state_dict(), lm.tokenizer)
    return out


@pytest.fixture(scope="module")
def peaked_llama(small_llama_dir, tmp_path_factory):
    return peaked(small_llama_dir, tmp_path_factory.mktemp("peaked"))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_layer_by_layer_calibration_beats_rtn_on_every_linear_and_in_kl(method, peaked_llama):
    ref = load(str(peaked_llama))
    ids = calibration_ids(ref.tokenizer, TEXT, 2048, 128)
    lm = load(str(peaked_llama))
    report = calibrate(lm.model, ids, QuantScheme.parse("int4"), CalibConfig(method=method, quiet=True))
    assert len(report["errors"]) == 4 * 3  # qkv, o, gate/up, down in each of 3 layers
    for name, (ours, rtn) in report["errors"].items():
        assert ours <= rtn * (0.9 if method == "gptq" else 1.0 + 1e-6), (name, ours, rtn)
    rtn_lm = load(str(peaked_llama), quant="int4")
    held_out = torch.tensor(ref.tokenizer.encode("The hello world of x is a world of hello, he said. " * 8))
    kl = agreement_stats(lm.model, ref.model, held_out, 128, 128)["kl_mean"]
    kl_rtn = agreement_stats(rtn_lm.model, ref.model, held_out, 128, 128)["kl_mean"]
    assert kl < kl_rtn, (kl, kl_rtn)


def test_gptq_folder_is_an_ordinary_quantized_folder_and_runs_on_the_kernels(peaked_llama, tmp_path):
    from pocketlm.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "gptq"
    assert main(["quantize", str(peaked_llama), "--to", "int4", "--calib", str(calib), "--method", "gptq",
                 "--calib-tokens", "1024", "-o", str(out)]) == 0
    lm = load(str(out))
    assert lm.meta["weights"] == "int4" and lm.meta["calibration"]["method"] == "gptq"
    int4 = [m for m in lm.model.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 4 * 3 and all(m.group_size == 32 for m in int4)
    for m in int4:
        assert int(unpack_nibbles(m.qweight).max()) <= 15 and m.scales_and_zeros.dtype == torch.bfloat16
    # through the kernels (a few rows: pocketlm's int4 kernel) against a copy whose layers hold the dequantized weights
    ids = torch.tensor([lm.tokenizer.encode("Hello world. The hello world of x is a world of hello, he said.")])
    float_copy = load(str(out))
    for name, m in list(float_copy.model.named_modules()):
        if isinstance(m, Int4Linear):
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            dense.weight = nn.Parameter(m.dequantized(), requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(float_copy.model.get_submodule(parent), attr, dense)
    with torch.inference_mode():
        x = torch.randn(1, 3, int4[0].in_features)
        exact = x @ int4[0].dequantized().T
        assert ((int4[0](x) - exact).abs().max() / exact.abs().max()).item() < 0.02  # the kernel's 8-bit activations
        logits, ref = lm.model(ids), float_copy.model(ids)
    assert ((logits - ref).abs().max() / ref.abs().max()).item() < 0.02
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9


def test_kl_budget_search_meets_its_budget_at_fewer_bits_than_int8(peaked_llama, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    ref = load(str(peaked_llama))
    ids = calibration_ids(ref.tokenizer, TEXT, 2048, 128)
    flat = ids[-4:].reshape(-1)  # kl_tokens=512: the last 4 sequences of 128, held out of calibration
    uniform = agreement_stats(load(str(peaked_llama), quant="int4-g64").model, ref.model, flat, 128, 128)["kl_mean"]
    budget = uniform / 2
    report = quantize_calibrated(str(peaked_llama), tmp_path / "budget", QuantScheme.parse("int4"), str(calib),
                                 CalibConfig(method="rtn", tokens=2048, seq_len=128, kl_tokens=512, quiet=True), budget=budget)
    assert (report["tokens"], report["kl_tokens"]) == (ids.numel() - 512, 512)
    lm = load(str(tmp_path / "budget"))
    assert lm.meta["weights"] == "mixed-bits"
    kl = agreement_stats(lm.model, ref.model, flat, 128, 128)["kl_mean"]  # as `pocketlm eval --task agreement`
    assert kl == pytest.approx(report["kl_measured"], rel=1e-4)  # the budget's KL is the held-out sequences'
    assert kl <= budget, (kl, budget)
    assert report["bits_per_weight"] < 8  # fewer bits than int8 everywhere
    assert len(set(report["plan"].values())) > 1  # it did choose: not one kind for every linear
    kinds = {type(m).__name__ for m in lm.model.modules()}
    assert "Int4Linear" in kinds


def test_a_bits_cap_gives_less_kl_than_uniform_int4_at_its_bits(peaked_llama):
    """--max-bits without a budget: the plan stays within the bits and, at uniform int4's own 5 bits a weight
    (groups of 32, a bf16 scale and zero each), its KL is below uniform int4's on the same held-out tokens."""
    ref = load(str(peaked_llama))
    ids = calibration_ids(ref.tokenizer, TEXT, 2048, 128)
    flat = ids[-4:].reshape(-1)
    cfg = CalibConfig(method="rtn", tokens=2048, seq_len=128, kl_tokens=512, quiet=True)
    uniform = agreement_stats(load(str(peaked_llama), quant="int4").model, ref.model, flat, 128, 128)["kl_mean"]
    model, report = budget_search(ref, lambda: load(str(peaked_llama)), QuantScheme.parse("int4"), ids, None, cfg, max_bits=5.0)
    assert report["bits_per_weight"] <= 5.0 and report["max_bits"] == 5.0
    assert report["kl_measured"] == pytest.approx(agreement_stats(model, ref.model, flat, 128, 128)["kl_mean"], rel=1e-4)
    assert report["kl_measured"] < uniform, (report["kl_measured"], uniform)
    assert len(set(report["plan"].values())) > 1
    _, tight = budget_search(ref, lambda: load(str(peaked_llama)), QuantScheme.parse("int4"), ids, None, cfg, max_bits=4.5)
    assert tight["bits_per_weight"] <= 4.5 and tight["kl_measured"] > report["kl_measured"]
    # a budget that 4.5 bits cannot meet: refused, after the rounds that could still change the plan
    with pytest.raises(PocketLMError, match="give a larger budget or more --max-bits"):
        budget_search(ref, lambda: load(str(peaked_llama)), QuantScheme.parse("int4"), ids, report["kl_measured"] / 2, cfg, max_bits=4.5)
    with pytest.raises(PocketLMError, match=r"--max-bits 4: the fewest bits this model.s linears take is 4\.\d\d per weight; give more"):
        budget_search(ref, lambda: load(str(peaked_llama)), QuantScheme.parse("int4"), ids, None, cfg, max_bits=4.0)


def test_quantize_max_bits_writes_a_mixed_bits_folder(peaked_llama, tmp_path, capsys):
    from pocketlm.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "capped"
    assert main(["quantize", str(peaked_llama), "--to", "int4", "--calib", str(calib), "--method", "rtn", "--max-bits", "5",
                 "--calib-tokens", "2048", "--quiet", "-o", str(out)]) == 0
    assert "(at most 5 bits) at" in capsys.readouterr().err
    lm = load(str(out))
    saved = lm.meta["calibration"]
    assert lm.meta["weights"] == "mixed-bits" and saved["max_bits"] == 5 and saved["budget"] is None
    assert saved["bits_per_weight"] <= 5


def test_kl_budget_measures_its_kl_on_sequences_gptq_did_not_calibrate_on(peaked_llama):
    ref = load(str(peaked_llama))
    ids = calibration_ids(ref.tokenizer, TEXT, 1024, 128)  # (8, 128)
    cfg = CalibConfig(method="gptq", tokens=1024, seq_len=128, kl_tokens=256, quiet=True)
    model, report = budget_search(ref, lambda: load(str(peaked_llama)), QuantScheme.parse("int4"), ids, 10.0, cfg)
    assert (report["tokens"], report["kl_tokens"]) == (6 * 128, 2 * 128)
    # GPTQ of the chosen plan on the first 6 sequences only gives the very weights the search returned
    plan = QuantScheme("int4", 32, layers=report["plan"])
    alone = load(str(peaked_llama))
    calibrate(alone.model, ids[:-2], plan, cfg)
    for (name, a), b in zip(model.state_dict().items(), alone.model.state_dict().values()):
        assert torch.equal(a, b), name
    # and its KL is the float model's against it on the 2 held-out ones
    kl = agreement_stats(model, ref.model, ids[-2:].reshape(-1), 128, 128)["kl_mean"]
    assert kl == pytest.approx(report["kl_measured"], rel=1e-4)
    with pytest.raises(PocketLMError, match="needs at least 1152 calibration tokens .* got 1024"):
        budget_search(ref, lambda: load(str(peaked_llama)), QuantScheme.parse("int4"), ids, 10.0,
                      CalibConfig(method="gptq", tokens=1024, seq_len=128, kl_tokens=1024, quiet=True))
    with pytest.raises(PocketLMError, match="the int8 output head alone costs KL"):
        budget_search(ref, lambda: load(str(peaked_llama)), QuantScheme.parse("int4"), ids, 1e-9, cfg)
