"""The real weights against Hugging Face transformers loading the same GGUF with its own loader."""

import pytest
import torch
import torch.nn.functional as F

from pocketlm import registry
from pocketlm.engine.generate import encode_chat, encode_raw, generate
from pocketlm.engine.sampling import SamplingParams
from pocketlm.eval.perplexity import perplexity
from pocketlm.load import load

from conftest import FIXTURES

pytestmark = pytest.mark.slow

TEXT = "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was designed by the company of Gustave Eiffel and"


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@torch.inference_mode()
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2):
    ids = torch.tensor([encode_raw(smollm2.tokenizer, TEXT)])
    assert max_relative_error(smollm2.model(ids), hf_smollm2(ids).logits) < 1e-4


@torch.inference_mode()
def test_smollm2_greedy_answer_matches_transformers_for_64_tokens(smollm2, hf_smollm2):
    messages = [{"role": "user", "content": "Explain in a few sentences how a bicycle works."}]
    ids = encode_chat(smollm2.tokenizer, messages)
    ours = generate(smollm2, ids, SamplingParams(max_new_tokens=64, temperature=0, repetition_penalty=1.0, ignore_eos=True))
    ours.text()
    ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert ours.stats.token_ids == ref[0, len(ids):].tolist()


@torch.inference_mode()
def test_smollm2_perplexity_matches_transformers(smollm2, hf_smollm2):
    ids = encode_raw(smollm2.tokenizer, (FIXTURES / "wikitext2_test_excerpt.txt").read_text())
    ours = perplexity(smollm2.model, ids, window=512, stride=256)
    # transformers: the same windows, its own full logits and mean loss per window
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, 256):
        end = min(begin + 512, len(ids))
        n_new = end - max(prev_end, begin + 1)
        window = torch.tensor([ids[begin:end]])
        logits = hf_smollm2(window).logits[0, -n_new - 1 : -1]
        nll += F.cross_entropy(logits, window[0, -n_new:], reduction="sum").item()
        count, prev_end = count + n_new, end
        if end == len(ids):
            break
    ref = torch.tensor(nll / count).exp().item()
    assert ours["tokens"] == count > 2000
    assert abs(ours["perplexity"] - ref) / ref < 1e-3, (ours, ref)


@torch.inference_mode()
def test_gemma3_logits_match_transformers(hf_gemma3):
    ours, ref = load("gemma3-270m"), hf_gemma3
    ids = torch.tensor([encode_raw(ours.tokenizer, TEXT)])
    assert ids[0, 0].item() == ours.tokenizer.bos_id  # Gemma wants its BOS
    assert max_relative_error(ours.model(ids), ref(ids).logits) < 1e-4
    # a prompt longer than the 512-token sliding window exercises local and global layers differently
    long_ids = torch.tensor([encode_raw(ours.tokenizer, (FIXTURES / "wikitext2_test_excerpt.txt").read_text())[:700]])
    assert max_relative_error(ours.model.hidden(long_ids)[:, -8:], ref.model(long_ids).last_hidden_state[:, -8:]) < 1e-4
    # greedy continuation equals transformers' (the base model's answer is not Paris, but it is the same one)
    ids = encode_raw(ours.tokenizer, "The capital of France is")
    g = generate(ours, ids, SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.0, ignore_eos=True))
    g.text()
    expected = ref.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(ids):]
    assert g.stats.token_ids == expected.tolist()


@torch.inference_mode()
def test_minilm_embeddings_match_transformers_mean_pooling():
    from transformers import AutoModel, AutoTokenizer

    from pocketlm.engine.embed import embed

    lm = load("minilm-l6-v2")
    folder = registry.resolve("minilm-l6-v2")[1]
    texts = ["A man is eating food.", "The weather is lovely today, isn't it?", "Ein kurzer deutscher Satz."]
    hf_tok, hf = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    ref = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    cosine = F.cosine_similarity(embed(lm, texts), ref, dim=-1)
    assert cosine.min().item() >= 0.9999


def test_a_draft_head_trained_by_the_cli_keeps_smollm2s_text(tmp_path):
    """train-draft on SmolLM2 (a few of its own answers, a tiny head), then run with and without --draft: the same
    text, with proposals made and checked (the real fused step's hidden states and the kernels' draft step)."""
    import json
    import subprocess
    import sys

    data = tmp_path / "instructions.jsonl"
    questions = ["Name three colors.", "What is the capital of Italy?", "Give a tip for sleeping well.",
                 "Why do cats purr?", "Write one sentence about rain.", "What is 2 plus 2?"]
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": "An answer."}) + "\n" for q in questions))
    cli = [sys.executable, "-m", "pocketlm.cli"]
    trained = subprocess.run(cli + ["train-draft", "--target", "smollm2", "--data", str(data), "-o", str(tmp_path / "head"),
                                    "--target-answers", "6", "--max-new-tokens", "24", "--epochs", "2", "--n-tokens", "512",
                                    "--hidden-dim", "64", "--batch-tokens", "2048", "--quiet"], capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert len((tmp_path / "head" / "target_answers.jsonl").read_text().splitlines()) == 6
    ask = cli + ["run", "smollm2", "Why is the sky blue?", "--temperature", "0", "-n", "40", "--json"]
    plain = json.loads(subprocess.run(ask, capture_output=True, text=True, timeout=300, check=True).stdout)
    drafted = json.loads(subprocess.run(ask + ["--draft", str(tmp_path / "head")], capture_output=True, text=True, timeout=300, check=True).stdout)
    assert drafted["text"] == plain["text"]
    assert drafted["draft_tokens"] > 0 and drafted["draft_checks"] > 0
