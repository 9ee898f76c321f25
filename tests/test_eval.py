"""pocketlm eval: metrics against hand-computed values, label scoring against a plain forward, the CLI end to end.

The CLI tests run on the tiny random Llama (conftest.tiny_llama_dir) and the committed fixtures in
tests/fixtures/eval/ (never ../shared/data); the two marked slow use the real SmolLM2.
"""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pocketlm.cli import main
from pocketlm.config import config_from_hf
from pocketlm.errors import PocketLMError
from pocketlm.eval import data as eval_data
from pocketlm.eval import loglik, metrics
from pocketlm.eval.tasks import TASKS, Prompter, match_label
from pocketlm.models import model_class_for

from conftest import FIXTURES

EVAL = FIXTURES / "eval"


# ------------------------------------------------------------------------------------ metrics by hand


def test_accuracy_macro_f1_confusion_by_hand():
    y_true = ["a", "a", "b", "b", "c"]
    y_pred = ["a", "b", "b", "b", "a"]
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(3 / 5)
    # F1 = 2tp / (true + predicted): a 2*1/(2+2) = 0.5, b 2*2/(2+3) = 0.8, c 0/(1+0) = 0
    assert metrics.per_label_f1(y_true, y_pred) == pytest.approx({"a": 0.5, "b": 0.8, "c": 0.0})
    assert metrics.macro_f1(y_true, y_pred) == pytest.approx(1.3 / 3)
    assert metrics.confusion_matrix(y_true, y_pred, ["a", "b", "c"]) == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_rouge_by_hand():
    # pred "the cat sat on the mat", ref "the cat is on the mat": 5 of 6 unigrams shared (P = R = 5/6),
    # 3 of 5 bigrams (the cat, on the, the mat), longest common subsequence 5 tokens
    scores, per_example = metrics.rouge(["the cat sat on the mat"], [["the cat is on the mat", "dogs bark"]])
    assert scores == pytest.approx({"rouge1": 100 * 5 / 6, "rouge2": 60.0, "rougeL": 100 * 5 / 6})
    assert per_example == pytest.approx([100 * 5 / 6])  # the better of the two references counts


def test_bleu_and_chrf_by_hand():
    # every n-gram precision is 1; only the brevity penalty exp(1 - 7/6) remains
    scores, _ = metrics.bleu_chrf(["the cat sat on the mat"], [["the cat sat on the mat today"]])
    assert scores["bleu"] == pytest.approx(100 * math.exp(1 - 7 / 6))
    # chrF "abc" vs "abd": character 1-grams 2/3, 2-grams 1/2, 3-grams 0 (precision = recall); orders 4-6 have
    # no n-grams and are left out, so F = (2/3 + 1/2 + 0) / 3
    scores, per_example = metrics.bleu_chrf(["abc"], [["abd"]])
    assert scores["chrf"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 3)
    assert per_example == pytest.approx([scores["chrf"]])


def test_kl_and_top1_on_hand_made_logits():
    ln3 = math.log(3)
    ref = torch.tensor([[ln3, 0.0], [1.0, 2.0]])  # row 0: p = (3/4, 1/4)
    model = torch.tensor([[0.0, ln3], [1.0, 2.0]])  # row 0: q = (1/4, 3/4); row 1 the same as the reference
    kl, agree = metrics.kl_and_top1(ref, model)
    # KL = 3/4 ln(3) + 1/4 ln(1/3) = ln(3) / 2
    assert kl.tolist() == pytest.approx([ln3 / 2, 0.0], abs=1e-6)
    assert agree.tolist() == [False, True]


# ------------------------------------------------------------------------------------ data and prompts


def test_read_jsonl_names_the_bad_line():
    with pytest.raises(PocketLMError, match=r"malformed.jsonl, line 3: not valid JSON"):
        eval_data.read_jsonl(EVAL / "malformed.jsonl")
    with pytest.raises(PocketLMError, match=r"line 2: no 'text' field"):
        eval_data.read_jsonl(EVAL / "missing_field.jsonl", ("label", "text"))


def test_subset_is_seeded_in_file_order_and_shots_cycle_through_labels():
    records = [{"i": i, "label": "ab"[i % 2]} for i in range(20)]
    picked = eval_data.subset(records, 5, seed=0)
    assert picked == eval_data.subset(records, 5, seed=0) and picked != eval_data.subset(records, 5, seed=1)
    assert [r["i"] for r in picked] == sorted(r["i"] for r in picked)
    shots = eval_data.pick_shots(records, 4, "label", seed=0)
    assert sorted(s["label"] for s in shots) == ["a", "a", "b", "b"]


def test_raw_few_shot_prompt_layout(smollm2):
    records = eval_data.read_jsonl(EVAL / "sentiment" / "train.jsonl")
    labels = {"negative": "negative", "positive": "positive"}
    prompter = Prompter(TASKS["classify"], smollm2.tokenizer, labels, records[:2], chat=False)
    prefix, query = prompter.render({"text": "so good", "label": "positive"})
    assert prefix == ("Classify the text into one of these labels: negative, positive.\n\n"
                      "Text: a delightful surprise .\nLabel: positive\n\n"
                      "Text: an utter waste of time .\nLabel: negative\n\n")
    assert query == "Text: so good\nLabel:"
    # with the chat template the shots are earlier turns and the prefix is the same for every example
    chat = Prompter(TASKS["classify"], smollm2.tokenizer, labels, records[:2], chat=True)
    (p1, q1), (p2, _) = chat.render({"text": "so good", "label": "x"}), chat.render({"text": "bad", "label": "x"})
    assert p1 == p2 and "<|im_start|>assistant\npositive<|im_end|>" in p1 and q1.endswith("<|im_start|>assistant\n")


def test_label_text_is_spaced_and_a_lone_capital_lowered():
    from pocketlm.eval.tasks import spaced

    assert [spaced(x) for x in ("card_arrival", "Refund_not_showing_up", "ATM_support")] == [
        "card arrival", "refund not showing up", "ATM support"]


def test_match_label_of_a_generated_answer():
    labels = {"card_arrival": "card arrival", "lost_or_stolen_card": "lost or stolen card"}
    assert match_label("Card arrival.", labels) == "card_arrival"
    assert match_label("lost_or_stolen_card", labels) == "lost_or_stolen_card"
    assert match_label("card arrival, I think", labels) == "card_arrival"
    assert match_label("no idea", labels) == "(no match)"


# ------------------------------------------------------------------------------------ label log-likelihood


def tiny_gemma():
    """A random 4-layer Gemma 3 with a 4-token sliding window: sliding and global layers both matter."""
    torch.manual_seed(0)
    cfg = config_from_hf(dict(
        model_type="gemma3_text", vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=64, rms_norm_eps=1e-6,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    ))
    return model_class_for(cfg)(cfg).eval()


def full_forward_logprob(model, context: list[int], continuation: list[int]) -> float:
    """The plain reference: one uncached forward of context + continuation, summing its tokens' log-probs."""
    with torch.inference_mode():
        logp = F.log_softmax(model(torch.tensor([context + continuation]))[0].float(), dim=-1)  # (T, V)
    return sum(logp[len(context) - 1 + j, tok].item() for j, tok in enumerate(continuation))


@pytest.mark.parametrize("method", loglik.METHODS)
def test_label_scores_equal_a_full_forward(tiny_llama_dir, method, monkeypatch):
    from pocketlm.load import load

    llama = load(str(tiny_llama_dir)).model
    prefix, query = [1, 50, 60, 70, 80, 90], [20, 30, 40]  # ids < 100: the tiny Gemma's vocabulary
    labels = [[11], [12, 13, 14], [15, 16], [17]]  # single- and multi-token labels
    for model, prefix_ids in ((llama, prefix), (llama, []), (tiny_gemma(), [1, 5, 7, 9, 11])):
        expected = [full_forward_logprob(model, prefix_ids + query[:2], c) for c in labels]
        scores = loglik.ChoiceScorer(model, prefix_ids, labels, 64, method).score(query[:2])
        assert scores.tolist() == pytest.approx(expected, abs=1e-4)
    # labels run a few at a time (the last pass half full): the same scores
    monkeypatch.setattr(loglik.ChoiceScorer, "rows_per_pass", lambda self, row_bytes: 2)
    monkeypatch.setattr(loglik, "BATCH_TOKENS", 1)
    labels += [[18, 19]]
    scores = loglik.ChoiceScorer(llama, prefix, labels, 64, method).score(query)
    assert scores.tolist() == pytest.approx([full_forward_logprob(llama, prefix + query, c) for c in labels], abs=1e-4)


# ------------------------------------------------------------------------------------ the CLI


def run_cli(capsys, *args):
    code = main(["eval", *[str(a) for a in args], "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def eval_json(capsys, *args) -> dict:
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_cli_classify_zero_and_few_shot_with_report(tiny_llama_dir, capsys, tmp_path):
    data = EVAL / "sentiment" / "test.jsonl"
    out = eval_json(capsys, tiny_llama_dir, "--task", "classify", "--data", data, "--report", tmp_path / "r")
    assert out["n"] == 6 and 0 <= out["metrics"]["accuracy"] <= 1 and 0 <= out["metrics"]["macro_f1"] <= 1
    assert out["settings"]["shots"] == 0 and out["settings"]["chat"] is True  # SmolLM2's tokenizer and template
    report = (tmp_path / "r" / "report.md").read_text()
    assert "accuracy" in report and "confusion_matrix.png" in report
    assert (tmp_path / "r" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "r" / "predictions.jsonl").read_text().splitlines()) == 6
    # few-shot: examples from the train.jsonl beside the data; --limit takes a subset
    out = eval_json(capsys, tiny_llama_dir, "--task", "classify", "--data", data, "--shots", 2, "--limit", 3, "--chat", "off")
    assert out["n"] == 3 and out["settings"]["shots"] == 2 and out["settings"]["chat"] is False
    out = eval_json(capsys, tiny_llama_dir, "--task", "classify", "--data", data, "--calibrate", "--norm", "chars")
    assert out["n"] == 6 and out["settings"]["calibrate"] is True and out["settings"]["norm"] == "chars"
    # the terminal table
    code, text, _ = run_cli(capsys, tiny_llama_dir, "--task", "classify", "--data", EVAL / "intents.jsonl")
    assert code == 0 and "accuracy" in text and "macro-F1" in text


def test_cli_generation_tasks(tiny_llama_dir, capsys, tmp_path):
    out = eval_json(capsys, tiny_llama_dir, "--task", "classify", "--by", "generate", "--data", EVAL / "intents.jsonl", "-n", 4)
    assert out["settings"]["scoring"] == "generate" and 0 <= out["metrics"]["no_match"] <= 1
    out = eval_json(capsys, tiny_llama_dir, "--task", "summarize", "--data", EVAL / "dialogues.jsonl", "-n", 8,
                    "--report", tmp_path / "s")
    assert set(out["metrics"]) == {"rouge1", "rouge2", "rougeL"} and out["n"] == 2
    assert (tmp_path / "s" / "distribution_0.png").exists()
    out = eval_json(capsys, tiny_llama_dir, "--task", "translate", "--data", EVAL / "translations.jsonl", "-n", 8)
    assert set(out["metrics"]) == {"bleu", "chrf"}


def test_cli_custom_yaml_task(tiny_llama_dir, capsys):
    out = eval_json(capsys, tiny_llama_dir, "--task", EVAL / "yes_no_task.yaml")
    assert out["task"] == "yes_no_task" and out["n"] == 6 and out["settings"]["scoring"] == "loglikelihood"


def test_cli_perplexity_and_agreement(tiny_llama_dir, capsys):
    from pocketlm.eval.perplexity import perplexity
    from pocketlm.engine.generate import encode_raw
    from pocketlm.load import load

    text = FIXTURES / "wikitext2_test_excerpt.txt"
    out = eval_json(capsys, tiny_llama_dir, "--task", "perplexity", "--data", text, "--limit", 300, "--window", 128, "--stride", 64)
    lm = load(str(tiny_llama_dir))
    expected = perplexity(lm.model, encode_raw(lm.tokenizer, text.read_text())[:300], window=128, stride=64)
    assert out["n"] == expected["tokens"] == 299 and out["metrics"]["perplexity"] == pytest.approx(expected["perplexity"])
    # a model against itself agrees exactly; int8 weights against fp32 a little less
    same = eval_json(capsys, tiny_llama_dir, "--task", "agreement", "--reference", tiny_llama_dir, "--data", text, "--limit", 200)
    assert same["metrics"]["kl_mean"] == pytest.approx(0, abs=1e-5) and same["metrics"]["top1_agreement"] == 1.0
    int8 = eval_json(capsys, tiny_llama_dir, "--task", "agreement", "--reference", tiny_llama_dir, "--quant", "int8",
                     "--data", text, "--limit", 200)
    assert 0 < int8["metrics"]["kl_mean"] < 0.05 and int8["settings"]["quant"] == "int8"
    assert int8["metrics"]["reference_perplexity"] == pytest.approx(same["metrics"]["perplexity"], rel=1e-4)


def test_cli_speed_through_the_engine_benchmark(tiny_llama_dir, capsys):
    out = eval_json(capsys, tiny_llama_dir, "--task", "speed", "--limit", 16, "-n", 4)
    assert out["n"] == 4 and out["settings"]["prompt_tokens"] == 16
    assert out["metrics"]["decode_tok_s"] > 0 and out["metrics"]["peak_rss_mb"] > 0


@pytest.mark.parametrize("args, fragment", [
    (["--task", "clasify", "--data", EVAL / "intents.jsonl"], "unknown task 'clasify'"),
    (["--task", "classify", "--data", EVAL / "nope.jsonl"], "nope.jsonl: no such file"),
    (["--task", "classify", "--data", EVAL / "malformed.jsonl"], "malformed.jsonl, line 3: not valid JSON"),
    (["--task", "classify", "--data", EVAL / "missing_field.jsonl"], "line 2: no 'text' field"),
    (["--task", "classify"], "needs --data"),
    (["--task", "classify", "--data", EVAL / "intents.jsonl", "--shots", "2"], "--shots-from"),
    (["--task", EVAL / "nope.yaml"], "no such task file"),
    (["--task", "classify", "--data", EVAL / "intents.jsonl", "--by", "guess"], "--by must be loglikelihood or generate"),
    (["--task", "classify", "--data", EVAL / "intents.jsonl", "--template", "{txt}?"], "line 1: no 'txt' field"),
    (["--task", "classify", "--data", EVAL / "intents.jsonl", "--template", "{text"], "not a valid template"),
    (["--task", "agreement", "--data", FIXTURES / "wikitext2_test_excerpt.txt"], "needs --reference"),
])
def test_bad_input_is_one_line_and_exit_1(capsys, args, fragment):
    code, out, err = run_cli(capsys, "smollm2", *args)  # fails before any model loads
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("pocketlm: error: ") and fragment in err, err


def test_bad_input_from_a_fresh_process_has_no_traceback():
    result = subprocess.run([sys.executable, "-m", "pocketlm.cli", "eval", "--task", "classify", "--data",
                             str(EVAL / "malformed.jsonl")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"pocketlm: error: {EVAL / 'malformed.jsonl'}, line 3: not valid JSON (Expecting value at column 27)"


# ------------------------------------------------------------------------------------ real weights


@pytest.mark.slow
def test_smollm2_few_shot_sentiment_is_better_than_chance(capsys):
    out = eval_json(capsys, "smollm2-135m-instruct", "--quant", "none", "--task", "classify", "--data", EVAL / "sentiment" / "test.jsonl",
                    "--shots", 4)
    assert out["metrics"]["accuracy"] >= 4 / 6


@pytest.mark.slow
def test_smollm2_int8_agrees_with_fp32(capsys):
    out = eval_json(capsys, "smollm2-135m-instruct", "--task", "agreement", "--reference", "smollm2-135m-instruct",
                    "--quant", "int8", "--data", FIXTURES / "wikitext2_test_excerpt.txt", "--limit", 128)
    assert out["metrics"]["kl_mean"] < 0.05 and out["metrics"]["top1_agreement"] > 0.9


# ------------------------------------------------------------------------------------ lm-evaluation-harness's tokenization


def lm_eval_encode_pair(tokenizer, context: str, continuation: str, add_special_tokens: bool):
    """lm-evaluation-harness 0.4's TemplateLM._encode_pair (lm_eval/api/model.py), as written there, for a causal model."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = tokenizer.encode(context + continuation, add_special_tokens=add_special_tokens)
    context_enc = tokenizer.encode(context, add_special_tokens=add_special_tokens)
    return context_enc, whole_enc[len(context_enc):]


@pytest.mark.parametrize("chat", ["off", "on"])
def test_classify_scores_what_lm_eval_scores_for_the_same_prompt(tiny_llama_dir, capsys, tmp_path, chat):
    """Every label's log-likelihood equals a plain forward of lm-eval's tokenization of the joined prompt. SmolLM2's
    tokenizer (the tiny model's) makes "\\n\\n" one token alone and two before "Text": tokenized apart, as before,
    the instruction and the shots end in other tokens and the scores differ."""
    from pocketlm.load import load

    data = EVAL / "sentiment" / "test.jsonl"
    eval_json(capsys, tiny_llama_dir, "--task", "classify", "--data", data, "--shots", 2, "--chat", chat, "--report", tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    lm = load(str(tiny_llama_dir))
    records = eval_data.read_jsonl(data)
    shots = eval_data.pick_shots(eval_data.read_jsonl(EVAL / "sentiment" / "train.jsonl"), 2, "label", 0)
    labels = {"negative": "negative", "positive": "positive"}
    prompter = Prompter(TASKS["classify"], lm.tokenizer, labels, shots, chat=chat == "on")
    apart_differs = False
    for record, row in zip(records, rows):
        prefix, query = prompter.render(record)
        specials = chat == "off"
        scores = {}
        for label in labels:
            context, continuation = lm_eval_encode_pair(lm.tokenizer, prefix + query, prompter.target_text({"label": label}), specials)
            scores[label] = full_forward_logprob(lm.model, context, continuation)
        apart = lm.tokenizer.encode(prefix, add_special_tokens=specials) + lm.tokenizer.encode(query, add_special_tokens=False)
        apart_differs |= apart != lm_eval_encode_pair(lm.tokenizer, prefix + query, " x", specials)[0]
        assert row["prediction"] == max(scores, key=scores.get)
        assert row["logprob_label"] == pytest.approx(scores[row["label"]], abs=2e-4)
        assert row["logprob_prediction"] == pytest.approx(scores[row["prediction"]], abs=2e-4)
    assert apart_differs  # the case the test is about: tokenized apart, the prompt has other tokens


def test_the_shared_prefix_is_what_every_joint_tokenization_starts_with(smollm2):
    from pocketlm.eval.loglik import encode_choices, shared_prefix

    tok = smollm2.tokenizer
    head = "Classify the text into one of these labels: negative, positive.\n\n"
    contexts = [encode_choices(tok, head + f"Text: {t}\nLabel:", [" positive"], False)[0] for t in ("good", "bad")]
    alone = tok.encode(head, add_special_tokens=False)
    assert alone[-1] == tok.encode("\n\n", add_special_tokens=False)[0]  # "\n\n" alone: one token ...
    newline = tok.encode("\n", add_special_tokens=False)
    prefix = shared_prefix(contexts)  # ... joined: two, and the prefix shared is the joined string's, up to the text
    assert prefix[: len(alone) + 1] == alone[:-1] + newline * 2 and tok.decode(prefix).endswith("\n\nText:")
    assert all(c[: len(prefix)] == prefix for c in contexts)
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]  # every context keeps a token of its own
    # lm-eval's convention: the prompt's trailing whitespace goes to the label
    context, (label,) = encode_choices(tok, "Label: ", ["positive"], False)
    assert context == tok.encode("Label:", add_special_tokens=False) and tok.decode(label) == " positive"


def test_results_say_the_quantization_that_ran(tiny_llama_dir, capsys, tmp_path):
    """A folder written by `pocketlm quantize` runs int8 whatever --quant says (the default auto read it as "none")."""
    assert main(["quantize", str(tiny_llama_dir), "--to", "int8", "-o", str(tmp_path / "q8"), "--quiet"]) == 0
    capsys.readouterr()
    out = eval_json(capsys, tmp_path / "q8", "--task", "classify", "--data", EVAL / "sentiment" / "test.jsonl", "--report", tmp_path / "r")
    assert out["settings"]["quant"] == "int8"
    assert json.loads((tmp_path / "r" / "results.json").read_text())["settings"]["quant"] == "int8"
    assert eval_json(capsys, tiny_llama_dir, "--task", "classify", "--data", EVAL / "intents.jsonl")["settings"]["quant"] == "none"


@pytest.mark.parametrize("chat", ["off", "on"])
def test_the_same_prompt_string_scores_the_same_however_the_task_builds_it(tiny_llama_dir, capsys, tmp_path, chat):
    """classify (instruction, then the example) against a custom task whose one template holds the whole prompt: the
    same string, so the same scores (the issue's 0.71 against 0.67 on sst2 came from tokenizing the two apart)."""
    (tmp_path / "whole.yaml").write_text(
        "scoring: loglikelihood\n"
        'prompt: "Classify the text into one of these labels: negative, positive.\\n\\nText: {text}\\nLabel:"\n'
        'target: " {label}"\n'
        "labels: [negative, positive]\n")
    data = EVAL / "sentiment" / "test.jsonl"
    for name, task in (("classify", "classify"), ("whole", tmp_path / "whole.yaml")):
        eval_json(capsys, tiny_llama_dir, "--task", task, "--data", data, "--chat", chat, "--report", tmp_path / name)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
            for name in ("classify", "whole")}
    for a, b in zip(rows["classify"], rows["whole"]):
        assert a["prediction"] == b["prediction"]
        assert a["logprob_label"] == pytest.approx(b["logprob_label"], abs=2e-4)
