"""`pocketlm serve --draft`: a lone greedy request is decoded speculatively (pocketlm.engine.batch), with the
text it gets without a draft."""

import re

import httpx2 as httpx  # the HTTP client the openai package itself uses
import openai
import pytest
import subprocess
import sys
from serve_process import running_server

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def server():
    # SmolLM2 as its own draft: every proposal right, so the test sees the verify pass keep several tokens at once
    with running_server("smollm2", "--draft", "smollm2", "--draft-tokens", "3") as url:
        yield url


def counter(url: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", httpx.get(url + "/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_draft_keeps_the_greedy_text(server):
    from pocketlm.engine.generate import encode_chat, generate
    from pocketlm.engine.sampling import SamplingParams
    from pocketlm.load import load

    lm = load(CHAT, quant="auto")  # what the server runs
    alone = generate(lm, encode_chat(lm.tokenizer, FRANCE), SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0)).text()
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model=CHAT, messages=FRANCE, max_tokens=24, temperature=0)
    assert answer.choices[0].message.content == alone
    chunks = client.chat.completions.create(model=CHAT, messages=FRANCE, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == alone
    proposed, kept = counter(server, "pocketlm_draft_tokens_total"), counter(server, "pocketlm_draft_accepted_total")
    assert 0 < kept <= proposed


def test_ps_lists_the_draft(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model=CHAT, messages=FRANCE, max_tokens=2, temperature=0)  # loads both
    listed = {m["kind"]: m for m in httpx.get(server + "/api/ps").json()["models"]}
    assert listed["generate"]["name"] == CHAT and listed["draft"]["name"] == "smollm2"
    assert listed["draft"]["memory_bytes"] > 50e6  # SmolLM2's int4 weights and int8 head
    shown = subprocess.run([sys.executable, "-m", "pocketlm.cli", "ps", "--server", server], capture_output=True, text=True, timeout=60)
    assert re.search(r"^smollm2 +draft +\d+ MB", shown.stdout, re.M), shown.stdout


def test_a_draft_that_is_not_there_stops_the_start():
    done = subprocess.run([sys.executable, "-m", "pocketlm.cli", "serve", "smollm2", "--draft", "no-such-model"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no-such-model" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def head_server(tmp_path_factory):
    """SmolLM2 with a small random draft head (pocketlm.models.draft_head): most guesses are refused, which is what
    must not change the text."""
    import torch

    from pocketlm.compress.draft_head import save_draft_head
    from pocketlm.models.draft_head import DraftHead, DraftHeadConfig

    torch.manual_seed(0)
    head = DraftHead(DraftHeadConfig(dim=576, hidden_dim=64, n_tokens=512, target_vocab_size=49152))
    with torch.no_grad():
        head.token_ids.copy_(torch.randperm(49152)[:512])
    folder = tmp_path_factory.mktemp("head")
    save_draft_head(head, folder, {"target": CHAT})
    with running_server("smollm2", "--draft", str(folder)) as url:
        yield url


def test_a_draft_head_keeps_the_greedy_text(head_server):
    from pocketlm.engine.generate import encode_chat, generate
    from pocketlm.engine.sampling import SamplingParams
    from pocketlm.load import load

    lm = load(CHAT, quant="auto")
    alone = generate(lm, encode_chat(lm.tokenizer, FRANCE), SamplingParams(max_new_tokens=24, temperature=0)).text()
    client = openai.OpenAI(base_url=head_server + "/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model=CHAT, messages=FRANCE, max_tokens=24, temperature=0, extra_body={"repetition_penalty": 1.1})
    assert answer.choices[0].message.content == alone
    assert counter(head_server, "pocketlm_draft_tokens_total") > 0
    listed = {m["kind"]: m for m in httpx.get(head_server + "/api/ps").json()["models"]}
    assert listed["draft"]["memory_bytes"] < 1e6  # 512 x 576 and 1152 x 128 weights in int4
