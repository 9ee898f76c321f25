import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, fp32, through pocketlm's loader (converted once, then cached)."""
    from pocketlm.load import load

    return load("smollm2-135m-instruct")


def smollm2_path() -> Path:
    from pocketlm import registry

    return registry.resolve("smollm2-135m-instruct")[1]


def gemma3_path() -> Path:
    from pocketlm import registry

    return registry.resolve("gemma3-270m")[1]


def minilm_dir() -> Path:
    from pocketlm import registry

    return registry.resolve("minilm-l6-v2")[1]


def hf_from_gguf(path: Path):
    """Hugging Face transformers' own GGUF loader on a .gguf file: the reference implementation, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


# Loading through transformers takes about 20 s (SmolLM2) and 50 s (Gemma 3): once per test session.
@pytest.fixture(scope="session")
def hf_smollm2():
    return hf_from_gguf(smollm2_path())


@pytest.fixture(scope="session")
def hf_gemma3():
    return hf_from_gguf(gemma3_path())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2):
    """A 2-layer random Llama saved by transformers itself (an ordinary HF folder), with SmolLM2's tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2.path / name, folder / name)
    return folder


# The tiny random models of tests/tiny_models.py (with small real-format vocabularies), for export and prune.
@pytest.fixture(scope="module")
def small_llama_dir(tmp_path_factory):
    from tiny_models import built

    return built("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory):
    from tiny_models import built

    return built("gemma", tmp_path_factory)


@pytest.fixture(params=["llama", "gemma"])
def tiny_dir(request, small_llama_dir, tiny_gemma_dir):
    return small_llama_dir if request.param == "llama" else tiny_gemma_dir


@pytest.fixture
def throwaway_home(tmp_path_factory, monkeypatch):
    """Files a test writes (an exported .gguf) are converted into a throw-away cache, not the user's."""
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path_factory.getbasetemp() / "pocketlm-home"))


@pytest.fixture
def aten_kernels(monkeypatch):
    """As on a machine where pocketlm's CPU kernels cannot be built: every layer takes its aten/fbgemm path."""
    import pocketlm.kernels

    monkeypatch.setattr(pocketlm.kernels, "_lib", False)
