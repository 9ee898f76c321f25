"""Every model family pocketlm runs, one row each: the only place in the package that lists them.

A row says, for one config.json `model_type`, what the rest of the toolkit needs to know:

    config      the config dataclass (pocketlm/config.py; no torch), as "module:Class", imported on use
    model       the model class (pocketlm/models/<family>.py), as "module:Class", imported on use
    kind        "decoder" (a causal LM: generate, serve, quantize, LoRA, ...) or "encoder" (embed, classify)
    aliases     other model_types the same config reads ("gemma3": a multimodal config read down to its text model)
    gguf        llama.cpp's architecture name and tensor names, and the fix-up applied both ways (formats/gguf.py
                reads it, formats/gguf_write.py writes it); None: no GGUF for this family
    lora        LoRA's default target Linears (finetune --lora-r without --lora-targets)
    prune       what `pocketlm prune` can cut ("heads", "ffn", "hidden", "layers"); () = not prunable. "heads" and
                "hidden" need a config whose head_dim is its own (not dim // n_heads, which a cut would change)
    cuts        where prune cuts: the block Linears whose rows or columns belong to a head or an MLP channel
    scaled_embedding  the embedding is multiplied by sqrt(D) (Gemma): pruning hidden channels rescales it
    base_prefix the stack's name in a *ForCausalLM file ("transformer"), which files saved from the base model lack
                (openai-community/gpt2's own: "h.0.attn.c_attn.weight"); formats/hf.py reads them as if present
    stale       name endings of tensors older checkpoints carry that are no weights (GPT-2's causal-mask buffers)

No torch and no pocketlm import here: the CLI, the registry and the config readers look families up without
paying for a model import. tests/test_families.py fails when another module carries its own list of families
or asks `model_type == "..."`; ask this table instead (`family(model_type)`, `is_encoder(config)`).

Adding a family: README.md, "Adding a model family".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pocketlm.errors import PocketLMError

# ---- GGUF tensor names (llama.cpp's gguf-py tensor_mapping.py, read in reverse) --------------------------------
# A GGUF tensor is "<name>.weight" / "<name>.bias"; block tensors are "blk.<i>.<name>" -> "model.layers.<i>.<hf name>".

GGUF_TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

LLAMA_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

GEMMA3_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",  # Gemma's "ffn_norm" is the pre-FFN norm, not Llama's post-attention one
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

GEMMA2_GGUF_NAMES = {k: v for k, v in GEMMA3_GGUF_NAMES.items() if k not in ("attn_q_norm", "attn_k_norm")}

PHI2_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.dense",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
PHI2_GGUF_TOP_LEVEL_NAMES = GGUF_TOP_LEVEL_NAMES | {"output_norm": "model.final_layernorm"}

PHI3_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",  # gate rows then up rows, as llama.cpp's phi3 splits them
    "ffn_down": "mlp.down_proj",
}

GPT2_GGUF_NAMES = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
GPT2_GGUF_TOP_LEVEL_NAMES = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                             "output_norm": "transformer.ln_f", "output": "lm_head"}

# LoRA's default targets: every Linear of a block, by the module names the family's model file uses
LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Cuts:
    """Where `pocketlm prune` (compress/prune.py) cuts one block, by the HF names under <block list>.<i>. Phi-3's fused
    self_attn.qkv_proj and mlp.gate_up_proj are cut as the parts their rows hold side by side (q, k, v; gate, up)."""

    heads_in: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # rows per head: q, k, v
    heads_out: str = "self_attn.o_proj"  # columns per query head; its input is the attention output hooks read
    ffn_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # rows per MLP channel (weight and bias)
    ffn_out: str = "mlp.down_proj"  # columns per MLP channel; its input is the activation hooks read
    conv1d: bool = False  # weights stored (in, out), transformers' Conv1D (GPT-2): rows and columns swap


LLAMA_CUTS = Cuts()


@dataclass(frozen=True)
class Gguf:
    arch: str  # general.architecture, as llama.cpp's convert_hf_to_gguf.py writes it
    block_names: dict[str, str]  # GGUF block tensor name -> HF module name under model.layers.<i>
    # what convert_hf_to_gguf.py does to the tensors (formats/gguf_write.py) and formats/gguf.py undoes:
    # "none"; "permute_qk": Q/K rows interleaved per head for llama.cpp's RoPE; "norm_plus_one": norms stored as 1 + w;
    # "transpose_conv1d": GPT-2's Conv1D weights, (in, out) in the checkpoint, stored as ggml's (out, in) matrices
    fix: str = "none"
    required_biases: tuple[str, ...] = ()  # block tensors whose bias must be there (Qwen2's q/k/v)
    reads: bool = True  # a file of this architecture reads back as this family (Mistral is written as "llama")
    top_names: dict[str, str] | None = None  # GGUF top-level name -> HF name; None: GGUF_TOP_LEVEL_NAMES
    blocks: str = "model.layers"  # the HF name of the block list: blk.<i>.* <-> <blocks>.<i>.* (GPT-2: transformer.h)

    @property
    def top_level_names(self) -> dict[str, str]:
        return GGUF_TOP_LEVEL_NAMES if self.top_names is None else self.top_names


@dataclass(frozen=True)
class Family:
    model_type: str
    config: str  # "module:Class" of the config dataclass
    model: str  # "module:Class" of the model
    kind: str = "decoder"
    aliases: tuple[str, ...] = ()
    gguf: Gguf | None = None
    lora: tuple[str, ...] = LLAMA_LORA
    prune: tuple[str, ...] = ()
    cuts: Cuts = LLAMA_CUTS
    scaled_embedding: bool = False
    base_prefix: str | None = None
    stale: tuple[str, ...] = ()

    @property
    def is_decoder(self) -> bool:
        return self.kind == "decoder"

    def config_class(self) -> type:
        return _import(self.config)

    def model_class(self) -> type:
        return _import(self.model)


_LLAMA = "pocketlm.models.llama:LlamaForCausalLM"
_GEMMA = "pocketlm.models.gemma:GemmaForCausalLM"  # Gemma 1 and 2
_PRUNE_ALL = ("heads", "ffn", "hidden", "layers")
_PRUNE_DEPTH_FFN = ("ffn", "layers")  # head_dim is dim // n_heads in these configs: heads and hidden stay
# the causal-mask buffers (bias, masked_bias) older GPT-2 / GPT-Neo / GPT-J files keep beside each attention's weights
_GPT_MASKS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias")

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "pocketlm.config:LlamaConfig", _LLAMA, gguf=Gguf("llama", LLAMA_GGUF_NAMES, "permute_qk"),
           prune=_PRUNE_ALL),
    Family("mistral", "pocketlm.config:LlamaConfig", _LLAMA,
           gguf=Gguf("llama", LLAMA_GGUF_NAMES, "permute_qk", reads=False), prune=_PRUNE_ALL),
    Family("qwen2", "pocketlm.config:LlamaConfig", _LLAMA,
           gguf=Gguf("qwen2", LLAMA_GGUF_NAMES, required_biases=("attn_q", "attn_k", "attn_v")), prune=_PRUNE_ALL),
    Family("gemma3_text", "pocketlm.config:Gemma3Config", "pocketlm.models.gemma3:Gemma3ForCausalLM", aliases=("gemma3",),
           gguf=Gguf("gemma3", GEMMA3_GGUF_NAMES, "norm_plus_one"), prune=_PRUNE_ALL, scaled_embedding=True),
    Family("phi3", "pocketlm.config:Phi3Config", "pocketlm.models.phi3:Phi3ForCausalLM", gguf=Gguf("phi3", PHI3_GGUF_NAMES),
           lora=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), prune=_PRUNE_ALL),
    Family("gemma", "pocketlm.config:GemmaConfig", _GEMMA, gguf=Gguf("gemma", LLAMA_GGUF_NAMES, "norm_plus_one"),
           prune=_PRUNE_ALL, scaled_embedding=True),
    Family("gemma2", "pocketlm.config:GemmaConfig", _GEMMA, gguf=Gguf("gemma2", GEMMA2_GGUF_NAMES, "norm_plus_one"),
           prune=_PRUNE_ALL, scaled_embedding=True),
    Family("phi", "pocketlm.config:PhiConfig", "pocketlm.models.phi:PhiForCausalLM",
           gguf=Gguf("phi2", PHI2_GGUF_NAMES, top_names=PHI2_GGUF_TOP_LEVEL_NAMES),
           lora=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"), prune=_PRUNE_ALL,
           cuts=Cuts(heads_out="self_attn.dense", ffn_in=("mlp.fc1",), ffn_out="mlp.fc2")),
    Family("gpt2", "pocketlm.config:GPT2Config", "pocketlm.models.gpt2:GPT2LMHeadModel",
           gguf=Gguf("gpt2", GPT2_GGUF_NAMES, "transpose_conv1d", top_names=GPT2_GGUF_TOP_LEVEL_NAMES, blocks="transformer.h"),
           lora=("c_attn", "c_proj", "c_fc"), base_prefix="transformer", stale=_GPT_MASKS, prune=_PRUNE_DEPTH_FFN,
           cuts=Cuts(("attn.c_attn",), "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj", conv1d=True)),  # c_attn: q, k, v in one
    Family("gpt_neo", "pocketlm.config:GPTNeoConfig", "pocketlm.models.gpt_neo:GPTNeoForCausalLM",
           lora=("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"), base_prefix="transformer", stale=_GPT_MASKS,
           prune=_PRUNE_DEPTH_FFN, cuts=Cuts(("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"),
                                             "attn.attention.out_proj", ("mlp.c_fc",), "mlp.c_proj")),
    Family("gptj", "pocketlm.config:GPTJConfig", "pocketlm.models.gptj:GPTJForCausalLM",
           lora=("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"), base_prefix="transformer", stale=_GPT_MASKS,
           prune=_PRUNE_DEPTH_FFN, cuts=Cuts(("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.out_proj",
                                             ("mlp.fc_in",), "mlp.fc_out")),
    Family("bert", "pocketlm.config:BertConfig", "pocketlm.models.bert:BertModel", kind="encoder",
           lora=("query", "key", "value", "dense")),
    Family("distilbert", "pocketlm.config:DistilBertConfig", "pocketlm.models.distilbert:DistilBertModel",
           kind="encoder", lora=("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2")),
    Family("mobilebert", "pocketlm.config:MobileBertConfig", "pocketlm.models.mobilebert:MobileBertModel",
           kind="encoder", lora=("query", "key", "value", "dense")),
)}  # fmt: skip

_BY_NAME = {name: f for f in FAMILIES.values() for name in (f.model_type, *f.aliases)}


def supported() -> list[str]:
    """Every model_type pocketlm reads (aliases included), sorted."""
    return sorted(_BY_NAME)


def family(model_type: str | None) -> Family:
    """The row for a config.json model_type (or one of its aliases); a refusal that says what to do otherwise."""
    row = _BY_NAME.get(model_type)  # type: ignore[arg-type]
    if row is None:
        raise PocketLMError(
            f"unsupported model_type {model_type!r}: pocketlm supports {', '.join(supported())}. Export the model "
            "from transformers as one of these, or add the family (README.md, 'Adding a model family')"
        )
    return row


def lookup(model_type: str | None) -> Family | None:
    """The row for a model_type, or None (a draft head's config, a family pocketlm does not have)."""
    return _BY_NAME.get(model_type)  # type: ignore[arg-type]


def is_encoder(config) -> bool:
    """Whether a pocketlm config (or anything with a model_type) is an encoder's: no KV cache, no generation."""
    row = lookup(getattr(config, "model_type", None))
    return row is not None and not row.is_decoder


def gguf_reader(arch: str) -> Family | None:
    """The family a GGUF file of llama.cpp architecture `arch` reads back as."""
    return next((f for f in FAMILIES.values() if f.gguf and f.gguf.reads and f.gguf.arch == arch), None)


def _import(path: str) -> type:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)
