"""Faults lose nothing: a kill -9 or a full disk in the middle of a distillation, a checkpoint, the model cache's
conversion or an export leaves what was there before readable, never a half-written file a later run reads;
two processes converting one model at once end with one good copy.

A full disk is a real one: a tmpfs of a few hundred KB mounted for the test (root only; without root those
tests skip). The models are native tiny Llamas with the byte-level vocabulary of tests/tiny_models.py, so a run
takes seconds; the kill tests that need a conversion long enough to interrupt use SmolLM2 (marked slow).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pocketlm.errors import PocketLMError

CLI = [sys.executable, "-m", "pocketlm.cli"]
WORDS = "hello world the of x is a he said hello world of the x".split()


def make_llama(folder: Path, dim: int, n_layers: int, std: float, seed: int) -> Path:
    from tiny_models import byte_level_metadata

    from pocketlm.config import LlamaConfig
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.models.llama import LlamaForCausalLM
    from pocketlm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(byte_level_metadata())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, intermediate_size=2 * dim,
                      tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    return write_model_folder(folder, cfg.to_hf(), model.state_dict(), tok)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("faults") / "teacher", dim=64, n_layers=2, std=0.3, seed=1)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("faults") / "student", dim=32, n_layers=1, std=0.02, seed=2)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    rng = random.Random(0)
    rows = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(64)]
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return path


@contextmanager
def small_disk(path: Path, kb: int):
    """A tmpfs of `kb` KB at path: a disk that fills up. Skips the test where it cannot be mounted (not root)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kb}k", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the full-disk tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def wait_for(condition, what: str, limit_s: float = 120, process=None):
    deadline = time.monotonic() + limit_s
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {process.stdout.read() if process.stdout else ''}")
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# ------------------------------------------------------------------------------------------- distill


def distill_cmd(student_dir, teacher_dir, text_data, out, *extra) -> list[str]:
    return [*CLI, "distill", "--student", str(student_dir), "--teacher", str(teacher_dir), "--data", str(text_data), "-o", str(out),
            "--steps", "60", "--save-every", "4", "--batch-size", "4", "--lr", "1e-3", "--seq-len", "64", "--threads", "1",
            "--quiet", *extra]


def test_a_distill_killed_at_a_random_point_resumes_to_the_uninterrupted_run(tmp_path, student_dir, teacher_dir, text_data):
    whole = subprocess.run(distill_cmd(student_dir, teacher_dir, text_data, tmp_path / "whole"), capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "killed"
    run = subprocess.Popen(distill_cmd(student_dir, teacher_dir, text_data, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = out / "checkpoints"
    wait_for(lambda: checkpoints.is_dir() and any(p.name == "step-000008" for p in checkpoints.iterdir()), "step 8's checkpoint", process=run)
    time.sleep(random.Random().uniform(0, 0.05))  # somewhere in the steps after it: in a step, or writing the next checkpoint
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (out / "model.safetensors").exists()  # the model is written only at the end
    resumed = subprocess.run(distill_cmd(student_dir, teacher_dir, text_data, out, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from " + str(checkpoints / "step-0000") in resumed.stderr  # it names the checkpoint it took
    a, b = state(tmp_path / "whole"), state(out)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)


def test_finetune_resume_names_the_checkpoint(tmp_path, student_dir, text_data, capsys):
    from pocketlm.cli import main

    common = ["finetune", str(student_dir), "--data", str(text_data), "-o", str(tmp_path / "o"), "--steps", "6", "--save-every", "2",
              "--batch-size", "4", "--seq-len", "64", "--quiet", "--threads", "1"]
    assert main([*common, "--stop-after", "4"]) == 0
    capsys.readouterr()
    assert main([*common, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"resumed from {tmp_path / 'o' / 'checkpoints' / 'step-000004'} (step 4 of 6)" in err, err


def test_a_checkpoint_into_a_full_disk_leaves_the_previous_one_readable(tmp_path, student_dir, text_data):
    from pocketlm.finetune import FinetuneConfig, checkpoint, finetune

    def config(out, **kw):
        return FinetuneConfig(model=str(student_dir), data=str(text_data), out=str(out), steps=6, save_every=2, batch_size=4,
                              seq_len=64, lr=1e-3, quiet=True, **kw)

    finetune(config(tmp_path / "sized", stop_after=2))  # how much the output holds after one checkpoint
    one = sum(p.stat().st_size for p in (tmp_path / "sized").rglob("*") if p.is_file())
    with small_disk(tmp_path / "disk", kb=(one + one // 2) // 1024 + 8) as disk:  # one checkpoint fits, not two
        out = disk / "out"
        with pytest.raises(PocketLMError, match="no space left on the device for the checkpoint of step 4.*--resume goes on from step-000002"):
            finetune(config(out))
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # no half-written step-000004(.tmp)
        kept = checkpoint.latest(out)
        assert json.loads((kept / "state.json").read_text())["step"] == 2
        saved = state_of(kept)  # the weights read back whole (the trainer's names: "model." + the model's)
        assert {k.removeprefix("model.") for k in saved} == state(student_dir).keys()
        assert all(torch.isfinite(t).all() for t in saved.values())
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space again: it goes on from there
        assert finetune(config(out, resume=True))["steps"] == 6


def state_of(checkpoint_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(checkpoint_dir / "trainable.safetensors")


# ------------------------------------------------------------------------------------- the model cache


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, teacher_dir) -> Path:
    from pocketlm.export import export

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    export(str(teacher_dir), "gguf", path, "q8_0")
    return path


def convert_in(home: Path, gguf: Path, stderr=subprocess.PIPE):
    code = "import sys; from pathlib import Path; from pocketlm.load import convert_gguf; print(convert_gguf(Path(sys.argv[1])))"
    return subprocess.Popen([sys.executable, "-c", code, str(gguf)], env={**os.environ, "POCKETLM_HOME": str(home)},
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def test_two_processes_converting_one_model_end_with_one_good_copy(tmp_path, tiny_gguf, monkeypatch):
    import fcntl

    from pocketlm import cache
    from pocketlm.load import load

    home = tmp_path / "home"
    monkeypatch.setenv("POCKETLM_HOME", str(home))
    folder = cache.converted_dir(tiny_gguf)
    # Both start while the test holds the entry's lock, so both are converting "at once": each waits, then one
    # converts and the other finds its copy.
    logs = [tmp_path / f"stderr-{i}" for i in range(2)]
    with open(folder.parent / f"{folder.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = [convert_in(home, tiny_gguf, stderr=log.open("w")) for log in logs]
        wait_for(lambda: all(log.exists() and "waiting for another pocketlm process" in log.read_text() for log in logs),
                 "both processes to wait for the lock")
        fcntl.flock(lock, fcntl.LOCK_UN)
    outs = [r.communicate(timeout=120)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [log.read_text() for log in logs]
    assert {Path(o.strip()) for o in outs} == {folder}
    assert sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) == [folder.name]  # one copy, no temporary folder
    assert load(str(folder)).config.vocab_size == 278


def test_a_conversion_into_a_full_disk_leaves_nothing_and_says_so(tmp_path, tiny_gguf):
    """A float run converts the GGUF into the cache (a quantized run reads its blocks directly)."""
    with small_disk(tmp_path / "disk", kb=96) as home:
        done = subprocess.run([*CLI, "run", str(tiny_gguf), "hi", "-n", "2", "--quant", "none"], env={**os.environ, "POCKETLM_HOME": str(home)},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("pocketlm: error: no space left on the device"), done.stderr
        converted = home / "converted"
        assert not [p for p in converted.iterdir() if p.is_dir()]  # no entry, no temporary folder


@pytest.mark.slow
def test_a_conversion_killed_half_way_leaves_no_entry_and_the_next_run_converts(tmp_path):
    from pocketlm import registry

    home, gguf = tmp_path / "home", registry.resolve("smollm2")[1]
    run = convert_in(home, gguf)
    converted = home / "converted"
    wait_for(lambda: converted.is_dir() and any(".tmp" in p.name for p in converted.iterdir()), "the conversion to be writing", process=run)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not [p for p in converted.iterdir() if p.is_dir() and ".tmp" not in p.name]  # nothing a later start would read
    again = convert_in(home, gguf)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    folder = Path(out.strip())
    assert sorted(p.name for p in converted.iterdir() if p.is_dir()) == [folder.name]  # the killed run's part is gone
    assert state(folder)["model.embed_tokens.weight"].shape == (49152, 576)


# -------------------------------------------------------------------------------------------- export


@pytest.mark.slow
def test_an_export_killed_half_way_leaves_the_previous_file(tmp_path):
    out = tmp_path / "smollm2.gguf"
    out.write_bytes(b"the previous export")
    export = subprocess.Popen([*CLI, "export", "smollm2", "--format", "gguf", "--type", "f32", "-o", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parts = lambda: [p for p in tmp_path.iterdir() if p.name.startswith("smollm2.gguf.tmp")]  # noqa: E731
    wait_for(lambda: parts() and parts()[0].stat().st_size > 1 << 20, "the export to be writing", process=export)
    export.send_signal(signal.SIGKILL)
    export.wait()
    assert out.read_bytes() == b"the previous export"
    again = subprocess.run([*CLI, "export", "smollm2", "--format", "gguf", "--type", "q8_0", "-o", str(out)], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert not parts()  # the killed run's part was cleared away
    from pocketlm.formats.gguf import read_gguf

    assert len(read_gguf(out).tensors) == 272


def test_an_export_into_a_full_disk_says_so_in_one_line_and_keeps_the_previous(tmp_path, teacher_dir):
    with small_disk(tmp_path / "disk", kb=64) as disk:
        for fmt, name in (("gguf", "t.gguf"), ("hf", "t-hf")):
            out = disk / name
            if fmt == "gguf":
                out.write_bytes(b"previous")
            done = subprocess.run([*CLI, "export", str(teacher_dir), "--format", fmt, "-o", str(out)], capture_output=True, text=True, timeout=300)
            assert done.returncode == 1, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("pocketlm: error: no space left on the device"), done.stderr
            assert sorted(p.name for p in disk.iterdir()) == ["t.gguf"]  # no part left behind
            assert (disk / "t.gguf").read_bytes() == b"previous"
