"""pocketlm's CPU kernels (pocketlm/kernels/cpu.cpp) against the PyTorch ops they replace."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels
from pocketlm.engine.generate import encode_raw
from pocketlm.load import load
from pocketlm.models.llama import KVCache, apply_rope
from pocketlm.quant.int4 import Int4Linear
from pocketlm.quant.int8 import Int8Linear

if kernels.library() is None:
    if shutil.which(kernels.compiler()):  # a machine that can build them must: never skip silently there
        pytest.fail(f"the CPU kernels did not build: {kernels.why_unavailable}")
    pytest.skip(f"no C++ compiler: {kernels.why_unavailable}", allow_module_level=True)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("K", [256, 320, 576])  # 320 and 576: rows of codes that end in a partial 64-byte chunk
def test_int4_kernel_matches_the_dequantized_weight_and_ignores_the_batch(group_size, K, monkeypatch):
    monkeypatch.setenv("POCKETLM_INT4_KERNEL", "1")
    if not kernels.int4_kernel_on():
        pytest.skip("the int4 kernel needs AVX-512 VNNI")
    if K % group_size:
        pytest.skip("K is not a multiple of the group")
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(nn.Linear(K, 40, bias=True), group_size)
    assert layer.kernel_weight is None and layer.scales is not None  # aten's packed copy is never made
    x = torch.randn(9, K)
    exact = x @ layer.dequantized().T + layer.bias
    out = kernels.int4_linear(x, layer.qweight, layer.scales, layer.zeros, group_size, layer.bias)
    rel = ((out - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
    assert rel < 0.01, rel  # activations rounded to 8 bits per block of 32 (llama.cpp's Q8): 0.3-0.6% here
    # each row has its own grids, and tiles of 4 rows do a single row's arithmetic: a row's result is bit for
    # bit its own, next to a row 50x larger too
    x[4] *= 50
    out = kernels.int4_linear(x, layer.qweight, layer.scales, layer.zeros, group_size, layer.bias)
    assert torch.equal(out, torch.cat([layer(row[None]) for row in x]))


def test_int8_kernel_is_the_exact_product():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(200, 300, bias=True))  # 200: a row tail past the 16-wide vectors
    x = torch.randn(6, 200)
    exact = x @ (layer.weight.float() * layer.scales.float()[:, None]).T + layer.bias
    torch.testing.assert_close(kernels.int8_linear(x, layer.weight, layer.scales, layer.bias), exact, rtol=1e-5, atol=1e-5)
    assert layer.packed is None  # no fbgemm copy where the kernel is built


@pytest.mark.parametrize("unit_offset", [0.0, 1.0])  # Llama's weight, Gemma 3's (1 + weight)
def test_rms_norm(unit_offset):
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 576) * 4, torch.randn(576)
    ref = F.rms_norm(x, (576,), w + unit_offset, 1e-6)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6, unit_offset), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gelu", [False, True])
def test_gated_act(gelu):
    torch.manual_seed(0)
    gate_up = torch.randn(2, 1, 2 * 1000) * 6  # both tails of the activation, and a length that is no multiple of 16
    gate, up = gate_up.chunk(2, -1)
    ref = (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up
    torch.testing.assert_close(kernels.gated_act(gate_up, gelu), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "nh, n_kv, hd, pos, begin, norms",
    [
        (9, 3, 64, 300, 0, False),  # SmolLM2's heads; positions split between the threads
        (4, 1, 256, 40, 25, True),  # Gemma 3 270M's heads, a sliding window, q/k norms
        (4, 2, 16, 5, 0, False),  # a head size without a vector path
    ],
)
def test_attend_decode_matches_sdpa(nh, n_kv, hd, pos, begin, norms):
    torch.manual_seed(0)
    cache = KVCache(1, 512, n_kv, hd, torch.float32)
    cache.k.normal_(), cache.v.normal_()
    keys, values = cache.k.clone(), cache.v.clone()
    q, k, v = torch.randn(1, 1, nh * hd), torch.randn(1, 1, n_kv * hd), torch.randn(1, 1, n_kv * hd)
    angles = torch.rand(1, hd // 2).repeat(1, 2) * 6
    cos, sin = angles.cos(), angles.sin()
    q_norm, k_norm = (torch.randn(hd), torch.randn(hd)) if norms else (None, None)
    scale = 0.0625
    out = kernels.attend_decode(q, k, v, nh, n_kv, hd, cos, sin, q_norm, k_norm, 1e-6, cache, pos, begin, scale)

    q, k = q.view(1, nh, 1, hd), k.view(1, n_kv, 1, hd)  # T = 1: (B, T, heads, hd) and (B, heads, T, hd) agree
    if norms:
        q, k = F.rms_norm(q, (hd,), 1 + q_norm, 1e-6), F.rms_norm(k, (hd,), 1 + k_norm, 1e-6)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys[:, :, pos], values[:, :, pos] = k[:, :, 0], v.view(1, n_kv, hd)
    ref = F.scaled_dot_product_attention(q, keys[:, :, begin : pos + 1], values[:, :, begin : pos + 1], scale=scale, enable_gqa=True)
    torch.testing.assert_close(out, ref.reshape(1, 1, nh * hd), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k, keys, rtol=1e-6, atol=1e-6)  # the new key written, rotated, at pos
    assert torch.equal(cache.v, values)


@pytest.mark.parametrize("quant", ["none", "int4", "int8"])
def test_decoding_with_kernels_matches_aten(tiny_dir, quant, monkeypatch):
    """A whole model decoding past its sliding window: the kernels' logits against the aten path's, step by step."""
    steps = {}
    for path in ("pocketlm", "aten"):
        if path == "aten":
            monkeypatch.setattr(kernels, "_lib", False)
        lm = load(str(tiny_dir), quant=quant)
        ids = torch.tensor([encode_raw(lm.tokenizer, "hello world, the said hello")])
        T = ids.shape[1]
        lm.model.setup_cache(1, T + 30)
        with torch.inference_mode():
            logits = [lm.model(ids, torch.arange(T))[:, -1]]
            for t in range(T, T + 24):  # tiny Gemma's window is 16 positions
                token = ids[:, (t * 7) % T, None]  # the same tokens for both paths, (1, 1)
                logits.append(lm.model(token, torch.tensor([t]))[:, -1])
        steps[path] = torch.stack(logits)
    # int4: pocketlm's kernel rounds activations to 8 bits per block of 32, aten's to bf16
    tol = {"none": 1e-4, "int8": 2e-2, "int4": 1e-1}[quant]
    torch.testing.assert_close(steps["pocketlm"], steps["aten"], rtol=tol, atol=tol)


def test_training_keeps_pytorch_ops():
    """A norm whose weight wants a gradient, or an input that needs one, stays on autograd's ops."""
    x, w = torch.randn(2, 8), torch.randn(8, requires_grad=True)
    assert kernels.usable(x) and not kernels.usable(x, w)
    assert not kernels.usable(x.requires_grad_())
    with torch.no_grad():
        assert kernels.usable(x, w)
