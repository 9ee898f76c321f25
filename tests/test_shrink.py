"""pocketlm shrink on a tiny classifier: the whole chain (split, teacher, prune, distill, quantize, evaluate, report,
export) end to end, and a run killed between stages and inside the distillation that goes on where it stopped.

The teacher is a 4-block tiny Llama (the byte-level vocabulary of tests/tiny_models.py) with a classification head
trained for three labels, each text starting with its label's word; --size 0.55 leaves 2 blocks (0.5 would leave
one: half the blocks and the final norm are just over half of the non-embedding parameters).
"""

from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch

from pocketlm.cli import main
from pocketlm.compress.shrink import STAGES, Stopped, shrink
from pocketlm.compress.shrink_config import ShrinkConfig
from pocketlm.errors import PocketLMError

LABELS = ["hello", "said", "world"]
WORDS = "hello world the of x is a he said".split()
HEADLINE = re.compile(r"^\d+\.\d% of the teacher's quality kept, at \d+% of its size and \d+\.\d\d times its speed$")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread does the work in seconds, where two OpenMP threads on busy cores wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def label_data(tmp_path_factory):
    rng = random.Random(3)
    rows = []
    for i in range(96):
        label = LABELS[i % 3]
        rows.append({"text": label + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))), "label": label})
    path = tmp_path_factory.mktemp("shrink-data") / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, label_data):
    from tiny_models import byte_level_metadata

    from pocketlm.config import LlamaConfig
    from pocketlm.finetune import FinetuneConfig, finetune
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.models.llama import LlamaForCausalLM
    from pocketlm.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("shrink-teacher")
    tok = Tokenizer.from_gguf_metadata(byte_level_metadata())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=128,
                      tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    write_model_folder(folder / "base", cfg.to_hf(), LlamaForCausalLM(cfg).state_dict(), tok)
    finetune(FinetuneConfig(model=str(folder / "base"), data=str(label_data), out=str(folder / "head"), task="classify", steps=30,
                            batch_size=8, lr=1e-2, head_lr=3e-2, quiet=True, save_every=0))
    return folder / "head"


def settings(teacher, label_data, out) -> dict:
    return dict(teacher=str(teacher), data=str(label_data), out=str(out), eval_split=0.25, size=0.55, calib_tokens=256,
                distill={"steps": 6, "batch_size": 8, "lr": 1e-2, "save_every": 2}, quant="int4", speed_rounds=1, bench=False,
                quiet=True)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, teacher, label_data):
    """One uninterrupted run."""
    out = tmp_path_factory.mktemp("shrink") / "whole"
    return out, shrink(ShrinkConfig(**settings(teacher, label_data, out)))


def test_shrink_runs_end_to_end(whole):
    from pocketlm.finetune.classify import Classifier
    from pocketlm.load import load

    out, results = whole
    assert [p.name for p in sorted((out / "stages").glob("*/stage.json"))] == ["stage.json"] * len(STAGES)
    lines = (out / "report.md").read_text().splitlines()
    assert HEADLINE.match(lines[0]), lines[0]
    assert results["report"]["headline"] == lines[0]
    assert "| classify: accuracy |" in "\n".join(lines) and "top-1 agreement" in "\n".join(lines)
    for name in ("compare.png", "kl.png", "loss.png", "results.json"):
        assert (out / name).stat().st_size > 100, name

    # the student: half the teacher's blocks, at most half its non-embedding parameters, int4, and it classifies
    assert results["prune"]["layers"] == 2 and results["report"]["size"] <= 0.55  # 0.5 and the final norm is over half
    student = Classifier.load(out / "student")
    assert student.labels == LABELS and student.predict(["hello x is a"])[0][0] in LABELS
    assert load(str(out / "student")).meta["weights"] == "int4"
    ev = results["evaluate"]
    assert 0 <= ev["agreement"]["top1_agreement"] <= 1 and ev["agreement"]["n"] == 24  # a quarter of 96 held out
    assert ev["speed"]["student"]["classify.texts_per_s"] > 0 and ev["speed"]["teacher"]["classify.texts_per_s"] > 0
    assert "| classify: texts/s |" in "\n".join(lines)
    assert results["report"]["quality_kept"] == pytest.approx(ev["student"]["classify.accuracy"] / results["teacher"]["classify.accuracy"])

    # exported: a Hugging Face folder (with the head) that loads, and a GGUF file
    hf = results["export"]["hf"]
    assert Classifier.load(hf).labels == LABELS
    assert os.path.getsize(results["export"]["gguf"]) > 10_000 and results["export"]["gguf"].endswith("q4_0.gguf")


def test_a_killed_shrink_resumes_at_the_stage_it_stopped_in(tmp_path, whole, teacher, label_data, capsys):
    """Stopped after the prune stage, then inside the distillation (after its step-2 checkpoint), then run to the
    end: no finished stage is done again, the distillation goes on from its checkpoint, and the student is the one
    the uninterrupted run made."""
    out = tmp_path / "run"
    recipe = tmp_path / "shrink.yaml"  # the chain as a recipe file (--config), the flags given on top
    s = settings(teacher, label_data, out)
    recipe.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in s.items() if k not in ("out", "quiet")) + "\n")
    command = ["shrink", "--config", str(recipe), "-o", str(out), "--quiet"]

    os.environ["POCKETLM_SHRINK_STOP"] = "prune"
    try:
        assert main(command) == 1
        assert "stopped after stage prune" in capsys.readouterr().err
        finished = {p.parent.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*/stage.json")}
        assert sorted(finished) == ["01-split", "02-teacher", "03-prune"]
        os.environ["POCKETLM_SHRINK_STOP"] = "distill:2"
        with pytest.raises(Stopped, match="step 2"):
            shrink(ShrinkConfig.from_yaml(recipe, {"out": str(out), "quiet": True}))
    finally:
        del os.environ["POCKETLM_SHRINK_STOP"]
    assert not (out / "stages" / "04-distill" / "stage.json").exists()
    assert (out / "stages" / "04-distill" / "model" / "checkpoints" / "step-000002").is_dir()

    assert main(command) == 0
    assert HEADLINE.match(capsys.readouterr().out.splitlines()[0])
    for name, mtime in finished.items():  # not done again
        assert (out / "stages" / name / "stage.json").stat().st_mtime_ns == mtime, name
    steps = [json.loads(line)["step"] for line in (out / "stages" / "04-distill" / "model" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-2 from before the kill, 3-6 after the resume
    resumed = json.loads((out / "stages" / "04-distill" / "stage.json").read_text())["results"]
    assert resumed["final_loss"] == pytest.approx(whole[1]["distill"]["final_loss"], abs=1e-5)

    # a changed setting redoes its stage and those after it, and keeps the ones before
    before = {p.parent.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*/stage.json")}
    shrink(ShrinkConfig.from_yaml(recipe, {"out": str(out), "quiet": True, "quant": "int8"}))
    after = {p.parent.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*/stage.json")}
    assert [n for n in sorted(after) if after[n] != before[n]] == ["05-quantize", "06-evaluate", "07-report", "08-export"]


def test_shrink_refusals(tmp_path, teacher, label_data):
    with pytest.raises(PocketLMError, match="size must be"):
        ShrinkConfig(teacher=str(teacher), data=str(label_data), out=str(tmp_path), size=1.5)
    with pytest.raises(PocketLMError, match="unknown key"):
        ShrinkConfig.from_dict({"teacher": "t", "sizes": 0.5})
    with pytest.raises(PocketLMError, match="speed must be a factor such as 2 or 2x, not 'fast'"):
        ShrinkConfig(teacher=str(teacher), data=str(label_data), out=str(tmp_path), speed="fast")
    assert ShrinkConfig(speed="2.5x").speed == 2.5 and ShrinkConfig(speed="2").prune_target == {"speed": 2.0, "quant": "int4"}
    with pytest.raises(PocketLMError, match="--serve serves generative models"):
        shrink(ShrinkConfig(**{**settings(teacher, label_data, tmp_path / "o"), "serve": True}))


def test_shipped_shrink_recipes_parse():
    """recipes/shrink-*.yaml: valid settings, their data next to the project (../shared/data), and every `distill:`
    key one that pocketlm distill takes."""
    import dataclasses
    from pathlib import Path

    from pocketlm.compress.distill_config import DistillConfig

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("shrink-*.yaml"))
    assert recipes
    for path in recipes:
        cfg = ShrinkConfig.from_yaml(path, {"out": "x"})
        assert Path(cfg.data).name == "train.jsonl" and Path(cfg.eval_data).parent == Path(cfg.data).parent, path
        assert set(cfg.distill) <= {f.name for f in dataclasses.fields(DistillConfig)}, path


def test_speed_picks_the_fewest_blocks_that_reach_it(tmp_path, teacher, label_data, monkeypatch):
    """--speed bisects on the blocks dropped: each try is measured (here by a stand-in whose speed grows with the
    blocks dropped, as a real one does) and the fewest that reach the target are dropped; a target no try reaches is
    refused in one line. The real measure runs in test_speed_measures_the_student_it_would_make."""
    from pocketlm.compress import shrink as shrink_module

    tries = []

    def speed_of(run, lm, importance, n_drop, folder):
        tries.append(n_drop)
        return 4 / (4 - n_drop)  # 4 blocks: 1x, 1.33x, 2x, 4x

    monkeypatch.setattr(shrink_module, "student_speed", speed_of)
    monkeypatch.setenv("POCKETLM_SHRINK_STOP", "prune")
    s = {**settings(teacher, label_data, tmp_path / "run"), "speed": "1.5x"}
    with pytest.raises(Stopped):
        shrink(ShrinkConfig(**s))
    result = json.loads((tmp_path / "run" / "stages" / "03-prune" / "stage.json").read_text())["results"]
    assert result["drop_layers"] == 2 and result["layers"] == 2 and result["speed_target"] == 1.5
    assert tries[0] == 3 and set(tries) <= {0, 1, 2, 3} and len(tries) <= 3
    assert result["speed_by_drop"] == {str(k): round(4 / (4 - k), 3) for k in sorted(tries)}

    with pytest.raises(PocketLMError, match=r"^--speed 5x: one block of 4, int4, measures 4.00x the teacher's speed"):
        shrink(ShrinkConfig(**{**s, "speed": 5, "out": str(tmp_path / "too-fast")}))


def test_speed_measures_the_student_it_would_make(tmp_path, teacher, label_data, monkeypatch):
    """The real measure: a student without its least influential blocks, int4, timed in turn with the teacher. Any
    student reaches 0.01x, so nothing is dropped, and the chosen try's ratio is a measured, positive one."""
    monkeypatch.setenv("POCKETLM_SHRINK_STOP", "prune")
    s = {**settings(teacher, label_data, tmp_path / "run"), "speed": 0.01}
    with pytest.raises(Stopped):
        shrink(ShrinkConfig(**s))
    result = json.loads((tmp_path / "run" / "stages" / "03-prune" / "stage.json").read_text())["results"]
    assert result["drop_layers"] == 0 and result["layers"] == 4
    assert set(result["speed_by_drop"]) >= {"0", "3"} and all(v > 0 for v in result["speed_by_drop"].values())
    assert not (tmp_path / "run" / "stages" / "03-prune" / "speed").exists()  # the tries' folders are removed
