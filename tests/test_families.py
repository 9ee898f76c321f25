"""The family table (pocketlm/families.py) is the only place that lists model families, and the package's imports
run one way (no import circles, lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from pocketlm import families
from pocketlm.errors import PocketLMError

PACKAGE = Path(__file__).resolve().parent.parent / "pocketlm"
NAMES = set(families.supported())


def sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "families.py" or path.parent != PACKAGE:
            yield path, ast.parse(path.read_text(), str(path))


def strings(node) -> list[str]:
    elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]


def mentions_model_type(node) -> bool:
    return any(
        (isinstance(n, ast.Attribute) and n.attr == "model_type") or (isinstance(n, ast.Name) and n.id == "model_type")
        or (isinstance(n, ast.Constant) and n.value == "model_type")
        for n in ast.walk(node)
    )  # fmt: skip


def outside_config_classes(tree: ast.Module):
    """Every node but those inside a class of config.py: a config class that reads several model_types (LlamaConfig:
    llama, mistral, qwen2) knows its own variants' defaults; that is the family's data, not a second list."""
    skip = {id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name.endswith("Config")
            for n in ast.walk(c)}  # fmt: skip
    return (n for n in ast.walk(tree) if id(n) not in skip)


def test_no_module_lists_families_or_compares_model_types():
    """A module that needs to know about a family asks families.py (family(model_type), is_encoder(config), the row's
    gguf / lora / prune fields); a second list of families drifts the day a family is added."""
    problems = []
    for path, tree in sources():
        where = path.relative_to(PACKAGE.parent)
        for node in outside_config_classes(tree) if path == PACKAGE / "config.py" else ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                named = set(strings(node)) & NAMES
                if len(named) >= 2:
                    problems.append(f"{where}:{node.lineno}: a list of families {sorted(named)}")
            elif isinstance(node, ast.Dict):
                named = {k.value for k in node.keys if isinstance(k, ast.Constant)} & NAMES
                if len(named) >= 2:
                    problems.append(f"{where}:{node.lineno}: a table keyed by families {sorted(named)}")
            elif isinstance(node, ast.Compare) and mentions_model_type(node):
                named = {s for side in [node.left, *node.comparators] for s in strings(side)} & NAMES
                if named:
                    problems.append(f"{where}:{node.lineno}: model_type compared with {sorted(named)}")
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_list():
    tree = ast.parse('DECODERS = ("llama", "qwen2")\nif cfg.model_type == "bert": pass\n')
    lists = [n for n in ast.walk(tree) if isinstance(n, ast.Tuple) and len(set(strings(n)) & NAMES) >= 2]
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare) and mentions_model_type(n)]
    assert lists and compares


def test_every_row_resolves():
    for row in families.FAMILIES.values():
        cls = row.config_class()
        assert hasattr(cls, "from_hf") and hasattr(cls, "to_hf")
        model = row.model_class()
        assert row.is_decoder == hasattr(model, "setup_cache"), row.model_type
    from pocketlm.formats import gguf, gguf_write

    written = {f.model_type for f in families.FAMILIES.values() if f.gguf}
    assert set(gguf_write.ARCHITECTURES) == written
    assert set(gguf.ARCHITECTURES) == {f.gguf.arch for f in families.FAMILIES.values() if f.gguf and f.gguf.reads}
    for arch in gguf.ARCHITECTURES:
        assert families.gguf_reader(arch).gguf.arch == arch


def test_refusal_names_the_family_the_choices_and_what_to_do():
    with pytest.raises(PocketLMError, match=r"'t5'.*supports bert, .*llama.*Export the model from transformers.*Adding a model family") as e:
        families.family("t5")  # an encoder-decoder: no family (tests/test_encoders.py: the same through the CLI)
    assert all(name in str(e.value) for name in families.supported())


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts).removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every import, the lazy ones inside functions too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pocketlm"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("pocketlm"))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles_below_the_recipes():
    """models/llama.py -> fused_step.py -> gemma3.py -> llama.py, load.py <-> quant/__init__.py and
    engine/generate.py <-> engine/speculative.py are gone; a lower module never reaches up. (finetune/'s recipes are
    left to their own rework.)"""
    found = [c for c in cycles(import_graph()) if not all(m.startswith("pocketlm.finetune.") for m in c)]
    assert not found, found


# ---- Gemma 1, Gemma 2 and Phi-2 end to end (and Phi-3's GGUF, prune and fused step): tiny random models built by
# transformers' own classes

NEW_DECODERS = ["gemma", "gemma2", "phi"]


def tiny_hf(model_type: str, vocab_size: int = 128, sharp: bool = False, **overrides):
    """A tiny random transformers model of the family, its norms and biases perturbed (test_models.randomized).
    gemma: Gemma 2B's shape in small (multi-query, head_dim larger than D / heads). gemma2: sliding and global
    layers, both soft-caps, query_pre_attn_scalar apart from head_dim. phi: partial rotary, biases. sharp: attention
    scores well past Gemma 2's cap (transformers' init leaves them near 0.1)."""
    import transformers
    from test_models import randomized, tiny_llama

    kinds = {
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(num_key_value_heads=1, head_dim=32)),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                   dict(num_hidden_layers=3, num_key_value_heads=2, head_dim=16, sliding_window=4,
                        query_pre_attn_scalar=24, attn_logit_softcapping=0.5, final_logit_softcapping=3.0)),
        "phi": (transformers.PhiConfig, transformers.PhiForCausalLM, dict(partial_rotary_factor=0.5)),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,  # Phi-4 mini's shape: partial rotary, GQA, tied
                 dict(partial_rotary_factor=0.75, num_key_value_heads=2, tie_word_embeddings=True)),
    }  # fmt: skip
    config_class, model_class, shape = kinds[model_type]
    torch.manual_seed(0)
    config = config_class(**tiny_llama(vocab_size=vocab_size, **shape) | overrides, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = randomized(model_class(config))
    with torch.no_grad():  # Gemma's norms go into a GGUF as 1 + w: multiples of 1/1024 come back exactly
        for name, p in model.named_parameters():
            if model_type.startswith("gemma") and name.endswith("norm.weight"):
                p.copy_(torch.round(p * 1024) / 1024)
    if sharp:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(10)
                layer.self_attn.k_proj.weight.mul_(10)
    return model


_FOLDERS: dict[tuple, Path] = {}


def tiny_folder(model_type: str, tmp_path_factory, sharp: bool = False, **overrides) -> Path:
    """tiny_hf's model saved by transformers with a small tokenizer (Gemma's SentencePiece, Phi's byte-level BPE)."""
    from tiny_models import byte_level_metadata, sentencepiece_gemma_metadata

    from pocketlm.tokenizer import Tokenizer

    key = (model_type, sharp, *sorted(overrides.items()))
    if key not in _FOLDERS:
        if model_type.startswith("phi"):
            metadata = byte_level_metadata()
        else:
            metadata = sentencepiece_gemma_metadata() | {"general.architecture": model_type}
        tokenizer = Tokenizer.from_gguf_metadata(metadata)
        folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
        hf = tiny_hf(model_type, tokenizer.vocab_size, sharp, **overrides)
        hf.config.bos_token_id, hf.config.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
        hf.config.pad_token_id = tokenizer.pad_id
        hf.save_pretrained(folder)
        tokenizer.save(folder)
        _FOLDERS[key] = folder
    return _FOLDERS[key]


def ids_of(lm) -> torch.Tensor:
    from tiny_models import TEXT

    return torch.tensor([lm.tokenizer.encode(TEXT)])


@pytest.mark.parametrize("model_type", NEW_DECODERS)
def test_new_decoder_matches_transformers(model_type):
    """Logits to 1e-4 in fp32, cached decoding equal to uncached, meta-device loading, to_hf() read back by
    transformers, and 30 greedy tokens equal to transformers' generate (tests/test_models.py's check_decoder)."""
    from test_models import check_decoder

    hf = tiny_hf(model_type, sharp=True)
    check_decoder(hf, families.family(model_type).model_class())


def test_gemma2_soft_caps_are_applied():
    """Both caps change the logits (tiny_hf's scores pass the attention cap): without either the same weights give
    other logits, so matching transformers above needs them."""
    from pocketlm.config import config_from_hf

    hf = tiny_hf("gemma2", sharp=True)
    idx = torch.arange(12)[None]
    outs = []
    for caps in ({}, {"attn_logit_softcapping": None}, {"final_logit_softcapping": None}):
        cfg = config_from_hf(hf.config.to_dict() | caps)
        model = families.family("gemma2").model_class()(cfg).eval()
        model.load_state_dict(hf.state_dict())
        with torch.no_grad():
            outs.append(model(idx))
    assert outs[0].abs().max() <= 3.0
    assert not torch.allclose(outs[0], outs[1], atol=1e-3) and not torch.allclose(outs[0], outs[2], atol=1e-3)


@pytest.mark.parametrize("model_type", [*NEW_DECODERS, "phi3"])
def test_new_decoder_gguf_round_trip(model_type, tmp_path_factory, tmp_path, monkeypatch):
    """export --format gguf writes llama.cpp's architecture and tensor names; pocketlm reads back the same tensors
    and config, and the model gives the same logits (so the same greedy text); transformers' own GGUF loader
    agrees where it reads every setting (gemma2; its phi3 reader drops partial rotary); q8_0 and q4_0 files run
    quantized straight from their blocks."""
    from pocketlm.config import config_from_hf
    from pocketlm.export import export
    from pocketlm.formats.gguf import gguf_to_hf, read_gguf
    from pocketlm.load import load

    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    # llama.cpp's gemma2 derives the query scale from head_dim; transformers' GGUF loader keeps its defaults
    # (query_pre_attn_scalar 256, caps 50 and 30): a model with those is read the same by both
    overrides = dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    overrides = overrides if model_type == "gemma2" else {}
    folder = tiny_folder(model_type, tmp_path_factory, **overrides)
    src = load(str(folder))
    path = tmp_path / "model.gguf"
    export(str(folder), "gguf", path, "f32")
    f = read_gguf(path)
    assert f.architecture == families.family(model_type).gguf.arch
    config, state_dict = gguf_to_hf(path)
    expected = {k: v for k, v in src.model.state_dict().items() if not (k == "lm_head.weight" and src.config.tie_word_embeddings)}
    assert set(state_dict) == set(expected)
    assert all(torch.equal(state_dict[k], expected[k]) for k in expected)
    read = config_from_hf(config)
    assert read.norm_eps == pytest.approx(src.config.norm_eps)  # stored as f32
    assert read == dataclass_replace(src.config, dtype="float32", norm_eps=read.norm_eps)
    ids = ids_of(src)
    with torch.inference_mode():
        want = src.model(ids)
        assert torch.equal(load(str(path)).model(ids), want)
        if model_type == "gemma2":
            from conftest import hf_from_gguf

            torch.testing.assert_close(hf_from_gguf(path)(ids).logits, want, rtol=1e-4, atol=1e-4)
    for qtype, quant, tol in (("q8_0", "int8", 0.03), ("q4_0", "int4", 0.25)):  # as test_new_decoder_quantized_close_to_float
        export(str(folder), "gguf", tmp_path / f"{qtype}.gguf", qtype)
        with torch.inference_mode():
            got = load(str(tmp_path / f"{qtype}.gguf"), quant=quant).model(ids)
        assert float((got - want).abs().mean()) < tol * float(want.std()), qtype


def dataclass_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
@pytest.mark.parametrize("model_type, fused", [("gemma", True), ("gemma2", True), ("gemma2-uncapped", True), ("phi3", True),
                                               ("phi", False)])
def test_new_decoder_fused_step_equals_the_modules(model_type, fused, quant, tmp_path_factory):
    """On every kernel target this CPU runs: Gemma 1 and Gemma 2 (sliding layers, post norms, both soft-caps, or
    none on the scores) and Phi-4 mini's shape (partial rotary) decode in one call into the kernels, equal to their
    modules; what the fused step does not compute (Phi-2's LayerNorm, parallel block, MLP without a gate) runs
    module by module, quantized too."""
    from pocketlm import kernels
    from pocketlm.load import load
    from pocketlm.models.fused_step import FusedStep

    if kernels.library() is None:
        pytest.skip(f"no CPU kernels: {kernels.why_unavailable}")
    overrides = {"attn_logit_softcapping": None} if model_type == "gemma2-uncapped" else {}
    folder = tiny_folder(model_type.removesuffix("-uncapped"), tmp_path_factory, sharp=model_type == "gemma2", **overrides)
    for target in [t.name for t in kernels.runnable_targets()]:
        with kernels.using(target):
            lm = load(str(folder), quant=quant)
            model, ids, steps = lm.model, ids_of(lm)[:, :6], {}
            for path in ("fused", "modules"):
                model.setup_cache(1, 32)
                with torch.inference_mode():
                    model(ids, torch.arange(6))
                    if path == "modules":
                        model.decode_step = False
                    steps[path] = torch.stack([model(ids[:, t % 6, None], torch.tensor([t]))[0, -1] for t in range(6, 16)])
                if path == "fused":
                    assert isinstance(model.decode_step, FusedStep) == fused, target
            if quant == "none" or not fused:
                torch.testing.assert_close(steps["fused"], steps["modules"], rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(steps["fused"], steps["modules"]), target


@pytest.mark.parametrize("model_type", NEW_DECODERS)
def test_new_decoder_quantized_close_to_float(model_type, tmp_path_factory):
    from pocketlm.load import load

    folder = tiny_folder(model_type, tmp_path_factory)
    ids = ids_of(load(str(folder)))
    with torch.inference_mode():
        want = load(str(folder)).model(ids)
        for quant, tol in (("int8", 0.03), ("int4", 0.25)):  # mean error against the logits' spread
            got = load(str(folder), quant=quant).model(ids)
            assert float((got - want).abs().mean()) < tol * float(want.std()), quant


@pytest.mark.parametrize("model_type", NEW_DECODERS)
def test_new_decoder_lora_trains_and_merges(model_type):
    """finetune --lora-r's default targets are the family's Linears (families.py's row); a few steps lower the loss
    and the merged model computes what the adapted one did."""
    import torch.nn.functional as F

    from pocketlm.config import config_from_hf
    from pocketlm.finetune.config import DEFAULT_LORA_TARGETS
    from pocketlm.finetune.lora import apply_lora, merge, unwrap

    hf = tiny_hf(model_type)
    cfg = config_from_hf(hf.config.to_dict())
    model = families.family(model_type).model_class()(cfg)
    model.load_state_dict(hf.state_dict())
    peft = apply_lora(model, 4, 8, 0.0, DEFAULT_LORA_TARGETS)
    wrapped = {name.rsplit(".", 1)[-1] for name, m in unwrap(peft).named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(families.family(model_type).lora)
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(5):
        logits = unwrap(peft)(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    with torch.no_grad():
        adapted = unwrap(peft)(idx)
        torch.testing.assert_close(merge(peft)(idx), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", NEW_DECODERS)
def test_new_decoder_hf_export_loads_in_transformers(model_type, tmp_path_factory, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from pocketlm.export import export
    from pocketlm.load import load

    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    folder = tiny_folder(model_type, tmp_path_factory)
    src = load(str(folder))
    export(str(folder), "hf", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = ids_of(src)
    with torch.inference_mode():
        torch.testing.assert_close(hf(ids).logits, src.model(ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "phi3"])
def test_prune_loads_in_transformers_and_exports(model_type, tmp_path_factory, tmp_path, monkeypatch):
    """prune cuts a layer, heads, MLP and hidden channels of Gemma 1 and 2 (the sqrt(D) scale kept, Gemma 2's
    layer kinds kept) and of Phi-3 (its fused projections cut as q/k/v and gate/up): transformers loads the result
    and agrees, and its GGUF reads back equal (Phi-3's is refused: llama.cpp's phi3 needs heads * head_dim = D)."""
    from transformers import AutoModelForCausalLM

    from pocketlm.compress.prune import PruneSpec, prune_model
    from pocketlm.export import export
    from pocketlm.load import load

    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    overrides = {"query_pre_attn_scalar": 16} if model_type == "gemma2" else {}  # head_dim: what llama.cpp derives
    folder = tiny_folder(model_type, tmp_path_factory, **overrides)
    out = tmp_path / "pruned"
    prune_model(str(folder), out, PruneSpec(drop_layers=1, heads=2, kv_groups=1, ffn=48, hidden=40), calib_tokens=256)
    lm = load(str(out))
    assert (lm.config.n_heads, lm.config.intermediate_size, lm.config.dim) == (2, 48, 40)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = ids_of(lm)
    with torch.inference_mode():
        ours = lm.model(ids)
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-4, atol=1e-4)
        if model_type == "phi3":
            with pytest.raises(PocketLMError, match="llama.cpp's phi3 sizes q/k/v by the hidden size"):
                export(str(out), "gguf", tmp_path / "pruned.gguf", "f32")
            return
        export(str(out), "gguf", tmp_path / "pruned.gguf", "f32")
        assert torch.equal(load(str(tmp_path / "pruned.gguf")).model(ids), ours)


def test_phi_awq_folds_nothing_into_the_norm_both_branches_read(tmp_path_factory):
    """Phi's one LayerNorm feeds attention and the MLP: AWQ scales for q/k/v folded into it would change the MLP's
    input too. With that fold left out, AWQ ends closer to the float model than round-to-nearest."""
    from tiny_models import TEXT

    from pocketlm.load import load
    from pocketlm.quant import QuantScheme
    from pocketlm.quant.calibrate import CalibConfig, calibrate, calibration_ids

    folder = tiny_folder("phi", tmp_path_factory)
    ref = load(str(folder))
    ids = ids_of(ref)
    lm = load(str(folder))
    calibrate(lm.model, calibration_ids(ref.tokenizer, TEXT * 4, 256, 64), QuantScheme.parse("int4"),
              CalibConfig(method="awq", awq_grid=10, quiet=True))
    with torch.inference_mode():
        want = ref.model(ids)
        awq = (lm.model(ids) - want).abs().mean()
        rtn = (load(str(folder), quant="int4").model(ids) - want).abs().mean()
    assert awq < rtn, (awq, rtn)


def test_gguf_export_refuses_what_llama_cpp_would_run_otherwise(tmp_path_factory, tmp_path, monkeypatch):
    """llama.cpp's gemma2 always soft-caps and derives the query scale from head_dim: a Gemma 2 without caps, or with
    another query_pre_attn_scalar, is refused in one line rather than written as a different model."""
    from pocketlm.export import export

    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    uncapped = {"attn_logit_softcapping": None, "query_pre_attn_scalar": 16}
    for overrides, says in ((uncapped, "without soft-capping"), ({}, "query_pre_attn_scalar 24")):
        with pytest.raises(PocketLMError, match=says):
            export(str(tiny_folder("gemma2", tmp_path_factory, **overrides)), "gguf", tmp_path / "m.gguf")
