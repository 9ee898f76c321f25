"""pocketlm.tokenizer against transformers: the same ids from the same GGUF or folder, the same chat
text, the same merges; and streaming text that adds up to decode().

References: transformers' GGUF tokenizer path (AutoTokenizer.from_pretrained(dir, gguf_file=...),
integrations/gguf/gguf_tokenizer_mapping.py), its generate_merges and apply_chat_template. The fast
tests use SmolLM2's 49k vocabulary and small made-up vocabularies; Gemma's 262k one and loading
transformers' tokenizers from the GGUF files (10 to 35 s each) are marked slow.
"""

from __future__ import annotations

import json
import mmap
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as V

from conftest import smollm2_path, gemma3_path, minilm_dir
from pocketlm.errors import PocketLMError
from pocketlm.tokenizer import StreamDecoder, Tokenizer, _merges_from_vocab

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog. Don't stop; it's 5 o'clock, we'll see.",
    "def f(x):\n    if x:\n\treturn {'a': [1, 2]}\n\t\tpass  # tab then spaces\n",
    "1234567 and 3.14159, 1,000,000 or -42e10",
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "中文测试：你好，世界！ 日本語のテキスト",
    "rare CJK 𠜎𠝹𠱓 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",  # outside most vocabularies: byte tokens
    "Grüße aus München, straße; café naïve résumé; e\u0301 (combining)",
    "multiple   spaces    here and\ttabs\t\tand a trailing space ",
    "line1\n\nline3\n\n\n\nend\r\nwindows",
    "  two leading spaces",
    " one leading space",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<eos> and <pad> inside",
    "Arabic مرحبا and Hindi नमस्ते and Russian Привет",
    "https://example.com/path?q=1&r=2#frag",
    "",
    "   ",
]


# ---- reading a GGUF's metadata fast ----------------------------------------------------------------

_SCALARS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d", V.BOOL: "<?",
}  # fmt: skip


def read_gguf_metadata(path: Path) -> dict:
    """A GGUF file's key/values as Python values, the shape Tokenizer.from_gguf_metadata takes.

    gguf.GGUFReader gives the same values (test_metadata_reader_matches_gguf_reader) but builds a
    numpy view per array element and reads the tensor table too: 5 s for SmolLM2 and 18 s for Gemma
    here. Walking only the key/value section takes 0.2 and 0.5 s.
    """
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (n_kv,) = struct.unpack_from("<Q", buf, 16)  # after magic, version, tensor count

    def string(pos):
        (n,) = struct.unpack_from("<Q", buf, pos)
        return buf[pos + 8 : pos + 8 + n].decode("utf-8"), pos + 8 + n

    def value(kind, pos):
        if kind == V.STRING:
            return string(pos)
        if kind == V.ARRAY:
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item == V.STRING:
                out = []
                for _ in range(count):
                    text, pos = string(pos)
                    out.append(text)
                return out, pos
            dtype = np.dtype(_SCALARS[item])
            return np.frombuffer(buf, dtype, count, pos).tolist(), pos + count * dtype.itemsize
        return struct.unpack_from(_SCALARS[kind], buf, pos)[0], pos + struct.calcsize(_SCALARS[kind])

    metadata, pos = {}, 24
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = value(kind, pos + 4)
    return metadata


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(smollm2_path()))


@pytest.fixture(scope="module")
def gemma() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(gemma3_path()))


def transformers_from_gguf(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def streamed(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    decoder = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    return "".join(decoder.push(i) for i in ids) + decoder.flush()


def random_ids(tok: Tokenizer, rng: random.Random, n: int) -> list[int]:
    """Ids a model might never write but a sampler can: byte tokens, specials, anything."""
    pool = sorted(tok.byte_fallback_ids | tok.special_ids)
    return [rng.choice(pool) if pool and rng.random() < 0.4 else rng.randrange(tok.vocab_size) for _ in range(n)]


# ---- SmolLM2 (byte-level BPE), fast ----------------------------------------------------------------


def test_smollm2_special_ids_and_stop_ids(smollm2):
    assert (smollm2.vocab_size, smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (49152, 1, 2, 2)
    assert smollm2.id_to_token(2) == "<|im_end|>" and not smollm2.add_bos
    assert smollm2.stop_ids == {smollm2.token_to_id("<|im_end|>"), smollm2.token_to_id("<|endoftext|>")}
    # control tokens written in the text are single ids; encode adds nothing for this model
    assert smollm2.encode("<|im_start|>assistant<|im_end|>") == [1, 520, 9531, 2]
    assert smollm2.decode([1, 520, 9531, 2]) == "assistant"
    assert smollm2.decode([1, 520, 9531, 2], skip_special_tokens=False) == "<|im_start|>assistant<|im_end|>"


def test_smollm2_pinned_ids(smollm2):
    # from transformers' tokenizer on the same GGUF (the slow test compares every text live)
    assert smollm2.encode("Hello world!") == [19556, 905, 17]
    # every digit alone, as llama.cpp's "smollm" pre-tokenizer and SmolLM2's own tokenizer.json split them
    assert smollm2.encode("1234567 and 3") == [33, 34, 35, 36, 37, 38, 39, 284, 216, 35]
    assert smollm2.encode("  two leading spaces and   three inside") == [216, 827, 2899, 5600, 284, 256, 1296, 2972]


def test_smollm2_decode_round_trips(smollm2):
    for text in TEXTS:
        assert smollm2.decode(smollm2.encode(text), skip_special_tokens=False) == text


def test_smollm2_chat_template_pinned(smollm2):
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}])
    turns = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert text == f"<|im_start|>system\n{default_system}<|im_end|>\n" + turns
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert smollm2.apply_chat_template(chat) == "<|im_start|>system\nBe brief.<|im_end|>\n" + turns


def test_chat_template_environment_matches_transformers(smollm2):
    """Whitespace control, namespace, loop controls, tojson, strftime_now, {% generation %}, tools."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = """{%- set ns = namespace(n=0) -%}
{%- for m in messages %}
    {%- if m.role == 'skip' %}{% continue %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    {% generation %}{{ bos_token }}{{ m.role }}: {{ m.content | tojson }}{% endgeneration %}
    {% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{% endfor %}
{{ ns.n }} {{ strftime_now('%Y') }}{% if add_generation_prompt %}<assistant>{% endif %}"""
    tok = Tokenizer(smollm2.backend, bos_id=1, eos_id=2, chat_template=template)
    chat = [{"role": "user", "content": "Ünïcode \"quoted\" 😀"}, {"role": "skip", "content": "x"}]
    tools = [{"name": "add", "parameters": {"a": "int"}}]
    for kwargs in ({}, {"tools": tools}):
        expected, _ = render_jinja_template(
            [chat], chat_template=template, add_generation_prompt=True, bos_token="<|im_start|>", eos_token="<|im_end|>",
            **kwargs,
        )
        assert tok.apply_chat_template(chat, **kwargs) == expected[0]


def test_smollm2_streaming_equals_decode(smollm2):
    for text in TEXTS:
        ids = smollm2.encode(text)
        for skip in (True, False):
            assert streamed(smollm2, ids, skip) == smollm2.decode(ids, skip_special_tokens=skip), text
    rng = random.Random(0)
    for _ in range(100):  # arbitrary ids: split characters, stray continuation bytes
        ids = random_ids(smollm2, rng, rng.randint(1, 20))
        assert streamed(smollm2, ids) == smollm2.decode(ids)


def test_stream_decoder_holds_back_split_characters(smollm2):
    ids = smollm2.encode("😀")  # four UTF-8 bytes over several byte-level tokens
    assert len(ids) > 1
    decoder = StreamDecoder(smollm2)
    pieces = [decoder.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "😀"
    decoder = StreamDecoder(smollm2)
    decoder.push(ids[0])
    assert decoder.flush() == "\ufffd"  # cut short: what decode() gives too


def test_save_round_trip(smollm2, tmp_path):
    smollm2.save(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == smollm2.encode(text)
    assert (again.bos_id, again.eos_id, again.pad_id, again.stop_ids) == (1, 2, 2, smollm2.stop_ids)
    assert again.chat_template == smollm2.chat_template and again.add_bos == smollm2.add_bos


def test_save_is_read_by_transformers(smollm2, tmp_path):
    from transformers import AutoTokenizer

    smollm2.save(tmp_path)
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert reference.encode(text) == smollm2.encode(text), text


# ---- MiniLM (BERT WordPiece) from a Hugging Face folder --------------------------------------------


def test_minilm_folder_matches_transformers():
    from transformers import AutoTokenizer

    folder = minilm_dir()
    ours, reference = Tokenizer.from_hf_dir(folder), AutoTokenizer.from_pretrained(str(folder))
    for text in TEXTS + ["x " * 300]:  # its tokenizer.json pads and truncates to 128: we must not
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert (ours.vocab_size, ours.pad_id, ours.bos_id, ours.eos_id, ours.stop_ids) == (30522, 0, None, None, set())
    assert not ours.has_chat_template


def test_hf_folder_reads_config_files(tmp_path, smollm2):
    smollm2.backend.save(str(tmp_path / "tokenizer.json"))
    special_tokens = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_tokens))
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ bos_token + m['content'] }}{% endfor %}")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, {0, 2})
    assert tok.encode("hi") == [1, 6004] and tok.encode("<|im_start|>hi") == [1, 6004]  # no double BOS
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"


# ---- made-up vocabularies against transformers' builders --------------------------------------------


def test_merges_match_transformers_generate_merges():
    from transformers.tokenization_utils_base import generate_merges

    rng = random.Random(0)
    words = ["".join(rng.choice("ab▁c") for _ in range(rng.randint(1, 6))) for _ in range(400)]
    for ranks in ([rng.randint(-5, 0) for _ in words], [-i for i in range(len(words))]):  # ties, then none
        vocab = {w: i for i, w in enumerate(words)}  # duplicated words: the last position wins, as there
        assert _merges_from_vocab(words, ranks, vocab) == generate_merges(vocab, dict(zip(words, ranks)))


def sentencepiece_metadata(architecture: str) -> dict:
    """A small SentencePiece vocabulary as a GGUF states it: control, byte and normal tokens."""
    specials = ["<unk>", "<s>", "</s>"] if architecture == "llama" else ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    specials += ["<start_of_turn>", "<end_of_turn>"]
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "x", "he", "ll", "▁h", "▁w", "hell", "▁hell", "▁hello",
              "or", "▁wor", "▁world", "ld", "▁x", "\n", "\n\n", "  ", "   "]  # fmt: skip
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3] * len(specials) + [6] * 256 + [4 if p.isspace() else 1 for p in pieces]
    return {
        "general.architecture": architecture,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": tokens.index("<s>" if architecture == "llama" else "<bos>"),
        "tokenizer.ggml.eos_token_id": tokens.index("</s>" if architecture == "llama" else "<eos>"),
        "tokenizer.ggml.unknown_token_id": tokens.index("<unk>"),
    }


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_sentencepiece_matches_transformers_builder(architecture):
    from transformers.integrations.gguf import convert_gguf_tokenizer

    metadata = sentencepiece_metadata(architecture)
    tokenizer_dict = {
        "tokenizer_type": "llama",
        "tokens": metadata["tokenizer.ggml.tokens"],
        "scores": metadata["tokenizer.ggml.scores"],
        "token_type": metadata["tokenizer.ggml.token_type"],
    }
    reference, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    ours = Tokenizer.from_gguf_metadata(metadata)
    assert ours.add_bos  # the default for a SentencePiece GGUF, as llama.cpp
    texts = ["hello world", " hello", "hello  world   x", "héllo wörld ñ", "\n\nhello\n"]
    for text in texts + ["<start_of_turn>hello<end_of_turn>"]:
        ids = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False) == ids, text
        assert ours.encode(text) == [ours.bos_id] + ids
        assert ours.decode(ids) == reference.decode(ids), text
        assert streamed(ours, ids) == ours.decode(ids)


# ---- errors -----------------------------------------------------------------------------------------


def test_no_chat_template_is_a_clear_error():
    tok = Tokenizer.from_gguf_metadata(sentencepiece_metadata("llama"))
    assert not tok.has_chat_template
    with pytest.raises(PocketLMError, match="no chat template.*raw prompt"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_errors_are_pocketlm_errors(smollm2):
    tok = Tokenizer(smollm2.backend, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(PocketLMError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_unsupported_gguf_tokenizers_are_refused():
    metadata = sentencepiece_metadata("llama")
    with pytest.raises(PocketLMError, match="'bert'"):
        Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.model": "bert"})
    with pytest.raises(PocketLMError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"})
    gpt2 = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"]}
    gpt2["tokenizer.ggml.merges"] = ["a b"]
    assert Tokenizer.from_gguf_metadata(gpt2).encode("abba") == [2, 1, 0]
    with pytest.raises(PocketLMError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_metadata({**gpt2, "tokenizer.ggml.pre": "mystery"})


def test_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(PocketLMError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ---- the real models against transformers: slow -----------------------------------------------------


@pytest.mark.slow
def test_metadata_reader_matches_gguf_reader():
    from gguf import GGUFReader

    path = smollm2_path()
    fields = GGUFReader(path).fields.items()
    reference = {name: field.contents() for name, field in fields if not name.startswith("GGUF.")}  # GGUF.*: header
    assert read_gguf_metadata(path) == reference


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    reference = transformers_from_gguf(smollm2_path())
    for text in TEXTS:
        assert smollm2.encode(text) == reference.encode(text), text
        ids = reference.encode(text)
        assert smollm2.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    chats = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Ünïcode 😀?"}],
    ]  # fmt: skip
    for chat in chats:
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
            assert smollm2.apply_chat_template(chat, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.slow
def test_gemma3_matches_transformers(gemma):
    reference = transformers_from_gguf(gemma3_path())
    for text in TEXTS:
        assert gemma.encode(text) == reference.encode(text), text
        ids = reference.encode(text)
        assert gemma.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert gemma.decode(gemma.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


@pytest.mark.slow
def test_gemma3_special_ids_stop_ids_and_no_template(gemma):
    assert (gemma.vocab_size, gemma.bos_id, gemma.eos_id, gemma.pad_id, gemma.add_bos) == (262144, 2, 1, 0, True)
    assert gemma.stop_ids == {gemma.token_to_id("<eos>"), gemma.token_to_id("<end_of_turn>")}
    assert gemma.encode("<start_of_turn>user") == [2, 105, 2364]
    assert len(gemma.byte_fallback_ids) == 256
    assert not gemma.has_chat_template  # the base model
    with pytest.raises(PocketLMError, match="no chat template"):
        gemma.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_gemma3_streaming_equals_decode(gemma):
    for text in TEXTS:
        ids = gemma.encode(text)
        for skip in (True, False):
            assert streamed(gemma, ids, skip) == gemma.decode(ids, skip_special_tokens=skip), text
    rng = random.Random(0)
    for _ in range(200):  # byte tokens that make invalid UTF-8, specials between them
        ids = random_ids(gemma, rng, rng.randint(1, 30))
        for skip in (True, False):
            assert streamed(gemma, ids, skip) == gemma.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.slow
def test_gemma3_save_round_trip(gemma, tmp_path):
    gemma.save(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == gemma.encode(text), text
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (2, 1, 0, True)
    assert again.stop_ids == gemma.stop_ids
