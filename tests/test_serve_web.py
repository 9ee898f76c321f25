"""The chat page at / in a real headless browser (Debian's chromium driven by playwright) against a real
`pocketlm serve`: a person types a message and watches the answer stream in."""

import json
import os

import pytest
from serve_process import running_server

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 240_000  # a bound on a hung page on a busy machine, not a speed check


@pytest.fixture(scope="module")
def page():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (scripts/setup test installs Debian's chromium with apt-get when it can)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with running_server("smollm2", "minilm") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.set_default_timeout(WAIT_MS)
        sent = []
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
        outside = []  # every asset must come from the server itself (no CDN)
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
        page.goto(url + "/")
        page.sent, page.outside = sent, outside
        yield page
        browser.close()


def test_page_streams_an_answer_and_keeps_the_conversation(page):
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert options == ["smollm2-135m-instruct"]  # the embedding model is no chat choice
    page.click("summary")  # open the settings, as a person would
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#system", "You are a helpful assistant.")
    page.fill("#prompt", "What is the capital of France?")
    page.press("#prompt", "Enter")
    # streamed: text shows while the answer is still coming
    page.wait_for_function("(() => { const m = document.querySelector('.msg.assistant');"
                           " return m && m.dataset.state === 'streaming' && m.textContent.length > 0 })()")
    page.wait_for_selector('.msg.assistant[data-state="done"]')
    answer = page.inner_text(".msg.assistant")
    assert "Paris" in answer
    assert "completion tokens" in page.inner_text("#status")
    first = page.sent[0]
    assert first["stream"] is True and first["temperature"] == 0 and first["max_tokens"] == 24
    assert first["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}

    page.fill("#prompt", "And of Italy?")
    page.press("#prompt", "Enter")
    page.wait_for_selector('.msg.assistant:nth-of-type(4)[data-state="done"]')
    roles = [m["role"] for m in page.sent[1]["messages"]]
    assert roles == ["system", "user", "assistant", "user"]  # the page kept the conversation
    assert page.sent[1]["messages"][2]["content"] == answer
    assert "Rome" in page.inner_text(".msg.assistant:nth-of-type(4)")  # "And of Italy?" made sense to it
    assert page.outside == []


def test_stop_button_ends_a_long_answer(page):
    page.click("#clear")
    page.fill("#max-tokens", "400")
    page.fill("#prompt", "Write a long story about a dragon.")
    page.press("#prompt", "Enter")
    page.wait_for_function("(() => { const m = document.querySelector('.msg.assistant');"
                           " return m && m.textContent.length > 0 })()")
    page.click("#stop")
    page.wait_for_selector('.msg.assistant[data-state="stopped"]')
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    assert page.inner_text("#status") == "stopped"
