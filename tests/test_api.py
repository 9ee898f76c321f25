"""The Python API (pocketlm/api.py): three lines from a name to an answer, with the CLI's defaults.

Most tests run conftest's tiny random Llama (SmolLM2's tokenizer and chat template) and compare with `pocketlm run`
on the same folder; the one marked slow asks the real SmolLM2.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

import pocketlm
from pocketlm.errors import PocketLMError


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """pocketlm.load chooses torch's threads as the CLI does (process-wide): put them back for the other tests."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketlm.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_pocketlm_imports_no_torch():
    assert python("import sys, pocketlm; print('torch' in sys.modules, pocketlm.__version__)").split()[0] == "False"


def test_pocketlm_load_is_callable_and_still_the_module_in_either_import_order():
    # the submodule first (as the library and the tests import it), then the package's function; and the other way
    out = python("from pocketlm.load import load as low, LoadedModel\n"
                 "import pocketlm, pocketlm.load as L\n"
                 "print(callable(pocketlm.load), pocketlm.load.load is low, L.LoadedModel is LoadedModel)")
    assert out.split() == ["True", "True", "True"]
    out = python("import pocketlm\n"
                 "f = pocketlm.load\n"
                 "from pocketlm import load\n"
                 "import pocketlm.load as L\n"
                 "print(callable(f), load is f is L, callable(L.load), pocketlm.LM.__name__)")
    assert out.split() == ["True", "True", "True", "LM"]


def test_three_lines_answer_as_pocketlm_run_does(tiny_llama_dir):
    lm = pocketlm.load(str(tiny_llama_dir))
    text = lm.generate("Hi", temperature=0, max_tokens=12)
    run = json.loads(cli("run", tiny_llama_dir, "Hi", "--temperature", "0", "-n", "12", "--json").stdout)
    assert text == run["text"] and text  # the chat template, the sampler and its defaults (repeat penalty 1.1) as the CLI's
    sampled = lm.generate("Hi", seed=3, max_tokens=12, top_k=0)  # temperature 0.8, top-p 0.9: the CLI's defaults
    assert sampled == json.loads(cli("run", tiny_llama_dir, "Hi", "--seed", "3", "-n", "12", "--top-k", "0", "--json").stdout)["text"]
    system = lm.generate("Hi", system="Answer in French.", temperature=0, max_tokens=12)
    assert system == json.loads(cli("run", tiny_llama_dir, "Hi", "--system", "Answer in French.", "--temperature", "0",
                                    "-n", "12", "--json").stdout)["text"]
    raw = lm.generate("Hi", raw=True, temperature=0, max_tokens=12)
    assert raw == json.loads(cli("run", tiny_llama_dir, "Hi", "--raw", "--temperature", "0", "-n", "12", "--json").stdout)["text"]


def test_chat_streams_pieces_and_equals_the_whole_answer(tiny_llama_dir):
    lm = pocketlm.load(str(tiny_llama_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    stream = lm.chat(messages, stream=True, temperature=0, max_tokens=10)
    pieces = list(stream)
    assert all(isinstance(p, str) for p in pieces) and len(pieces) > 1
    assert "".join(pieces) == lm.chat(messages, temperature=0, max_tokens=10)
    assert "".join(pieces) == lm.generate("Hi", system="Be brief.", temperature=0, max_tokens=10)
    assert stream.stats.completion_tokens == 10 and stream.stats.finish_reason == "length"
    whole, stop = "".join(pieces), pieces[-1]
    assert lm.chat(messages, temperature=0, max_tokens=10, stop=stop) == whole[: whole.find(stop)]  # stop: a str or a list


def test_one_generation_at_a_time_and_mistakes_are_named(tiny_llama_dir):
    lm = pocketlm.load(str(tiny_llama_dir), ctx_size=64)
    first = lm.generate("Hi", stream=True, temperature=0, max_tokens=8)
    next(first)
    with pytest.raises(PocketLMError, match="still streaming"):
        lm.generate("Hello", temperature=0)  # would overwrite the open stream's KV cache
    first.close()
    assert lm.generate("Hello", temperature=0, max_tokens=4)
    with pytest.raises(PocketLMError, match="context window is 64"):
        lm.generate("word " * 80)
    with pytest.raises(TypeError, match="generate\\(\\) got an unexpected keyword argument 'temprature'"):
        lm.generate("Hi", temprature=0)
    with pytest.raises(PocketLMError, match="not an embedding model"):
        lm.embed("Hi")
    with pytest.raises(PocketLMError, match="takes 2 to 256"):
        pocketlm.load(str(tiny_llama_dir), ctx_size=1000)
    with pytest.raises(PocketLMError, match="unknown model"):
        pocketlm.load("smolm2")


def test_quant_defaults_to_the_cli_s_auto_and_the_loader_keeps_its_own(tiny_llama_dir, tmp_path, throwaway_home):
    from pocketlm.export import export

    gguf = export(str(tiny_llama_dir), "gguf", tmp_path / "tiny-q4_0.gguf", "q4_0")["path"]
    assert pocketlm.load(gguf).loaded.meta["weights"] == "int4-mixed"  # as `pocketlm run` runs a Q4 GGUF
    assert pocketlm.load(gguf, quant="none").loaded.meta["weights"] == "float32"
    assert pocketlm.load.load(gguf).meta["weights"] == "float32"  # pocketlm.load.load's callers: float, as before


def test_embed_gives_the_cli_s_unit_vectors():
    lm = pocketlm.load("minilm")
    vectors = lm.embed(["first sentence", "second sentence"])
    assert len(vectors) == 2 and all(len(v) == 384 and abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    assert lm.embed("first sentence") == pytest.approx(vectors[0], abs=1e-6)
    printed = [json.loads(line) for line in cli("embed", "first sentence", "second sentence").stdout.splitlines()]
    assert len(printed) == 2 and all(p == pytest.approx(v, abs=1e-6) for p, v in zip(printed, vectors))
    with pytest.raises(PocketLMError, match="embedding model"):
        lm.generate("Hi")


@pytest.mark.slow
def test_smollm2_in_three_lines_knows_the_capital_of_france():
    lm = pocketlm.load("smollm2")
    assert "Paris" in lm.generate("What is the capital of France?", temperature=0)
