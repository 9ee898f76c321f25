"""LoRA adapters served unmerged (pocketlm/models/lora.py): `run --lora`, `chat --lora`, `serve --lora NAME=PATH`.

The reference for a float base is the merged model (peft's merge_and_unload through pocketlm/finetune/lora.py's
merge); for an int4 base, the same int4 base with peft's own LoRA layers beside it (finetune/qlora.py's
QuantLoraLinear). The adapters are PEFT folders written by pocketlm's own finetune code (apply_lora + save_adapter)
on tests/tiny_models.py's llama, with random nonzero B matrices so that each changes the model's output.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pocketlm.cli import main
from pocketlm.engine.generate import encode_raw, generate
from pocketlm.engine.params import SamplingParams
from pocketlm.load import load, load_adapters

PROMPT = "Hello world. The hello"
GREEDY = dict(temperature=0.0, repetition_penalty=1.0, max_new_tokens=8, ignore_eos=True)


def make_adapter(base: Path, folder: Path, r: int, alpha: float, targets: list[str], seed: int) -> Path:
    """A PEFT adapter as finetune --lora-r writes it, with random A and B (peft starts B at zero: no change)."""
    from pocketlm.finetune.lora import apply_lora, save_adapter

    peft_model = apply_lora(load(str(base)).model, r, alpha, 0.0, targets, base_name=str(base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(peft_model, folder)
    return folder


@pytest.fixture(scope="module")
def adapters(small_llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {"alpha": make_adapter(small_llama_dir, root / "alpha", 4, 8, every, seed=1),
            "beta": make_adapter(small_llama_dir, root / "beta", 2, 6, ["q_proj", "v_proj", "down_proj"], seed=2)}


def reference(base: Path, adapter: Path, quant: str = "none"):
    """The base with the adapter through peft: merged into a float base; beside an int4 one (QuantLoraLinear)."""
    from pocketlm.finetune.lora import load_adapter, merge, unwrap

    lm = load(str(base), quant=quant)
    peft_model = load_adapter(lm.model, adapter)
    return replace(lm, model=merge(peft_model) if quant == "none" else unwrap(peft_model))


@pytest.fixture(scope="module")
def merged_dirs(small_llama_dir, adapters, tmp_path_factory) -> dict[str, Path]:
    """Each adapter merged into the base, written as a model folder."""
    from pocketlm.formats.hf import write_model_folder

    config = json.loads((small_llama_dir / "config.json").read_text())
    out = {}
    for name, path in adapters.items():
        merged = reference(small_llama_dir, path)
        out[name] = write_model_folder(tmp_path_factory.mktemp("merged") / name, config, merged.model.state_dict(), merged.tokenizer)
    return out


def decoded(lm, prompt: str = PROMPT) -> tuple[list[int], torch.Tensor, list]:
    """Greedy generate() on lm -> (tokens, the logits (n, V) each came from, what lm's model ran each step with:
    the fused decode step or the modules)."""
    rows, steps = [], []

    def capture(logits, ids):
        rows.append(logits.clone())
        steps.append(type(lm.model.decode_step).__name__)
        return logits

    generation = generate(lm, encode_raw(lm.tokenizer, prompt), SamplingParams(**GREEDY), processors=[capture])
    generation.text()
    return generation.stats.token_ids, torch.cat(rows), steps


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_an_unmerged_adapter_gives_the_merged_models_logits(small_llama_dir, adapters, quant):
    from pocketlm import kernels
    from pocketlm.models.lora import LoraLinear, select

    lm = load(str(small_llama_dir), quant=quant)
    views = load_adapters(lm, adapters)
    wrapped = [m for m in lm.model.modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 3 * (4 if quant == "int4" else 7)  # 3 layers; int4 fuses q/k/v and gate/up: the adapters update their rows
    ids = torch.tensor([encode_raw(lm.tokenizer, PROMPT * 2)])
    base_tokens, base_logits, base_steps = decoded(lm)
    if kernels.library() is not None:  # the base's passes keep the fused step, read through the wrappers
        assert base_steps[1:] == ["FusedStep"] * (len(base_steps) - 1)
    for name, path in adapters.items():
        want = reference(small_llama_dir, path, quant)
        select(lm.model, views[name].adapter)
        with torch.inference_mode():
            got, plain = lm.model(ids), want.model(ids)
        # int4: peft's layers sit on the base's q/k/v and gate/up split apart, whose float arithmetic around the same
        # int4 matmuls (the MLP's activation) rounds a little differently from the fused layers'
        tol = 1e-5 if quant == "none" else 1e-4
        torch.testing.assert_close(got, plain, rtol=tol, atol=tol)
        # each step of a generation (the prompt, then decode steps that the fused step would take) has the adapter
        tokens, logits, steps = decoded(views[name])
        want_tokens, want_logits, want_steps = decoded(want)
        assert "FusedStep" not in steps  # a pass with an adapter leaves the fused step (it computes the base only)
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
        assert (logits - base_logits).abs().max() > 0.1  # the adapter changes the output: the test would see it dropped
        if quant == "none" and kernels.library() is not None:
            assert want_steps[1:] == ["FusedStep"] * (len(want_steps) - 1)  # the merged reference decodes on the fused step
    assert decoded(lm)[0] == base_tokens  # the base is still served as it was


def test_rows_of_different_adapters_decode_together_in_one_batch(small_llama_dir, adapters, merged_dirs):
    """The server's continuous batch: base and adapter rows in the same steps, each with its own update; the prefix
    cache never hands a row's keys and values to a prompt of another adapter."""
    from pocketlm.engine.batch import Batch
    from pocketlm.engine.generate import Sequence

    lm = load(str(small_llama_dir))
    views = load_adapters(lm, adapters)
    runs = [(lm, PROMPT), (views["alpha"], PROMPT), (views["beta"], PROMPT), (views["alpha"], "The world of x"),
            (lm, PROMPT)]  # the last shares its prompt with the first, of its own adapter: taken from the cache
    batch = Batch(lm.model, max_batch=len(runs), context_length=lm.context_length)
    seqs = [Sequence(lm.tokenizer, encode_raw(lm.tokenizer, prompt), SamplingParams(**GREEDY), lm.context_length) for _, prompt in runs]
    for (view, _), seq in zip(runs, seqs):
        batch.add(seq, view.adapter)
    widest = 0
    while len(batch):
        for run in (batch.prefill_step, batch.step):
            stepped = run()
            if run == batch.step:
                widest = max(widest, len({s.adapter for s in batch.slots if s.seq is not None and not s.todo}))
            for seq, logits, _ in stepped:
                token, row = seq.choose(logits)
                seq.accept(token, row)
                if seq.done:
                    batch.remove(seq)
    assert widest == 3  # steps ran rows of the base and of both adapters together
    references = {0: lm, **{views[n].adapter: load(str(merged_dirs[n])) for n in adapters}}
    for (view, prompt), seq in zip(runs, seqs):
        assert seq.stats.token_ids == decoded(references[view.adapter], prompt)[0]
    assert [s.stats.cached_tokens > 0 for s in seqs] == [False, False, False, False, True]


def test_server_answers_two_adapters_and_the_base_each_as_its_own_model(small_llama_dir, adapters, merged_dirs):
    import openai
    from serve_process import running_server

    flags = [f for name, path in adapters.items() for f in ("--lora", f"{name}={path}")]
    with running_server(str(small_llama_dir), *flags) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        cards = {m.id: m for m in client.models.list().data}
        base = next(name for name in cards if name not in adapters)
        assert set(cards) == {base, *adapters}
        assert cards["alpha"].parent == base and cards["alpha"].root == str(adapters["alpha"])

        def answer(model: str) -> str:
            reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
            assert reply.model == model
            return reply.choices[0].text

        with ThreadPoolExecutor(6) as pool:  # at once, twice each: rows of all three share the server's decode steps
            texts = list(pool.map(answer, [base, "alpha", "beta"] * 2))
        metrics = urllib.request.urlopen(url + "/metrics").read().decode()
        value = lambda name: float(re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", metrics, re.M).group(1))  # noqa: E731
        # some step decoded 3 or more rows: of two models at least, since each has two requests
        assert value("pocketlm_decode_batch_size_count") > value('pocketlm_decode_batch_size_bucket{le="2.0"}')
    params = SamplingParams(**{**GREEDY, "ignore_eos": False, "max_new_tokens": 24})
    for model, text in zip([base, "alpha", "beta"] * 2, texts):
        want = load(str(merged_dirs[model] if model in adapters else small_llama_dir))
        assert text == generate(want, encode_raw(want.tokenizer, PROMPT), params).text(), model
    assert len(set(texts[:3])) == 3  # three models, three answers


def test_run_and_chat_with_lora_equal_the_merged_model(small_llama_dir, adapters, merged_dirs, capsys, monkeypatch, throwaway_home):
    greedy = ["--temperature", "0", "--repeat-penalty", "1", "-n", "8"]
    assert main(["run", str(small_llama_dir), PROMPT, "--raw", "--lora", str(adapters["alpha"]), *greedy]) == 0
    unmerged = capsys.readouterr().out
    assert unmerged.strip()
    assert main(["run", str(merged_dirs["alpha"]), PROMPT, "--raw", *greedy]) == 0
    assert unmerged == capsys.readouterr().out
    assert main(["run", str(small_llama_dir), PROMPT, "--raw", *greedy]) == 0
    assert unmerged != capsys.readouterr().out
    import pocketlm  # the Python API's lora=, as --lora

    lm = pocketlm.load(str(small_llama_dir), lora=str(adapters["alpha"]), threads=torch.get_num_threads())
    assert lm.generate(PROMPT, raw=True, max_tokens=8, temperature=0, repeat_penalty=1) + "\n" == unmerged
    # a created model with an adapter (pocketlm create --adapter) runs it the same way
    assert main(["create", "tiny-alpha", "--from", str(small_llama_dir), "--adapter", str(adapters["alpha"])]) == 0
    capsys.readouterr()
    assert main(["run", "tiny-alpha", PROMPT, "--raw", *greedy]) == 0
    assert capsys.readouterr().out == unmerged

    def chat(*model) -> str:
        monkeypatch.setattr(sys, "stdin", io.StringIO("Hello world\nThe world of x\n/bye\n"))
        assert main(["chat", *model, *greedy]) == 0
        return capsys.readouterr().out

    unmerged = chat(str(small_llama_dir), "--lora", str(adapters["beta"]))
    assert unmerged == chat(str(merged_dirs["beta"])) and unmerged != chat(str(small_llama_dir))


def test_a_bad_adapter_gets_one_clear_line(small_llama_dir, adapters, tmp_path, capsys):
    from pocketlm.config import LlamaConfig
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.models.llama import LlamaForCausalLM

    lm = load(str(small_llama_dir))
    cfg = replace(lm.config, dim=32, n_heads=2, n_kv_heads=1, intermediate_size=48)  # same names, other widths
    assert isinstance(cfg, LlamaConfig)
    other = write_model_folder(tmp_path / "other", cfg.to_hf(), LlamaForCausalLM(cfg).state_dict(), lm.tokenizer)
    foreign = make_adapter(other, tmp_path / "foreign", 2, 4, ["q_proj", "v_proj"], seed=3)
    (tmp_path / "empty").mkdir()
    cases = {str(tmp_path / "missing"): "is not a folder", str(tmp_path / "empty"): "has no adapter_config.json",
             str(foreign): "does not fit"}
    for path, says in cases.items():
        assert main(["run", str(small_llama_dir), "hi", "--lora", path, "-n", "2"]) == 1
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"it was trained for {other}" in err
    assert main(["run", "model", "hi", "--lora", str(foreign), "--server", "http://127.0.0.1:9"]) == 1
    assert "serve --lora NAME=PATH" in capsys.readouterr().err
    # the server checks its adapters against the base's shapes before it serves
    from serve_process import free_port

    started = subprocess.run([sys.executable, "-m", "pocketlm.cli", "serve", str(small_llama_dir), "--lora", f"good={adapters['alpha']}",
                              "--lora", f"bad={foreign}", "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert started.returncode == 1 and "LoRA adapter bad does not fit" in started.stderr, started.stderr
    assert started.stderr.count("\n") == 1 and "Traceback" not in started.stderr
