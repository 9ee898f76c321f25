"""Log-likelihood of each of a fixed set of continuations (the labels) after a prompt.

The score of a label is sum_j log p(label[j] | context, label[:j]): lm-evaluation-harness's `loglikelihood`
request, whose argmax over the choices is its multiple-choice `acc`. Context and label are tokenized as the
harness tokenizes them (`encode_choices`, its `_encode_pair`): the context string (instruction, few-shot examples
and the example, joined) in one piece, and each label as the tokens of context + label past the context's own, with
whitespace at the end of the context moved to the label. So a label's tokens can differ between examples, and a
boundary the separate pieces would tokenize differently (SmolLM2's "\n\n" is one token alone and two before
"Text") is scored as the whole string reads.

The context's first tokens that every example shares (`shared_prefix`: the instruction, label list and few-shot
examples, up to where the joint tokenization first differs) run once per data set; the rest of a context, the
query, per example. Two ways to score, both exact:
  - "cache": the prefix runs once for the whole data set and its keys/values are kept; per example the query
    runs once on top of a copy of them, and the labels' tokens run batched against copies of that KV cache
    (one row per label, as many rows per pass as fit KV_BUDGET_BYTES, longest labels first), each row attending
    to the prompt and to its own label. Cost per example: about Q + sum(len(label) - 1) positions. Single-token
    labels need no label pass at all: the query's last logits score them.
  - "batch": one plain causal forward of (prefix + query + label) per label, batched; no cache. Cost per
    example: L * (P + Q + len(label)) positions. Simple, and the reference the cache path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pocketlm.errors import PocketLMError

METHODS = ("cache", "batch")
KV_BUDGET_BYTES = 256 * 2**20  # the labels' batched KV cache copies are made this many bytes at a time
BATCH_TOKENS = 4096  # positions per forward for the "batch" method
LOGIT_ROWS = 512  # positions whose (., V) logits exist at once (Gemma's V = 262k: 512 MB in fp32)


def _layers(model):
    # Both decoder families (models/llama.py, models/gemma3.py) keep their blocks in model.model.layers, each
    # with self_attn.kv_cache (a KVCache with k, v buffers (B, n_kv, S, hd)) once setup_cache() has run.
    return model.model.layers


def _kv(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v) for layer in _layers(model)]


def _load_kv(model, kv: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> None:
    """Copy positions [0, n) of kv (each (1, n_kv, >=n, hd)) into every row of the model's current cache."""
    for (k, v), layer in zip(kv, _layers(model)):
        cache = layer.self_attn.kv_cache
        cache.k[:, :, :n].copy_(k[:, :, :n])  # broadcasts over the batch rows
        cache.v[:, :, :n].copy_(v[:, :, :n])


def _target_logprobs(model, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """h (N, D) hidden states, targets (N,) token ids -> log p(target) (N,), LOGIT_ROWS rows of logits at a time."""
    out = []
    for begin in range(0, h.size(0), LOGIT_ROWS):
        logits = model.logits(h[None, begin : begin + LOGIT_ROWS])[0].float()  # (n, V)
        logp = F.log_softmax(logits, dim=-1)
        out.append(logp.gather(-1, targets[begin : begin + LOGIT_ROWS, None])[:, 0])  # (n,)
    return torch.cat(out) if out else torch.zeros(0)


def encode_choices(tokenizer, context: str, continuations: list[str], add_special_tokens: bool) -> tuple[list[int], list[list[int]]]:
    """(context ids, each continuation's ids) as lm-evaluation-harness's `_encode_pair` (lm_eval/api/model.py) makes
    them for each (context, continuation) request: whitespace at the end of the context moves to the start of the
    continuation, then whole = enc(context + continuation), context_ids = enc(context), continuation = whole past
    len(context_ids). add_special_tokens: BOS where the model wants one (a raw prompt), none for a rendered chat
    template, which writes its own."""
    n_spaces = len(context) - len(context.rstrip())
    context_ids = tokenizer.encode(context[: len(context) - n_spaces], add_special_tokens=add_special_tokens)
    conts = []
    for continuation in continuations:
        whole = tokenizer.encode(context + continuation, add_special_tokens=add_special_tokens)
        conts.append(whole[len(context_ids):])
        if not conts[-1]:
            raise PocketLMError(f"the label {continuation!r} has no tokens of its own after the prompt (they merge into "
                                f"the prompt's last token): end the prompt with a space or a new line")
    return context_ids, conts


def shared_prefix(contexts: list[list[int]]) -> list[int]:
    """The longest run of tokens every context starts with, leaving each at least one token of its own (the query,
    whose last logits score the labels' first tokens)."""
    first, n = contexts[0], min(len(c) for c in contexts) - 1
    for ids in contexts[1:]:
        n = next((i for i in range(n) if ids[i] != first[i]), n)
    return first[: max(n, 0)]


class ChoiceScorer:
    """score(query_ids, continuations) -> sum of log-probs of each continuation after prefix_ids + query_ids, (L,)
    fp32. The continuations may change with every example (encode_choices); given to the constructor, they are the
    default of score()."""

    def __init__(self, model, prefix_ids: list[int], continuations: list[list[int]] | None, context_length: int,
                 method: str = "cache"):
        if method not in METHODS:
            raise PocketLMError(f"unknown scoring method {method!r}: choose one of {', '.join(METHODS)}")
        self.model, self.method, self.context_length = model, method, context_length
        self.prefix = torch.tensor(prefix_ids, dtype=torch.long)  # (P,)
        self.default_conts = continuations
        self.prefix_kv = None
        if method == "cache" and len(prefix_ids):
            self.prefix_kv = self._run_prefix()

    @torch.inference_mode()
    def _run_prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        P = self.prefix.numel()
        self.model.setup_cache(1, P)
        try:
            for begin in range(0, P, 512):  # chunks bound the (T, S) mask, as the engine's prefill
                chunk = self.prefix[begin : begin + 512]
                self.model.hidden(chunk[None], torch.arange(begin, begin + chunk.numel()))
            return [(k.clone(), v.clone()) for k, v in _kv(self.model)]  # (1, n_kv, P, hd) each
        finally:
            self.model.clear_cache()

    def rows_per_pass(self, row_bytes: int) -> int:
        """How many labels run at once: their copies of the context's KV cache fit KV_BUDGET_BYTES."""
        return max(1, KV_BUDGET_BYTES // row_bytes)

    def check_length(self, n_query: int) -> None:
        total = self.prefix.numel() + n_query + self.max_cont
        if total > self.context_length:
            raise PocketLMError(
                f"a prompt plus its label is {total} tokens, over the model's context of {self.context_length}: "
                f"use fewer --shots or shorter texts"
            )

    @torch.inference_mode()
    def score(self, query_ids: list[int], continuations: list[list[int]] | None = None) -> torch.Tensor:
        continuations = continuations if continuations is not None else self.default_conts
        if not continuations or any(len(c) == 0 for c in continuations):
            raise PocketLMError("every label must be at least one token long")
        if not query_ids:
            raise PocketLMError("an example's prompt is empty")
        self.conts = continuations  # this example's: read by the two methods below
        self.max_cont = max(len(c) for c in continuations)
        self.first = torch.tensor([c[0] for c in continuations])  # (L,)
        self.check_length(len(query_ids))
        query = torch.tensor(query_ids, dtype=torch.long)
        return self._score_cache(query) if self.method == "cache" else self._score_batch(query)

    def _score_cache(self, query: torch.Tensor) -> torch.Tensor:
        model, P, Q = self.model, self.prefix.numel(), query.numel()
        n = P + Q
        model.setup_cache(1, n)
        try:
            if self.prefix_kv is not None:
                _load_kv(model, self.prefix_kv, P)
            h = model.hidden(query[None], torch.arange(P, n))  # (1, Q, D)
            logp = F.log_softmax(model.logits(h[:, -1:])[0, 0].float(), dim=-1)  # (V,) next-token after the query
            scores = logp[self.first].clone()  # (L,) each label's first token
            if self.max_cont == 1:
                return scores
            context_kv = _kv(model)  # the batch-1 cache, (1, n_kv, n, hd) each; kept while the labels run
            T = self.max_cont - 1  # label tokens fed: all but each label's last
            elem = context_kv[0][0].element_size()
            row_bytes = sum(k.numel() + v.numel() for k, v in context_kv) * elem * (n + T) // n
            group = self.rows_per_pass(row_bytes)
            # Labels longest first, so each pass pads its rows only to its own longest label (banking77's 77
            # labels: 201 label tokens fed instead of 77 x 6 = 462).
            longer = sorted((i for i, c in enumerate(self.conts) if len(c) > 1), key=lambda i: -len(self.conts[i]))
            G = min(group, len(longer))
            # One G-row cache for all passes: the context rows are the same for every pass, and each pass
            # writes only positions n..n+t-1, which the next pass overwrites (causal attention never sees stale
            # positions past its own).
            model.setup_cache(G, n + T)
            _load_kv(model, context_kv, n)
            for begin in range(0, len(longer), G):
                owners = longer[begin : begin + G]
                t = len(self.conts[owners[0]]) - 1  # this pass's longest label, minus its last token
                tokens = torch.zeros(G, t, dtype=torch.long)  # right-padded: causal attention keeps pads unseen
                for row, i in enumerate(owners):  # rows past len(owners) (the last pass) stay padding
                    c = self.conts[i]
                    tokens[row, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                h = model.hidden(tokens, torch.arange(n, n + t))  # (G, t, D)
                # position j of a row predicts token j + 1 of its label
                picks = [(row, j, i, self.conts[i][j + 1]) for row, i in enumerate(owners) for j in range(len(self.conts[i]) - 1)]
                row, col, owner, target = (list(x) for x in zip(*picks))
                lp = _target_logprobs(model, h[row, col], torch.tensor(target))  # (N, D) hidden -> (N,)
                scores.index_add_(0, torch.tensor(owner), lp)
            return scores
        finally:
            model.clear_cache()

    def _score_batch(self, query: torch.Tensor) -> torch.Tensor:
        context = torch.cat([self.prefix, query])  # (n,)
        n = context.numel()
        T = n + self.max_cont - 1  # each row: context + label[:-1], right-padded
        scores = torch.zeros(len(self.conts))
        group = max(1, BATCH_TOKENS // T)
        for begin in range(0, len(self.conts), group):
            conts = self.conts[begin : begin + group]
            rows = torch.zeros(len(conts), T, dtype=torch.long)
            for i, c in enumerate(conts):
                rows[i, :n] = context
                rows[i, n : n + len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            h = self.model.hidden(rows)  # (G, T, D), plain causal forward
            # label token j is predicted at position n - 1 + j
            row, pos, tok = zip(*[(i, n - 1 + j, c[j]) for i, c in enumerate(conts) for j in range(len(c))])
            lp = _target_logprobs(self.model, h[list(row), list(pos)], torch.tensor(tok))  # (N, D) hidden -> (N,)
            scores.index_add_(0, torch.tensor(row) + begin, lp)
        return scores
