"""The scripts under bench/ start: each explains itself with --help, and bench_distill_xtok builds every variant's
config (its start once broke unnoticed, on a setting the labels-only run does not take). Timings are never run here."""

import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest

from pocketlm.compress.distill_config import DistillConfig
from pocketlm.finetune import FinetuneConfig

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), "--help"])
    monkeypatch.syspath_prepend(str(BENCH))  # as `python bench/X.py` puts it first: scripts import each other
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage:") and len(out.splitlines()) > 3, out  # the docstring's commands follow the usage line


def load_xtok_bench():
    spec = importlib.util.spec_from_file_location("bench_distill_xtok", BENCH / "bench_distill_xtok.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_xtok_bench_builds_every_variant(tmp_path, monkeypatch):
    data = tmp_path / "data" / "banking77"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(f'{{"text": "message {i}", "label": "label_{i % 3}"}}\n' for i in range(20)))
    monkeypatch.setenv("POCKETLM_DATA", str(tmp_path / "data"))  # the shared data folder, as CI's clean clone may lack it
    bench = load_xtok_bench()
    args = bench.parser().parse_args(["--teacher", str(tmp_path / "teacher"), "-o", str(tmp_path / "runs"), "--rows", "8",
                                      "--xtok-top-k", "4", "--on-policy", "0.5", "--kd-weight", "0.2"])
    configs = bench.run_configs(args, tmp_path / "runs")
    assert list(configs) == ["labels", "xtok", "teacher-answers", "xtok+top-k", "xtok+on-policy"]
    labels, xtok, answers, top_k, on_policy = configs.values()
    assert type(labels) is FinetuneConfig and all(isinstance(c, DistillConfig) for c in (xtok, answers, top_k, on_policy))
    assert answers.teacher_answers and not xtok.teacher_answers
    assert labels.data == xtok.data and labels.steps == xtok.steps == 100 and labels.lr == xtok.lr  # the same run but the teacher
    assert len(Path(labels.data).read_text().splitlines()) == 8
    assert (top_k.xtok_top_k, on_policy.on_policy, xtok.xtok_top_k, xtok.on_policy) == (4, 0.5, 0, 0.0)
    assert xtok.kd_weight == top_k.kd_weight == 0.2 and not hasattr(labels, "on_policy")
    assert len({c.out for c in configs.values()}) == 5
    only = bench.parser().parse_args(["--teacher", "t", "-o", str(tmp_path / "o"), "--only", "labels"])
    assert list(bench.run_configs(only, tmp_path / "o")) == ["labels"]


def test_xtok_bench_writes_translation_rows_with_the_eval_prompt(tmp_path, monkeypatch):
    """multi30k's {src, tgt} rows become {prompt, completion} with `pocketlm eval --task translate`'s prompt, so the
    student is scored (BLEU, chrF) on the prompt it was trained on."""
    from pocketlm.eval.tasks import task_spec

    data = tmp_path / "data" / "multi30k_en_de"
    data.mkdir(parents=True)
    for name in ("train.jsonl", "test_2016_flickr.jsonl"):
        (data / name).write_text("".join(f'{{"src": "A dog {i}.", "tgt": "Ein Hund {i}."}}\n' for i in range(10)))
    monkeypatch.setenv("POCKETLM_DATA", str(tmp_path / "data"))
    bench = load_xtok_bench()
    args = bench.parser().parse_args(["--task", "multi30k", "--teacher", "t", "-o", str(tmp_path / "runs"), "--rows", "4"])
    xtok = bench.run_configs(args, tmp_path / "runs")["xtok"]
    rows = [json.loads(line) for line in Path(xtok.data).read_text().splitlines()]
    heldout = [json.loads(line) for line in Path(xtok.eval_data).read_text().splitlines()]
    assert len(rows) == 4 and len(heldout) == 10 and xtok.model == "smollm2-135m-instruct"
    spec = task_spec("translate")
    assert heldout[3] == {"prompt": "Translate English to German.\n\nEnglish: A dog 3.\nGerman:", "completion": "Ein Hund 3."}
    assert spec.instruction + spec.separator + spec.prompt.format(src="A dog 3.") == heldout[3]["prompt"]
    teacher_rows, _ = bench.write_rows("multi30k", 6, tmp_path / "runs", teacher=True)  # --teacher-rows: the shuffle's last
    teacher_set, student_set = (set(path.read_text().splitlines()) for path in (teacher_rows, Path(xtok.data)))
    assert len(teacher_set) == 6 and len(student_set) == 4 and not teacher_set & student_set


def test_xtok_bench_tests_translations_against_the_labels_run(tmp_path):
    """The paired bootstrap compares each variant's translations with the labels' run, on the same sentences only."""
    bench = load_xtok_bench()
    references = [f"Ein Hund {i} läuft über die grüne Wiese." for i in range(30)]
    runs = {"labels": [f"Hund {i} Wiese." for i in range(30)], "xtok": references, "other-sentences": references}
    for name, predictions in runs.items():
        (tmp_path / name).mkdir()
        refs = references[::-1] if name == "other-sentences" else references
        (tmp_path / name / "translations.jsonl").write_text(
            "".join(json.dumps({"prediction": p, "reference": r}) + "\n" for p, r in zip(predictions, refs)))
    result = bench.against_labels(tmp_path, ["labels", "xtok", "other-sentences", "xtok+top-k"])
    assert list(result) == ["xtok"] and result["xtok"]["p_bleu"] < 0.01 and result["xtok"]["p_chrf"] < 0.01
