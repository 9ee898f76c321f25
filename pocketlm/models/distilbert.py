"""DistilBERT encoder in plain PyTorch: embeddings, sentence embeddings and classification heads.

Numerically this is transformers' modeling_distilbert.py DistilBertModel: BERT's post-norm layer (attention,
add, LayerNorm; FFN, add, LayerNorm) with exact-erf GELU, learned positions (a sinusoidal table, where the
config says so, is in the checkpoint like a learned one), no token types and no pooler; LayerNorm eps is
1e-12 throughout. Module names are HF's ("embeddings.word_embeddings.weight", "transformer.layer.0.attention.q_lin.weight",
"transformer.layer.0.ffn.lin1.weight", ...), so DistilBertModel's state_dict loads as is, and the task models'
files ("distilbert." + the same names) through EncoderModel (models/encoder.py).

    model = DistilBertModel(cfg)
    vecs = model.embed(input_ids, attention_mask)   # (B, D), unit length

Shapes: B batch, T tokens, D model dim, nh heads, hd head dim, I FFN dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.config import DistilBertConfig
from pocketlm.models.encoder import ACT, EncoderModel


class DistilBertEmbeddings(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, input_ids, token_type_ids):
        # token_type_ids: every encoder's embeddings take them (models/encoder.py); DistilBERT has none to add
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos))  # (B, T, D)


# Copied from pocketlm.models.bert.BertSelfAttention with Bert->DistilBert, query->q_lin, key->k_lin, value->v_lin, out_lin added
class DistilBertSelfAttention(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_lin = nn.Linear(cfg.dim, cfg.dim)
        self.k_lin = nn.Linear(cfg.dim, cfg.dim)
        self.v_lin = nn.Linear(cfg.dim, cfg.dim)
        self.out_lin = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, mask):
        # x (B, T, D); mask bool (B, 1, 1, T): True where the key is a real token
        B, T, D = x.shape
        q = self.q_lin(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_lin(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = self.v_lin(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd), bidirectional
        return self.out_lin(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class DistilBertFFN(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.act = ACT[cfg.hidden_act]
        self.lin1 = nn.Linear(cfg.dim, cfg.intermediate_size)
        self.lin2 = nn.Linear(cfg.intermediate_size, cfg.dim)

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x)))  # (B, T, I) -> (B, T, D)


class DistilBertBlock(nn.Module):
    """transformers' TransformerBlock: post-norm, as BERT's layer."""

    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.attention = DistilBertSelfAttention(cfg)
        self.sa_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = DistilBertFFN(cfg)
        self.output_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, mask):
        x = self.sa_layer_norm(x + self.attention(x, mask))  # (B, T, D)
        return self.output_layer_norm(x + self.ffn(x))  # (B, T, D)


class DistilBertTransformer(nn.Module):
    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(DistilBertBlock(cfg) for _ in range(cfg.n_layers))


class DistilBertModel(EncoderModel):
    hf_prefix = "distilbert"
    hf_classifier_pre = ("pre_classifier", "relu")  # DistilBertForSequenceClassification: pre_classifier, ReLU

    def __init__(self, cfg: DistilBertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = DistilBertEmbeddings(cfg)
        self.transformer = DistilBertTransformer(cfg)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.layer
