"""pocketlm's CPU kernels (pocketlm/kernels/cpu.cpp) against the PyTorch ops they replace, on every kernel target
this CPU runs (pocketlm/kernels/__init__.py's TARGETS: AVX-512 VNNI, AVX2, scalar, ...): each test runs once per
target, so the path the machine takes by default is always among them. aarch64: tests/test_kernels_aarch64.py."""

import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels
from pocketlm.engine.generate import encode_raw
from pocketlm.load import load
from pocketlm.models.fused_step import MAX_TOKENS, FusedStep
from pocketlm.models.llama import KVCache, apply_rope
from pocketlm.quant.int4 import Int4Linear
from pocketlm.quant.int8 import Int8Linear, int8_rows

if kernels.library() is None:
    if shutil.which(kernels.compiler()):  # a machine that can build them must: never skip silently there
        pytest.fail(f"the CPU kernels did not build: {kernels.why_unavailable}")
    pytest.skip(f"no C++ compiler: {kernels.why_unavailable}", allow_module_level=True)

TARGETS = [t.name for t in kernels.runnable_targets()]


@pytest.fixture(autouse=True, params=TARGETS)
def target(request):
    """Every test of this file once per target this CPU runs (models packed under one run under any: one layout)."""
    with kernels.using(request.param):
        yield request.param


def test_the_default_target_is_the_best_this_cpu_runs():
    assert TARGETS[-1] == "scalar"
    assert subprocess.run([sys.executable, "-c", "from pocketlm import kernels; print(kernels.target())"],
                          capture_output=True, text=True).stdout.strip() == TARGETS[0]


def random_blocks(qtype: str, N: int, K: int, gen: torch.Generator, bf16_exact: bool = False) -> torch.Tensor:
    """Random GGML blocks of an (N, K) tensor, uint8 (N, blocks a row, bytes a block): block_q4_0 (fp16 d | 16 bytes
    of codes), block_q4_K (fp16 d | fp16 dmin | 12 bytes of 6-bit scales and mins | 128 bytes of codes) or
    block_q6_K (128 bytes of low 4 bits | 64 of high 2 bits | 16 int8 scales | fp16 d), their fp16 fields small
    positive numbers. bf16_exact: every d also a bf16 value (its 3 lowest mantissa bits 0)."""
    per_block, size, halves, at = {"q4_0": (32, 18, 1, 0), "q4_k": (256, 144, 2, 0), "q6_k": (256, 210, 1, 208)}[qtype]
    blocks = torch.randint(0, 256, (N, K // per_block, size), dtype=torch.uint8, generator=gen)
    fields = ((torch.rand(N, K // per_block, halves, generator=gen) * 0.02 + 1e-3).to(torch.float16)).view(torch.int16)
    if bf16_exact:
        fields &= ~0x7
    blocks[..., at : at + 2 * halves] = fields.view(torch.uint8).view(N, K // per_block, 2 * halves)
    return blocks


def gguf_layer(qtype: str, N: int, K: int, seed: int, bf16_exact: bool = False) -> tuple[Int4Linear | Int8Linear, torch.Tensor]:
    """A layer in the kernel layout of a GGUF's `qtype` blocks (an Int4Linear's "q4_0", "q4_k"; an Int8Linear's
    "q6_k"), written by int4_pack_gguf from random_blocks, with a bias; and the blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks = random_blocks(qtype, N, K, gen, bf16_exact)
    packed = torch.empty(kernels.int4_packed_bytes(N, K, 32, qtype), dtype=torch.uint8)
    kernels.int4_pack_gguf(blocks.reshape(-1), qtype.upper(), N, K, None, packed, qtype)
    bias = torch.randn(N, generator=gen)
    if qtype == "q6_k":
        return Int8Linear.of_q6_k(packed, K, N, bias), blocks
    return Int4Linear.from_packed(packed, K, N, 32, bias, qtype), blocks


# blocks of 16 output rows, taken two at a time for several rows on AVX-512; a tile of rows then single rows
@pytest.mark.parametrize("kernel", ["int4", "int4-q4_0", "int4-q4_k", "int4-q6_k", "int8"])
@pytest.mark.parametrize("M", [1, 2, 3, 7, 8, 13])
@pytest.mark.parametrize("N", [24, 40, 64])
def test_integer_kernels_equal_the_scalar_build_bit_for_bit(kernel, M, N, target, monkeypatch):
    """int4_linear and int8_packed_linear do the same integer sums and the same float operations per output row on
    every target (simd.h): each target's result equals the portable scalar build's, bit for bit."""
    import pocketlm.quant.int8 as int8

    monkeypatch.setattr(int8, "PACK_MIN_WEIGHTS", 0)
    torch.manual_seed(M * 100 + N)
    K = 576
    x = torch.randn(M, K)
    x[:, 7] *= 40  # an outlier channel
    if kernel == "int4":
        layer = Int4Linear.from_linear(nn.Linear(K, N, bias=True), 64)
        run = lambda: kernels.int4_linear(x, layer.packed, N, 64, layer.bias)  # noqa: E731
    elif kernel.startswith("int4-"):  # a GGUF's blocks in their own layout
        K = 512  # Q4_K's and Q6_K's super-blocks of 256
        x = torch.randn(M, K)
        x[:, 7] *= 40
        layer = gguf_layer(kernel[5:], N, K, M * 100 + N)[0]
        packed = layer.packed_weight if kernel == "int4-q6_k" else layer.packed
        run = lambda: kernels.int4_linear(x, packed, N, 32, layer.bias, layer.layout)  # noqa: E731
    else:
        layer = Int8Linear.from_linear(nn.Linear(K, N, bias=True))
        run = lambda: kernels.int8_packed_linear(x, layer.packed_weight, layer.scales, layer.bias)  # noqa: E731
    out = run()
    with kernels.using("scalar"):
        assert torch.equal(out, run())


@pytest.mark.parametrize("group_size", [32, 64, 128])
# blocks of 16 output rows, taken two at a time for several rows: 24, a pair whose second block is partly padding;
# 40, a pair and a last block of its own that is; 64, two pairs
@pytest.mark.parametrize("N", [24, 40, 64])
@pytest.mark.parametrize("K", [256, 576])
def test_int4_kernel_matches_the_dequantized_weight_and_ignores_the_batch(group_size, K, N):
    if K % group_size:
        pytest.skip("K is not a multiple of the group")
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(nn.Linear(K, N, bias=True), group_size)
    assert layer.kernel_weight is None and layer.packed is not None  # aten's packed copy is never made
    x = torch.randn(9, K)
    exact = x.double() @ layer.dequantized().double().T + layer.bias.double()
    out = kernels.int4_linear(x, layer.packed, N, group_size, layer.bias)
    rel = ((out - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
    # activations rounded in two passes of 8 bits per block of 32: 2e-5 here (one pass, llama.cpp's Q8: 0.3-0.6%)
    assert rel < 1e-4, rel
    # each row has its own grids, and the tiles (2 rows x 2 blocks for a batch, 4 rows x 1 block) do a single
    # row's arithmetic: a row's result is bit for bit its own (one row alone takes one block at a time), next to
    # a row 50x larger too
    x[4] *= 50
    out = kernels.int4_linear(x, layer.packed, N, group_size, layer.bias)
    assert torch.equal(out, torch.cat([layer(row[None]) for row in x]))


@pytest.mark.parametrize("N", [24, 40, 64])
def test_the_q4_0_layout_is_the_layout_with_zeros_0(N):
    """Q4_0's blocks held as they are (fp16 scales, no zeros: 4.5 bits a weight) give what the layout with bf16
    scales and zeros 0 gives, bit for bit, where every scale is also a bf16 value."""
    K = 256
    layer = gguf_layer("q4_0", N, K, N, bf16_exact=True)[0]
    with_zeros = Int4Linear(K, N, 32, bias=True)
    with_zeros.load_state_dict(layer.state_dict())  # the plain codes, bf16 scales and zeros 0
    with_zeros.pack()
    assert with_zeros.layout == "zeros" and layer.packed.numel() == with_zeros.packed.numel() * 288 // 320
    assert torch.equal(with_zeros.scales_and_zeros[..., 1].float(), torch.zeros(K // 32, N))
    for M in (1, 2, 3, 7, 8, 13):  # one row, the tiles, the pairs of blocks
        x = torch.randn(M, K)
        assert torch.equal(layer(x), with_zeros(x)), M


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("N", [24, 40])
def test_a_gguf_layout_holds_the_files_weights_exactly(qtype, N):
    """A GGUF's Q4_0 / Q4_K / Q6_K blocks in their own layouts (4.5 / 4.625 bits a weight where bf16 scales and zeros
    take 5; 6.5625 where int8 rows take 8): the weight is gguf-py's dequantization of the blocks, exactly (the bf16
    buffers would round the scales); the kernel's product that weight's within the activations' rounding, a row the
    same alone as in a batch; the plain buffers (saving, training) are the C and torch readings alike (Q6_K: saved
    as the int8 rows of the file's weights)."""
    from gguf import GGMLQuantizationType, dequantize

    from pocketlm.quant.int4 import unpack_kernel_layout

    K = 512
    layer, blocks = gguf_layer(qtype, N, K, N)
    packed = layer.packed_weight if qtype == "q6_k" else layer.packed
    bits = packed.numel() * 8 / (-(-N // 16) * 16 * K)
    assert bits == {"q4_0": 4.5, "q4_k": 4.625, "q6_k": 6.5625}[qtype]
    file_weight = torch.from_numpy(dequantize(blocks.reshape(-1).numpy(), GGMLQuantizationType[qtype.upper()])).view(N, K)
    assert torch.equal(layer.dequantized(), file_weight.float())
    x = torch.randn(9, K)
    exact = x.double() @ file_weight.double().T + layer.bias.double()
    assert ((layer(x) - exact).norm(dim=-1) / exact.norm(dim=-1)).max() < 1e-4
    assert torch.equal(layer(x), torch.cat([layer(row[None]) for row in x]))
    if qtype == "q6_k":
        saved = layer.state_dict()
        assert all(torch.equal(a, b) for a, b in zip((saved["weight"], saved["scales"]), int8_rows(file_weight)))
        return
    c_reading = kernels.int4_unpack(layer.packed, N, K, 32, qtype)
    torch_reading = unpack_kernel_layout(layer.packed, N, K, 32, qtype)
    assert all(torch.equal(a, b) for a, b in zip(c_reading, torch_reading))


def test_int4_kernel_is_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("POCKETLM_INT4_KERNEL", "0")
    layer = Int4Linear.from_linear(nn.Linear(64, 16), 32)
    assert layer.packed is None and layer.kernel_weight is not None  # aten's layout instead


def test_int8_kernel_is_the_exact_product():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(200, 300, bias=True))  # 200: a row tail past the 16-wide vectors
    x = torch.randn(6, 200)
    exact = x @ (layer.weight.float() * layer.scales.float()[:, None]).T + layer.bias
    torch.testing.assert_close(kernels.int8_linear(x, layer.weight, layer.scales, layer.bias), exact, rtol=1e-5, atol=1e-5)
    assert layer.packed is None  # no fbgemm copy where the kernel is built


@pytest.mark.parametrize("N", [40, 64])  # 40: a last block of 16 output rows that is partly padding
@pytest.mark.parametrize("M", [1, 2, 3, 7, 8, 13])  # the kernel's tiles: 8 rows, 4, 2, then one
def test_int8_packed_kernel_matches_the_weight_and_ignores_the_batch(M, N, monkeypatch):
    """An int8 weight multiplied in integers (int8_packed_linear) with the int4 kernel's 16-bit activations: close to
    the exact product, and a row's result is bit for bit its own, next to a row 50x larger. The layer keeps only the
    kernel's layout, and its plain rows read back equal."""
    torch.manual_seed(0)
    linear = nn.Linear(576, N, bias=True)
    layer = Int8Linear.from_linear(linear)
    assert layer.packed_weight is not None and layer.packed is None and layer._buffers["weight"].numel() == 0
    assert torch.equal(layer.weight, int8_rows(linear.weight.detach())[0])
    x = torch.randn(M, 576)
    x[:, 7] *= 40  # an outlier channel
    exact = x.double() @ (layer.weight.double() * layer.scales.double()[:, None]).T + layer.bias.double()
    out = layer(x)
    rel = ((out - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
    assert rel < 1e-4, rel
    x[M // 2] *= 50
    assert torch.equal(layer(x), torch.cat([layer(row[None]) for row in x]))
    monkeypatch.setenv("POCKETLM_INT8_KERNEL", "0")
    assert layer.pack().packed_weight is None  # the switch: int8_linear's exact fp32 product instead


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
        (8, 2, 128, 150, 3, False),  # 128-wide heads; 148 positions: blocks of 16 scores and a tail
        (4, 2, 16, 5, 0, False),  # a head size without a vector path
    ],
)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_attend_decode_matches_sdpa(nh, n_kv, hd, pos, begin, norms, kv_dtype):
    """An fp16 cache (a quantized model's): the kernel rounds the new key and value as torch's .half() does, and
    attends in fp32 over what the cache holds."""
    torch.manual_seed(0)
    cache = KVCache(1, 512, n_kv, hd, kv_dtype)
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
    keys[:, :, pos], values[:, :, pos] = k[:, :, 0].to(kv_dtype), v.view(1, n_kv, hd).to(kv_dtype)
    window = slice(begin, pos + 1)
    ref = F.scaled_dot_product_attention(q, keys[:, :, window].float(), values[:, :, window].float(), scale=scale, enable_gqa=True)
    torch.testing.assert_close(out, ref.reshape(1, 1, nh * hd), rtol=1e-5, atol=1e-5)
    if kv_dtype == torch.float16:  # the same rounding: nothing depends on which path wrote a position
        assert torch.equal(cache.k, keys)
    torch.testing.assert_close(cache.k, keys, rtol=1e-6, atol=1e-6)  # the new key written, rotated, at pos


@pytest.mark.parametrize("hd", [256, 16])  # Gemma 2's heads (a vector path), and one without
def test_attend_decode_soft_caps_the_scores(hd):
    """Gemma 2's attention logit soft-capping: tanh(s / cap) * cap on every score before the softmax, as transformers'
    Gemma2 eager_attention_forward (pocketlm.models.gemma.softcapped_attention) computes it."""
    from pocketlm.models.gemma import softcapped_attention

    torch.manual_seed(0)
    nh, n_kv, pos, begin, scale, cap = 4, 2, 40, 30, 0.25, 2.0
    cache = KVCache(1, 64, n_kv, hd, torch.float32)
    cache.k.normal_(), cache.v.normal_()
    keys, values = cache.k.clone(), cache.v.clone()
    q, k, v = torch.randn(1, 1, nh * hd), torch.randn(1, 1, n_kv * hd), torch.randn(1, 1, n_kv * hd)
    cos, sin = torch.ones(1, hd), torch.zeros(1, hd)  # RoPE at position 0: the identity
    out = kernels.attend_decode(q, k, v, nh, n_kv, hd, cos, sin, None, None, 0.0, cache, pos, begin, scale, cap)
    keys[:, :, pos], values[:, :, pos] = k.view(1, n_kv, hd), v.view(1, n_kv, hd)
    window = slice(begin, pos + 1)
    ref = softcapped_attention(q.view(1, nh, 1, hd), keys[:, :, window], values[:, :, window], scale=scale, enable_gqa=True, softcap=cap)
    torch.testing.assert_close(out, ref.reshape(1, 1, nh * hd), rtol=1e-5, atol=1e-5)
    uncapped = kernels.attend_decode(q, k, v, nh, n_kv, hd, cos, sin, None, None, 0.0, cache, pos, begin, scale)
    assert not torch.allclose(uncapped, out, atol=1e-3)  # the scores reach past the cap


@pytest.mark.parametrize("hd, rd", [(128, 96), (16, 8)])  # Phi-4 mini's 3/4 (a vector path), Phi-2's half
def test_attend_decode_turns_the_rotary_part_of_each_head(hd, rd):
    """cos, sin (1, rd) narrower than the head: RoPE on the first rd channels, the rest as they are (transformers'
    Phi3 apply_rotary_pos_emb: pocketlm.models.phi3.apply_partial_rope)."""
    from pocketlm.models.phi3 import apply_partial_rope

    torch.manual_seed(0)
    nh, n_kv, pos = 4, 2, 20
    cache = KVCache(1, 32, n_kv, hd, torch.float32)
    cache.k.normal_(), cache.v.normal_()
    keys, values = cache.k.clone(), cache.v.clone()
    q, k, v = torch.randn(1, 1, nh * hd), torch.randn(1, 1, n_kv * hd), torch.randn(1, 1, n_kv * hd)
    angles = torch.rand(1, rd // 2).repeat(1, 2) * 6
    cos, sin = angles.cos(), angles.sin()
    out = kernels.attend_decode(q, k, v, nh, n_kv, hd, cos, sin, None, None, 0.0, cache, pos, 0, hd**-0.5)
    q, k = apply_partial_rope(q.view(1, nh, 1, hd), cos, sin), apply_partial_rope(k.view(1, n_kv, 1, hd), cos, sin)
    keys[:, :, pos], values[:, :, pos] = k[:, :, 0], v.view(1, n_kv, hd)
    ref = F.scaled_dot_product_attention(q, keys[:, :, : pos + 1], values[:, :, : pos + 1], enable_gqa=True)
    torch.testing.assert_close(out, ref.reshape(1, 1, nh * hd), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k, keys, rtol=1e-6, atol=1e-6)
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
    # aten's int8 and int4 kernels round activations to bf16; pocketlm's keep fp32 (int8) or 16 bits (int4)
    tol = {"none": 1e-4, "int8": 2e-2, "int4": 2e-2}[quant]
    torch.testing.assert_close(steps["pocketlm"], steps["aten"], rtol=tol, atol=tol)


def decode_fused_and_by_modules(model, ids: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """After the prompt ids (1, T), `steps` decoded positions' logits (steps, vocab), the same tokens fed twice: through
    the fused decode step ("fused", which the model must take) and module by module ("modules")."""
    T, out = ids.shape[1], {}
    for way in ("fused", "modules"):
        model.setup_cache(1, T + steps + 6)
        with torch.inference_mode():
            model(ids, torch.arange(T))
            if way == "modules":
                model.decode_step = False  # as for a model the fused step cannot take
            out[way] = torch.stack([model(ids[:, (t * 7) % T, None], torch.tensor([t]))[0, -1] for t in range(T, T + steps)])
        if way == "fused":
            assert isinstance(model.decode_step, FusedStep)
    return out


@pytest.mark.parametrize("quant", ["none", "int4", "int8", "gguf-q4_0"])
def test_fused_decode_step_equals_the_modules(tiny_dir, quant, tmp_path, throwaway_home):
    """A whole decoded token in one call (pocketlm/models/fused_step.py) against the same model module by module,
    past tiny Gemma's sliding window. Quantized models are fused (q/k/v, gate/up) and call the same kernels in the
    same order: equal bit for bit. A float model keeps HF's separate projections and F.silu / F.gelu. Every int8
    layer (the head, and each layer of an int8 model) runs the packed int8 kernel. A Q4_0 GGUF's int4 layers hold
    its blocks as they are (cpu.cpp's Q4_0 layout), its tied head too, the embedding then its own int8 rows."""
    if quant == "gguf-q4_0":
        from test_gguf_direct import export

        lm = load(export(tiny_dir, "q4_0", tmp_path / "tiny-q4_0.gguf"), quant="auto")
        assert isinstance(lm.model.lm_head, Int4Linear) and lm.model.lm_head.layout == "q4_0"
        assert lm.model.model.embed_tokens.table.rows_only  # looked up, never multiplied
    else:
        lm = load(str(tiny_dir), quant=quant)
    int8_layers = [m for m in lm.model.modules() if isinstance(m, Int8Linear) and not m.rows_only]
    assert all(m.packed_weight is not None for m in int8_layers) and (quant in ("int4", "int8")) == bool(int8_layers), quant
    steps = decode_fused_and_by_modules(lm.model, torch.tensor([encode_raw(lm.tokenizer, "hello world, the said hello")]), 24)
    if quant == "none":
        torch.testing.assert_close(steps["fused"], steps["modules"], rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(steps["fused"], steps["modules"])


def test_quantized_models_keep_an_fp16_cache_close_to_fp32(tiny_dir, monkeypatch):
    """A quantized model's keys and values are kept in fp16 (as llama.cpp's f16 cache; half the bytes a decoded token
    reads); a float model's stay fp32 (equal to transformers'), and POCKETLM_KV_FP16=0 keeps fp32 everywhere. The
    fp16 cache moves logits by about fp16's rounding, not by a quantization's."""
    assert load(str(tiny_dir)).meta["kv_cache"] == "float32"
    logits = {}
    for fp16 in ("1", "0"):
        monkeypatch.setenv("POCKETLM_KV_FP16", fp16)
        lm = load(str(tiny_dir), quant="int4")
        assert lm.meta["kv_cache"] == ("float16" if fp16 == "1" else "float32")
        ids = torch.tensor([encode_raw(lm.tokenizer, "hello world, the said hello")])
        T = ids.shape[1]
        lm.model.setup_cache(1, T + 30)
        assert lm.model.model.layers[0].self_attn.kv_cache.k.dtype == (torch.float16 if fp16 == "1" else torch.float32)
        with torch.inference_mode():
            steps = [lm.model(ids, torch.arange(T))[:, -1]]
            steps += [lm.model(ids[:, (t * 7) % T, None], torch.tensor([t]))[:, -1] for t in range(T, T + 24)]
        logits[fp16] = torch.stack(steps)
    assert not torch.equal(logits["1"], logits["0"])
    torch.testing.assert_close(logits["1"], logits["0"], rtol=5e-3, atol=5e-3)


def test_a_quantized_encoder_names_no_kv_cache():
    """An encoder keeps no KV cache: quantized or not, load() gives it no cache dtype."""
    lm = load("minilm-l6-v2", quant="int8")
    assert lm.meta["kv_cache"] is None and not hasattr(lm.model, "kv_dtype")


def test_fused_decode_step_is_for_decoded_tokens_only(small_llama_dir):
    model = load(str(small_llama_dir), quant="int4").model
    token = torch.tensor([[5]])
    model.setup_cache(1, MAX_TOKENS + 8)
    model(token, torch.tensor([0]))  # autograd on: the modules
    assert model.decode_step is None
    with torch.inference_mode():
        model(torch.arange(5, 5 + MAX_TOKENS + 1)[None], torch.arange(MAX_TOKENS + 1))  # a prompt chunk: the modules
        assert model.decode_step is None
        model(token, torch.tensor([MAX_TOKENS + 1]))
    assert isinstance(model.decode_step, FusedStep)
    model.setup_cache(1, 32)  # new caches: the step that points at the old ones is dropped
    assert model.decode_step is None


def test_fused_tokens_of_one_sequence_equal_one_at_a_time(tiny_dir):
    """A speculative verify pass (a few tokens of one sequence in one call, each attending to those before it)
    gets bit for bit the logits the same tokens get decoded one at a time."""
    lm = load(str(tiny_dir), quant="int4")
    model = lm.model
    prompt = encode_raw(lm.tokenizer, "hello world, the said hello")
    more = torch.tensor([prompt[3:8]])  # (1, 5)
    T = len(prompt)
    logits = {}
    with torch.inference_mode():
        for path in ("together", "one at a time"):
            model.setup_cache(1, 64)
            model(torch.tensor([prompt]), torch.arange(T))
            if path == "together":
                logits[path] = model(more, torch.arange(T, T + 5))[0]
            else:
                logits[path] = torch.cat([model(more[:, i, None], torch.tensor([T + i]))[0] for i in range(5)])
            assert isinstance(model.decode_step, FusedStep)
    assert torch.equal(logits["together"], logits["one at a time"])


def test_a_short_prompt_chunk_takes_the_fused_step(tiny_dir, monkeypatch):
    """prefill() runs a short last chunk (the server's prompt after a shared prefix, a new chat turn) through the
    fused step, the head on its last token only: the logits the whole step gives that token, bit for bit, and
    what the modules give within float rounding; the cache row it writes holds what the modules write."""
    from pocketlm.engine import step as generate  # prefill, and the fused_logits it calls, live in engine/step.py

    lm = load(str(tiny_dir), quant="int4")
    model = lm.model
    prompt = torch.tensor([encode_raw(lm.tokenizer, "hello world, the cat sat on the mat")])  # (1, T)
    T = prompt.shape[1]
    assert 1 < T - 3 <= MAX_TOKENS
    logits, caches = {}, {}
    with torch.inference_mode():
        for path in ("fused", "whole step", "modules"):
            if path == "modules":
                monkeypatch.setattr(generate, "fused_logits", lambda *args, **kwargs: None)
            model.setup_cache(3, 64)
            generate.prefill(model, prompt[:, :3], slot=2)  # a prefix the row already holds
            if path == "whole step":
                logits[path] = model(prompt[:, 3:], torch.arange(3, T)[None], torch.tensor([2]))[0, -1:]
            else:
                logits[path] = generate.prefill(model, prompt[:, 3:], start=3, slot=2)  # (1, V)
            if path != "modules":
                assert isinstance(model.decode_step, FusedStep)
            caches[path] = model.model.layers[-1].self_attn.kv_cache.k[2, :, :T].float()
    assert torch.equal(logits["fused"], logits["whole step"])
    torch.testing.assert_close(logits["fused"], logits["modules"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(caches["fused"], caches["modules"], rtol=2e-3, atol=2e-3)
    assert caches["fused"][:, T - 1].abs().sum() > 0  # the chunk's last key was written


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_fused_decode_step_of_a_batch_equals_each_sequence_alone(tiny_dir, quant):
    """Sequences at their own positions in their own cache rows (the server's continuous batching), decoded in one
    call, get bit for bit the logits each gets alone (the tests of 8 concurrent clients rest on this)."""
    lm = load(str(tiny_dir), quant=quant)
    assert lm.model.lm_head.packed_weight is not None
    model = lm.model
    prompts = [encode_raw(lm.tokenizer, text) for text in ("hello world", "the cat sat on the mat, and then", "a b c d")]
    fed = [[p[(t * 7) % len(p)] for t in range(20)] for p in prompts]  # the tokens each sequence is fed
    alone = []
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, fed):
            model.setup_cache(1, 64)
            model.hidden(torch.tensor([prompt]), torch.arange(len(prompt)))  # the prompt as the engine runs it
            alone.append(torch.stack([model(torch.tensor([[tok]]), torch.tensor([len(prompt) + t]))[0, -1] for t, tok in enumerate(tokens)]))
        model.setup_cache(4, 64)
        slots = torch.tensor([3, 0, 2])
        for slot, prompt in zip(slots, prompts):
            model.hidden(torch.tensor([prompt]), torch.arange(len(prompt))[None], slot[None])
        together = []
        for t in range(20):
            tokens = torch.tensor([[f[t]] for f in fed])  # (3, 1)
            pos = torch.tensor([[len(p) + t] for p in prompts])  # (3, 1)
            together.append(model(tokens, pos, slots)[:, -1])
        assert isinstance(model.decode_step, FusedStep)
    assert torch.equal(torch.stack(together, 1), torch.stack(alone))


def test_pocketlm_ps_counts_the_kernel_layouts(small_llama_dir):
    """The server's memory figure (`pocketlm ps`) includes the layouts the kernels read (int4_pack's, int8_pack's),
    which are no buffers; the int4 layers keep no other copy of their codes, the tied int8 head its plain rows too."""
    from pocketlm.serve.scheduler import model_bytes

    model = load(str(small_llama_dir), quant="int4").model
    saved = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.numel()}
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    layouts = sum(m.packed.numel() for m in int4) + model.lm_head.packed_weight.numel()
    assert all(m._buffers["qweight"].numel() == 0 for m in int4)
    assert layouts > 0 and model_bytes(model) == sum(saved.values()) + layouts


def test_training_keeps_pytorch_ops():
    """A norm whose weight wants a gradient, or an input that needs one, stays on autograd's ops."""
    x, w = torch.randn(2, 8), torch.randn(8, requires_grad=True)
    assert kernels.usable(x) and not kernels.usable(x, w)
    assert not kernels.usable(x.requires_grad_())
    with torch.no_grad():
        assert kernels.usable(x, w)


def random_gguf_blocks(qtype, n_blocks: int, seed: int = 0) -> torch.Tensor:
    """n_blocks GGML blocks of qtype: random bytes, with small finite fp16 scales (and mins) where the block has them."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    half = lambda: rng.uniform(-0.01, 0.01, (n_blocks, 1)).astype(np.float16).view(np.uint8)  # noqa: E731
    fields = {T.Q4_0: [0], T.Q5_0: [0], T.Q8_0: [0], T.Q4_1: [0, 2], T.Q5_1: [0, 2], T.Q4_K: [0, 2], T.Q5_K: [0, 2],
              T.Q6_K: [GGML_QUANT_SIZES[T.Q6_K][1] - 2]}
    for at in fields.get(qtype, []):
        blocks[:, at : at + 2] = half()
    if qtype in (T.F16, T.BF16, T.F32):
        values = torch.from_numpy(rng.standard_normal((n_blocks, GGML_QUANT_SIZES[qtype][0]), dtype=np.float32))
        dtype = {T.F16: torch.float16, T.BF16: torch.bfloat16, T.F32: torch.float32}[qtype]
        return values.to(dtype).view(torch.uint8).reshape(n_blocks, -1)
    return torch.from_numpy(blocks)


@pytest.mark.parametrize("qtype", list(kernels.GGUF_ROW_TYPES))
def test_gguf_rows_rounded_to_int8_in_c_equal_the_torch_dequantizer_and_int8_rows(qtype):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from pocketlm.formats.gguf_quants import dequantize

    ggml_type = GGMLQuantizationType[qtype]
    N, K = 37, 512  # rows of two 256-wide super-blocks; a row count the threads split unevenly
    blocks = random_gguf_blocks(ggml_type, N * K // GGML_QUANT_SIZES[ggml_type][0])
    weight, scales = torch.empty(N, K, dtype=torch.int8), torch.empty(N, dtype=torch.bfloat16)
    kernels.int8_rows_gguf(blocks, qtype, N, K, weight, scales)
    expected_weight, expected_scales = int8_rows(dequantize(blocks.reshape(-1), ggml_type, (N, K)))
    assert torch.equal(weight, expected_weight) and torch.equal(scales, expected_scales)


def test_the_bandwidth_probe_reads_every_float():
    x = torch.rand(64 * 1000)
    total = kernels.library().read_floats(x.data_ptr(), x.numel(), 2)
    assert total == pytest.approx(x.double().sum().item(), rel=1e-5)
