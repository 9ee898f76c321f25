"""Speculative decoding: greedy output equals the target's own greedy output; sampled output keeps the
target's distribution (checked against exact probabilities with a draft that is far from the target)."""

import collections

import pytest
import torch

from pocketlm.engine.generate import encode_raw, generate
from pocketlm.engine.sampling import SamplingParams, token_distribution
from pocketlm.engine.speculative import layer_draft
from pocketlm.errors import PocketLMError
from tiny_models import drive_batch
from pocketlm.load import load


def draft_of(lm, n_layers):
    return type(lm)(**{**vars(lm), "model": layer_draft(lm.model, n_layers)})


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_plain_greedy(tiny_llama_dir, k):
    lm = load(str(tiny_llama_dir))
    draft = draft_of(lm, 1)
    ids = encode_raw(lm.tokenizer, "Hello there, how are you today?")
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)  # with the repetition penalty
    plain = generate(lm, ids, params)
    plain.text()
    spec = generate(lm, ids, params, draft=draft, draft_tokens=k)
    spec.text()
    assert spec.stats.token_ids == plain.stats.token_ids
    assert spec.stats.draft_tokens > 0 and 0 <= spec.stats.draft_accepted <= spec.stats.draft_tokens


def test_sampled_speculative_keeps_the_target_distribution():
    """The first two speculative tokens against their exact joint probability under the target, on a tiny
    random model with a 32-token vocabulary (cheap enough to draw 1,000 samples)."""
    from pocketlm.config import LlamaConfig
    from pocketlm.engine.speculative import speculative_tokens
    from pocketlm.models import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=64)
    target = LlamaForCausalLM(cfg).eval()
    draft = layer_draft(target, 0)  # embedding -> head: a poor draft, so refusals and residual draws happen often
    prompt = [3, 14, 15, 9]
    params = SamplingParams(temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.0)
    none = torch.zeros(1, 0, dtype=torch.long)

    def dist(model, context):  # exact next-token probabilities (V,) as the sampler draws them
        with torch.inference_mode():
            return token_distribution(model(torch.tensor([context]))[:, -1], params, none)[0]

    def pairs(model):  # the exact probability of each (first, second) pair after the prompt
        first = dist(model, prompt)
        out = {}
        for a in first.nonzero().flatten().tolist():
            second = dist(model, prompt + [a])
            out.update({(a, b): (first[a] * second[b]).item() for b in second.nonzero().flatten().tolist()})
        return out

    exact = pairs(target)
    tv = lambda p, q: 0.5 * sum(abs(p.get(x, 0) - q.get(x, 0)) for x in set(p) | set(q))  # noqa: E731
    assert tv(exact, pairs(draft)) > 0.3  # the draft alone would fail this test

    n, counts = 1000, collections.Counter()
    generator = torch.Generator().manual_seed(0)
    for _ in range(n):
        for model in (target, draft):
            model.setup_cache(1, 16)
        tokens = speculative_tokens(target, draft, torch.tensor(prompt), params, 2, 0, generator)
        counts[(next(tokens)[0], next(tokens)[0])] += 1  # the second comes from a draft proposal or a residual draw
    empirical = {pair: c / n for pair, c in counts.items()}
    # 9 cells, 1,000 draws: the empirical total variation from the truth is about 0.04
    assert tv(empirical, exact) < 0.1, (empirical, exact)


def test_a_draft_with_another_tokenizer_is_refused(tiny_llama_dir, tiny_gemma_dir):
    lm = load(str(tiny_llama_dir))
    other = draft_of(lm, 1)
    other.tokenizer = load(str(tiny_gemma_dir)).tokenizer  # a SentencePiece vocabulary, not SmolLM2's
    with pytest.raises(PocketLMError, match="same tokenizer"):
        generate(lm, [1, 2, 3], SamplingParams(), draft=other)


@pytest.mark.slow
def test_smollm2_speculative_greedy_chat_answer(smollm2):
    from pocketlm.engine.generate import encode_chat

    ids = encode_chat(smollm2.tokenizer, [{"role": "user", "content": "Name three colours of the rainbow."}])
    params = SamplingParams(max_new_tokens=32, temperature=0)
    plain = generate(smollm2, ids, params)
    spec = generate(smollm2, ids, params, draft=draft_of(smollm2, 12), draft_tokens=4)
    assert spec.text() == plain.text()


@pytest.mark.slow
def test_a_batch_with_a_draft_equals_plain_greedy(smollm2, monkeypatch):
    """The server's batch (pocketlm.engine.batch) with a draft: a greedy sequence alone in it is checked k
    tokens at a time in its cache row, a refused proposal's positions are written over; two sequences decode
    together as usual, and once one of them is done the other goes on with the draft. Each text is the one it
    gets alone, with a draft that is often wrong (SmolLM2's first 20 of 30 layers) and with one always right but
    for the repetition penalty (all of them). Real weights: a random tiny model barely looks at positions, so
    it would not notice a row that kept a refused proposal."""
    from pocketlm.engine import batch as batch_module
    from pocketlm.engine.batch import Batch
    from pocketlm.engine.generate import Sequence

    monkeypatch.setattr(batch_module, "DRAFT_P_MIN", 0.0)  # every proposal made, sure or not: refusals happen
    lm = smollm2
    prompts = ["Hello there, how are you today?", "The quick brown fox"]
    params = [SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True),  # with the repetition penalty
              SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=1.0, ignore_eos=True)]
    ids = [encode_raw(lm.tokenizer, p) for p in prompts]
    alone = []
    for prompt, p in zip(ids, params):
        g = generate(lm, prompt, p)
        g.text()
        alone.append(g.stats.token_ids)
    counts = {}  # draft layers -> [proposals kept, proposals]
    for n_layers, k in [(20, 3), (len(lm.model.model.layers), 4)]:
        batch = Batch(lm.model, max_batch=2, context_length=lm.context_length, draft=layer_draft(lm.model, n_layers), draft_tokens=k)
        for together in (False, True):
            seqs = [Sequence(lm.tokenizer, i, p, lm.context_length) for i, p in zip(ids, params)][: 2 if together else 1]
            proposed, kept = drive_batch(batch, seqs)
            assert [s.stats.token_ids for s in seqs] == alone[: len(seqs)], (n_layers, together)
            assert proposed > 0  # alone, or once the short one was done, the long one went on with the draft
            counts[n_layers] = [a + b for a, b in zip(counts.get(n_layers, [0, 0]), (kept, proposed))]
    (kept_poor, proposed_poor), (kept_full, proposed_full) = counts[20], counts[len(lm.model.model.layers)]
    assert 0 < kept_poor < proposed_poor  # refusals happened, and the text did not change
    assert kept_full > kept_poor * proposed_full / proposed_poor  # the whole model as its draft: right more often
