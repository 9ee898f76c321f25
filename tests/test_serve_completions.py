"""/v1/completions as evaluation harnesses use it: token-id prompts, echo with the prompt's log-probs, max_tokens 0,
logprobs up to 20 with text_offset from the prompt's start (OpenAI's legacy API, as vLLM serves it).

The checks of the fields run a real `pocketlm serve` on the tiny random Llama with SmolLM2's tokenizer
(conftest.tiny_llama_dir), driven by the official `openai` client, against transformers' forward of the same folder.
The last test is lm-evaluation-harness itself (`lm_eval`, --model local-completions) against a server of the real
SmolLM2 in float: a multiple-choice task and a loglikelihood_rolling (perplexity) task from tests/fixtures/lm_eval
give what lm-eval's own `hf` backend gives on pocketlm's Hugging Face export of the same model, and the
multiple-choice scores equal `pocketlm eval`'s on the same prompt.
"""

import json
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest
import torch
from serve_process import running_server

from conftest import FIXTURES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["The capital of France is Paris", "One, two, three, four"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from pocketlm.tokenizer import Tokenizer

    with running_server(str(tiny_llama_dir)) as url:
        yield url, tiny_llama_dir.name, Tokenizer.from_hf_dir(tiny_llama_dir)


@pytest.fixture(scope="module")
def client(tiny):
    return openai.OpenAI(base_url=tiny[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """log p(token t | tokens before it), (T - 1,), from transformers' own forward of the tiny folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
        return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], logp

    return logprobs


def test_echo_scores_token_id_prompts_as_transformers_does(tiny, client, reference):
    url, model, tokenizer = tiny
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    response = client.completions.create(model=model, prompt=prompts, echo=True, logprobs=3, max_tokens=0)
    assert [c.index for c in response.choices] == [0, 1] and response.usage.completion_tokens == 0
    for ids, choice in zip(prompts, response.choices):
        lp = choice.logprobs
        assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
        assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == choice.text
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
        expected, logp = reference(ids)
        assert lp.token_logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-4)
        for t, top in enumerate(lp.top_logprobs[1:]):
            best = torch.topk(logp[t], 3)
            assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)
            assert set(top) == {tokenizer.decode([i]) for i in best.indices.tolist()}
        assert lp.text_offset == [sum(len(s) for s in lp.tokens[:i]) for i in range(len(ids))]
    alone = client.completions.create(model=model, prompt=prompts[0], echo=True, logprobs=3, max_tokens=0)  # a list of ints
    assert alone.choices[0].logprobs.token_logprobs == response.choices[0].logprobs.token_logprobs


def test_echo_then_new_tokens_streamed_or_not(tiny, client):
    """Echo's text is the prompt then the answer; logprobs and text_offset run on through both, and the same
    in a stream. Without echo, text_offset still counts from the prompt's start, as OpenAI's legacy API."""
    url, model, _ = tiny
    prompt = TEXTS[1]
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=4, logprobs=20, temperature=0)
    echoed = client.completions.create(model=model, prompt=prompt, max_tokens=4, logprobs=20, temperature=0, echo=True)
    text, lp = echoed.choices[0].text, echoed.choices[0].logprobs
    assert text == prompt + plain.choices[0].text
    assert all(len(top) == 20 for top in lp.top_logprobs[1:])
    n = len(plain.choices[0].logprobs.tokens)
    assert lp.token_logprobs[-n:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert plain.choices[0].logprobs.text_offset[0] == len(prompt)
    assert lp.text_offset[-n:] == plain.choices[0].logprobs.text_offset
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=4, logprobs=20, temperature=0,
                                            echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=prompt, logprobs=21)
    assert e.value.param == "logprobs"


def test_an_end_token_is_listed_in_the_logprobs(tiny, client):
    """lm-eval sends echo with max_tokens 1 and drops the last entry as the new token's: an end token chosen there
    must be listed, or it would drop the prompt's last token instead (vLLM and OpenAI's legacy API list it)."""
    url, model, tokenizer = tiny
    ids = tokenizer.encode(TEXTS[0], add_special_tokens=False)
    end = tokenizer.eos_id
    response = client.completions.create(model=model, prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                         logit_bias={str(end): 100}, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.text == tokenizer.decode(ids)
    assert len(choice.logprobs.tokens) == len(ids) + 1
    assert choice.logprobs.tokens[-1] == "<|im_end|>" == tokenizer.decode([end], skip_special_tokens=False)


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [-1], [[1, 2], 3], [1.5], [True]])
def test_bad_prompts_are_400(tiny, prompt):
    url, model, _ = tiny
    response = httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text


def test_stop_takes_a_generation_tasks_until_list(tiny, client):
    """lm-eval sends a task's `until` strings plus the end token as `stop` (humaneval's: 6), past OpenAI's 4."""
    url, model, _ = tiny
    until = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "<|im_end|>"]
    assert client.completions.create(model=model, prompt="def f():", max_tokens=4, stop=until).choices[0].finish_reason
    response = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "x", "stop": ["a"] * 17}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop"


def test_a_token_id_outside_the_vocabulary_is_400(tiny):
    url, model, _ = tiny
    response = httpx.post(url + "/v1/completions", json={"model": model, "prompt": [[5, 49152]], "echo": True}, timeout=60)
    assert response.status_code == 400 and "49152" in response.json()["error"]["message"]


# ------------------------------------------------------------------------------- lm-evaluation-harness


def test_lm_eval_through_the_server_equals_its_hf_backend_and_pocketlm_eval(monkeypatch, tmp_path, capsys):
    import lm_eval  # the test extra's lm-eval[api]
    from lm_eval.tasks import TaskManager

    from pocketlm.cli import main
    from pocketlm.export import export

    monkeypatch.chdir(ROOT)  # the tasks' data_files are relative to the repository
    model = "smollm2-135m-instruct"
    export(model, "hf", str(tmp_path / "hf"), None)
    tasks = ["pocketlm_sentiment_mc", "pocketlm_wiki_rolling"]
    manager = TaskManager(include_path=str(FIXTURES / "lm_eval"), include_defaults=False)  # not lm-eval's thousands of tasks

    def evaluate(backend: str, args: str) -> dict:
        out = lm_eval.simple_evaluate(model=backend, model_args=args, tasks=tasks, task_manager=manager, log_samples=True)
        samples = {task: sorted(out["samples"][task], key=lambda s: s["doc_id"]) for task in tasks}
        scores = [[r[0][0] for r in s["resps"]] for s in samples["pocketlm_sentiment_mc"]]  # each choice's log-likelihood
        nll = [s["resps"][0][0] for s in samples["pocketlm_wiki_rolling"]]  # each document's
        return {**out["results"][tasks[0]], **out["results"][tasks[1]], "scores": scores, "nll": nll}

    with running_server(model, "--quant", "none") as url:  # float weights, as the export's
        # lm-eval's defaults: its own tokenization (tokenized_requests), echo with max_tokens 1; batch_size 16 sends
        # the multiple choice's 12 requests as one list of token-id prompts
        served = evaluate("local-completions", f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                                               f"tokenizer={tmp_path / 'hf'},batch_size=16")
    hf = evaluate("hf", f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu")
    assert served["acc,none"] == hf["acc,none"] and 0.5 < hf["acc,none"] < 1  # neither always right nor chance
    assert sum(served["scores"], []) == pytest.approx(sum(hf["scores"], []), abs=1e-3)
    assert served["nll"] == pytest.approx(hf["nll"], abs=1e-3)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert served[metric] == pytest.approx(hf[metric], rel=1e-3)

    # pocketlm eval on the same prompt string (tests/fixtures/eval/sentiment_lm_eval.yaml): the same scores
    capsys.readouterr()
    report = tmp_path / "report"
    assert main(["eval", model, "--quant", "none", "--chat", "off", "--task", str(FIXTURES / "eval" / "sentiment_lm_eval.yaml"),
                 "--json", "--quiet", "--report", str(report)]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["metrics"]["accuracy"] == pytest.approx(hf["acc,none"]) and ours["settings"]["quant"] == "none"
    rows = [json.loads(line) for line in (report / "predictions.jsonl").read_text().splitlines()]
    labels = ["negative", "positive"]
    for row, scores in zip(rows, hf["scores"]):
        assert row["logprob_label"] == pytest.approx(scores[labels.index(row["label"])], abs=1e-3)
        assert row["prediction"] == labels[scores.index(max(scores))]
