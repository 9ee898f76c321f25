"""Native PyTorch models, one file per architecture family, picked by the config's model_type.

Every model's parameter names equal Hugging Face's state_dict keys for the same architecture, so
`model.load_state_dict(hf_state_dict)` works as is. Loading without a first fp32 copy in memory:

    with torch.device("meta"):
        model = model_class_for(cfg)(cfg)
    model.load_state_dict(state_dict, assign=True, strict=False)
    model.tie_weights()
    model.init_buffers()

Decoders (LlamaForCausalLM, Gemma3ForCausalLM): hidden(idx, input_pos) -> (B, T, D), logits(h) -> (B, T, V),
forward = logits(hidden(...)); setup_cache(batch_size, max_seq_len, dtype, keep) / clear_cache(). With
hidden(idx, input_pos, slots), each row is a sequence of its own in cache row slots[b] at positions
input_pos[b] (continuous batching); copy_cache_prefix(src, dst, n) copies a row's first n positions.
Encoder (BertModel): forward(input_ids, attention_mask, token_type_ids) -> (B, T, D); embed(...) -> (B, D).
"""

from pocketlm.errors import PocketLMError
from pocketlm.models.bert import BertModel
from pocketlm.models.gemma3 import Gemma3ForCausalLM
from pocketlm.models.llama import LlamaForCausalLM

MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
    "gemma3": Gemma3ForCausalLM,  # Gemma3Config reads a multimodal config down to its text model
    "bert": BertModel,
}


def model_class_for(config) -> type:
    """The model class for a pocketlm config (pocketlm.config.config_from_hf)."""
    if config.model_type not in MODEL_CLASSES:
        raise PocketLMError(
            f"no model for model_type {config.model_type!r}: pocketlm supports {', '.join(sorted(MODEL_CLASSES))}"
        )
    return MODEL_CLASSES[config.model_type]


__all__ = ["MODEL_CLASSES", "model_class_for", "LlamaForCausalLM", "Gemma3ForCausalLM", "BertModel"]
