"""A quantized run of a GGUF reads its blocks straight into the quantized layers (pocketlm/quant/from_gguf.py): the
same model as the float round trip gave (dequantize to a float folder, quantize that), with no float copy made."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketlm import kernels
from pocketlm.cli import main
from pocketlm.formats.gguf import read_gguf
from pocketlm.load import convert_gguf, load
from pocketlm.quant.from_gguf import grid_groups
from pocketlm.quant.int4 import Int4Linear
from pocketlm.quant.int8 import Int8Linear

from tiny_models import logits


def export(model_dir, qtype: str, path) -> str:
    assert main(["export", str(model_dir), "--format", "gguf", "--type", qtype, "-o", str(path)]) == 0
    return str(path)


def converted_copies() -> list[str]:
    folder = os.path.join(os.environ["POCKETLM_HOME"], "converted")
    return [p for p in os.listdir(folder) if not p.endswith(".json")] if os.path.isdir(folder) else []


def quantized_and_float(path):
    """load()'s steps for a GGUF that gguf-py wrote without a tokenizer (a byte-level one from elsewhere): the model
    as a quantized run reads it (int4-mixed), the float model (the file dequantized), and the file as read."""
    from tiny_models import byte_level_metadata

    from pocketlm.formats.gguf import gguf_to_hf
    from pocketlm.load import build, read_gguf_model
    from pocketlm.quant import QuantScheme
    from pocketlm.quant.from_gguf import quantized_state_dict
    from pocketlm.tokenizer import Tokenizer

    gguf_file, config = read_gguf_model(path)
    scheme = QuantScheme.parse("int4-mixed")
    config["pocketlm"]["quantization"] = scheme.to_dict()
    state_dict, layers = quantized_state_dict(gguf_file, scheme, config)
    tokenizer = Tokenizer.from_gguf_metadata(byte_level_metadata())
    lm = build("gguf", path, path, config, state_dict, tokenizer, torch.float32, "int4-mixed", layers)
    float_config, float_state_dict = gguf_to_hf(gguf_file)
    float_config["pocketlm"] = {}
    reference = build("gguf", path, path, float_config, float_state_dict, tokenizer, torch.float32, "none")
    return lm, reference, gguf_file


def assert_close_to_float(lm, reference) -> None:
    """The quantized model's logits within 5% (of the largest) of the float model's, on a few tokens."""
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 8]])
    with torch.inference_mode():
        ours, theirs = lm.model(ids), reference.model(ids)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 0.05


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k", "q8_0"])
def test_a_quantized_gguf_loads_as_the_float_round_trip_did_without_a_float_copy(tiny_dir, qtype, tmp_path, throwaway_home):
    path = export(tiny_dir, qtype, tmp_path / f"tiny-{qtype}.gguf")
    before = set(converted_copies())
    direct = load(path, quant="auto")
    assert set(converted_copies()) == before  # nothing written: no float folder, no quantized copy
    assert direct.meta["weights"] == ("int4-mixed" if qtype != "q8_0" else "int8") == direct.meta["runtime_quant"]
    grids = any(t.ggml_type.name in ("Q4_0", "Q4_K") for t in read_gguf(path).tensors.values() if len(t.shape) == 2)
    kinds = {type(m) for m in direct.model.modules() if isinstance(m, (Int4Linear, Int8Linear))}
    assert kinds == ({Int4Linear, Int8Linear} if grids else {Int8Linear})  # the head stays int8
    # the round trip's model: the GGUF dequantized into a float folder, quantized at load
    folder = convert_gguf(Path(path))
    round_trip = load(str(folder), quant=direct.meta["weights"])
    ours, theirs, exact = logits(direct), logits(round_trip), logits(load(str(folder)))
    if qtype == "q8_0":  # both round the dequantized rows to int8 alike
        assert torch.equal(ours, theirs)
    else:
        # The same grids; the scales and zeros go to bf16 from the block's own fields here (Q4_0's stay the file's
        # fp16 ones, exact), from the group's minimum and step there: a few bf16 steps apart, and this path no
        # further from the file's own values.
        tolerance = 1e-2 if qtype == "q4_0" else 5e-3
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)
        assert (ours - exact).abs().mean() <= 1.05 * (theirs - exact).abs().mean()


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k"])
def test_the_kernel_layout_written_from_the_blocks_equals_the_torch_reading(tiny_dir, qtype, tmp_path, throwaway_home):
    """cpu.cpp's int4_pack_gguf (the file's blocks straight into the kernels' layout, Q4_0's and Q4_K's own): every
    layer's weight is the file's, as gguf-py dequantizes it, exactly."""
    from gguf import dequantize

    if not kernels.int4_kernel_on():
        pytest.skip(f"pocketlm's kernels are not built: {kernels.why_unavailable}")
    path = export(tiny_dir, qtype, tmp_path / f"tiny-{qtype}.gguf")
    f = read_gguf(path)
    info = f.tensors["blk.0.ffn_down.weight"]
    if info.ggml_type.name.lower() != qtype:
        pytest.skip(f"the tiny model's rows are too short for {qtype} (the exporter took another type)")
    lm = load(path, quant="auto")
    down = lm.model.model.layers[0].mlp.down_proj  # an int4 layer without reordered rows
    assert isinstance(down, Int4Linear) and down.packed is not None and down._buffers["qweight"].numel() == 0
    assert down.layout == qtype
    expected = torch.from_numpy(dequantize(info.data, info.ggml_type)).view(down.out_features, -1)
    assert torch.equal(down.dequantized(), expected.float())


def test_a_layer_kept_in_the_kernel_layout_saves_and_loads_its_plain_codes():
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(torch.nn.Linear(64, 40, bias=True), 32)
    state = layer.state_dict()
    assert state["qweight"].shape == (40, 32) and state["scales_and_zeros"].shape == (2, 40, 2)
    if kernels.int4_kernel_on():  # the plain buffers are given up for the kernel's layout
        assert layer._buffers["qweight"].numel() == 0 and layer.packed is not None
    again = Int4Linear(64, 40, 32, bias=True)
    again.load_state_dict(state)
    again.pack()
    x = torch.randn(3, 64)
    assert torch.equal(again(x), layer(x)) and torch.equal(again.dequantized(), layer.dequantized())


def test_a_mixed_file_runs_its_4bit_tensors_int4_and_the_rest_int8(tmp_path, throwaway_home):
    """A Q4_K_M-like file (Q4_K and Q4_1 matrices, Q6_K and Q5_0 ones, F32 norms): the 4-bit grids stay int4, the
    others run int8, and the logits stay close to the float model's (the file dequantized)."""
    from gguf import GGMLQuantizationType as T
    from test_gguf import random_k_quants, tiny_hf_state_dict, tiny_metadata, to_gguf_tensors, write_gguf

    mix = {"token_embd": T.Q8_0, "attn_output": T.Q6_K, "output.": T.Q6_K, "attn_q.": T.Q4_0, "attn_k.": T.Q4_1,
           "attn_v": T.Q4_K, "ffn_gate": T.Q4_K, "ffn_up": T.Q4_0, "blk.0.ffn_down": T.Q5_0, "blk.1.ffn_down": T.Q4_1}
    tensors = random_k_quants(to_gguf_tensors("llama", tiny_hf_state_dict("llama", False), mix))
    path = write_gguf(tmp_path / "mixed.gguf", "llama", tiny_metadata("llama"), tensors)
    types = {name: t.ggml_type.name for name, t in read_gguf(path).tensors.items()}
    assert {"Q4_K", "Q4_1", "Q4_0", "Q6_K", "Q5_0"} <= set(types.values())
    lm, reference, gguf_file = quantized_and_float(path)
    for i, layer in enumerate(lm.model.model.layers):
        for module, names in ((layer.self_attn.qkv_proj, ("attn_q", "attn_k", "attn_v")), (layer.mlp.down_proj, ("ffn_down",))):
            grid = all(types[f"blk.{i}.{n}.weight"] in ("Q4_0", "Q4_1", "Q4_K") for n in names)
            assert isinstance(module, Int4Linear if grid else Int8Linear), (i, names, types)
    # the kernels' layout written from Q4_K blocks (attn_v, the fused layer's last rows) against the torch reading
    qkv = lm.model.model.layers[0].self_attn.qkv_proj
    v = gguf_file.tensors["blk.0.attn_v.weight"]
    codes, scale, zero = grid_groups(v)
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    expected = ((codes.float() - 8) * bf16(scale)[:, None] + bf16(zero)[:, None]).view(v.shape)
    assert torch.equal(qkv.dequantized()[-v.shape[0]:], expected)
    assert_close_to_float(lm, reference)


def test_loading_holds_about_the_quantized_model_not_a_float_one(tmp_path, throwaway_home, smollm2):
    """Peak memory of a direct load, in a fresh process, after the imports: the int4 layers, the int8 head (with its
    kernel's copy) and the tokenizer, well under the float model alone (7x the file)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    folder = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smollm2.path / name).read_bytes())
    path = export(folder, "q4_0", tmp_path / "model.gguf")
    size = os.path.getsize(path)
    code = ("import torch, pocketlm.load as L, pocketlm.quant.from_gguf, pocketlm.tokenizer\n"
            "rss = lambda key: int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024\n"
            "before = rss('VmRSS')\n"
            f"L.load({path!r}, quant='auto')\n"
            "print(before, rss('VmHWM'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True).stdout
    before, peak = map(int, out.split())
    float_bytes = sum(p.numel() for p in LlamaForCausalLM(config).parameters()) * 4
    # a float copy of the model alone would be float_bytes; the int4 layers, the int8 head with its kernel's copy and
    # the tokenizer are about 2.7x the file here (a small model's 49k-row embedding weighs most)
    assert peak - before < 0.75 * float_bytes, (peak - before, size, float_bytes)


def test_a_model_larger_than_the_memory_is_refused_before_it_loads(tmp_path, monkeypatch):
    env = {**os.environ, "POCKETLM_MEMORY_LIMIT": "20MB"}
    for quant in ("auto", "none"):
        done = subprocess.run([sys.executable, "-m", "pocketlm.cli", "run", "smollm2", "Hi", "-n", "2", "--quant", quant],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "needs about" in done.stderr and "20 MB is available" in done.stderr


def test_show_reads_a_gguf_without_converting_it(tmp_path, small_llama_dir, throwaway_home, capsys):
    path = export(small_llama_dir, "q4_0", tmp_path / "tiny.gguf")
    before = set(converted_copies())
    capsys.readouterr()
    assert main(["show", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["model_type"] == "llama" and info["quant"] == "Q4_0"
    assert set(converted_copies()) == before


def test_an_untied_head_on_a_4bit_grid_stays_int4_as_the_file_has_it(tmp_path, throwaway_home):
    """TinyLlama's or Mistral's Q4_0 output.weight: the int4 head reads the file's own codes and scales (an int8 head
    would read 1.8x the bytes every token); a tied head stays int8 (the embedding looks its rows up)."""
    from gguf import GGMLQuantizationType as T
    from test_gguf import random_k_quants, tiny_hf_state_dict, tiny_metadata, to_gguf_tensors, write_gguf

    from pocketlm.load import read_gguf_model
    from pocketlm.quant import QuantScheme
    from pocketlm.quant.from_gguf import quantized_state_dict

    mix = {"token_embd": T.Q4_0, "output.": T.Q4_0, "attn": T.Q4_0, "ffn": T.Q4_0}
    tensors = random_k_quants(to_gguf_tensors("llama", tiny_hf_state_dict("llama", False), mix))
    path = write_gguf(tmp_path / "untied.gguf", "llama", tiny_metadata("llama"), tensors)
    gguf_file, config = read_gguf_model(path)
    assert gguf_file.tensors["output.weight"].ggml_type == T.Q4_0
    state_dict, layers = quantized_state_dict(gguf_file, QuantScheme.parse("int4-mixed"), config)
    table = layers["model.embed_tokens"].head[0]  # the untied embedding's int8 rows: looked up, never laid out for a kernel
    assert table.packed_weight is None and table.pack().packed_weight is None and table.weight.shape == (config["vocab_size"], config["hidden_size"])
    if not kernels.int4_kernel_on():
        assert "lm_head.qweight" in state_dict  # the plain int4 buffers, for torch's int4 path
        return
    head = layers["lm_head"]
    codes, scale, zero = grid_groups(gguf_file.tensors["output.weight"])  # Q4_0: zero 0, the layout's scales fp16
    assert head.layout == "q4_0" and torch.equal(head.dequantized(), ((codes.float() - 8) * scale[:, None]).view(head.out_features, -1))


def k_quant_file(path, mix: dict) -> str:
    """A tiny untied Llama GGUF whose tensors take `mix`'s types (by name fragment), its K-quant blocks random with
    small scales (test_kernels.random_blocks), so the activations stay in range."""
    from gguf import GGMLQuantizationType as T
    from test_gguf import random_k_quants, tiny_hf_state_dict, tiny_metadata, to_gguf_tensors, write_gguf
    from test_kernels import random_blocks

    tensors = random_k_quants(to_gguf_tensors("llama", tiny_hf_state_dict("llama", False), mix))
    gen = torch.Generator().manual_seed(0)
    for name, (w, qtype) in tensors.items():
        if qtype in (T.Q4_K, T.Q6_K):
            rows, size = w.shape[0], {T.Q4_K: 144, T.Q6_K: 210}[qtype]
            tensors[name] = (random_blocks(qtype.name.lower(), rows, w.size // size * 256 // rows, gen).reshape(rows, -1).numpy(), qtype)
    return write_gguf(path, "llama", tiny_metadata("llama"), tensors)


def test_q4_k_and_q6_k_layers_keep_their_blocks_and_decode_fused_as_by_the_modules(tmp_path, throwaway_home):
    """A file mixed as Q4_K_M is (Q4_K matrices; Q6_K head, ffn_down and attn_v): every int4 layer holds the Q4_K layout
    (4.625 bits a weight), the Q6_K ones the Q6_K layout (6.5625 bits), the file's weights exactly; q, k and v, whose
    types differ, are not fused, each in its own layout (one fused layer would take int8 rows). The logits stay close
    to the float model's, and the fused decode step (cpu.cpp's Linear kinds 5 and 6) gives the modules' logits bit for
    bit."""
    from gguf import GGMLQuantizationType as T
    from test_kernels import decode_fused_and_by_modules

    if not kernels.int4_kernel_on():
        pytest.skip(f"pocketlm's kernels are not built: {kernels.why_unavailable}")
    mix = {"token_embd": T.Q8_0, "output.": T.Q6_K, "attn_v": T.Q6_K, "ffn_down": T.Q6_K,  # "output." takes attn_output too
           **{name: T.Q4_K for name in ("attn_q.", "attn_k.", "attn_output", "ffn_gate", "ffn_up")}}
    lm, reference, _ = quantized_and_float(k_quant_file(tmp_path / "q4_k.gguf", mix))
    int4 = [m for m in lm.model.modules() if isinstance(m, Int4Linear)]
    assert int4 and {m.layout for m in int4} == {"q4_k"}
    q6_k = {name for name, m in lm.model.named_modules() if isinstance(m, Int8Linear) and m.layout == "q6_k"}
    assert q6_k == {"lm_head", *(f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"))}
    attn = lm.model.model.layers[0].self_attn
    assert attn.qkv_proj is None and attn.q_proj.layout == attn.k_proj.layout == "q4_k"
    # what a decoded token reads: the layouts (and scales, biases), not the untied embedding's int8 table
    from pocketlm.bench import weight_bytes_per_token

    layouts = sum(m.packed.numel() for m in int4) + sum(m.packed_weight.numel() for m in lm.model.modules()
                                                          if isinstance(m, Int8Linear) and m.packed_weight is not None)
    assert weight_bytes_per_token(lm.model) == layouts and lm.model.model.embed_tokens.table.rows_only
    float_weights = reference.model.state_dict()
    assert torch.equal(lm.model.lm_head.dequantized(), float_weights["lm_head.weight"])
    assert_close_to_float(lm, reference)
    steps = decode_fused_and_by_modules(lm.model, torch.tensor([[1, 5, 9, 3, 7, 2, 8]]), 8)
    assert torch.equal(steps["fused"], steps["modules"])


def test_a_q6_k_file_keeps_its_blocks_fused_and_saves_and_splits_as_int8_rows(tmp_path, throwaway_home):
    """Every matrix Q6_K: the fused q/k/v and gate/up hold the Q6_K layout too, decode fused as by the modules, and
    where a layer's plain rows are needed (saving; unfuse_projections, which LoRA runs) they are the int8 rows of the
    file's weights, as the layers were before the layout."""
    from gguf import GGMLQuantizationType as T
    from test_kernels import decode_fused_and_by_modules

    from pocketlm.quant import unfuse_projections
    from pocketlm.quant.int8 import int8_rows

    if not kernels.int4_kernel_on():
        pytest.skip(f"pocketlm's kernels are not built: {kernels.why_unavailable}")
    mix = {"token_embd": T.Q8_0, **{name: T.Q6_K for name in ("output.", "attn_q.", "attn_k.", "attn_v", "ffn_gate", "ffn_up", "ffn_down")}}
    lm, reference, _ = quantized_and_float(k_quant_file(tmp_path / "q6_k.gguf", mix))
    q6_k = {name.rpartition(".")[2] for name, m in lm.model.named_modules() if isinstance(m, Int8Linear) and m.layout == "q6_k"}
    assert q6_k == {"lm_head", "qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert_close_to_float(lm, reference)
    steps = decode_fused_and_by_modules(lm.model, torch.tensor([[1, 5, 9, 3, 7, 2, 8]]), 6)
    assert torch.equal(steps["fused"], steps["modules"])
    float_weights = reference.model.state_dict()
    parts = [float_weights[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    saved = lm.model.state_dict()
    assert all(torch.equal(a, b) for a, b in zip((saved["model.layers.0.self_attn.qkv_proj.weight"],
                                                  saved["model.layers.0.self_attn.qkv_proj.scales"]), int8_rows(torch.cat(parts))))
    unfuse_projections(lm.model)
    attn = lm.model.model.layers[0].self_attn
    assert attn.q_proj.layout == "rows" and torch.equal(attn.q_proj.weight, int8_rows(parts[0])[0])


def vm_flags(address: int) -> set[str]:
    """The VmFlags (/proc/self/smaps) of the mapping that holds `address`: "hg" where it is advised MADV_HUGEPAGE."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir(), reason="a kernel without transparent huge pages")
@pytest.mark.parametrize("qtype", ["q4_k", "q6_k"])
def test_packed_weights_from_2mb_on_are_advised_into_huge_pages(qtype, monkeypatch):
    """A GGUF tensor's kernel layout (and int4_pack's, int8_pack's) starts on a 2 MB boundary in memory advised into
    transparent huge pages, as the page cache holds llama.cpp's memory-mapped file; with POCKETLM_HUGEPAGES=0, or
    under 2 MB, it is a plain tensor with the same bytes."""
    from types import SimpleNamespace

    from test_kernels import random_blocks

    from pocketlm.formats.gguf import GGMLQuantizationType
    from pocketlm.quant.from_gguf import kernel_layout

    N, K = 2048, 2048  # 2.4 MB (Q4_K), 3.4 MB (Q6_K)
    blocks = random_blocks(qtype, N, K, torch.Generator().manual_seed(0))
    info = SimpleNamespace(shape=(N, K), ggml_type=GGMLQuantizationType[qtype.upper()], data=blocks.reshape(-1).numpy())
    packed = kernel_layout([info], [None], qtype)
    assert packed.data_ptr() % kernels.HUGE_PAGE == 0 and "hg" in vm_flags(packed.data_ptr())
    assert "hg" in vm_flags(Int4Linear.from_linear(torch.nn.Linear(2048, 2048), 32).packed.data_ptr())
    assert "hg" in vm_flags(kernels.int8_pack(torch.randint(-127, 128, (2048, 1024), dtype=torch.int8)).data_ptr())
    small = kernels.weight_buffer(kernels.HUGE_PAGE - 4096)
    assert small.untyped_storage().nbytes() == small.numel()  # a plain tensor: freed memory may already be advised
    monkeypatch.setenv("POCKETLM_HUGEPAGES", "0")
    plain = kernel_layout([info], [None], qtype)
    assert plain.untyped_storage().nbytes() == plain.numel() and torch.equal(plain, packed)
