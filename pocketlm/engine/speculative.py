"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023): a small draft model with the same tokenizer proposes k tokens one by one, the target
checks all of them in one forward pass, and keeps the longest prefix it agrees with plus one token of its own.

Greedy: a proposal is kept when it is the target's own greedy choice, so the text equals the target's
greedy text exactly. Sampled: a proposal x drawn from the draft's distribution q is kept with probability
min(1, p(x) / q(x)); at the first refusal the token is drawn from normalize(max(0, p - q)). The kept
tokens are then distributed exactly as the target's samples (the papers' theorem), whatever the draft.

Caches: each model's cache is written by position and every forward pass attends only up to its own
positions (pocketlm.models.decoder.attention_spans), so refused proposals need no rollback: their entries
lie past the accepted text and are overwritten by the next pass.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch

from pocketlm.engine.sampling import SamplingParams, apply_repetition_penalty, greedy_token, recent_ids, token_distribution
from pocketlm.engine.step import decode_one_token, prefill
from pocketlm.errors import PocketLMError


HEAD_GOES_ON_P = 0.8  # a draft head guesses again only when this sure of its last guess (HeadDrafter.goes_on)


class ModelDrafter:
    """A smaller model of the same tokenizer, in its own KV cache."""

    wants_hidden = False

    def __init__(self, model):
        self.model = model

    def start(self, context: torch.Tensor, hidden: torch.Tensor | None) -> None:
        prefill(self.model, context[None])
        self.seen = len(context)  # context positions its cache holds

    def propose(self, ids: torch.Tensor, choose, params: SamplingParams, recent: torch.Tensor):
        """ids (N,): the text so far -> choose(the draft's logits (1, V) for token N). Feeds what its cache lacks:
        1 token, or 2 after a round that kept all k."""
        logits = decode_one_token(self.model, ids[self.seen :][None], torch.arange(self.seen, len(ids)))
        self.seen = len(ids)
        return choose(logits, ids)

    def goes_on(self) -> bool:
        return True  # k proposals every round

    def checked(self, n_kept: int, hidden: torch.Tensor | None, kept: int) -> None:
        """The target kept the first n_kept ids (then adds one of its own): cache entries past them are stale."""
        self.seen = min(self.seen, n_kept)


class HeadDrafter:
    """A draft head (pocketlm.models.draft_head): its whole state is the target's hidden state at the position
    before the last token, so it needs the target's hidden states and keeps no cache."""

    wants_hidden = True

    def __init__(self, head):
        self.head = head

    def start(self, context: torch.Tensor, hidden: torch.Tensor | None) -> None:
        self.state = hidden  # (1, D) the target's at the prompt's last position

    def propose(self, ids: torch.Tensor, choose, params: SamplingParams, recent: torch.Tensor):
        self.state, logits = self.head.decode(self.state, int(ids[-1]))  # (1, D), (1, n_tokens)
        if params.greedy:  # its own tokens only, under the target's repetition penalty on those it holds
            if params.repetition_penalty != 1.0:
                rows = self.head.rows_of[recent]  # (1, N), -1 for a token it cannot propose
                logits = apply_repetition_penalty(logits, rows[rows >= 0][None], params.repetition_penalty)
            best = int(logits.numpy().argmax())  # numpy's: see greedy_token
            self.sure = float(logits.softmax(-1)[0, best])
            return self.head.token_ids[best : best + 1], None
        token, probs = choose(self.head.full_logits(logits), ids)  # (1, V): the distribution is needed to accept or refuse
        self.sure = float(probs[0, token])
        return token, probs

    def goes_on(self) -> bool:
        """Guess once more only when sure of the last guess: each further guess costs the check a row (about 0.25 of
        a step from the third on a CPU), worth it only when the guesses before it are likely kept."""
        return self.sure >= HEAD_GOES_ON_P

    def checked(self, n_kept: int, hidden: torch.Tensor | None, kept: int) -> None:
        self.state = hidden[kept : kept + 1]  # the target's at the position before its own token


def drafter_for(draft):
    from pocketlm.models.draft_head import DraftHead

    return HeadDrafter(draft) if isinstance(draft, DraftHead) else ModelDrafter(draft)


def logits_and_hidden(model, idx: torch.Tensor, input_pos: torch.Tensor, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """idx (1, T) consecutive tokens of one sequence at input_pos (T,) (or (1, T) in cache row slots (1,)) -> logits
    (T, V) and final-norm hidden states (T, D): through the fused step when it takes the call, else the modules."""
    from pocketlm.models.fused_step import fused_logits

    hidden = torch.empty(idx.size(1), model.cfg.dim)
    logits = fused_logits(model, idx, input_pos, slots, hidden=hidden)
    if logits is not None:
        return logits[0], hidden
    h = model.hidden(idx, input_pos, slots)  # (1, T, D)
    return model.logits(h)[0], h[0]


def speculative_tokens(
    target, draft, context: torch.Tensor, params: SamplingParams, k: int, recent_window: int,
    generator: torch.Generator | None, stats=None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token id, the target's logits (1, V) at that position) forever; the target's cache (and a draft
    model's) must be set up for len(context) + the tokens to come + k + 1 positions. context (T,) is the prompt.
    draft: a model with the target's tokenizer, or a DraftHead trained on the target."""
    # not decorated with inference_mode: on a generator that decorator imports torch._dynamo (1.3 s of start-up)
    drafter = drafter_for(draft)

    def recent(ids: torch.Tensor) -> torch.Tensor:
        return recent_ids(ids, recent_window)

    def choose(logits: torch.Tensor, ids: torch.Tensor):
        """-> (token (1,), its distribution (1, V) or None when greedy)"""
        if params.greedy:
            return greedy_token(logits, params, recent(ids)), None
        probs = token_distribution(logits, params, recent(ids))
        return torch.multinomial(probs, 1, generator=generator)[:, 0], probs

    hidden = torch.empty(1, target.cfg.dim) if drafter.wants_hidden else None
    logits = prefill(target, context[None], hidden=hidden)  # (1, V)
    with torch.inference_mode():
        drafter.start(context, hidden)
    token, _ = choose(logits, context)
    yield int(token), logits
    while True:
        context = torch.cat([context, token])  # the last token is in neither cache yet
        n = len(context)
        with torch.inference_mode():
            # 1. the draft proposes up to k tokens, one step each (a head stops where it is unsure)
            proposals, draft_probs, ids = [], [], context
            while len(proposals) < k and (not proposals or drafter.goes_on()):
                proposal, probs = drafter.propose(ids, choose, params, recent(ids))
                proposals.append(proposal)
                draft_probs.append(probs)
                ids = torch.cat([ids, proposal])
            m = len(proposals)
            # 2. the target scores the last token and all m proposals in one pass: row i predicts position n + i
            if drafter.wants_hidden:
                t_logits, t_hidden = logits_and_hidden(target, ids[n - 1 :][None], torch.arange(n - 1, n + m))  # (m+1, V), (m+1, D)
            else:
                t_logits, t_hidden = target(ids[n - 1 :][None], torch.arange(n - 1, n + m))[0], None  # (m+1, V)
        # 3. keep the agreed prefix, then one token of the target's own
        kept = 0
        for i in range(m):
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
            stats.draft_tokens += m
            stats.draft_accepted += kept
            stats.draft_checks += 1
        if kept < m and not params.greedy:
            residual = (p - q).clamp(min=0)  # (1, V): the target's mass the draft under-proposed
            token = torch.multinomial(residual / residual.sum(), 1, generator=generator)[:, 0]
        else:
            token, _ = choose(t_logits[kept : kept + 1], ids[: n + kept])
        yield int(token), t_logits[kept : kept + 1]
        context = ids[: n + kept]
        drafter.checked(n + kept, t_hidden, kept)


def check_same_tokenizer(target_tok, draft_tok) -> None:
    if target_tok is not draft_tok and not target_tok.same_vocabulary(draft_tok):  # a draft head shares its target's
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
