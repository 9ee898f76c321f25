"""BERT encoder in plain PyTorch, for sentence embeddings (sentence-transformers all-MiniLM-L6-v2).

Numerically this is transformers' modeling_bert.py BertModel (post-norm layers, exact-erf GELU, learned
absolute positions). Module names are HF's, so its state_dict keys ("embeddings.word_embeddings.weight",
"encoder.layer.0.attention.self.query.weight", ..., "pooler.dense.weight") load directly: a BertModel
checkpoint has no "bert." prefix; BertForMaskedLM's and friends' files, which do, load through EncoderModel
(models/encoder.py, with embed() and the loading steps every encoder shares).

    model = BertModel(cfg)
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))
    vecs = model.embed(input_ids, attention_mask)   # (B, D), unit length

Shapes: B batch, T tokens, D model dim, nh heads, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.config import BertConfig
from pocketlm.models.encoder import ACT, EncoderModel


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.dim)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, input_ids, token_type_ids):
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, T, D)
        x = x + self.position_embeddings(pos)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.query = nn.Linear(cfg.dim, cfg.dim)
        self.key = nn.Linear(cfg.dim, cfg.dim)
        self.value = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, mask):
        # x (B, T, D); mask bool (B, 1, 1, T): True where the key is a real token
        B, T, D = x.shape
        q = self.query(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.key(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = self.value(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd), bidirectional
        return y.transpose(1, 2).reshape(B, T, D)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.intermediate_size)


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.dim)
        self.LayerNorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


class BertLayer(nn.Module):
    """One post-norm block. The submodules above only hold weights under HF's names; the math is here."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.act = ACT[cfg.hidden_act]
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x, mask):
        att = self.attention
        x = att.output.LayerNorm(x + att.output.dense(att.self(x, mask)))  # (B, T, D)
        h = self.act(self.intermediate.dense(x))  # (B, T, I)
        return self.output.LayerNorm(x + self.output.dense(h))  # (B, T, D)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.n_layers))


class BertPooler(nn.Module):
    """Kept so checkpoints load strictly; sentence embeddings use mean pooling (`embed`), not this."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim)


class BertModel(EncoderModel):
    hf_prefix = "bert"
    hf_classifier_pre = ("bert.pooler.dense", "tanh")  # BertForSequenceClassification reads the pooler's output

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layer
