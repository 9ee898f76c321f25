import pytest
import torch
from torch import nn

from pocketlm.engine.generate import encode_raw, generate
from pocketlm.engine.sampling import SamplingParams
from pocketlm.eval.perplexity import perplexity
from pocketlm.load import load
from pocketlm.quant.int8 import Int8Linear, quantize_int8

from conftest import FIXTURES


def test_int8_linear_matches_float_within_quantization_error():
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(5, 7, 256)
    ref, out = linear(x), q(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # per-channel int8 (error <= scale/2 per weight) plus bf16 activations: about 1% of the output's scale
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 0.02
    assert q.weight.dtype == torch.int8 and q.weight.abs().max().item() == 127


def test_quantize_int8_swaps_every_linear_and_keeps_the_embedding(tiny_llama_dir):
    lm = load(str(tiny_llama_dir), quant="int8")
    assert not any(type(m) is nn.Linear for m in lm.model.modules())
    assert lm.model.model.embed_tokens.weight.dtype == torch.float32
    ref = load(str(tiny_llama_dir))
    ids = torch.tensor([encode_raw(ref.tokenizer, "Hello there, how are you today?")])
    with torch.inference_mode():
        cosine = torch.cosine_similarity(lm.model(ids).flatten(), ref.model(ids).flatten(), dim=0)
    assert cosine.item() > 0.999
    g = generate(lm, ids[0].tolist(), SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    g.text()
    assert g.stats.completion_tokens == 8


@pytest.mark.slow
def test_smollm2_int8_perplexity_close_to_float(smollm2):
    ids = encode_raw(smollm2.tokenizer, (FIXTURES / "wikitext2_test_excerpt.txt").read_text())[:1024]
    int8 = load("smollm2-135m-instruct", quant="int8")
    ref = perplexity(smollm2.model, ids, window=1024, stride=1024)["perplexity"]
    ours = perplexity(int8.model, ids, window=1024, stride=1024)["perplexity"]
    assert abs(ours - ref) / ref < 0.02, (ours, ref)
