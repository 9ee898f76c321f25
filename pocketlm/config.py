"""Model configs: plain dataclasses read from and written to Hugging Face `config.json` dicts.

No torch here: configs are data, so the registry, the CLI and the GGUF writer can read them without
paying for a torch import. Derived values (head_dim, n_kv_heads, per-layer attention types, biases)
are filled in `__post_init__`, so a config built by hand and one read from `config.json` agree.

    cfg = config_from_hf(json.load(open("config.json")))   # the family's config (pocketlm/families.py)
    json.dump(cfg.to_hf(), open("config.json", "w"))        # loads back in transformers

`from_hf` reads both RoPE spellings found on the Hub: the classic `rope_theta` + `rope_scaling` keys
(transformers 4) and transformers 5's `rope_parameters`, which Gemma 3 nests per layer type. `to_hf`
writes both, so transformers 4 and 5 (and tools that read either) load the file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pocketlm.errors import PocketLMError
from pocketlm.families import family

FULL = "full_attention"
SLIDING = "sliding_attention"

# RoPE variants the models implement (pocketlm.models.llama.rope_inv_freq); others are refused up front.
ROPE_TYPES = ("default", "linear", "llama3")


def _rope_scaling(d: dict | None, max_position_embeddings: int) -> dict | None:
    """Normalize one RoPE dict ({"rope_type"|"type": ..., factor, ...}) to `None` (plain RoPE) or a scaling dict.

    Mirrors transformers' `standardize_rope_params`: the old key "type" means "rope_type", and llama3
    scaling falls back to max_position_embeddings when original_max_position_embeddings is absent.
    """
    if not d:
        return None
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise PocketLMError(
            f"RoPE scaling type {rope_type!r} is not supported; pocketlm supports {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None
    out = {k: v for k, v in d.items() if k not in ("type", "rope_type", "rope_theta")}
    out = {"rope_type": rope_type, **out}
    if rope_type == "llama3":
        out.setdefault("original_max_position_embeddings", max_position_embeddings)
    return out


def _rope_parameters(theta: float, scaling: dict | None) -> dict:
    """The transformers-5 `rope_parameters` dict for one RoPE (the inverse of `_rope_scaling`)."""
    return {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}


def _require(d: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise PocketLMError(f"config.json ({d.get('model_type')}) lacks required keys: {', '.join(missing)}")


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


@dataclass
class LlamaConfig:
    """Llama-family decoder: Llama 2/3/3.2, TinyLlama, SmolLM2 (model_type llama), Mistral, Qwen2.

    The three differ only in biases and sliding-window attention, so one dataclass covers them;
    `model_type` says which HF class the weights came from and which config.json `to_hf` writes.
    """

    # transformers' defaults where config.json leaves a key out; they differ per model_type
    # (configuration_llama.py / configuration_mistral.py / configuration_qwen2.py).
    DEFAULTS: ClassVar[dict[str, dict]] = {
        "llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, sliding_window=None),
        "mistral": dict(max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                        sliding_window=4096, num_key_value_heads=8),
        "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                      sliding_window=4096, num_key_value_heads=32, max_window_layers=28),
    }
    ARCHITECTURES: ClassVar[dict[str, str]] = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096  # HF hidden_size
    n_layers: int = 32  # HF num_hidden_layers
    n_heads: int = 32  # HF num_attention_heads
    n_kv_heads: int | None = None  # HF num_key_value_heads; None -> n_heads (no GQA)
    head_dim: int | None = None  # None -> dim // n_heads
    intermediate_size: int = 11008
    hidden_act: str = "silu"
    norm_eps: float = 1e-6  # HF rms_norm_eps
    rope_theta: float = 10000.0
    # None = plain RoPE; else {"rope_type": "linear", "factor": f} or
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama: bias on q/k/v/o together (Qwen2 sets its own, see __post_init__)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: every layer; Qwen2: layers >= max_window_layers
    max_window_layers: int | None = None  # Qwen2 only
    layer_types: list[str] | None = None  # per layer FULL or SLIDING; None -> derived
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    dtype: str | None = None  # the dtype the checkpoint was saved in ("bfloat16"), informational

    # derived in __post_init__
    qkv_bias: bool = field(init=False)
    o_bias: bool = field(init=False)

    def __post_init__(self):
        if self.model_type not in self.ARCHITECTURES:
            raise PocketLMError(f"LlamaConfig does not cover model_type {self.model_type!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise PocketLMError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.hidden_act != "silu":
            raise PocketLMError(f"hidden_act {self.hidden_act!r} is not supported for {self.model_type} (only silu)")
        self.rope_scaling = _rope_scaling(self.rope_scaling, self.max_position_embeddings)
        # Qwen2Attention hard-codes bias=True on q/k/v and bias=False on o_proj (modeling_qwen2.py);
        # LlamaAttention puts config.attention_bias on all four; Mistral has no biases.
        self.qkv_bias = self.model_type == "qwen2" or self.attention_bias
        self.o_bias = self.model_type == "llama" and self.attention_bias
        if self.layer_types is None:
            if self.sliding_window is None:
                self.layer_types = [FULL] * self.n_layers
            elif self.model_type == "qwen2":  # Qwen2Config.__post_init__
                first = self.max_window_layers if self.max_window_layers is not None else 0
                self.layer_types = [SLIDING if i >= first else FULL for i in range(self.n_layers)]
            else:
                self.layer_types = [SLIDING] * self.n_layers
        if len(self.layer_types) != self.n_layers:
            raise PocketLMError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")

    @property
    def hidden_size(self) -> int:
        return self.dim

    def window(self, layer_idx: int) -> int | None:
        """The sliding window of one layer, or None for full causal attention."""
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING else None

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        model_type = d.get("model_type", "llama")
        if model_type not in cls.ARCHITECTURES:
            raise PocketLMError(f"LlamaConfig does not cover model_type {model_type!r}")
        _require(d, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        dflt = cls.DEFAULTS[model_type]

        def get(key):
            return d.get(key, dflt.get(key))

        max_pos = get("max_position_embeddings")
        # transformers 5 writes rope_parameters (theta inside); transformers 4 writes rope_theta + rope_scaling.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))

        sliding_window = get("sliding_window")
        layer_types = None
        if model_type == "qwen2":
            # Qwen2Config drops the window unless use_sliding_window; then only layers >= max_window_layers slide.
            if not d.get("use_sliding_window", False):
                sliding_window = None
            layer_types = d.get("layer_types")
        dtype = d.get("dtype", d.get("torch_dtype"))
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads", dflt.get("num_key_value_heads")),
            head_dim=d.get("head_dim"),
            intermediate_size=d["intermediate_size"],
            hidden_act=d.get("hidden_act", "silu"),
            norm_eps=get("rms_norm_eps"),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=max_pos,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False) if model_type == "llama" else False,
            mlp_bias=d.get("mlp_bias", False) if model_type == "llama" else False,
            sliding_window=sliding_window,
            max_window_layers=get("max_window_layers") if model_type == "qwen2" else None,
            layer_types=layer_types,
            bos_token_id=get("bos_token_id"),
            eos_token_id=get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            dtype=dtype if isinstance(dtype, str) else None,
        )

    def to_hf(self) -> dict[str, Any]:
        d = {
            "architectures": [self.ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": _rope_parameters(self.rope_theta, self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        }
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window  # written even when None: HF's default is 4096
        elif self.model_type == "qwen2":
            d.update(
                use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window,
                max_window_layers=self.max_window_layers if self.max_window_layers is not None else self.n_layers,
                layer_types=list(self.layer_types),
            )
        keep_none = {"sliding_window", "bos_token_id", "eos_token_id"}
        # deep copy: transformers edits the rope dicts it is given in place
        return copy.deepcopy({k: v for k, v in d.items() if v is not None or k in keep_none})


@dataclass
class Gemma3Config:
    """Gemma 3 text decoder (transformers' Gemma3TextConfig / Gemma3ForCausalLM), e.g. Gemma 3 270M / 1B.

    Local (sliding-window) and global layers interleave per `layer_types`; each kind has its own RoPE:
    local layers use `rope_local_base_freq`, global layers `rope_theta` with `rope_scaling`.
    """

    model_type: str = "gemma3_text"
    vocab_size: int = 262_208
    dim: int = 2304
    n_layers: int = 26
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 256
    intermediate_size: int = 9216
    hidden_act: str = "gelu_pytorch_tanh"
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global (full_attention) layers
    rope_scaling: dict | None = None  # global layers only, as in HF (Gemma 3 4B+: linear, factor 8)
    rope_local_base_freq: float = 10_000.0  # sliding_attention layers
    rope_local_scaling: dict | None = None  # transformers 5 allows it; released checkpoints leave it None
    max_position_embeddings: int = 131_072
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    sliding_window_pattern: int = 6  # every 6th layer global; only used when layer_types is None
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    dtype: str | None = None

    def __post_init__(self):
        self.model_type = "gemma3_text"  # a multimodal "gemma3" config is read down to its text part
        if self.n_heads % self.n_kv_heads:
            raise PocketLMError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.hidden_act != "gelu_pytorch_tanh":
            raise PocketLMError(f"hidden_act {self.hidden_act!r} is not supported for Gemma 3 (gelu_pytorch_tanh)")
        self.rope_scaling = _rope_scaling(self.rope_scaling, self.max_position_embeddings)
        self.rope_local_scaling = _rope_scaling(self.rope_local_scaling, self.max_position_embeddings)
        if self.layer_types is None:  # Gemma3TextConfig.__post_init__: layer i is global when (i + 1) % pattern == 0
            p = self.sliding_window_pattern
            self.layer_types = [SLIDING if (i + 1) % p else FULL for i in range(self.n_layers)]
        if len(self.layer_types) != self.n_layers:
            raise PocketLMError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")

    @property
    def hidden_size(self) -> int:
        return self.dim

    def window(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING else None

    @classmethod
    def from_hf(cls, d: dict) -> "Gemma3Config":
        if d.get("model_type") == "gemma3":  # Gemma3ForConditionalGeneration: the language model's config
            text = dict(d.get("text_config") or {})
            text.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", True))
            text.setdefault("dtype", d.get("dtype", d.get("torch_dtype")))
            d = text
        _require(d, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        if d.get("use_bidirectional_attention"):
            raise PocketLMError("Gemma 3 with use_bidirectional_attention (an embedding model) is not supported")
        # transformers 5: {"full_attention": {...}, "sliding_attention": {...}}; a flat dict applies to
        # global layers. transformers 4: rope_theta, rope_local_base_freq, rope_scaling (global layers only).
        rope = d.get("rope_parameters") or {}
        if FULL in rope or SLIDING in rope:
            full, local = rope.get(FULL) or {}, rope.get(SLIDING) or {}
        else:
            full, local = rope or d.get("rope_scaling") or {}, {}
        max_pos = d.get("max_position_embeddings", 131_072)
        dtype = d.get("dtype", d.get("torch_dtype"))
        return cls(
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads", 4),
            head_dim=d.get("head_dim", 256),
            intermediate_size=d.get("intermediate_size", 9216),
            hidden_act=d.get("hidden_activation", "gelu_pytorch_tanh"),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=full.get("rope_theta", d.get("rope_theta", 1_000_000.0)),
            rope_scaling=full,
            rope_local_base_freq=local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0)),
            rope_local_scaling=local,
            max_position_embeddings=max_pos,
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            attention_bias=d.get("attention_bias", False),
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
            sliding_window=d.get("sliding_window", 4096),
            sliding_window_pattern=d.get("sliding_window_pattern", 6),
            layer_types=d.get("layer_types"),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            attn_logit_softcapping=d.get("attn_logit_softcapping"),
            bos_token_id=d.get("bos_token_id", 2),
            eos_token_id=d.get("eos_token_id", 1),
            pad_token_id=d.get("pad_token_id", 0),
            dtype=dtype if isinstance(dtype, str) else None,
        )

    def to_hf(self) -> dict[str, Any]:
        d = {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_activation": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_local_base_freq": self.rope_local_base_freq,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": {
                FULL: _rope_parameters(self.rope_theta, self.rope_scaling),
                SLIDING: _rope_parameters(self.rope_local_base_freq, self.rope_local_scaling),
            },
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        }
        keep_none = {"final_logit_softcapping", "attn_logit_softcapping"}
        return copy.deepcopy({k: v for k, v in d.items() if v is not None or k in keep_none})


@dataclass
class Phi3Config:
    """Phi-3 / Phi-4 mini decoder (transformers' Phi3Config / Phi3ForCausalLM): Llama's block with q/k/v and gate/up
    stored fused (qkv_proj, gate_up_proj), RoPE on the first partial_rotary_factor of each head (Phi-4 mini: 0.75),
    and an optional sliding window on every layer. LongRoPE scaling (the 128k-context releases) is refused."""

    model_type: str = "phi3"
    vocab_size: int = 32064
    dim: int = 3072
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None  # None -> dim // n_heads (Phi3Attention reads config.head_dim when set)
    intermediate_size: int = 8192
    hidden_act: str = "silu"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000
    dtype: str | None = None

    # derived in __post_init__
    rotary_dim: int = field(init=False)  # the leading dims of each head that RoPE turns
    layer_types: list[str] = field(init=False)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise PocketLMError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.hidden_act != "silu":
            raise PocketLMError(f"hidden_act {self.hidden_act!r} is not supported for phi3 (only silu)")
        self.rope_scaling = _rope_scaling(self.rope_scaling, self.max_position_embeddings)
        self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)  # as Phi3RotaryEmbedding: int(hd * f)
        if self.rotary_dim % 2:
            raise PocketLMError(f"phi3: a rotary dimension of {self.rotary_dim} is odd")
        self.layer_types = [FULL if self.sliding_window is None else SLIDING] * self.n_layers

    @property
    def hidden_size(self) -> int:
        return self.dim

    def window(self, layer_idx: int) -> int | None:
        return self.sliding_window

    @classmethod
    def from_hf(cls, d: dict) -> "Phi3Config":
        _require(d, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if rope.get("type") in ("su", "yarn"):  # Phi3Config's old names for LongRoPE
            rope["rope_type"] = "longrope"
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        dtype = d.get("dtype", d.get("torch_dtype"))
        return cls(
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            intermediate_size=d["intermediate_size"],
            hidden_act=d.get("hidden_act", "silu"),
            norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=theta,
            rope_scaling={k: v for k, v in rope.items() if k != "partial_rotary_factor"},
            partial_rotary_factor=partial,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            original_max_position_embeddings=d.get("original_max_position_embeddings", 4096),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            sliding_window=d.get("sliding_window"),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=d.get("eos_token_id", 32000),
            pad_token_id=d.get("pad_token_id", 32000),
            dtype=dtype if isinstance(dtype, str) else None,
        )

    def to_hf(self) -> dict[str, Any]:
        d = {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "partial_rotary_factor": self.partial_rotary_factor,
            "rope_parameters": {**_rope_parameters(self.rope_theta, self.rope_scaling),
                                "partial_rotary_factor": self.partial_rotary_factor},
            "tie_word_embeddings": self.tie_word_embeddings,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        }
        if self.head_dim != self.dim // self.n_heads:
            d["head_dim"] = self.head_dim
        return copy.deepcopy({k: v for k, v in d.items() if v is not None or k == "sliding_window"})


@dataclass
class GemmaConfig:
    """Gemma 1 and Gemma 2 decoders (transformers' GemmaConfig / Gemma2Config), e.g. Gemma 2B and Gemma 2 2B.

    Gemma 1 is Llama's block with Gemma's (1 + w) RMSNorm, a GELU-tanh gated MLP and the embedding scaled by
    sqrt(D) (Gemma 2B: multi-query, head_dim 256). Gemma 2 adds norms after attention and after the MLP,
    tanh soft-capping of the attention scores and of the final logits, query_pre_attn_scalar, and sliding-window
    layers alternating with global ones. One dataclass covers both; `model_type` says which.
    """

    ARCHITECTURES: ClassVar[dict[str, str]] = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}

    model_type: str = "gemma"
    vocab_size: int = 256_000
    dim: int = 2048
    n_layers: int = 18
    n_heads: int = 8
    n_kv_heads: int = 1
    head_dim: int = 256
    intermediate_size: int = 16384
    hidden_act: str = "gelu_pytorch_tanh"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float | None = None  # Gemma 2's; None (Gemma 1) -> head_dim
    sliding_window: int | None = None  # Gemma 2: the window of its sliding layers
    layer_types: list[str] | None = None  # None -> Gemma 1: all full; Gemma 2: sliding, full, sliding, ...
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    dtype: str | None = None

    # derived in __post_init__
    post_norms: bool = field(init=False)  # Gemma 2's post_attention / pre_ and post_feedforward norms

    def __post_init__(self):
        if self.model_type not in self.ARCHITECTURES:
            raise PocketLMError(f"GemmaConfig does not cover model_type {self.model_type!r}")
        if self.n_heads % self.n_kv_heads:
            raise PocketLMError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.hidden_act != "gelu_pytorch_tanh":
            raise PocketLMError(f"hidden_act {self.hidden_act!r} is not supported for {self.model_type} (gelu_pytorch_tanh)")
        self.rope_scaling = _rope_scaling(self.rope_scaling, self.max_position_embeddings)
        self.post_norms = self.model_type == "gemma2"
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = self.head_dim
        if self.layer_types is None:
            # Gemma2Config.__post_init__: layer i slides when (i + 1) % 2 (and Gemma 1 has no window)
            sliding = self.post_norms and self.sliding_window is not None
            self.layer_types = [SLIDING if sliding and (i + 1) % 2 else FULL for i in range(self.n_layers)]
        if len(self.layer_types) != self.n_layers:
            raise PocketLMError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")

    @property
    def hidden_size(self) -> int:
        return self.dim

    def window(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING else None

    @classmethod
    def from_hf(cls, d: dict) -> "GemmaConfig":
        model_type = d.get("model_type", "gemma")
        if model_type not in cls.ARCHITECTURES:
            raise PocketLMError(f"GemmaConfig does not cover model_type {model_type!r}")
        _require(d, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if d.get("use_bidirectional_attention"):
            raise PocketLMError(f"{model_type} with use_bidirectional_attention (an embedding model) is not supported")
        gemma2 = model_type == "gemma2"
        # Gemma 1's releases say hidden_act "gelu", which GemmaConfig reads as gelu_pytorch_tanh; Gemma 2 names
        # its activation hidden_activation
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if act == "gelu" and not gemma2:
            act = "gelu_pytorch_tanh"
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        dtype = d.get("dtype", d.get("torch_dtype"))
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads", 4 if gemma2 else 16),
            head_dim=d.get("head_dim", 256),
            intermediate_size=d["intermediate_size"],
            hidden_act=act,
            norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
            rope_scaling=rope,
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            attention_bias=d.get("attention_bias", False),
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256) if gemma2 else None,
            sliding_window=d.get("sliding_window", 4096) if gemma2 else None,
            layer_types=d.get("layer_types") if gemma2 else None,
            final_logit_softcapping=d.get("final_logit_softcapping", 30.0) if gemma2 else None,
            attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0) if gemma2 else None,
            bos_token_id=d.get("bos_token_id", 2),
            eos_token_id=d.get("eos_token_id", 1),
            pad_token_id=d.get("pad_token_id", 0),
            dtype=dtype if isinstance(dtype, str) else None,
        )

    def to_hf(self) -> dict[str, Any]:
        d = {
            "architectures": [self.ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": _rope_parameters(self.rope_theta, self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        }
        keep_none = set()
        if self.post_norms:  # Gemma 2's keys; None is written where HF's default differs (softcaps 30 and 50)
            d.update(hidden_activation=self.hidden_act, query_pre_attn_scalar=self.query_pre_attn_scalar,
                     sliding_window=self.sliding_window, layer_types=list(self.layer_types),
                     final_logit_softcapping=self.final_logit_softcapping,
                     attn_logit_softcapping=self.attn_logit_softcapping)  # fmt: skip
            keep_none = {"final_logit_softcapping", "attn_logit_softcapping", "sliding_window"}
        else:
            d["hidden_act"] = self.hidden_act
        return copy.deepcopy({k: v for k, v in d.items() if v is not None or k in keep_none})


@dataclass
class PhiConfig:
    """Phi-1, Phi-1.5 and Phi-2 (transformers' PhiConfig / PhiForCausalLM): attention and MLP side by side on one
    LayerNorm (with bias), RoPE on the first partial_rotary_factor of each head (Phi-2: 0.4), a GELU (tanh) MLP
    of two Linears, biases on every projection and on the head."""

    model_type: str = "phi"
    vocab_size: int = 51200
    dim: int = 2560
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    head_dim: int | None = None  # None -> dim // n_heads (PhiAttention reads config.head_dim when set: a pruned model's)
    intermediate_size: int = 10240
    hidden_act: str = "gelu_new"
    norm_eps: float = 1e-5  # HF layer_norm_eps
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 0.5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    dtype: str | None = None

    # derived in __post_init__
    rotary_dim: int = field(init=False)  # the leading dims of each head that RoPE turns
    layer_types: list[str] = field(init=False)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise PocketLMError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.hidden_act not in ("gelu_new", "gelu_pytorch_tanh"):  # both are GELU's tanh approximation
            raise PocketLMError(f"hidden_act {self.hidden_act!r} is not supported for phi (gelu_new)")
        self.rope_scaling = _rope_scaling(self.rope_scaling, self.max_position_embeddings)
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)  # PhiRotaryEmbedding: int(hd * f)
        if self.rotary_dim % 2:
            raise PocketLMError(f"phi: a rotary dimension of {self.rotary_dim} is odd")
        self.layer_types = [FULL] * self.n_layers

    @property
    def hidden_size(self) -> int:
        return self.dim

    def window(self, layer_idx: int) -> int | None:
        return None

    @classmethod
    def from_hf(cls, d: dict) -> "PhiConfig":
        _require(d, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if d.get("qk_layernorm"):
            raise PocketLMError("phi with qk_layernorm is not supported (no released Phi checkpoint uses it)")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        dtype = d.get("dtype", d.get("torch_dtype"))
        return cls(
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            intermediate_size=d["intermediate_size"],
            hidden_act=d.get("hidden_act", "gelu_new"),
            norm_eps=d.get("layer_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
            rope_scaling={k: v for k, v in rope.items() if k != "partial_rotary_factor"},
            partial_rotary_factor=rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=d.get("eos_token_id", 2),
            pad_token_id=d.get("pad_token_id"),
            dtype=dtype if isinstance(dtype, str) else None,
        )

    def to_hf(self) -> dict[str, Any]:
        d = {
            "architectures": ["PhiForCausalLM"],
            "model_type": "phi",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim if self.head_dim != self.dim // self.n_heads else None,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "partial_rotary_factor": self.partial_rotary_factor,
            "rope_parameters": {**_rope_parameters(self.rope_theta, self.rope_scaling),
                                "partial_rotary_factor": self.partial_rotary_factor},
            "qk_layernorm": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        }
        return copy.deepcopy({k: v for k, v in d.items() if v is not None})


# GPT-2 style activations (transformers' ACT2FN names): "gelu_new" and its aliases are GELU's tanh approximation
GPT_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none", "relu": "relu"}


def _gpt_activation(name: str, model_type: str) -> str:
    if name not in GPT_ACTIVATIONS:
        raise PocketLMError(
            f"activation_function {name!r} is not supported for {model_type} ({', '.join(GPT_ACTIVATIONS)})"
        )
    return name


@dataclass
class GPT2Config:
    """GPT-2 decoder (transformers' GPT2Config / GPT2LMHeadModel): learned absolute positions, pre-LayerNorm blocks
    with biases, q/k/v in one Conv1D (c_attn), a plain GELU MLP, the head tied to the embedding."""

    model_type: str = "gpt2"
    vocab_size: int = 50257
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    intermediate_size: int | None = None  # n_inner; None -> 4 * dim
    activation: str = "gelu_new"
    norm_eps: float = 1e-5
    max_position_embeddings: int = 1024
    scale_attn_weights: bool = True  # scores / sqrt(hd)
    scale_attn_by_inverse_layer_idx: bool = False  # and / (layer index + 1)
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    dtype: str | None = None

    # derived in __post_init__
    n_kv_heads: int = field(init=False)
    head_dim: int = field(init=False)
    sliding_window: int | None = field(init=False, default=None)
    layer_types: list[str] = field(init=False)

    def __post_init__(self):
        _gpt_activation(self.activation, self.model_type)
        if self.dim % self.n_heads:
            raise PocketLMError(f"hidden size {self.dim} is not a multiple of the {self.n_heads} heads")
        self.n_kv_heads, self.head_dim = self.n_heads, self.dim // self.n_heads
        self.intermediate_size = self.intermediate_size or 4 * self.dim
        self.layer_types = [FULL] * self.n_layers

    @property
    def hidden_size(self) -> int:
        return self.dim

    def window(self, layer_idx: int) -> int | None:
        return None

    @classmethod
    def from_hf(cls, d: dict) -> "GPT2Config":
        _require(d, "vocab_size", "n_embd", "n_layer", "n_head")
        if d.get("add_cross_attention"):
            raise PocketLMError("GPT-2 with cross-attention (add_cross_attention) is not supported")
        dtype = d.get("dtype", d.get("torch_dtype"))
        return cls(
            vocab_size=d["vocab_size"],
            dim=d["n_embd"],
            n_layers=d["n_layer"],
            n_heads=d["n_head"],
            intermediate_size=d.get("n_inner"),
            activation=d.get("activation_function", "gelu_new"),
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            max_position_embeddings=d.get("n_positions", 1024),
            scale_attn_weights=d.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=d.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            bos_token_id=d.get("bos_token_id", 50256),
            eos_token_id=d.get("eos_token_id", 50256),
            pad_token_id=d.get("pad_token_id"),
            dtype=dtype if isinstance(dtype, str) else None,
        )

    def to_hf(self) -> dict[str, Any]:
        return _drop_none({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_embd": self.dim,
            "n_layer": self.n_layers,
            "n_head": self.n_heads,
            "n_inner": self.intermediate_size,
            "activation_function": self.activation,
            "layer_norm_epsilon": self.norm_eps,
            "n_positions": self.max_position_embeddings,
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        })


@dataclass
class GPTNeoConfig:
    """GPT-Neo decoder (transformers' GPTNeoConfig / GPTNeoForCausalLM): GPT-2's block with separate q/k/v Linears,
    attention scores NOT scaled by 1/sqrt(hd) (GPTNeoSelfAttention._attn), and "global" (causal) layers alternating
    with "local" ones that see the last window_size positions."""

    model_type: str = "gpt_neo"
    vocab_size: int = 50257
    dim: int = 2048
    n_layers: int = 24
    n_heads: int = 16
    intermediate_size: int | None = None  # None -> 4 * dim
    activation: str = "gelu_new"
    norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    window_size: int = 256
    attention_layers: list[str] | None = None  # "global" / "local" per layer; None -> global, local, global, ...
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    dtype: str | None = None

    # derived in __post_init__
    n_kv_heads: int = field(init=False)
    head_dim: int = field(init=False)
    sliding_window: int | None = field(init=False)  # the local layers' window (None when every layer is global)
    layer_types: list[str] = field(init=False)

    def __post_init__(self):
        _gpt_activation(self.activation, self.model_type)
        if self.dim % self.n_heads:
            raise PocketLMError(f"hidden size {self.dim} is not a multiple of the {self.n_heads} heads")
        self.n_kv_heads, self.head_dim = self.n_heads, self.dim // self.n_heads
        self.intermediate_size = self.intermediate_size or 4 * self.dim
        if self.attention_layers is None:
            self.attention_layers = ["global" if i % 2 == 0 else "local" for i in range(self.n_layers)]
        if len(self.attention_layers) != self.n_layers or set(self.attention_layers) - {"global", "local"}:
            raise PocketLMError(
                f"gpt_neo: attention_layers must be {self.n_layers} entries of 'global' or 'local' "
                f"(got {self.attention_layers})"
            )
        self.layer_types = [SLIDING if t == "local" else FULL for t in self.attention_layers]
        self.sliding_window = self.window_size if SLIDING in self.layer_types else None

    @property
    def hidden_size(self) -> int:
        return self.dim

    def window(self, layer_idx: int) -> int | None:
        return self.window_size if self.layer_types[layer_idx] == SLIDING else None

    @classmethod
    def from_hf(cls, d: dict) -> "GPTNeoConfig":
        n_layers, n_heads = d.get("num_layers", d.get("num_hidden_layers")), d.get("num_heads", d.get("num_attention_heads"))
        _require(d, "vocab_size", "hidden_size")
        if n_layers is None or n_heads is None:
            raise PocketLMError("config.json (gpt_neo) lacks required keys: num_layers, num_heads")
        layers = d.get("attention_layers")
        if layers is None and d.get("attention_types"):  # GPTNeoConfig.expand_attention_types_params
            layers = [kind for kinds, repeat in d["attention_types"] for _ in range(repeat) for kind in kinds]
        dtype = d.get("dtype", d.get("torch_dtype"))
        return cls(
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=n_layers,
            n_heads=n_heads,
            intermediate_size=d.get("intermediate_size"),
            activation=d.get("activation_function", "gelu_new"),
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            window_size=d.get("window_size", 256),
            attention_layers=layers,
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            bos_token_id=d.get("bos_token_id", 50256),
            eos_token_id=d.get("eos_token_id", 50256),
            pad_token_id=d.get("pad_token_id"),
            dtype=dtype if isinstance(dtype, str) else None,
        )

    def to_hf(self) -> dict[str, Any]:
        # attention_types as runs of one kind each: GPTNeoConfig expands them back to the same attention_layers
        runs: list[list] = []
        for kind in self.attention_layers:
            if runs and runs[-1][0] == [kind]:
                runs[-1][1] += 1
            else:
                runs.append([[kind], 1])
        return _drop_none({
            "architectures": ["GPTNeoForCausalLM"],
            "model_type": "gpt_neo",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_layers": self.n_layers,
            "num_heads": self.n_heads,
            "intermediate_size": self.intermediate_size,
            "activation_function": self.activation,
            "layer_norm_epsilon": self.norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "window_size": self.window_size,
            "attention_types": runs,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        })


@dataclass
class GPTJConfig:
    """GPT-J decoder (transformers' GPTJConfig / GPTJForCausalLM): one LayerNorm feeding attention and the MLP in
    parallel, RoPE on the first rotary_dim channels of each head in GPT-J's interleaved layout (rotate_every_two),
    no position embeddings, an untied head with a bias."""

    model_type: str = "gptj"
    vocab_size: int = 50400
    dim: int = 4096
    n_layers: int = 28
    n_heads: int = 16
    rotary_dim: int | None = 64
    intermediate_size: int | None = None  # n_inner; None -> 4 * dim
    activation: str = "gelu_new"
    norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    pad_token_id: int | None = None
    dtype: str | None = None

    # derived in __post_init__
    n_kv_heads: int = field(init=False)
    head_dim: int = field(init=False)
    rope_theta: float = field(init=False, default=10000.0)  # create_sinusoidal_positions' fixed base
    sliding_window: int | None = field(init=False, default=None)
    layer_types: list[str] = field(init=False)

    def __post_init__(self):
        _gpt_activation(self.activation, self.model_type)
        if self.dim % self.n_heads:
            raise PocketLMError(f"hidden size {self.dim} is not a multiple of the {self.n_heads} heads")
        self.n_kv_heads, self.head_dim = self.n_heads, self.dim // self.n_heads
        if self.rotary_dim is None or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise PocketLMError(f"gptj: rotary_dim {self.rotary_dim} must be even and at most the head dim {self.head_dim}")
        self.intermediate_size = self.intermediate_size or 4 * self.dim
        self.layer_types = [FULL] * self.n_layers

    @property
    def hidden_size(self) -> int:
        return self.dim

    def window(self, layer_idx: int) -> int | None:
        return None

    @classmethod
    def from_hf(cls, d: dict) -> "GPTJConfig":
        _require(d, "vocab_size", "n_embd", "n_layer", "n_head")
        dtype = d.get("dtype", d.get("torch_dtype"))
        return cls(
            vocab_size=d["vocab_size"],
            dim=d["n_embd"],
            n_layers=d["n_layer"],
            n_heads=d["n_head"],
            rotary_dim=d.get("rotary_dim", 64),
            intermediate_size=d.get("n_inner"),
            activation=d.get("activation_function", "gelu_new"),
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            max_position_embeddings=d.get("n_positions", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id", 50256),
            eos_token_id=d.get("eos_token_id", 50256),
            pad_token_id=d.get("pad_token_id"),
            dtype=dtype if isinstance(dtype, str) else None,
        )

    def to_hf(self) -> dict[str, Any]:
        return _drop_none({
            "architectures": ["GPTJForCausalLM"],
            "model_type": "gptj",
            "vocab_size": self.vocab_size,
            "n_embd": self.dim,
            "n_layer": self.n_layers,
            "n_head": self.n_heads,
            "rotary_dim": self.rotary_dim,
            "n_inner": self.intermediate_size,
            "activation_function": self.activation,
            "layer_norm_epsilon": self.norm_eps,
            "n_positions": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        })


@dataclass
class BertConfig:
    """BERT encoder (transformers' BertModel), e.g. sentence-transformers all-MiniLM-L6-v2."""

    model_type: str = "bert"
    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12  # HF layer_norm_eps
    pad_token_id: int | None = 0
    dtype: str | None = None

    # derived in __post_init__
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise PocketLMError(f"hidden size {self.dim} is not a multiple of the {self.n_heads} heads")
        if self.hidden_act not in ("gelu", "relu"):
            raise PocketLMError(f"hidden_act {self.hidden_act!r} is not supported for BERT (gelu, relu)")
        self.head_dim = self.dim // self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.dim

    @classmethod
    def from_hf(cls, d: dict) -> "BertConfig":
        _require(d, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise PocketLMError(f"BERT position_embedding_type {d['position_embedding_type']!r} is not supported")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise PocketLMError("BERT as a decoder (is_decoder / add_cross_attention) is not supported")
        dtype = d.get("dtype", d.get("torch_dtype"))
        return cls(
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            hidden_act=d.get("hidden_act", "gelu"),
            max_position_embeddings=d.get("max_position_embeddings", 512),
            type_vocab_size=d.get("type_vocab_size", 2),
            norm_eps=d.get("layer_norm_eps", 1e-12),
            pad_token_id=d.get("pad_token_id", 0),
            dtype=dtype if isinstance(dtype, str) else None,
        )

    def to_hf(self) -> dict[str, Any]:
        return _drop_none({
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.norm_eps,
            "position_embedding_type": "absolute",
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        })


def _encoder_act(family_name: str, act: str) -> str:
    if act not in ("gelu", "relu"):
        raise PocketLMError(f"activation {act!r} is not supported for {family_name} (gelu, relu)")
    return act


@dataclass
class DistilBertConfig:
    """DistilBERT encoder (transformers' DistilBertModel): BERT's post-norm layers, six of them, no token types.
    config.json spells it its own way (dim, n_layers, hidden_dim, activation); the names here are BertConfig's."""

    model_type: str = "distilbert"
    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 6
    n_heads: int = 12
    intermediate_size: int = 3072  # HF hidden_dim
    hidden_act: str = "gelu"  # HF activation
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False  # the table is in the checkpoint either way; kept for to_hf
    norm_eps: float = 1e-12  # fixed in modeling_distilbert.py
    pad_token_id: int | None = 0
    dtype: str | None = None

    # derived in __post_init__
    head_dim: int = field(init=False)

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise PocketLMError(f"hidden size {self.dim} is not a multiple of the {self.n_heads} heads")
        _encoder_act("DistilBERT", self.hidden_act)
        self.head_dim = self.dim // self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.dim

    @classmethod
    def from_hf(cls, d: dict) -> "DistilBertConfig":
        _require(d, "vocab_size", "dim", "n_layers", "n_heads", "hidden_dim")
        dtype = d.get("dtype", d.get("torch_dtype"))
        return cls(
            vocab_size=d["vocab_size"],
            dim=d["dim"],
            n_layers=d["n_layers"],
            n_heads=d["n_heads"],
            intermediate_size=d["hidden_dim"],
            hidden_act=d.get("activation", "gelu"),
            max_position_embeddings=d.get("max_position_embeddings", 512),
            sinusoidal_pos_embds=d.get("sinusoidal_pos_embds", False),
            pad_token_id=d.get("pad_token_id", 0),
            dtype=dtype if isinstance(dtype, str) else None,
        )

    def to_hf(self) -> dict[str, Any]:
        return _drop_none({
            "architectures": ["DistilBertModel"],
            "model_type": "distilbert",
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "hidden_dim": self.intermediate_size,
            "activation": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "sinusoidal_pos_embds": self.sinusoidal_pos_embds,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        })


@dataclass
class MobileBertConfig:
    """MobileBERT encoder (transformers' MobileBertModel): each layer narrows the hidden state to a bottleneck
    (inner_dim), attends and runs a stack of FFNs there, and widens back; NoNorm (an elementwise affine, no
    statistics) in place of LayerNorm; embeddings of embedding_size, three neighbours' concatenated (trigram input)
    and projected to dim."""

    model_type: str = "mobilebert"
    vocab_size: int = 30522
    dim: int = 512  # HF hidden_size: what the layers' residual stream and the output carry
    n_layers: int = 24
    n_heads: int = 4
    intermediate_size: int = 512
    hidden_act: str = "relu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12  # HF layer_norm_eps (with layer_norm; NoNorm has none)
    pad_token_id: int | None = 0
    embedding_size: int = 128
    trigram_input: bool = True
    use_bottleneck: bool = True
    intra_bottleneck_size: int = 128
    use_bottleneck_attention: bool = False
    key_query_shared_bottleneck: bool = True
    num_feedforward_networks: int = 4
    normalization_type: str = "no_norm"  # or "layer_norm"
    classifier_activation: bool = True  # the pooler has a dense + tanh (else it passes [CLS] through)
    dtype: str | None = None

    # derived in __post_init__
    inner_dim: int = field(init=False)  # HF true_hidden_size: the bottleneck, where attention and the FFNs run
    head_dim: int = field(init=False)

    def __post_init__(self):
        self.inner_dim = self.intra_bottleneck_size if self.use_bottleneck else self.dim
        if self.inner_dim % self.n_heads:
            raise PocketLMError(f"MobileBERT's attention size {self.inner_dim} is not a multiple of the {self.n_heads} heads")
        if self.normalization_type not in ("no_norm", "layer_norm"):
            raise PocketLMError(f"MobileBERT normalization_type {self.normalization_type!r} is not supported (no_norm, layer_norm)")
        _encoder_act("MobileBERT", self.hidden_act)
        self.head_dim = self.inner_dim // self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.dim

    @classmethod
    def from_hf(cls, d: dict) -> "MobileBertConfig":
        _require(d, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        dtype = d.get("dtype", d.get("torch_dtype"))
        defaults = cls.__dataclass_fields__
        own = ("embedding_size", "trigram_input", "use_bottleneck", "intra_bottleneck_size", "use_bottleneck_attention",
               "key_query_shared_bottleneck", "num_feedforward_networks", "normalization_type", "classifier_activation",
               "type_vocab_size", "max_position_embeddings", "hidden_act", "pad_token_id")  # the same names in config.json
        return cls(
            vocab_size=d["vocab_size"],
            dim=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"],
            norm_eps=d.get("layer_norm_eps", 1e-12),
            dtype=dtype if isinstance(dtype, str) else None,
            **{k: d.get(k, defaults[k].default) for k in own},
        )

    def to_hf(self) -> dict[str, Any]:
        return _drop_none({
            "architectures": ["MobileBertModel"],
            "model_type": "mobilebert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.norm_eps,
            "pad_token_id": self.pad_token_id,
            "embedding_size": self.embedding_size,
            "trigram_input": self.trigram_input,
            "use_bottleneck": self.use_bottleneck,
            "intra_bottleneck_size": self.intra_bottleneck_size,
            "use_bottleneck_attention": self.use_bottleneck_attention,
            "key_query_shared_bottleneck": self.key_query_shared_bottleneck,
            "num_feedforward_networks": self.num_feedforward_networks,
            "normalization_type": self.normalization_type,
            "classifier_activation": self.classifier_activation,
            "dtype": self.dtype,
        })


ModelConfig = LlamaConfig | Gemma3Config | GemmaConfig | Phi3Config | PhiConfig | GPT2Config | GPTNeoConfig | GPTJConfig | BertConfig | DistilBertConfig | MobileBertConfig


def config_from_hf(d: dict) -> ModelConfig:
    """The config for a Hugging Face `config.json` dict, picked by its model_type (pocketlm.families)."""
    return family(d.get("model_type")).config_class().from_hf(d)
