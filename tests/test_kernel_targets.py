"""Which kernel target runs (pocketlm/kernels/__init__.py's TARGETS), a target the CPU lacks refused in one line, and
SmolLM2's answers on every x86 target this CPU runs (the kernels themselves: tests/test_kernels.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pocketlm import kernels
from pocketlm.errors import PocketLMError

AVX2_CPU = "avx avx2 fma f16c bmi1 bmi2 movbe abm sse4_2"  # an AVX2 laptop's flags, no AVX-512
RUNNABLE = [t.name for t in kernels.runnable_targets()]
CLI = [sys.executable, "-m", "pocketlm.cli"]

needs_compiler = pytest.mark.skipif(not shutil.which(kernels.compiler()), reason="no C++ compiler")


def names(flags: str, monkeypatch) -> list[str]:
    monkeypatch.setenv("POCKETLM_CPU_FLAGS", flags)
    return [t.name for t in kernels.runnable_targets()]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 flags")
def test_the_cpu_flags_choose_the_target(monkeypatch):
    assert names(AVX2_CPU, monkeypatch) == ["avx2", "scalar"]
    assert names(AVX2_CPU + " avx_vnni", monkeypatch) == ["avx2-vnni", "avx2", "scalar"]
    assert names(AVX2_CPU + " avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni", monkeypatch)[0] == "avx512-vnni"
    assert names(AVX2_CPU + " avx512f avx512bw avx512cd avx512dq avx512vl", monkeypatch)[0] == "avx2"  # AVX-512 without VNNI
    assert names("sse2", monkeypatch) == ["scalar"]


def test_a_target_the_cpu_lacks_is_refused_before_it_loads(monkeypatch):
    monkeypatch.setenv("POCKETLM_CPU_FLAGS", "sse2")
    with pytest.raises(PocketLMError, match="need .*which this CPU does not have; .*choose one of: scalar"):
        kernels.load_target(kernels.target_named("avx2" if os.uname().machine == "x86_64" else "neon-dotprod"))
    with pytest.raises(PocketLMError, match="unknown kernel target 'avx9'"):
        kernels.target_named("avx9")


@needs_compiler
@pytest.mark.parametrize("target", ["avx2", "avx9"])
def test_the_cli_refuses_a_forced_target_in_one_line(target):
    env = {**os.environ, "POCKETLM_CPU_FLAGS": "sse2", "POCKETLM_KERNEL_TARGET": target}
    done = subprocess.run(CLI + ["run", "Hi", "-n", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("pocketlm: error: "), done.stderr


@needs_compiler
def test_an_older_cpu_gets_the_avx2_build(monkeypatch):
    """POCKETLM_CPU_FLAGS plays an AVX2 laptop on an AVX-512 machine: the best target it runs is chosen, and named."""
    if "avx2" not in RUNNABLE:
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "POCKETLM_CPU_FLAGS": AVX2_CPU}
    code = "from pocketlm import kernels; print(kernels.describe())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.strip() == "pocketlm avx2"


@needs_compiler
def test_the_avx2_vnni_code_equals_the_scalar_build_bit_for_bit(tmp_path, monkeypatch):
    """The avx2-vnni target's code (AVX-VNNI's 256-bit vpdpbusd), built with the same instruction's AVX-512 VL
    encoding so that it runs on a CPU with AVX-512 VNNI but no AVX-VNNI (this one, if it has no avx_vnni)."""
    if not {"avx2", "fma", "f16c", "avx512_vnni", "avx512vl"} <= kernels.cpu_flags():
        pytest.skip("needs AVX-512 VNNI with VL (or run on a CPU with avx_vnni, where the avx2-vnni target itself runs)")
    import pocketlm.quant.int8 as int8
    from torch import nn

    from test_kernels import gguf_layer

    from pocketlm.quant.int4 import Int4Linear
    from pocketlm.quant.int8 import Int8Linear

    target = kernels.target_named("avx2-vnni")
    path = tmp_path / "avx2-vnni-evex.so"
    flags = [*kernels.COMPILE, "-march=x86-64-v3", "-mavx512vnni", "-mavx512vl", "-DPOCKETLM_AVXVNNI_AS_EVEX"]
    subprocess.run([kernels.compiler(), *flags, str(kernels.SOURCE), "-o", str(path)], check=True, capture_output=True)
    evex = kernels.open_library(path)
    assert evex.kernel_target() == b"avx2-vnni" and evex.cpu_runs_target() and target.flags[-1] == "-mavxvnni"
    monkeypatch.setattr(int8, "PACK_MIN_WEIGHTS", 0)
    torch.manual_seed(0)
    for M in (1, 2, 7):
        x = torch.randn(M, 576)
        int4, int8_layer = Int4Linear.from_linear(nn.Linear(576, 40, bias=True), 32), Int8Linear.from_linear(nn.Linear(576, 40))
        q6_k = gguf_layer("q6_k", 40, 512, M)[0]  # a GGUF's Q6_K blocks (K: whole super-blocks of 256)
        runs = {}
        for name in ("evex", "scalar"):
            with kernels.using("scalar"):  # (which restores the library in use after)
                if name == "evex":
                    kernels._lib = evex
                runs[name] = (kernels.int4_linear(x, int4.packed, 40, 32, int4.bias),
                              kernels.int8_packed_linear(x, int8_layer.packed_weight, int8_layer.scales, None),
                              kernels.int4_linear(x[:, :512], q6_k.packed_weight, 40, 32, q6_k.bias, "q6_k"))
        assert all(torch.equal(a, b) for a, b in zip(runs["evex"], runs["scalar"])), M


def test_without_kernels_aten_is_named():
    env = {**os.environ, "POCKETLM_KERNELS": "0"}
    code = "from pocketlm import kernels; print(kernels.describe())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout
    assert out.startswith("aten (") and "POCKETLM_KERNELS=0" in out


# ------------------------------------------------------------------------------------------ the real SmolLM2


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("target", [t for t in RUNNABLE if t != "scalar"] + ["scalar"])
def test_smollm2_answers_alike_on_every_target(target):
    """The CLI's greedy answer (prompt chunks, the fused step, the int4 and int8 head kernels), forced onto each
    target: the same text as the default target's, and `show` names the kernels that ran."""
    env = {**os.environ, "POCKETLM_KERNEL_TARGET": target}
    ask = CLI + ["run", "What is the capital of France?", "-n", "24", "--temperature", "0", "--repeat-penalty", "1", "--json"]
    answer = json.loads(subprocess.run(ask, capture_output=True, text=True, env=env, timeout=300, check=True).stdout)
    assert answer["text"] == "The capital of France is Paris."
    shown = subprocess.run(CLI + ["show", "smollm2"], capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    assert f"pocketlm {target}" in shown


@pytest.mark.slow
@needs_compiler
@torch.inference_mode()
def test_smollm2_batches_and_checks_alike_on_every_target(smollm2_int4):
    """A batch of sequences decoded in one fused call (the server's), a speculative check of several tokens, and 48
    greedy tokens: on every target the batch equals each sequence alone bit for bit, and the greedy tokens equal the
    best target's (the integer kernels agree bit for bit; attention and norms to float rounding)."""
    from pocketlm.engine.generate import encode_chat, generate
    from pocketlm.engine.sampling import SamplingParams

    model, tokenizer = smollm2_int4.model, smollm2_int4.tokenizer
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in ("Name a fruit.", "Why is the sky blue?")]
    greedy = SamplingParams(max_new_tokens=48, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    answers = {}
    for target in RUNNABLE:
        with kernels.using(target):
            g = generate(smollm2_int4, prompts[1], greedy)
            g.text()
            answers[target] = g.stats.token_ids
            fed = [[p[(t * 5) % len(p)] for t in range(6)] for p in prompts]
            alone = []
            for prompt, tokens in zip(prompts, fed):
                model.setup_cache(1, 256)
                model.hidden(torch.tensor([prompt]), torch.arange(len(prompt)))
                alone.append(torch.cat([model(torch.tensor([tokens]), torch.arange(len(prompt), len(prompt) + 6))[0]]))
            model.setup_cache(2, 256)
            for slot, prompt in enumerate(prompts):
                model.hidden(torch.tensor([prompt]), torch.arange(len(prompt))[None], torch.tensor([slot]))
            together = [model(torch.tensor([[f[t]] for f in fed]), torch.tensor([[len(p) + t] for p in prompts]), torch.tensor([0, 1]))[:, -1]
                        for t in range(6)]
            assert torch.equal(torch.stack(together, 1), torch.stack(alone)), target
    assert all(ids == answers[RUNNABLE[0]] for ids in answers.values()), answers


@pytest.fixture(scope="module")
def smollm2_int4():
    from pocketlm.load import load

    return load("smollm2-135m-instruct", quant="auto")
