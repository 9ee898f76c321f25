"""The family table (pocketlm/families.py) is the only place that lists model families, and the package's imports
run one way (no import circles, lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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
    with pytest.raises(PocketLMError, match=r"'gpt_neo'.*supports bert, .*llama.*Adding a model family"):
        families.family("gpt_neo")


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
