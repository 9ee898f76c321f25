import pytest
import torch
from torch import nn

from pocketlm.engine.generate import encode_raw, generate
from pocketlm.engine.sampling import SamplingParams
from pocketlm.eval.perplexity import perplexity
from pocketlm.load import load
from pocketlm.quant import QuantScheme
from pocketlm.quant.int4 import Int4Linear, dequantize_groups, pack_nibbles, quantize_groups, unpack_nibbles
from pocketlm.quant.int8 import Int8Embedding, Int8Linear

from conftest import FIXTURES


@pytest.mark.parametrize("path", ["pocketlm", "aten"])  # pocketlm's kernels, or aten's/fbgemm's where none are built
@pytest.mark.parametrize("rows", [3, 35, 200])  # kernel, kernel or fbgemm, the dequantized float matmul
def test_int8_linear_matches_float_within_quantization_error(rows, path, request):
    if path == "aten":
        request.getfixturevalue("aten_kernels")
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(1, rows, 256)
    ref, out = linear(x), q(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # per-channel int8 (error <= scale/2 per weight): about 1% of the output's scale
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 0.02
    assert q.weight.dtype == torch.int8 and q.weight.abs().max().item() == 127


def test_int8_head_refines_its_top_logits_to_fp32(aten_kernels):
    """The int8 kernel returns bf16 (steps of 0.125 near 20): a head recomputes its most likely logits in fp32."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 500, bias=False)
    with torch.no_grad():
        linear.weight.mul_(30)  # logits around 20, as a language model's head gives
    head = Int8Linear.from_linear(linear)
    head.packed = None  # aten's kernel, as on a build without fbgemm
    x = torch.randn(1, 64)
    exact = x @ (head.weight.float() * head.scales.float()[:, None]).T  # (1, 500)
    top = exact.topk(8).indices
    coarse = head(x)
    assert (coarse.gather(-1, top) - exact.gather(-1, top)).abs().max() > 1e-3  # the kernel alone: bf16 steps
    head.refine = 8
    torch.testing.assert_close(head(x).gather(-1, top), exact.gather(-1, top), rtol=1e-6, atol=1e-5)


def test_int8_fbgemm_rows_are_exact_to_15_bits_and_independent_of_the_batch(monkeypatch, aten_kernels):
    """fbgemm's activations are 8-bit on one grid per block; each row goes on a grid of its own as two rows
    (Int8Linear's docstring). Its result is the exact product of the int8 weight to about 1e-4 even with an
    outlier channel 40x the rest (bf16 activations: 1e-3), and a row's result is bit for bit the same alone
    or batched with a row 50x larger."""
    import pocketlm.quant.int8 as int8

    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(320, 200, bias=True))
    assert layer.packed is None  # a small layer stays on aten's kernel; output heads are large enough
    monkeypatch.setattr(int8, "PACK_MIN_WEIGHTS", 0)
    layer.pack()
    assert layer.packed is not None  # the x86 engine is in every x86 build of torch
    x = torch.randn(6, 320)
    x[:, 7] *= 40  # an outlier channel, as language models' activations have
    x[2] *= 50
    exact = x @ (layer.weight.float() * layer.scales.float()[:, None]).T + layer.bias
    out = layer(x)
    rel = ((out - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
    assert rel < 3e-4, rel
    assert torch.equal(out, torch.cat([layer(row[None]) for row in x]))
    layer.packed = None
    bf16_rel = ((layer(x) - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
    assert bf16_rel > 5 * rel  # what the two-row grid buys over aten's kernel


def test_int4_codes_round_trip():
    codes = torch.randint(0, 16, (48, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


def test_int4_keeps_a_grid_the_weights_already_lie_on():
    """A dequantized GGUF Q4 block is step * q + offset; its codes need not reach 0 or 15, nor use every
    level in between (as in Q4_K). quantize_groups finds that grid; min/max rounding alone would not."""
    torch.manual_seed(0)
    step = torch.rand(48, 2, 1) * 0.01 + 0.001
    offset = -step * (7 + 2 * torch.rand(48, 2, 1))  # a group around zero, as trained weights are
    q = torch.randint(2, 14, (48, 2, 32)).float()
    q[..., 1] = q[..., 0] + 3  # some level gaps, never the full 0..15 range
    w = (q * step + offset).reshape(48, 64)
    codes, sz, on_grid = quantize_groups(w, 32)
    assert on_grid
    # only the bf16 rounding of scale and zero is lost: a few percent of one grid step
    assert ((dequantize_groups(codes, sz) - w).abs() / step.repeat_interleave(32, -1).reshape(48, 64)).max() < 0.05
    # ordinary float weights are not on a grid, and round between their min and max
    _, _, on_grid = quantize_groups(torch.randn(48, 64), 32)
    assert not on_grid


@pytest.mark.parametrize("path", ["pocketlm", "aten"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [3, 130])  # the int4 kernel (decode) and the dequantized float matmul (prompts)
def test_int4_linear_matches_its_dequantized_weight(group_size, rows, path, request):
    if path == "aten":
        request.getfixturevalue("aten_kernels")
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    q = Int4Linear.from_linear(linear, group_size)
    x = torch.randn(1, rows, 256)
    codes = unpack_nibbles(q.qweight)
    assert torch.equal(q.dequantized(), dequantize_groups(codes, q.scales_and_zeros))
    exact = x @ dequantize_groups(codes, q.scales_and_zeros).T + linear.bias
    out = q(x)
    assert out.shape == exact.shape and out.dtype == exact.dtype
    # the kernel is exact up to its activations: 8 bits per block of 32 (pocketlm's, as llama.cpp's Q8) or bf16 (aten's)
    assert ((out - exact).abs().max() / exact.abs().max()).item() < (0.02 if path == "pocketlm" else 0.01)
    # and 4 bits in groups stays near the float layer
    ref = linear(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 0.1


def test_quant_scheme_names():
    assert QuantScheme.parse("int4") == QuantScheme("int4", 32)
    assert QuantScheme.parse("int4-g128").name == "int4-g128"
    assert QuantScheme.parse("int8").name == "int8"
    assert QuantScheme.parse("int4-mixed") == QuantScheme("int4", 32, off_grid="int8")
    with pytest.raises(Exception, match="choose int8, int4"):
        QuantScheme.parse("int3")


def test_fused_projections_change_nothing(tiny_llama_dir):
    """quantize() fuses q/k/v and gate/up first: alone, in fp32, that must give the same logits, cached too."""
    ref, fused = load(str(tiny_llama_dir)), load(str(tiny_llama_dir))
    fused.model.fuse_projections()
    assert fused.model.model.layers[0].self_attn.qkv_proj is not None
    ids = torch.tensor([encode_raw(ref.tokenizer, "Hello there, how are you today?")])
    with torch.inference_mode():
        torch.testing.assert_close(fused.model(ids), ref.model(ids), rtol=1e-5, atol=1e-5)
        T = ids.shape[1]
        fused.model.setup_cache(1, T + 1)
        steps = [fused.model(ids[:, : T - 2], torch.arange(T - 2))]
        steps += [fused.model(ids[:, t : t + 1], torch.tensor([t])) for t in (T - 2, T - 1)]
        torch.testing.assert_close(torch.cat(steps, 1), ref.model(ids), rtol=1e-4, atol=1e-5)


def test_int4_mixed_keeps_off_grid_layers_int8(tiny_llama_dir):
    """Random weights lie on no grid: under int4-mixed every layer stays int8, under int4 every one is int4."""
    mixed, int4 = load(str(tiny_llama_dir), quant="int4-mixed"), load(str(tiny_llama_dir), quant="int4")
    kinds = lambda lm: {type(m).__name__ for m in lm.model.modules() if "Int" in type(m).__name__}  # noqa: E731
    assert kinds(mixed) == {"Int8Linear", "Int8Embedding"}
    assert kinds(int4) == {"Int4Linear", "Int8Linear", "Int8Embedding"}  # the head is int8 in every scheme


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantize_swaps_every_linear_and_shares_the_tied_table(tiny_llama_dir, quant):
    lm = load(str(tiny_llama_dir), quant=quant)
    assert not any(type(m) is nn.Linear for m in lm.model.modules())
    # the tied embedding reads the int8 head: one table, no float copy left
    assert isinstance(lm.model.model.embed_tokens, Int8Embedding)
    assert lm.model.model.embed_tokens.weight is lm.model.lm_head.weight
    assert not any(p.dtype == torch.float32 and p.numel() >= 49152 for p in lm.model.parameters())
    ref = load(str(tiny_llama_dir))
    ids = torch.tensor([encode_raw(ref.tokenizer, "Hello there, how are you today?")])
    with torch.inference_mode():
        cosine = torch.cosine_similarity(lm.model(ids).flatten(), ref.model(ids).flatten(), dim=0)
    assert cosine.item() > (0.999 if quant == "int8" else 0.99)  # random weights: the worst case for 4 bits
    g = generate(lm, ids[0].tolist(), SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    g.text()
    assert g.stats.completion_tokens == 8


@pytest.mark.parametrize("to", ["int8", "int4"])
def test_quantize_command_round_trip_gives_identical_outputs(tiny_llama_dir, tmp_path, to):
    from pocketlm.cli import main

    out = tmp_path / f"tiny-{to}"
    assert main(["quantize", str(tiny_llama_dir), "--to", to, "-o", str(out)]) == 0
    in_memory, saved = load(str(tiny_llama_dir), quant=to), load(str(out))
    assert saved.meta["weights"] == to and saved.meta["quantization"]["weights"] == to
    ids = torch.tensor([encode_raw(saved.tokenizer, "Hello there, how are you today?")])
    with torch.inference_mode():
        assert torch.equal(saved.model(ids), in_memory.model(ids))
    assert sum(f.stat().st_size for f in out.iterdir()) < 0.5 * sum(f.stat().st_size for f in tiny_llama_dir.iterdir())
    # a quantized folder is not quantized again; --quant auto (every command's default) runs it as it is
    assert main(["run", str(out), "hi", "--quant", "int8", "-n", "2"]) == 1
    assert load(str(out), quant="auto").meta["weights"] == to


def test_auto_quant_follows_the_source_bits():
    from pocketlm.load import auto_quant

    assert [auto_quant(q) for q in ("Q4_1", "Q4_K_M", "Q6_K", "Q8_0", "F16", None)] == ["int4-mixed", "int4-mixed", "int8", "int8", "none", "none"]


@pytest.mark.slow
def test_smollm2_int8_perplexity_close_to_float(smollm2):
    ids = encode_raw(smollm2.tokenizer, (FIXTURES / "wikitext2_test_excerpt.txt").read_text())[:1024]
    int8 = load("smollm2-135m-instruct", quant="int8")
    ref = perplexity(smollm2.model, ids, window=1024, stride=1024)["perplexity"]
    ours = perplexity(int8.model, ids, window=1024, stride=1024)["perplexity"]
    assert abs(ours - ref) / ref < 0.02, (ours, ref)
