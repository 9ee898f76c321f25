"""Continuous batching: sequences that start at different times decode together, one forward pass per step.

A `Batch` owns one model's KV cache of `max_batch` rows, its slots. A new sequence takes a free slot and its
prompt is prefilled there on its own (batch 1), one chunk of PREFILL_CHUNK tokens between two decode steps,
so that a long prompt does not stop the others; then it joins the decode step, in which every sequence
feeds its last chosen token at its own position (the models' `slots=` path). Sampling stays with each
Sequence (engine/generate.py): its own params, processors, seed and stop strings.

Prefix cache (as llama.cpp's server): a slot remembers the token ids its cache row holds, also after its
sequence ends. A new prompt takes the free slot whose tokens share the longest prefix with it and prefills
only the rest. Just before a prompt's chunk runs, positions another slot's row already holds for a longer
shared prefix are copied from that row instead of computed: a busy slot's, or those of a prompt that came
in the same burst and was prefilled a moment earlier (eight clients with one system prompt, n choices of
one prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import time

import torch

from pocketlm.engine.generate import PREFILL_CHUNK, Sequence, prefill
from pocketlm.models.fused_step import fused_logits

GROW_BY = 256  # cache positions are added in steps of this many: few reallocations, little waste
# The output head runs on at most this many rows at a time: quantized Linears switch to their prompt path
# (dequantize the weight, then a float matmul) from 16 rows on aten's int8 kernel (128 on fbgemm's, which
# an x86 build's heads use: quant/int8.py), and for the head, the largest matrix, that dequantization every
# step made a 16-row step of SmolLM2 1.7x slower (308 ms against 184, one thread, aten's kernel). In groups
# of 8 a row also gets the same head numbers as decoded alone.
HEAD_ROWS = 8


@dataclass
class Slot:
    index: int  # the cache row
    tokens: list[int] = field(default_factory=list)  # what the row holds, position by position
    seq: Sequence | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    last_used: int = 0  # when it was last taken: the oldest prompt is prefilled first, and among free slots
    # that share nothing with a new prompt the least recently used goes first


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Batch:
    def __init__(self, model, max_batch: int, context_length: int):
        self.model, self.context_length = model, context_length
        self.slots = [Slot(i) for i in range(max_batch)]
        self.length = min(GROW_BY, context_length)  # cache positions per row; grows with the longest sequence
        self.clock = 0
        model.setup_cache(max_batch, self.length)

    def __len__(self) -> int:
        return sum(s.seq is not None for s in self.slots)

    def has_room(self) -> bool:
        return len(self) < len(self.slots)

    def add(self, seq: Sequence) -> None:
        """Seat seq in a free slot; prefill_step() computes what its cache row does not hold yet (and counts
        the prompt tokens that came from the cache in seq.stats.cached_tokens)."""
        prompt = seq.prompt_ids
        slot, cached = self.place(prompt)
        # positions written: the prompt, then every new token but the last (it is never fed back)
        self.reserve(len(prompt) + seq.max_new - 1)
        slot.seq, slot.todo = seq, prompt[cached:]
        seq.stats.cached_tokens = cached
        seq.started = time.perf_counter()  # its time to first token counts from here

    @torch.inference_mode()
    def prefill_step(self) -> list[tuple[Sequence, torch.Tensor]]:
        """Prompt chunks, the oldest prompt first, until PREFILL_CHUNK tokens ran (or all did).
        -> [(sequence, the logits (1, V) of its first new token)] for the prompts now complete"""
        complete, spent = [], 0
        for slot in sorted((s for s in self.slots if s.todo), key=lambda s: s.last_used):
            if spent >= PREFILL_CHUNK:
                break
            self.borrow(slot)
            chunk = slot.todo[:PREFILL_CHUNK]  # the boundaries a run of its own (generate.prefill) has
            logits = prefill(self.model, torch.tensor([chunk]), start=len(slot.tokens), slot=slot.index)
            slot.tokens, slot.todo, spent = slot.tokens + chunk, slot.todo[len(chunk) :], spent + len(chunk)
            if not slot.todo:
                complete.append((slot.seq, logits))
        return complete

    def place(self, prompt: list[int]) -> tuple[Slot, int]:
        """A free slot for prompt, and how many of its first positions already hold the prompt's start."""
        free = [s for s in self.slots if s.seq is None]
        slot = max(free, key=lambda s: (common_prefix(s.tokens, prompt), -s.last_used))
        # the last prompt token runs again: its logits start the answer
        cached = min(common_prefix(slot.tokens, prompt), len(prompt) - 1)
        self.clock += 1
        slot.tokens, slot.last_used = prompt[:cached], self.clock
        return slot, cached

    def borrow(self, slot: Slot) -> None:
        """Copy from another slot's row the positions of slot's prompt it holds beyond slot's own. Positions
        below len(tokens) never change while a slot decodes or prefills on: safe to copy at any step."""
        prompt = slot.tokens + slot.todo
        donor = max((s for s in self.slots if s is not slot), key=lambda s: common_prefix(s.tokens, prompt), default=None)
        shared = min(common_prefix(donor.tokens, prompt), len(prompt) - 1) if donor else 0
        if shared > len(slot.tokens):
            self.model.copy_cache_prefix(donor.index, slot.index, shared)
            slot.seq.stats.cached_tokens += shared - len(slot.tokens)
            slot.tokens, slot.todo = prompt[:shared], prompt[shared:]

    def reserve(self, positions: int) -> None:
        if positions > self.length:
            self.length = min(self.context_length, -(-positions // GROW_BY) * GROW_BY)
            self.model.setup_cache(len(self.slots), self.length, keep=True)

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, torch.Tensor]]:
        """One forward pass for every sequence past its prompt, each feeding its last chosen token.
        -> [(sequence, the logits (1, V) of its next token)]"""
        seated = [s for s in self.slots if s.seq is not None and not s.todo]
        if not seated:
            return []
        tokens = torch.tensor([[int(s.seq.context[-1])] for s in seated])  # (n, 1)
        pos = torch.tensor([[len(s.tokens)] for s in seated])  # (n, 1): the next position of each row
        slots = torch.tensor([s.index for s in seated])
        logits = fused_logits(self.model, tokens, pos, slots)  # every layer and the head in one call into the kernels
        if logits is not None:
            logits = logits[:, -1]  # (n, V)
        else:
            h = self.model.hidden(tokens, pos, slots)  # (n, 1, D)
            logits = torch.cat([self.model.logits(h[i : i + HEAD_ROWS, -1]) for i in range(0, len(h), HEAD_ROWS)])  # (n, V)
        for s, token in zip(seated, tokens[:, 0].tolist()):
            s.tokens.append(token)
        return [(s.seq, logits[i : i + 1]) for i, s in enumerate(seated)]

    def remove(self, seq: Sequence) -> None:
        """Free seq's slot (ended or cancelled); the row keeps its tokens for a later prompt that shares them."""
        for s in self.slots:
            if s.seq is seq:
                s.seq, s.todo = None, []
