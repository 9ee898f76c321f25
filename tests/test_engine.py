import pytest
import torch

from pocketlm.engine.generate import encode_chat, encode_raw, generate
from pocketlm.engine.sampling import SamplingParams
from pocketlm.errors import PocketLMError
from pocketlm.load import load

GREEDY = dict(temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load(str(tiny_llama_dir))


def test_cached_generation_equals_uncached_argmax(tiny):
    ids = encode_raw(tiny.tokenizer, "The quick brown fox")
    g = generate(tiny, ids, SamplingParams(max_new_tokens=12, ignore_eos=True, **GREEDY))
    g.text()
    context = list(ids)
    with torch.inference_mode():
        for _ in range(12):  # no cache: the whole sequence through the model each step
            context.append(int(tiny.model(torch.tensor([context]))[0, -1].argmax()))
    assert g.stats.token_ids == context[len(ids):]
    assert g.stats.finish_reason == "length" and g.stats.completion_tokens == 12


def test_stream_chunks_join_to_the_text(tiny):
    ids = encode_raw(tiny.tokenizer, "Once upon a time")
    g = generate(tiny, ids, SamplingParams(max_new_tokens=20, ignore_eos=True, **GREEDY))
    chunks = list(g)
    assert len(chunks) > 1
    assert "".join(chunks) == tiny.tokenizer.decode(g.stats.token_ids)


def test_same_seed_same_text_other_seed_other_text(tiny):
    ids = encode_raw(tiny.tokenizer, "Hello")
    texts = [
        generate(tiny, ids, SamplingParams(max_new_tokens=16, temperature=1.0, seed=s, ignore_eos=True)).text()
        for s in (1, 1, 2)
    ]
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_stop_string_cuts_the_text(tiny):
    ids = encode_raw(tiny.tokenizer, "Numbers:")
    full = generate(tiny, ids, SamplingParams(max_new_tokens=30, ignore_eos=True, **GREEDY)).text()
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = generate(tiny, ids, SamplingParams(max_new_tokens=30, ignore_eos=True, stop=[stop], **GREEDY))
    assert cut.text() == full[: full.index(stop)]
    assert cut.stats.finish_reason == "stop"


def test_prompt_longer_than_context_names_both_numbers(tiny):
    ids = encode_raw(tiny.tokenizer, "word " * 300)
    with pytest.raises(PocketLMError, match=rf"{len(ids)} tokens.*context window is 256"):
        generate(tiny, ids, SamplingParams())


def test_generation_stops_at_the_context_end(tiny):
    ids = encode_raw(tiny.tokenizer, "word " * 250)
    g = generate(tiny, ids, SamplingParams(max_new_tokens=100, ignore_eos=True, **GREEDY))
    g.text()
    assert len(ids) + g.stats.completion_tokens == 256 and g.stats.finish_reason == "length"


def test_chat_prompt_uses_the_models_template(smollm2):
    ids = encode_chat(smollm2.tokenizer, [{"role": "user", "content": "Hi"}])
    text = smollm2.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_end_token_stops_generation(smollm2):
    ids = encode_chat(smollm2.tokenizer, [{"role": "user", "content": "Say just the word yes."}])
    g = generate(smollm2, ids, SamplingParams(max_new_tokens=64, **GREEDY))
    text = g.text()
    assert g.stats.finish_reason == "stop" and "<|im_end|>" not in text and text.strip()
