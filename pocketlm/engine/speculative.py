"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023): a small draft model with the same tokenizer proposes k tokens one by one, the target
checks all of them in one forward pass, and keeps the longest prefix it agrees with plus one token of its own.

Greedy: a proposal is kept when it is the target's own greedy choice, so the text equals the target's
greedy text exactly. Sampled: a proposal x drawn from the draft's distribution q is kept with probability
min(1, p(x) / q(x)); at the first refusal the token is drawn from normalize(max(0, p - q)). The kept
tokens are then distributed exactly as the target's samples (the papers' theorem), whatever the draft.

Caches: each model's cache is written by position and every forward pass attends only up to its own
positions (pocketlm.models.llama.attention_spans), so refused proposals need no rollback: their entries
lie past the accepted text and are overwritten by the next pass.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch

from pocketlm.engine.sampling import SamplingParams, greedy_token, token_distribution
from pocketlm.errors import PocketLMError


def speculative_tokens(
    target, draft, context: torch.Tensor, params: SamplingParams, k: int, recent_window: int,
    generator: torch.Generator | None, stats=None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token id, the target's logits (1, V) at that position) forever; both models' caches must be set
    up for len(context) + the tokens to come + k + 1 positions. context (T,) is the prompt."""
    # not decorated with inference_mode: on a generator that decorator imports torch._dynamo (1.3 s of start-up)
    from pocketlm.engine.generate import decode_one_token, prefill

    def recent(ids: torch.Tensor) -> torch.Tensor:  # (1, N) what the repetition penalty looks at
        return ids[-recent_window:][None] if recent_window else ids[:0][None]

    def choose(logits: torch.Tensor, ids: torch.Tensor):
        """-> (token (1,), its distribution (1, V) or None when greedy)"""
        if params.greedy:
            return greedy_token(logits, params, recent(ids)), None
        probs = token_distribution(logits, params, recent(ids))
        return torch.multinomial(probs, 1, generator=generator)[:, 0], probs

    logits = prefill(target, context[None])  # (1, V)
    prefill(draft, context[None])
    draft_seen = len(context)  # context positions the draft's cache holds
    token, _ = choose(logits, context)
    yield int(token), logits
    while True:
        context = torch.cat([context, token])  # the last token is in neither cache yet
        n = len(context)
        # 1. the draft proposes k tokens, one forward pass each
        proposals, draft_probs, ids = [], [], context
        feed, pos = context[draft_seen:], draft_seen  # 1 token, or 2 after a round that kept all k
        for _ in range(k):
            d_logits = decode_one_token(draft, feed[None], torch.arange(pos, pos + len(feed)))  # (1, V)
            proposal, probs = choose(d_logits, ids)
            proposals.append(proposal)
            draft_probs.append(probs)
            ids = torch.cat([ids, proposal])
            pos += len(feed)
            feed = proposal
        # 2. the target scores the last token and all k proposals in one pass: row i predicts position n + i
        with torch.inference_mode():
            t_logits = target(ids[n - 1 :][None], torch.arange(n - 1, n + k))[0]  # (k+1, V)
        # 3. keep the agreed prefix, then one token of the target's own
        kept = 0
        for i in range(k):
            x = proposals[i]
            if params.greedy:
                mine, _ = choose(t_logits[i : i + 1], ids[: n + i])
                ok = bool(mine == x)
            else:
                p = token_distribution(t_logits[i : i + 1], params, recent(ids[: n + i]))  # (1, V)
                q = draft_probs[i]
                ok = torch.rand(1, generator=generator).item() < min(1.0, (p[0, x] / q[0, x]).item())
            if not ok:
                break
            kept += 1
            yield int(x), t_logits[i : i + 1]
        if stats is not None:
            stats.draft_tokens += k
            stats.draft_accepted += kept
        if kept < k and not params.greedy:
            residual = (p - q).clamp(min=0)  # (1, V): the target's mass the draft under-proposed
            token = torch.multinomial(residual / residual.sum(), 1, generator=generator)[:, 0]
        else:
            token, _ = choose(t_logits[kept : kept + 1], ids[: n + kept])
        yield int(token), t_logits[kept : kept + 1]
        context = ids[: n + kept]
        draft_seen = n + min(kept, k - 1)


def check_same_tokenizer(target_tok, draft_tok) -> None:
    if not target_tok.same_vocabulary(draft_tok):
        raise PocketLMError(
            "the draft model's tokenizer differs from the target's: speculative decoding needs a draft with the "
            "same tokenizer (e.g. a smaller model of the same family, or one distilled from the target)"
        )


def layer_draft(model, n_layers: int):
    """A draft made of the target's first n_layers blocks (plus its embedding, final norm and head), sharing
    the target's weights: a cheap stand-in until a distilled draft exists, and a test fixture."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():  # tensors kept as plain attributes (an int4 layer's kernel layout)
        shared.update({id(v): v for v in vars(module).values() if isinstance(v, torch.Tensor)})
    if getattr(model, "decode_step", None):
        shared[id(model.decode_step)] = None  # the target's fused step points at the target's caches: not the draft's
    draft = copy.deepcopy(model, memo=shared)  # new modules (and KV caches), the same weight tensors
    draft.model.layers = draft.model.layers[:n_layers]
    return draft
