"""A draft head for speculative decoding: a small network that reads the target model's own last hidden state
and guesses the target's next tokens, after EAGLE (Li et al. 2024, "EAGLE: Speculative Sampling Requires
Rethinking Feature Uncertainty") and ReDrafter (Cheng et al. 2024, a recurrent draft head without attention).

Why not a smaller model of the same family: on a CPU a draft must cost a few percent of its target's step, and
a separate model that cheap agrees too rarely (docs/BENCHMARKS.md, "Speculative decoding"). The target's hidden
state already holds everything it knows about the context, so one MLP step on it, plus the embedding of the token
just chosen, predicts the next hidden state, and a head over the most frequent tokens (FR-Spec, Zhao et al. 2025:
a draft needs only the part of a 49k vocabulary that is ever proposed) turns that into a guess:

    state_0 = h_t                       the target's final-norm hidden state at position t (what its head reads)
    state_j = state_{j-1} + MLP([norm(state_{j-1}); norm(embed(x_{t+j}))])      predicts h_{t+j}
    logits_j = head(state_j)            over `token_ids`, guesses x_{t+j+1}

No attention and so no KV cache: the draft's whole state is one vector, and a refused guess costs nothing to undo.
The embedding is the target's own (attached at load, not saved), so the head belongs to exactly one target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm import kernels
from pocketlm.models.decoder import RMSNorm

ARCHITECTURE = "PocketLMDraftHead"


@dataclass
class DraftHeadConfig:
    dim: int  # the target's hidden size
    hidden_dim: int  # the MLP's width
    n_tokens: int  # the tokens it can propose (a subset of the target's vocabulary)
    target_vocab_size: int
    norm_eps: float = 1e-5

    def to_hf(self) -> dict:
        return {"architectures": [ARCHITECTURE], "model_type": "pocketlm_draft_head", **vars(self)}

    @classmethod
    def from_hf(cls, d: dict) -> DraftHeadConfig:
        return cls(**{k: d[k] for k in ("dim", "hidden_dim", "n_tokens", "target_vocab_size", "norm_eps")})


def is_draft_head(hf_config: dict) -> bool:
    return ARCHITECTURE in hf_config.get("architectures", [])


class DraftHead(nn.Module):
    def __init__(self, cfg: DraftHeadConfig):
        super().__init__()
        self.cfg = cfg
        self.state_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.token_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate_up = nn.Linear(2 * cfg.dim, 2 * cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.head = nn.Linear(cfg.dim, cfg.n_tokens, bias=False)
        self.register_buffer("token_ids", torch.zeros(cfg.n_tokens, dtype=torch.long))  # head row i -> target token id
        self.embed: nn.Module | None = None  # the target's token embedding (attach)
        self.fused = None

    def attach(self, target: nn.Module) -> DraftHead:
        """Read token embeddings from `target` (not registered: neither saved nor counted as the head's); call
        after the weights (token_ids) are loaded."""
        object.__setattr__(self, "embed", target.model.embed_tokens)
        self.fused = None  # DraftHeadStep, built at the first decode (False: the kernels cannot take this head)
        self.rows_of = torch.full((self.cfg.target_vocab_size,), -1, dtype=torch.long, device=self.token_ids.device)
        self.rows_of[self.token_ids] = torch.arange(self.cfg.n_tokens, device=self.token_ids.device)  # target id -> head row
        return self

    def step(self, state: torch.Tensor, embedded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """state (..., D) the target's hidden state at t (or the previous step's guess of it), embedded (..., D)
        the token at t+1 -> (guess of the hidden state at t+1 (..., D), logits over token_ids (..., n_tokens))."""
        z = torch.cat([self.state_norm(state), self.token_norm(embedded)], dim=-1)  # (..., 2D)
        gate, up = self.gate_up(z).chunk(2, dim=-1)  # (..., F) each
        state = state + self.down(F.silu(gate) * up)  # (..., D)
        return state, self.head(state)

    @torch.inference_mode()
    def decode(self, state: torch.Tensor, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """step for one guess at inference: state (1, D), the token's id -> (next state (1, D), logits (1, n_tokens)),
        through one call into the kernels where they read the head's layers (an int4 head from load_draft), else
        the modules."""
        from pocketlm.models.fused_step import DraftHeadStep, Unsupported

        if self.fused is None:
            try:
                self.fused = DraftHeadStep(self) if kernels.library() is not None else False
            except Unsupported:
                self.fused = False
        if self.fused and kernels.library() is not None:
            return self.fused(state, token)
        return self.step(state, self.embed(torch.tensor([token])))

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, n_tokens) -> (B, V) over the target's vocabulary, -inf where the head cannot propose."""
        full = logits.new_full((logits.size(0), self.cfg.target_vocab_size), float("-inf"))
        return full.index_copy_(1, self.token_ids, logits)
