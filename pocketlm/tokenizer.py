"""Text <-> token ids: encode/decode, the chat template, every end token, and a streaming decoder.

The tokenizing itself is Hugging Face's `tokenizers` (Rust). This module builds that tokenizer from
what a model ships -- the `tokenizer.ggml.*` metadata of a GGUF file, or a Hugging Face folder's
tokenizer.json -- and mirrors how transformers builds it, so both give the same ids:
transformers/integrations/gguf/gguf_tokenizer_mapping.py (GGUF), tokenization_utils_tokenizers.py
(folders), utils/chat_template_utils.py (chat templates). On top it adds what generation needs:
BOS, the set of ids that end a reply, and text that streams out token by token.

    tok = Tokenizer.from_gguf_metadata(metadata)     # or Tokenizer.from_hf_dir(folder)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]), add_special_tokens=False)
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from pocketlm.errors import PocketLMError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# How a reply ends, across model families. A token only counts when the vocabulary has it as a
# special token: "</s>" spelled in a plain-text vocabulary is just text.
_END_TOKENS = (
    "<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
    "<|end|>", "<|return|>", "</s>", "<eos>",
)

# Split regexes for byte-level vocabularies, by the GGUF's tokenizer.ggml.pre: text is cut the way the
# merges were learned. Copied from transformers' GGUF_PRE_TOKENIZER_SPLITS and llama.cpp's
# llm_tokenizer_bpe (src/llama-vocab.cpp); the plain GPT-2 regex is ByteLevel's own (use_regex=True).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = {"default", "gpt2", "mpt", "olmo", "jais"}
# StarCoder's tokenizer (SmolLM's too) puts every digit on its own before the GPT-2 regex. transformers
# does not know "smollm" and falls back to plain GPT-2; llama.cpp and SmolLM2's own tokenizer.json split
# digits. SmolLM2 has no multi-digit merges, so both give the same ids on it.
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell"}
_SPLIT_PRE = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}

def is_gemma_architecture(arch: str | None) -> bool:
    """Whether a GGUF's SentencePiece vocabulary needs transformers' gemma_tokenizer fixes (see _sentencepiece_bpe):
    llama.cpp's Gemma architectures are all named gemma* (gemma, gemma2, gemma3, ...)."""
    return isinstance(arch, str) and arch.startswith("gemma")


class Tokenizer:
    """A `tokenizers.Tokenizer` (`.backend`) plus the model's special ids, end tokens and chat template."""

    def __init__(
        self,
        backend: Backend,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: tuple[int | None, ...] | list[int | None] = (),
    ):
        self.backend = backend
        n = backend.get_vocab_size(with_added_tokens=True)

        def valid(i):  # ids come from a file: drop one that is no token
            return i if isinstance(i, int) and 0 <= i < n else None

        self.bos_id, self.eos_id = valid(bos_id), valid(eos_id)
        self.pad_id, self.unk_id = valid(pad_id), valid(unk_id)
        # BOS/EOS are added here rather than by a TemplateProcessing post-processor, whose string form
        # cannot hold a token spelled with ":" or a space.
        self.add_bos, self.add_eos = add_bos and self.bos_id is not None, add_eos and self.eos_id is not None
        self.chat_template = chat_template or None
        special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        self.special_ids = frozenset(special)
        # "<0x41>"-style tokens of a SentencePiece vocabulary: StreamDecoder must see a run of them whole
        byte_fallback = getattr(backend.model, "byte_fallback", False)
        byte_ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256)) if byte_fallback else ()
        self.byte_fallback_ids = frozenset(i for i in byte_ids if i is not None)
        ends = {backend.token_to_id(t) for t in _END_TOKENS} & special
        self.stop_ids: set[int] = {i for i in (self.eos_id, *map(valid, extra_stop_ids), *ends) if i is not None}

    # --- building ---------------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: dict) -> Tokenizer:
        """From a GGUF file's metadata, decoded to Python values (strings, ints, lists)."""
        get = metadata.get
        kind, tokens = get("tokenizer.ggml.model"), get("tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise PocketLMError("the GGUF file has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens)")
        if kind == "gpt2":
            backend, vocab = _byte_level_bpe(tokens, get("tokenizer.ggml.merges") or [], get("tokenizer.ggml.pre"))
            add_bos_default = False
        elif kind == "llama":
            backend, vocab = _sentencepiece_bpe(metadata, tokens)
            add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        else:
            raise PocketLMError(
                f"the GGUF tokenizer is {kind!r}; pocketlm reads 'gpt2' (byte-level BPE) "
                "and 'llama' (SentencePiece BPE)"
            )
        token_types = get("tokenizer.ggml.token_type") or ()
        _add_gguf_special_tokens(backend, tokens, token_types, vocab, byte_level=kind == "gpt2")
        return cls(
            backend,
            bos_id=get("tokenizer.ggml.bos_token_id"),
            eos_id=get("tokenizer.ggml.eos_token_id"),
            pad_id=get("tokenizer.ggml.padding_token_id"),
            unk_id=get("tokenizer.ggml.unknown_token_id"),
            add_bos=bool(get("tokenizer.ggml.add_bos_token", add_bos_default)),
            add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
            chat_template=get("tokenizer.chat_template"),
            extra_stop_ids=(get("tokenizer.ggml.eot_token_id"), get("tokenizer.ggml.eom_token_id")),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """From a Hugging Face folder: tokenizer.json, tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja, generation_config.json and config.json (each optional but the first)."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise PocketLMError(
                f"{folder}: no tokenizer.json (pocketlm reads the `tokenizers` file, not vocab.txt or .model files)"
            )
        try:
            backend = Backend.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise PocketLMError(f"{folder / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
        # A saved tokenizer.json may pin padding/truncation (MiniLM's pads to 128): the engine owns lengths.
        backend.no_padding()
        backend.no_truncation()

        config = _read_json(folder / "tokenizer_config.json")
        special = {**_read_json(folder / "special_tokens_map.json"), **config}
        model_config = _read_json(folder / "config.json")
        generation = _read_json(folder / "generation_config.json")

        def token_id(name: str) -> int | None:
            text = _token_text(special.get(f"{name}_token"))
            found = backend.token_to_id(text) if text is not None else None
            if found is None:  # fall back to the model's config, first id if it lists several
                value = generation.get(f"{name}_token_id", model_config.get(f"{name}_token_id"))
                found = value[0] if isinstance(value, list) and value else value
            return found if isinstance(found, int) else None

        # transformers rebuilds the post-processor from explicit add_bos_token/add_eos_token; so do we
        # (as flags applied in encode), and otherwise keep tokenizer.json's own (BERT's [CLS] ... [SEP]).
        explicit = "add_bos_token" in config or "add_eos_token" in config
        if explicit:
            backend.post_processor = None
        eos_ids = generation.get("eos_token_id", model_config.get("eos_token_id"))
        return cls(
            backend,
            bos_id=token_id("bos"),
            eos_id=token_id("eos"),
            pad_id=token_id("pad"),
            unk_id=token_id("unk"),
            add_bos=explicit and bool(config.get("add_bos_token", False)),
            add_eos=explicit and bool(config.get("add_eos_token", False)),
            chat_template=_read_chat_template(folder, config),
            extra_stop_ids=eos_ids if isinstance(eos_ids, list) else (eos_ids,),
        )

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json so that
        `from_hf_dir(folder)` (or transformers' AutoTokenizer) gives back this tokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = json.loads(self.backend.to_str())
        merges = data["model"].get("merges") or []
        if merges and not any(" " in a or " " in b for a, b in merges):
            # tokenizers reads merges written as "a b" strings much faster than as [a, b] pairs (Gemma's
            # 515k: 1.3 s instead of 2.2 s per load); the pair form is only needed for tokens with a space.
            data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
        if self.add_bos or self.add_eos:
            # For other readers of the folder (transformers ignored add_bos_token here); from_hf_dir
            # drops it again in favour of the flags in tokenizer_config.json.
            data["post_processor"] = self._bos_eos_template()
        (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        # Flags only where they decide: explicit flags make from_hf_dir drop tokenizer.json's post-processor,
        # which is what adds BERT's [CLS] ... [SEP] (or Llama 3's BOS) when this tokenizer was read with it.
        own = self.backend.post_processor is not None and not (self.add_bos or self.add_eos)
        config = {
            # the class that uses tokenizer.json as it is, rather than rebuilding it from the vocabulary
            "tokenizer_class": "PreTrainedTokenizerFast",
            **({} if own else {"add_bos_token": self.add_bos, "add_eos_token": self.add_eos}),
            **{f"{name}_token": text for name, text in self.special_tokens().items()},
            "chat_template": self.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        generation = {"bos_token_id": self.bos_id, "eos_token_id": sorted(self.stop_ids), "pad_token_id": self.pad_id}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))

    def _bos_eos_template(self) -> dict:
        """A TemplateProcessing post-processor in tokenizer.json's form, which holds any token spelling."""
        bos = self.backend.id_to_token(self.bos_id) if self.add_bos else None
        eos = self.backend.id_to_token(self.eos_id) if self.add_eos else None

        def sequence(name: str, type_id: int) -> list[dict]:
            pieces = [{"Sequence": {"id": name, "type_id": type_id}}]
            if bos:
                pieces.insert(0, {"SpecialToken": {"id": bos, "type_id": type_id}})
            if eos:
                pieces.append({"SpecialToken": {"id": eos, "type_id": type_id}})
            return pieces

        used = [(t, i) for t, i in ((bos, self.bos_id), (eos, self.eos_id)) if t]
        return {
            "type": "TemplateProcessing",
            "single": sequence("A", 0),
            "pair": sequence("A", 0) + sequence("B", 1),
            "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in used},
        }

    # --- using ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their single ids;
        `add_special_tokens` adds BOS/EOS where the model wants them."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            # Unlike transformers, no second BOS when the text already starts with it: llama.cpp warns
            # about that double BOS because it hurts generation.
            if self.add_bos and (not ids or ids[0] != self.bos_id):
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def same_vocabulary(self, other: Tokenizer) -> bool:
        """The same token for every id: what a draft model or a distilled student must share with its target.
        (A GGUF's tokenizer rebuilt here and the HF tokenizer.json of the same model compare equal.)"""
        return self.backend.get_vocab(with_added_tokens=True) == other.backend.get_vocab(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def special_tokens(self) -> dict[str, str]:
        """{"bos": "<s>", ...} for the special ids this model has: the chat template's bos_token etc."""
        named = {"bos": self.bos_id, "eos": self.eos_id, "unk": self.unk_id, "pad": self.pad_id}
        return {name: self.backend.id_to_token(i) for name, i in named.items() if i is not None}

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as the prompt text the model was trained on, rendered like transformers'
        apply_chat_template (tokenize=False). Encode the result with add_special_tokens=False: the
        template writes BOS itself where the model wants one."""
        if self.chat_template is None:
            raise PocketLMError(
                "this model has no chat template (it is probably a base model, not a chat model): "
                "give it a raw prompt to continue instead"
            )
        # transformers drops None values: a template would render content=None as "None"
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {
            **{f"{name}_token": text for name, text in self.special_tokens().items()},
            "tools": None,
            "documents": None,
            **kwargs,
        }
        import jinja2  # imported here: only chat needs it, not every start of the CLI

        try:
            template = _compile_chat_template(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:  # raise_exception() in a template, or a broken template
            raise PocketLMError(f"the model's chat template refused these messages: {e}") from None


# --- GGUF -> tokenizers ---------------------------------------------------------------------------


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> tuple[Backend, dict[str, int]]:
    """GPT-2 style byte-level BPE: merges from the file, split regex from tokenizer.ggml.pre.
    Mirrors transformers' byte_level_tokenizer + GPT2Tokenizer + set_split_regex."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token outside the byte alphabet (a mislabelled special token, say) is respelled into it, as transformers does.
    vocab = {
        t if alphabet.issuperset(t) else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="")
    backend = Backend(bpe)
    pre = pre or "default"
    if pre in _GPT2_PRE:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _DIGITS_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # like llama.cpp, refuse rather than cut text differently from how the model was trained
        known = sorted(_GPT2_PRE | _DIGITS_PRE | set(_SPLIT_PRE))
        raise PocketLMError(f"the GGUF tokenizer's pre-tokenizer {pre!r} is not supported; known: {', '.join(known)}")
    backend.decoder = decoders.ByteLevel()
    return backend, vocab


def _sentencepiece_bpe(metadata: dict, tokens: list[str]) -> tuple[Backend, dict[str, int]]:
    """SentencePiece BPE: "▁" for spaces, byte fallback for the rest, merges rebuilt from the vocabulary.
    Mirrors transformers' sentencepiece_tokenizer/gemma_tokenizer + LlamaTokenizer/GemmaTokenizer."""
    gemma = is_gemma_architecture(metadata.get("general.architecture"))
    if gemma:
        # Gemma stores its tokens of 2+ spaces as real spaces; its text has "▁" there after the normalizer.
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        # Gemma's scores do not follow its merge order, its token order does (transformers' gemma_tokenizer).
        ranks = range(0, -len(tokens), -1)
    else:
        ranks = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if metadata.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_vocab(tokens, ranks, vocab)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = Backend(bpe)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        # GemmaTokenizer also has a Split(" ") pre-tokenizer; after this normalizer there is no " " left to split on.
        backend.normalizer = normalizers.Replace(" ", "\u2581")
    else:
        # LlamaTokenizer (legacy=False): "▁" before the first word only; llama.cpp reads the same switch
        prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend, vocab


def _merges_from_vocab(tokens: list[str], ranks, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two vocabulary tokens, best first: the merges a SentencePiece BPE
    vocabulary implies (it applies whichever adjacent pair makes the best-ranked token).

    The same list, in the same order, as transformers' generate_merges(vocab, dict(zip(tokens, ranks)))
    (tokenization_utils_base.py): by (rank, left length, right length), highest first, ties in
    vocabulary order. Gemma's ranks fall strictly down the vocabulary, so the splits come out already
    in that order and the sort is skipped: its 515k merges take about half the time of generate_merges.
    """
    by_word = dict(zip(tokens, ranks))  # a duplicated token: first position, last rank, as transformers' dicts
    merges = []
    for word in by_word:
        for cut in range(len(word) - 1, 0, -1):  # longer left part first
            left = word[:cut]
            if left in vocab:
                right = word[cut:]
                if right in vocab:
                    merges.append((left, right))
    ordered = list(by_word.values())
    if any(a <= b for a, b in zip(ordered, ordered[1:])):
        # a merge's rank is its word's, and left + right is the word; list.sort is stable
        merges.sort(key=lambda m: (by_word[m[0] + m[1]], len(m[0]), len(m[1])), reverse=True)
    return merges


def _add_gguf_special_tokens(backend: Backend, tokens, token_types, vocab: dict[str, int], byte_level: bool) -> None:
    """Control tokens (`<|im_start|>`, `<start_of_turn>`) become special tokens and user-defined ones
    (Gemma's "\\n\\n", `<think>`) plain added tokens, so the text holding them encodes each as one id,
    as llama.cpp matches them. Mirrors transformers' add_gguf_special_tokens: in a byte-level vocabulary
    a "control" token spelled outside the byte alphabet is a llama.cpp mislabel and is left alone."""
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    control, user = [], []
    for token, kind in zip(tokens, token_types):
        if kind == _CONTROL and token and (alphabet is None or alphabet.issuperset(token)):
            control.append(AddedToken(token, normalized=False, special=True))
        elif kind == _USER_DEFINED and token in vocab:
            user.append(AddedToken(token, normalized=False, special=False))
    backend.add_special_tokens(control)
    backend.add_tokens(user)


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py, transformers' bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# --- Hugging Face folders -------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise PocketLMError(f"{path}: not valid JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja (newer transformers saves it there), else tokenizer_config.json's, else
    chat_template.json's. A list of named templates gives its "default" one."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template") or _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) else None


# --- chat templates -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _compile_chat_template(source: str):
    """The environment transformers renders chat templates in (_cached_compile_jinja_template): sandboxed,
    trim_blocks/lstrip_blocks, loop controls, raise_exception, strftime_now, a tojson that keeps non-ASCII."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks the assistant's text for training masks;
        # rendering just keeps the text (transformers' AssistantTracker, with tracking off).
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# --- streaming ------------------------------------------------------------------------------------


class StreamDecoder:
    """Token ids in, printable text out, one token at a time: "".join(pushes) + flush() == decode(ids).

    Decoding one token alone is wrong in two ways: a character split over byte tokens decodes to
    U+FFFD until its last byte arrives, and SentencePiece decoders drop the leading space of the first
    token they see. So each push decodes a short window of earlier tokens with and without the new one
    and returns the difference, holding back text that ends in U+FFFD -- the scheme of vLLM's
    detokenize_incrementally and HF TextStreamer.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here: one step of context before the unprinted tokens
        self._read = 0  # tokens before this are printed
        self._prefix_text = ""  # decode(ids[prefix:read])
        self._in_byte_run = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self._ids.append(token_id)
        # tokenizers' ByteFallback decodes a run of "<0xNN>" tokens as one: if the run is not valid
        # UTF-8, every byte in it becomes U+FFFD, even ones already printed as text. So a run is only
        # printed once a token that is not a byte ends it (a skipped special token does not).
        if token_id in self._tokenizer.byte_fallback_ids:
            self._in_byte_run = True
        elif not (self._skip and token_id in self._tokenizer.special_ids):
            self._in_byte_run = False
        if self._in_byte_run:
            return ""
        text = self._decode(self._ids[self._prefix :])
        # Nothing new yet (a skipped special token) or a character still incomplete: print nothing,
        # and keep the window where it is so the text can change once more tokens arrive.
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end decodes to U+FFFD, as decode does)."""
        self._in_byte_run = False
        if self._read == len(self._ids):
            return ""
        text = self._decode(self._ids[self._prefix :])
        return self._advance(text) if len(text) > len(self._prefix_text) else ""

    def _advance(self, text: str) -> str:
        new = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        return new
