"""Tiny random models saved by transformers itself, with a real tokenizer, for the export and prune tests.

    llama: 2 layers, a small byte-level BPE vocabulary stated as SmolLM2's GGUF states its own (ChatML specials,
           "smollm" pre-tokenizer, merges, chat template); conftest.py's tiny_llama_dir has SmolLM2's whole one
    gemma: 6 layers (5 local + 1 global, window 16), a small SentencePiece vocabulary (control, byte, normal
           and all-space user-defined tokens), as Gemma 3 states them in a GGUF
"""

from __future__ import annotations

from pathlib import Path

import torch

_BUILT: dict[str, Path] = {}


def built(kind: str, tmp_path_factory) -> Path:
    """The tiny model of `kind` ("llama" or "gemma"), built once per test session and shared by the test files."""
    if kind not in _BUILT:
        make = make_tiny_llama if kind == "llama" else make_tiny_gemma
        _BUILT[kind] = make(tmp_path_factory.mktemp(f"tiny-{kind}"))
    return _BUILT[kind]


TEXT = "Hello world. The hello world of x is a world of hello, he said.\n\nHello  world   x"


def byte_level_metadata() -> dict:
    from pocketlm.tokenizer import _bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["H e", "l l", "He ll", "Hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ t", "h e", "Ġt he",
              "Ġ o", "Ġo f", "Ġ x", "Ġ h", "Ġh e", "Ġhe ll", "Ġhell o"]  # fmt: skip
    tokens = specials + list(_bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.chat_template": template,
    }


def make_tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pocketlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(byte_level_metadata())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def sentencepiece_gemma_metadata() -> dict:
    """A small Gemma-style SentencePiece vocabulary (the shape of tests/test_tokenizer.py's)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "x", "s", "a", "i", "f", "t", "T", "H", ".", ",",
              "he", "ll", "▁h", "▁w", "hell", "▁hell", "▁hello", "or", "▁wor", "▁world", "ld", "▁x", "▁s",
              "▁a", "▁i", "is", "▁is", "▁of", "of", "▁the", "th", "▁th", "Th", "▁The", "Hell", "Hello",
              "ai", "sa", "said", "▁said", "\n", "\n\n", "  ", "   "]  # fmt: skip
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3] * len(specials) + [6] * 256 + [4 if p.isspace() else 1 for p in pieces]
    return {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


def make_tiny_gemma(folder: Path) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from pocketlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(sentencepiece_gemma_metadata())
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=256, sliding_window=16, query_pre_attn_scalar=256,
        max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # random norm weights (transformers starts them at 0): the +1 shift must be exact
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randint(-512, 512, p.shape) / 1024)
    model.save_pretrained(folder)
    tokenizer.save(folder)
    return folder


def logits(lm, text: str = TEXT) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer.encode(text)])
    with torch.inference_mode():
        return lm.model(ids)  # (1, T, V)


def drive_batch(batch, seqs) -> tuple[int, int]:
    """Run sequences through a server's Batch (pocketlm.engine.batch) to their ends, with the scheduler's rule for a
    verify pass (each sequence takes rows while the draft guessed right) -> (proposals made, proposals kept)."""
    for seq in seqs:
        batch.add(seq)
    proposed = kept = 0
    while len(batch):
        for run in (batch.prefill_step, batch.step):
            for seq, logits, proposals in run():
                for i in range(len(logits)):
                    token, row = seq.choose(logits[i : i + 1])
                    seq.accept(token, row)
                    if seq.done or i == len(proposals) or token != proposals[i]:
                        break
                    kept += 1
                proposed += len(proposals)
                if seq.done:
                    batch.remove(seq)
    return proposed, kept
