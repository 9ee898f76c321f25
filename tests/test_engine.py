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


def test_a_batch_of_sequences_that_start_at_different_times_equals_each_alone(tiny, monkeypatch):
    """Continuous batching at the engine level (pocketlm.engine.batch): 4 sequences, 3 slots, each joining when
    a slot is free; each keeps its own sampler (greedy, seeded sampling) and gets the text it gets alone. The
    third prompt shares its start with the first, which is still decoding: copied, not computed. Prompts run
    in chunks of 8 tokens here, one chunk between decode steps: the long last one does not stop the others."""
    from pocketlm.engine import batch as batch_module
    from pocketlm.engine import generate as generate_module
    from pocketlm.engine.batch import Batch
    from pocketlm.engine.generate import Sequence

    for module in (batch_module, generate_module):  # the same chunk boundaries in a batch and alone
        monkeypatch.setattr(module, "PREFILL_CHUNK", 8)
    prompts = ["The quick brown fox", "Once upon a time", "The quick brown fox jumps", "Numbers: " + " ".join(map(str, range(12)))]
    params = [
        SamplingParams(max_new_tokens=12, ignore_eos=True, **GREEDY),
        SamplingParams(max_new_tokens=9, temperature=1.0, seed=3, ignore_eos=True),
        SamplingParams(max_new_tokens=6, ignore_eos=True, **GREEDY),
        SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, seed=5, ignore_eos=True),
    ]
    ids = [encode_raw(tiny.tokenizer, p) for p in prompts]
    alone = [generate(tiny, i, p).text() for i, p in zip(ids, params)]

    batch = Batch(tiny.model, max_batch=3, context_length=tiny.context_length)
    seqs = [Sequence(tiny.tokenizer, i, p, tiny.context_length) for i, p in zip(ids, params)]
    texts, waiting = [""] * 4, list(range(4))
    steps_during_last_prompt = 0

    def advance(i, logits):
        token, logits = seqs[i].choose(logits)
        texts[i] += seqs[i].accept(token, logits)
        if seqs[i].done:
            texts[i] += seqs[i].finish()
            batch.remove(seqs[i])

    step = 0
    while waiting or len(batch):
        if waiting and batch.has_room() and step >= 2 * waiting[0]:  # one new sequence every other step
            i = waiting.pop(0)
            batch.add(seqs[i])
        for run in (batch.prefill_step, batch.step):
            stepped = run()
            for seq, logits, _ in stepped:
                advance(seqs.index(seq), logits)
        steps_during_last_prompt += any(s.todo for s in batch.slots) and bool(stepped)
        step += 1
    assert texts == alone
    assert seqs[2].stats.cached_tokens == len(ids[0]) and seqs[3].stats.cached_tokens == 0
    assert len(ids[3]) > 16 and steps_during_last_prompt >= 2  # its chunks alternated with decode steps


def test_prompts_seated_together_compute_their_shared_start_once(tiny):
    """Three prompts with one start arrive in the same step (eight clients with one system prompt, n choices):
    the first prefills it, the others copy those positions from its row, and each still gets its text alone."""
    from pocketlm.engine.batch import Batch
    from pocketlm.engine.generate import Sequence

    start = "You are a helpful assistant. Answer briefly and kindly."
    prompts = [start + " First question?", start + " Second one?", start + " First question?"]
    ids = [encode_raw(tiny.tokenizer, p) for p in prompts]
    shared = next(i for i, (a, b) in enumerate(zip(ids[0], ids[1])) if a != b)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, **GREEDY)
    alone = [generate(tiny, i, params).text() for i in ids]

    batch = Batch(tiny.model, max_batch=3, context_length=tiny.context_length)
    seqs = [Sequence(tiny.tokenizer, i, params, tiny.context_length) for i in ids]
    for seq in seqs:
        batch.add(seq)
    texts = [""] * 3
    while len(batch):
        for run in (batch.prefill_step, batch.step):
            for seq, logits, _ in run():
                i = seqs.index(seq)
                token, logits = seq.choose(logits)
                texts[i] += seq.accept(token, logits)
                if seq.done:
                    texts[i] += seq.finish()
                    batch.remove(seq)
    assert texts == alone
    assert [s.stats.cached_tokens for s in seqs] == [0, shared, len(ids[2]) - 1]
