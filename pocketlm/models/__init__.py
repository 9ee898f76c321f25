"""Native PyTorch models, one file per architecture family, picked by the config's model_type.

Every model's parameter names equal Hugging Face's state_dict keys for the same architecture, so
`model.load_state_dict(hf_state_dict)` works as is. Loading without a first fp32 copy in memory:

    with torch.device("meta"):
        model = model_class_for(cfg)(cfg)
    model.load_state_dict(state_dict, assign=True, strict=False)
    model.tie_weights()
    model.init_buffers()

Decoders (DecoderLM subclasses, models/decoder.py): hidden(idx, input_pos) -> (B, T, D), logits(h) -> (B, T, V),
forward = logits(hidden(...)); setup_cache(batch_size, max_seq_len, dtype, keep) / clear_cache(). With
hidden(idx, input_pos, slots), each row is a sequence of its own in cache row slots[b] at positions
input_pos[b] (continuous batching); copy_cache_prefix(src, dst, n) copies a row's first n positions.
Encoder (BertModel): forward(input_ids, attention_mask, token_type_ids) -> (B, T, D); embed(...) -> (B, D).

The model class of each model_type is pocketlm/families.py's row; the class is imported when first asked for.
"""

from pocketlm.families import FAMILIES, family


def model_class_for(config) -> type:
    """The model class for a pocketlm config (pocketlm.config.config_from_hf)."""
    return family(config.model_type).model_class()


def __getattr__(name: str) -> type:
    """`from pocketlm.models import LlamaForCausalLM`: any family's model class by its name, imported on use."""
    for row in FAMILIES.values():
        if row.model.rsplit(":", 1)[1] == name:
            return row.model_class()
    raise AttributeError(f"module 'pocketlm.models' has no attribute {name!r}")


__all__ = ["model_class_for"]
