"""Named models (pocketlm/named.py): `pocketlm create` / `cp` / `rm` records, and the defaults a model brings (a
created model's system prompt and parameters, a folder's generation_config.json) applied by `run` under its flags.
On the 2-layer random Llama of conftest (greedy text is fixed by its weights, so equal settings give equal text)."""

import io
import json
import shutil

import pytest

from pocketlm import named
from pocketlm.cli import main
from pocketlm.engine.params import SamplingParams
from pocketlm.errors import PocketLMError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["run", *args, "--json", "--threads", "1"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow  # tiny_llama_dir: SmolLM2's tokenizer, from the real model
def test_records_create_copy_remove_and_refuse_bad_values(home, tiny_llama_dir):
    record = named.create("terse", str(tiny_llama_dir), system="Be brief.", parameters={"temperature": "0.2", "num_predict": 7, "stop": "###"})
    assert (home / "named" / "terse.json").is_file()
    assert named.lookup("terse:latest") == record  # Ollama's tag
    assert record.parameters == {"temperature": 0.2, "max_new_tokens": 7, "stop": ["###"]}
    named.copy("terse", "terse2")
    assert named.lookup("terse2").system == "Be brief." and named.lookup("terse2").base == str(tiny_llama_dir)
    assert [r.name for r in named.all_named()] == ["terse", "terse2"]
    assert named.remove("terse2") and named.lookup("terse2") is None and not named.remove("terse2")
    for bad, message in [({"temperature": "hot"}, "must be a number"), ({"top_p": 0}, "top_p"), ({"mirostat": 1}, "unknown parameter 'mirostat'"),
                         ({"num_predict": 1.5}, "must be an integer")]:
        with pytest.raises(PocketLMError, match=message):
            named.create("bad", "smollm2", parameters=bad)
    with pytest.raises(PocketLMError, match="not a usable model name"):
        named.create("../escape", "smollm2")
    with pytest.raises(PocketLMError, match="Jinja"):
        named.create("bad", "smollm2", template="{{ .Prompt }}")  # Ollama's Go template is not one


def test_defaults_apply_under_the_given_values():
    params = named.apply(SamplingParams(temperature=1.5), {"temperature"}, {"temperature": 0.1, "top_k": 3, "max_new_tokens": 9})
    assert (params.temperature, params.top_k, params.max_new_tokens) == (1.5, 3, 9)


@pytest.mark.slow  # tiny_llama_dir: SmolLM2's tokenizer, from the real model
def test_a_created_models_system_prompt_and_parameters_apply_in_run(home, tiny_llama_dir, capsys):
    base = str(tiny_llama_dir)
    # sampled with a seed: the text follows every setting and the whole prompt
    same = ["--temperature", "1", "--seed", "3", "-n", "5", "--repeat-penalty", "1"]
    assert main(["create", "terse", "--from", base, "--system", "You answer in one word.", "--param", "temperature=1",
                 "--param", "seed=3", "--param", "num_predict=5", "--param", "repeat_penalty=1.0"]) == 0
    created = run(capsys, "terse", "Hello")
    by_hand = run(capsys, base, "Hello", "--system", "You answer in one word.", *same)
    plain = run(capsys, base, "Hello", *same)
    assert created["model"] == "terse" and created["completion_tokens"] == 5
    # SmolLM2's template writes its own system prompt when there is none: another length
    assert created["text"] == by_hand["text"] != plain["text"] and created["prompt_tokens"] == by_hand["prompt_tokens"] != plain["prompt_tokens"]
    assert run(capsys, "terse", "Hello", "-n", "2")["completion_tokens"] == 2  # a flag still wins
    import pocketlm

    assert pocketlm.load("terse").generate("Hello") == created["text"]  # the Python API applies them too
    def chat(monkeypatch_stdin, *args) -> str:
        monkeypatch_stdin.setattr("sys.stdin", io.StringIO("Hello\n/bye\n"))
        capsys.readouterr()
        assert main(["chat", *args, "--threads", "1"]) == 0
        return capsys.readouterr().out

    with pytest.MonkeyPatch.context() as patch:
        assert chat(patch, "terse") == chat(patch, base, "--system", "You answer in one word.", *same) != chat(patch, base, *same)
    assert main(["cp", "terse", "terse-copy"]) == 0
    assert run(capsys, "terse-copy", "Hello")["text"] == created["text"]
    assert main(["rm", "terse-copy"]) == 0 and named.lookup("terse-copy") is None
    # the YAML form of the same record, and a created model from a created model: each level overrides what it sets
    modelfile = home.parent / "Modelfile.yaml"
    modelfile.write_text(f"from: terse\nparameters:\n  num_predict: 3\n")
    assert main(["create", "terser", "-f", str(modelfile)]) == 0
    terser = run(capsys, "terser", "Hello")
    assert terser["completion_tokens"] == 3 and created["text"].startswith(terser["text"])
    capsys.readouterr()
    assert main(["create", "nothing", "--from", "no-such-model"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.slow  # tiny_llama_dir: SmolLM2's tokenizer, from the real model
def test_generation_config_defaults_apply(home, tiny_llama_dir, tmp_path, capsys):
    folder = tmp_path / "with-defaults"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "do_sample": False, "max_new_tokens": 4, "repetition_penalty": 1.0}))
    defaulted = run(capsys, str(folder), "Hello")
    explicit = run(capsys, str(tiny_llama_dir), "Hello", "--temperature", "0", "-n", "4", "--repeat-penalty", "1")
    assert defaulted["completion_tokens"] == 4 and defaulted["text"] == explicit["text"]
    assert run(capsys, str(folder), "Hello", "-n", "6")["completion_tokens"] == 6
