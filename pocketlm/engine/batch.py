"""Continuous batching: sequences that start at different times decode together, one forward pass per step.

A `Batch` owns one model's KV cache of `max_batch` rows, its slots. A new sequence takes a free slot and its
prompt is prefilled there on its own (batch 1), one chunk of PREFILL_CHUNK tokens between two decode steps,
so that a long prompt does not stop the others; then it joins the decode step, in which every sequence
feeds its last chosen token at its own position (the models' `slots=` path). Sampling stays with each
Sequence (engine/generate.py): its own params, processors, seed and stop strings.

Speculative decoding (as llama.cpp's server's draft model): with a draft (a smaller model with the same
tokenizer), a greedy sequence alone in the batch proposes `draft_tokens` tokens with the draft in its own cache
row, and the target checks them all in one pass (pocketlm.engine.speculative's method, the rows' logits handed
back for the sequence's own choice). Several sequences decode together as usual: a batch's step already shares
each weight read between its rows, which is what a draft's proposals would buy.

Prefix cache (as llama.cpp's server): a slot remembers the token ids its cache row holds, also after its
sequence ends. A new prompt takes the free slot whose tokens share the longest prefix with it and prefills
only the rest. Just before a prompt's chunk runs, positions another slot's row already holds for a longer
shared prefix are copied from that row instead of computed: a busy slot's, or those of a prompt that came
in the same burst and was prefilled a moment earlier (eight clients with one system prompt, n choices of
one prompt).

LoRA adapters (pocketlm.models.lora): sequences of different adapters of one base share the batch. Each pass selects
an adapter per row (models/lora.select) and every row gets its own adapter's update; a slot's cached keys and values
are only reused by a prompt of the same adapter (they depend on it from the first layer on).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import time

import torch

from pocketlm.engine.generate import PREFILL_CHUNK, Sequence, prefill
from pocketlm.engine.sampling import recent_ids
from pocketlm.models.fused_step import MAX_TOKENS, fused_logits
from pocketlm.models.lora import select

GROW_BY = 256  # cache positions are added in steps of this many: few reallocations, little waste
# The output head runs on at most this many rows at a time: quantized Linears switch to their prompt path
# (dequantize the weight, then a float matmul) from 16 rows on aten's int8 kernel (128 on fbgemm's, which
# an x86 build's heads use: quant/int8.py), and for the head, the largest matrix, that dequantization every
# step made a 16-row step of SmolLM2 1.7x slower (308 ms against 184, one thread, aten's kernel). In groups
# of 8 a row also gets the same head numbers as decoded alone.
HEAD_ROWS = 8
# A draft stops proposing at a token it gives less than this probability (llama.cpp's speculative --draft-p-min,
# default 0.8 in its server): the proposals it would be unsure of are mostly refused, and each costs a row of the
# target's check.
DRAFT_P_MIN = 0.8


@dataclass
class Slot:
    index: int  # the cache row
    tokens: list[int] = field(default_factory=list)  # what the row holds, position by position
    seq: Sequence | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    last_used: int = 0  # when it was last taken: the oldest prompt is prefilled first, and among free slots
    # that share nothing with a new prompt the least recently used goes first
    draft_tokens: list[int] = field(default_factory=list)  # what the draft's cache row holds, position by position
    checked: bool = False  # tokens ends with proposals the last verify pass wrote; the sequence kept a prefix of them
    # a draft head's state: the target's final-norm hidden state (1, D) at the last position the row was fed, or
    # after a verify pass those of its rows (from position checked_from), one of which settle() keeps
    hidden: torch.Tensor | None = None
    checked_from: int = 0
    adapter: int = 0  # the LoRA adapter (an index of the model's, 0: none) its sequence runs and its row's tokens were computed with


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Batch:
    def __init__(self, model, max_batch: int, context_length: int, draft=None, draft_tokens: int = 4):
        """draft: a model with the same tokenizer for speculative decoding (its cache gets max_batch rows too), or a
        draft head (pocketlm.models.draft_head), which reads the target's hidden states and keeps no cache."""
        from pocketlm.models.draft_head import DraftHead

        self.model, self.context_length = model, context_length
        self.draft, self.draft_tokens = draft, draft_tokens
        self.head = draft if isinstance(draft, DraftHead) else None
        self.slots = [Slot(i) for i in range(max_batch)]
        self.length = min(GROW_BY, context_length)  # cache positions per row; grows with the longest sequence
        self.clock = 0
        for m in self.models():
            m.setup_cache(max_batch, self.length)

    def models(self) -> list:
        return [self.model] if self.draft is None or self.head is not None else [self.model, self.draft]

    def __len__(self) -> int:
        return sum(s.seq is not None for s in self.slots)

    def has_room(self) -> bool:
        return len(self) < len(self.slots)

    def add(self, seq: Sequence, adapter: int = 0) -> None:
        """Seat seq in a free slot, to run with the model's LoRA adapter `adapter` (0: the base model);
        prefill_step() computes what its cache row does not hold yet (and counts the prompt tokens that came from
        the cache in seq.stats.cached_tokens)."""
        prompt = seq.prompt_ids
        slot, cached = self.place(prompt, adapter)
        # positions written: the prompt, then every new token but the last (it is never fed back)
        self.reserve(len(prompt) + seq.max_new - 1)
        slot.seq, slot.todo = seq, prompt[cached:]
        seq.stats.cached_tokens = cached
        seq.started = time.perf_counter()  # its time to first token counts from here

    @torch.inference_mode()
    def prefill_step(self) -> list[tuple[Sequence, torch.Tensor, list[int]]]:
        """Prompt chunks, the oldest prompt first, until PREFILL_CHUNK tokens ran (or all did).
        -> [(sequence, the logits (1, V) of its first new token, [])] for the prompts now complete"""
        complete, spent = [], 0
        for slot in sorted((s for s in self.slots if s.todo), key=lambda s: s.last_used):
            if spent >= PREFILL_CHUNK:
                break
            self.borrow(slot)
            chunk = slot.todo[:PREFILL_CHUNK]  # the boundaries a run of its own (generate.prefill) has
            hidden = self.hidden_rows(1)
            select(self.model, slot.adapter)
            logits = prefill(self.model, torch.tensor([chunk]), start=len(slot.tokens), slot=slot.index, hidden=hidden)
            slot.tokens, slot.todo, spent = slot.tokens + chunk, slot.todo[len(chunk) :], spent + len(chunk)
            slot.hidden = hidden
            if not slot.todo:
                complete.append((slot.seq, logits, []))
        return complete

    def place(self, prompt: list[int], adapter: int = 0) -> tuple[Slot, int]:
        """A free slot for prompt (run with `adapter`), and how many of its first positions already hold the prompt's start."""
        free = [s for s in self.slots if s.seq is None]
        shared = lambda s: common_prefix(s.tokens, prompt) if s.adapter == adapter else 0  # noqa: E731
        slot = max(free, key=lambda s: (shared(s), -s.last_used))
        # the last prompt token runs again: its logits start the answer
        cached = min(shared(slot), len(prompt) - 1)
        self.clock += 1
        slot.tokens, slot.last_used, slot.adapter = prompt[:cached], self.clock, adapter
        return slot, cached

    def borrow(self, slot: Slot) -> None:
        """Copy from another slot's row the positions of slot's prompt it holds beyond slot's own. Positions
        below len(tokens) never change while a slot decodes or prefills on: safe to copy at any step."""
        prompt = slot.tokens + slot.todo
        others = (s for s in self.slots if s is not slot and s.adapter == slot.adapter)
        donor = max(others, key=lambda s: common_prefix(s.tokens, prompt), default=None)
        shared = min(common_prefix(donor.tokens, prompt), len(prompt) - 1) if donor else 0
        if shared > len(slot.tokens):
            self.model.copy_cache_prefix(donor.index, slot.index, shared)
            slot.seq.stats.cached_tokens += shared - len(slot.tokens)
            slot.tokens, slot.todo = prompt[:shared], prompt[shared:]

    def reserve(self, positions: int) -> None:
        if positions > self.length:
            self.length = min(self.context_length, -(-positions // GROW_BY) * GROW_BY)
            for m in self.models():
                m.setup_cache(len(self.slots), self.length, keep=True)

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, torch.Tensor, list[int]]]:
        """One forward pass for every sequence past its prompt, each feeding its last chosen token.
        -> [(sequence, logits (1, V) of its next token, [])]; for a speculative pass (a draft, one greedy sequence),
        [(sequence, logits (k + 1, V), the draft's k proposals)]: row i scores the token after proposal i - 1, and
        the caller takes rows while its choice equals the proposal (a refused proposal's row is the last it takes)."""
        seated = [s for s in self.slots if s.seq is not None and not s.todo]
        for slot in seated:
            self.settle(slot)
        if not seated:
            return []
        if self.draft is not None and len(seated) == 1 and seated[0].seq.params.greedy:
            checked = self.speculate_with_head(seated[0]) if self.head is not None else self.speculate(seated[0])
            if checked is not None:
                return [checked]
        tokens = torch.tensor([[int(s.seq.context[-1])] for s in seated])  # (n, 1)
        pos = torch.tensor([[len(s.tokens)] for s in seated])  # (n, 1): the next position of each row
        slots = torch.tensor([s.index for s in seated])
        hidden = self.hidden_rows(len(seated))
        adapters = [s.adapter for s in seated]
        select(self.model, adapters)
        logits = fused_logits(self.model, tokens, pos, slots, hidden=hidden)  # every layer and the head in one call into the kernels
        if logits is not None:
            logits = logits[:, -1]  # (n, V)
        else:
            h = self.model.hidden(tokens, pos, slots)  # (n, 1, D)
            logits = torch.cat([self.head_logits(h[i : i + HEAD_ROWS, -1], adapters[i : i + HEAD_ROWS]) for i in range(0, len(h), HEAD_ROWS)])  # (n, V)
            if hidden is not None:
                hidden.copy_(h[:, -1])
        for i, (s, token) in enumerate(zip(seated, tokens[:, 0].tolist())):
            s.tokens.append(token)
            s.hidden = None if hidden is None else hidden[i : i + 1]
        return [(s.seq, logits[i : i + 1], []) for i, s in enumerate(seated)]

    def head_logits(self, h: torch.Tensor, adapters: list[int]) -> torch.Tensor:
        """h (n, D) -> logits (n, V), each row with its adapter (one may update the head too)."""
        select(self.model, adapters)
        return self.model.logits(h)

    def speculate(self, slot: Slot) -> tuple[Sequence, torch.Tensor, list[int]] | None:
        """The draft proposes up to draft_tokens tokens after slot's sequence, one pass each in its own cache row
        (first catching up on what the row lacks), while it is sure of them (DRAFT_P_MIN); then the target
        scores the last chosen token and every proposal in one pass (with none, a plain step). None when there is
        no room for a proposal."""
        seq = slot.seq
        context = seq.context.tolist()  # the prompt and every chosen token; the last is in neither cache yet
        n = len(slot.tokens)  # == len(context) - 1
        k = min(self.draft_tokens, MAX_TOKENS - 1, self.length - n - 1, seq.max_new - seq.stats.completion_tokens - 1)
        if k < 1:
            return None
        held = min(common_prefix(slot.draft_tokens, context), n)  # the draft row's positions still valid
        logits = prefill(self.draft, torch.tensor([context[held:]]), start=held, slot=slot.index)  # (1, V)
        proposals = []
        while True:
            p, token = torch.softmax(logits[0], -1).max(-1)
            if p < DRAFT_P_MIN:  # unsure: a proposal it would likely lose costs the target a row
                break
            proposals.append(int(token))
            if len(proposals) == k:
                break
            logits = rows_logits(self.draft, proposals[-1:], n + len(proposals), slot.index)  # the next one's
        slot.draft_tokens = context + proposals[: len(proposals) - (len(proposals) == k)]  # what the draft was fed
        fed = [context[-1], *proposals]  # positions n .. n + len(proposals)
        select(self.model, slot.adapter)
        logits = rows_logits(self.model, fed, n, slot.index)  # (len(fed), V)
        slot.tokens, slot.checked = slot.tokens + fed, True
        seq.stats.draft_tokens += len(proposals)
        return seq, logits, proposals

    def hidden_rows(self, n: int) -> torch.Tensor | None:
        """Where a pass writes its rows' hidden states, when a draft head reads them."""
        return None if self.head is None else torch.empty(n, self.model.cfg.dim)

    def speculate_with_head(self, slot: Slot) -> tuple[Sequence, torch.Tensor, list[int]] | None:
        """As speculate, with a draft head: it guesses from the target's hidden state at the position before the
        last chosen token, one step per proposal and no cache, so it always proposes once (a refused guess costs the
        check one more row, about 12% of a step on a CPU, against a whole step saved by a kept one), and again while
        it is sure (HeadDrafter.goes_on)."""
        from pocketlm.engine.speculative import HeadDrafter, logits_and_hidden

        seq = slot.seq
        n = len(slot.tokens)  # == len(seq.context) - 1
        k = min(self.draft_tokens, MAX_TOKENS - 1, self.length - n - 1, seq.max_new - seq.stats.completion_tokens - 1)
        if k < 1 or slot.hidden is None:
            return None
        drafter, ids = HeadDrafter(self.head), seq.context
        drafter.start(ids, slot.hidden)
        proposals = []
        while len(proposals) < k and (not proposals or drafter.goes_on()):
            token, _ = drafter.propose(ids, None, seq.params, recent_ids(ids, seq.window))
            proposals.append(int(token))
            ids = torch.cat([ids, token])
        fed = [int(seq.context[-1]), *proposals]  # positions n .. n + k
        select(self.model, slot.adapter)
        logits, slot.hidden = logits_and_hidden(self.model, torch.tensor([fed]), torch.arange(n, n + len(fed))[None], torch.tensor([slot.index]))
        slot.tokens, slot.checked, slot.checked_from = slot.tokens + fed, True, n
        seq.stats.draft_tokens += len(proposals)
        return seq, logits, proposals

    def settle(self, slot: Slot) -> None:
        """After a verify pass: the row's valid positions are those of the tokens the sequence kept (all but its
        last chosen one, which is fed next); the refused proposals' positions are overwritten as decoding goes on,
        and attention never reads past a row's own position. A draft head keeps the hidden state of the last of them."""
        if slot.checked and slot.seq is not None:
            slot.tokens, slot.checked = slot.seq.context[:-1].tolist(), False
            if slot.hidden is not None:
                last = len(slot.tokens) - 1 - slot.checked_from
                slot.hidden = slot.hidden[last : last + 1] if 0 <= last < len(slot.hidden) else None

    def remove(self, seq: Sequence) -> None:
        """Free seq's slot (ended or cancelled); the row keeps its tokens for a later prompt that shares them."""
        for s in self.slots:
            if s.seq is seq:
                self.settle(s)
                s.seq, s.todo = None, []


def rows_logits(model, tokens: list[int], start: int, slot: int) -> torch.Tensor:
    """Consecutive tokens of one sequence at positions start.. of cache row slot -> every position's logits (T, V).
    The model's forward takes the fused step (one call into the kernels) where it can, the modules otherwise."""
    return model(torch.tensor([tokens]), torch.arange(start, start + len(tokens))[None], torch.tensor([slot]))[0]
