"""What every encoder family shares (models/bert.py, distilbert.py, mobilebert.py): `EncoderModel`, the base
class of each family's model, and HF's "gelu"/"relu" activations.

An encoder's model class builds its own `embeddings` (input_ids, token_type_ids -> (B, T, D)) and layers (x, key
mask -> x), under transformers' module names, and names the layers `blocks`; the base adds, once for every family:

    forward(input_ids, attention_mask, token_type_ids) -> last hidden states (B, T, D)
    embed(input_ids, attention_mask)   sentence embeddings: mean over the real tokens, L2-normalized
    blocks                             the repeated layers, as the family names them (gradient checkpointing
                                       wraps them)
    tie_weights(), init_buffers()      the decoders' loading steps, as no-ops, so one loader handles every family
    loading a task model's file        transformers' *ForMaskedLM / *ForSequenceClassification / *ForPreTraining
                                       checkpoints hold the encoder under "<family>." (`hf_prefix`): it is read
                                       from there, the task's head left out (a sequence classifier's head is
                                       read by pocketlm/finetune/classify.py, named by `hf_classifier_pre`)

Shapes: B batch, T tokens, D model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACT = {"gelu": F.gelu, "relu": F.relu}  # HF's "gelu" is the exact erf form (GELUActivation)


class EncoderModel(nn.Module):
    hf_prefix = ""  # the encoder's attribute in transformers' task models (base_model_prefix): "bert", "distilbert", ...
    # transformers' *ForSequenceClassification: the Linear applied to [CLS] before its `classifier`, as named in
    # that model's file, and its activation (pocketlm/finetune/classify.py, hf_classifier)
    hf_classifier_pre: tuple[str, str] | None = None

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def tie_weights(self):
        pass

    def init_buffers(self, device="cpu"):
        pass

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """input_ids, attention_mask (B, T) -> last hidden states (B, T, D)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, D)
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): padding keys are masked out
        for layer in self.blocks:
            x = layer(x, mask)
        return x

    def embed(self, input_ids, attention_mask, normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings (B, D): mean over the real tokens, then L2-normalized, as sentence-transformers'
        Pooling(mean) + Normalize modules do (all-MiniLM-L6-v2, the msmarco-distilbert models)."""
        h = self(input_ids, attention_mask)  # (B, T, D)
        m = attention_mask[..., None].to(h.dtype)  # (B, T, 1)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, D)
        return F.normalize(pooled, p=2, dim=1) if normalize else pooled

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A task model's checkpoint ("distilbert.transformer.layer.0...", beside "classifier.weight" or the masked-LM
        # head): its encoder's tensors under our names, the head's dropped. torch loads the children from this same
        # dict after this call, so renaming here is enough.
        inner = f"{prefix}{self.hf_prefix}."
        if self.hf_prefix and any(k.startswith(inner) for k in state_dict):
            for key in [k for k in state_dict if k.startswith(prefix)]:
                value = state_dict.pop(key)
                if key.startswith(inner):
                    state_dict[prefix + key[len(inner) :]] = value
            pooler = getattr(self, "pooler", None)
            if pooler is not None and not any(k.startswith(f"{prefix}pooler.") for k in state_dict):
                # transformers builds *ForMaskedLM with add_pooling_layer=False: no pooler in the file. Embeddings and
                # pocketlm's heads never read it; zeros keep strict loading (and an export) whole.
                for name, p in pooler.named_parameters():
                    state_dict[f"{prefix}pooler.{name}"] = torch.zeros(p.shape)
        # Checkpoints saved by transformers < 4.31 (all-MiniLM-L6-v2 among them) hold the position_ids buffer
        # (1, 512) = arange; positions are computed instead, so the key goes rather than fail strict loads.
        state_dict.pop(f"{prefix}embeddings.position_ids", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
