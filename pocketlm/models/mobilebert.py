"""MobileBERT encoder in plain PyTorch: embeddings, sentence embeddings and classification heads.

Numerically this is transformers' modeling_mobilebert.py MobileBertModel. What sets it apart from BERT:

- embeddings: word vectors of embedding_size (128) < dim (512); with trigram_input each position's vector is
  [next token's, its own, previous token's] (zeros past the ends), and `embedding_transformation` projects
  the 3 * 128 to dim. Positions and token types are dim wide and added after.
- bottlenecks: each layer narrows its dim-wide input to inner_dim (HF true_hidden_size, 128) for attention
  and the FFNs, and `output.bottleneck` widens the result back, adding the layer's input.
- key_query_shared_bottleneck: queries and keys read a second narrowing of the input (`bottleneck.attention`),
  values read the input itself (dim wide), the attention's residual is the first narrowing.
- stacked FFNs: num_feedforward_networks - 1 extra FFN blocks (`ffn`) before the layer's own.
- NoNorm ("no_norm"): x * weight + bias, an elementwise affine without statistics, where BERT has LayerNorm.
  With "layer_norm", the embeddings' norm and `output.LayerNorm` are built without layer_norm_eps in
  transformers, so they keep torch's 1e-5; the others take layer_norm_eps. Both kept as they are.
- the pooler's dense + tanh only with classifier_activation.

Module names are HF's, so MobileBertModel's state_dict loads as is, and the task models' files ("mobilebert." +
the same names: MobileBertForPreTraining, google/mobilebert-uncased's) through EncoderModel (models/encoder.py).

Shapes: B batch, T tokens, D dim, E embedding_size, d inner_dim (the bottleneck), nh heads, hd head dim, I FFN dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.config import MobileBertConfig
from pocketlm.models.encoder import ACT, EncoderModel


class NoNorm(nn.Module):
    """MobileBERT's replacement for LayerNorm: an elementwise affine, no mean or variance."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x):
        return x * self.weight + self.bias


def norm(cfg: MobileBertConfig, size: int, eps: float = 1e-5) -> nn.Module:
    """The config's normalization; eps as transformers passes it (1e-5, torch's default, where it passes none)."""
    return NoNorm(size) if cfg.normalization_type == "no_norm" else nn.LayerNorm(size, eps=eps)


class MobileBertEmbeddings(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.trigram_input = cfg.trigram_input
        self.project = cfg.trigram_input or cfg.embedding_size != cfg.dim
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.embedding_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.dim)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.embedding_transformation = nn.Linear(cfg.embedding_size * (3 if cfg.trigram_input else 1), cfg.dim)
        self.LayerNorm = norm(cfg, cfg.dim)

    def forward(self, input_ids, token_type_ids):
        e = self.word_embeddings(input_ids)  # (B, T, E)
        if self.trigram_input:
            after = F.pad(e[:, 1:], (0, 0, 0, 1))  # (B, T, E): the next token's vector, zeros at the end
            before = F.pad(e[:, :-1], (0, 0, 1, 0))  # (B, T, E): the previous token's, zeros at the start
            e = torch.cat([after, e, before], dim=2)  # (B, T, 3E)
        if self.project:
            e = self.embedding_transformation(e)  # (B, T, D)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(e + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids))  # (B, T, D)


# Copied from pocketlm.models.bert.BertSelfAttention with Bert->MobileBert, dim->inner_dim, x->q_in, k_in, v_in
class MobileBertSelfAttention(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.query = nn.Linear(cfg.inner_dim, cfg.inner_dim)
        self.key = nn.Linear(cfg.inner_dim, cfg.inner_dim)
        self.value = nn.Linear(cfg.inner_dim if cfg.use_bottleneck_attention else cfg.dim, cfg.inner_dim)

    def forward(self, q_in, k_in, v_in, mask):
        # q_in, k_in (B, T, d); v_in (B, T, D or d); mask bool (B, 1, 1, T): True where the key is a real token
        B, T, _ = q_in.shape
        q = self.query(q_in).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.key(k_in).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = self.value(v_in).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd), bidirectional
        return y.transpose(1, 2).reshape(B, T, -1)  # (B, T, d)


class DenseNorm(nn.Module):
    """`dense` then `LayerNorm` (NoNorm or LayerNorm) of the sum with a residual: HF's SelfOutput, FFNOutput,
    OutputBottleneck and (without a residual) BottleneckLayer, under their names."""

    def __init__(self, cfg: MobileBertConfig, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = norm(cfg, d_out, eps)

    def forward(self, x, residual=None):
        y = self.dense(x)
        return self.LayerNorm(y if residual is None else y + residual)


class MobileBertAttention(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.self = MobileBertSelfAttention(cfg)
        self.output = DenseNorm(cfg, cfg.inner_dim, cfg.inner_dim, cfg.norm_eps)


class MobileBertIntermediate(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.inner_dim, cfg.intermediate_size)


class MobileBertOutput(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.inner_dim)
        self.LayerNorm = norm(cfg, cfg.inner_dim)  # transformers passes no eps here
        if cfg.use_bottleneck:
            self.bottleneck = DenseNorm(cfg, cfg.inner_dim, cfg.dim, cfg.norm_eps)


class MobileBertBottleneck(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.input = DenseNorm(cfg, cfg.dim, cfg.inner_dim, cfg.norm_eps)
        if cfg.key_query_shared_bottleneck:
            self.attention = DenseNorm(cfg, cfg.dim, cfg.inner_dim, cfg.norm_eps)


class MobileBertFFN(nn.Module):
    """One of the stacked FFNs before the layer's own: dense, act, dense, add, norm, all d wide."""

    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.intermediate = MobileBertIntermediate(cfg)
        self.output = DenseNorm(cfg, cfg.intermediate_size, cfg.inner_dim, cfg.norm_eps)


class MobileBertLayer(nn.Module):
    """Narrow, attend, the FFNs, widen. The submodules above hold weights under HF's names; the order is here."""

    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.cfg = cfg
        self.act = ACT[cfg.hidden_act]
        self.attention = MobileBertAttention(cfg)
        self.intermediate = MobileBertIntermediate(cfg)
        self.output = MobileBertOutput(cfg)
        if cfg.use_bottleneck:
            self.bottleneck = MobileBertBottleneck(cfg)
        if cfg.num_feedforward_networks > 1:
            self.ffn = nn.ModuleList(MobileBertFFN(cfg) for _ in range(cfg.num_feedforward_networks - 1))

    def attention_inputs(self, x):
        """(queries' input, keys', values', the attention's residual), as transformers' Bottleneck picks them."""
        cfg = self.cfg
        if not cfg.use_bottleneck:
            return x, x, x, x
        narrow = self.bottleneck.input(x)  # (B, T, d)
        if cfg.use_bottleneck_attention:
            return narrow, narrow, narrow, narrow
        if cfg.key_query_shared_bottleneck:
            shared = self.bottleneck.attention(x)  # (B, T, d)
            return shared, shared, x, narrow
        return x, x, x, narrow

    def forward(self, x, mask):
        q_in, k_in, v_in, residual = self.attention_inputs(x)
        att = self.attention
        h = att.output(att.self(q_in, k_in, v_in, mask), residual)  # (B, T, d)
        for ffn in getattr(self, "ffn", ()):
            h = ffn.output(self.act(ffn.intermediate.dense(h)), h)  # (B, T, d)
        out = self.output.LayerNorm(self.output.dense(self.act(self.intermediate.dense(h))) + h)  # (B, T, d)
        if self.cfg.use_bottleneck:
            out = self.output.bottleneck(out, x)  # (B, T, D): widened, plus the layer's input
        return out


# Copied from pocketlm.models.bert.BertEncoder with Bert->MobileBert
class MobileBertEncoder(nn.Module):
    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(MobileBertLayer(cfg) for _ in range(cfg.n_layers))


# Copied from pocketlm.models.bert.BertPooler with Bert->MobileBert, dense made only with classifier_activation
class MobileBertPooler(nn.Module):
    """Kept so checkpoints load strictly (and for a transformers classifier's head); embeddings pool by mean."""

    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        if cfg.classifier_activation:
            self.dense = nn.Linear(cfg.dim, cfg.dim)


class MobileBertModel(EncoderModel):
    hf_prefix = "mobilebert"
    hf_classifier_pre = ("mobilebert.pooler.dense", "tanh")  # the pooler's output (none: [CLS] as it is)

    def __init__(self, cfg: MobileBertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = MobileBertEmbeddings(cfg)
        self.encoder = MobileBertEncoder(cfg)
        self.pooler = MobileBertPooler(cfg)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layer
