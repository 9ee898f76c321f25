"""Distillation across tokenizers: the teacher and the student read the same text in their own tokens, the
tokens are aligned by the characters they spell, and the student matches the teacher's likelihood of each
aligned span.

The method is Approximate Likelihood Matching (ALM; Minixhofer, Vulic and Ponti 2025, "Universal Cross-Tokenizer
Distillation via Approximate Likelihood Matching"), without its debiasing and hidden-state terms:

  1. Both tokenizations of an answer are mapped to character offsets in the answer text. A "cut" is a place
     between two tokens; the cuts both tokenizations share split the answer into chunks, each spelled by one or
     more whole tokens on either side ("hello" + " world" against "hell" + "o" + " world": two chunks).
  2. A chunk's log-likelihood under a model is the sum of its tokens' log-probabilities (at temperature T), each
     token read after the same text: the prompt and the answer up to the chunk, in that model's own format.
  3. Per chunk, the student's binary distribution (p, 1 - p) over "the text goes on with this chunk" matches the
     teacher's under the same divergences as same-tokenizer distillation (forward KL, reverse KL, JSD:
     pocketlm.compress.distill.divergence). The end of the answer (each side's end-of-turn tokens) is one more
     chunk, so the student also learns how sure the teacher is that the answer stops there.

No mapping between the two vocabularies is needed, so any teacher pocketlm runs can teach any student; what is
lost against same-tokenizer distillation is the rest of the teacher's distribution (the tokens it did not read).
Part of it comes back with one more term (`--xtok-top-k K`): at each chunk's first position, where both models
have read the same text and both tokenizations start the chunk with the same bytes, the teacher's K likeliest
tokens that a student token spells byte for byte (`vocab_map`: FuseLLM's token mapping at edit distance 0), and
all other tokens as one outcome, make a distribution over K + 1 outcomes the student's matches (`coarse_pair`),
under the same divergence. Only where the two start alike: elsewhere a token's probability means different things
on the two sides (Gemma's "hell" + "o" against a student's "he" + "ll" + "o": the teacher gives "he" almost
nothing, though "hello" is likely), and matching there made the tests' students worse. It is off by default: on
the tests' task it did about as well as the chunks alone (held-out loss 0.108, 0.109, 0.125 against 0.098, 0.145,
0.114 for three students).

    s = encode_side(student_tok, messages, answer)      # ids, labels, and each learned token's answer characters
    t = encode_side(teacher_tok, messages, answer)
    s_chunk, t_chunk, n = align(s.spans, t.spans)       # per learned token: its chunk (-1: none)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import PocketLMError
from pocketlm.finetune.data import IGNORE, Example, assistant_spans

END = (-1, -1)  # the span of a learned token after the answer's text (end of turn, EOS)
BEFORE = (-2, -2)  # a learned token before the answer's text (a template that puts text there): in no chunk
NEG = -1e4  # a finite log(0), as in pocketlm.compress.distill


@dataclass
class Side:
    """One model's tokens of an example. spans[k]: the answer characters [a, b) of the k-th learned token (the k-th
    target position: labels[t + 1] != IGNORE, in order), END or BEFORE."""

    ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]]
    prompt_ids: list[int]

    def example(self, answer: str | None = None) -> Example:
        return Example(self.ids, self.labels, answer, self.prompt_ids)


# ------------------------------------------------------------------------------------------ encoding


def prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    """The ids a model reads before its answer to `prompt` (messages): its chat template with the generation
    prompt, or for a model without one (a base model) the user turns as raw text, as finetune's data reads them."""
    if tokenizer.has_chat_template:
        return tokenizer.encode(tokenizer.apply_chat_template(prompt, add_generation_prompt=True), add_special_tokens=False)
    return tokenizer.encode(raw_prompt(prompt), add_special_tokens=True)


def raw_prompt(prompt: list[dict]) -> str:
    # pocketlm.finetune.data.build_examples' rendering for a model without a chat template
    return "\n\n".join(m["content"] for m in prompt) + "\n"


def encode_side(tokenizer, prompt: list[dict] | None, answer: str, seq_len: int, end: bool = True) -> Side:
    """`answer` after `prompt` (messages; None: the answer is raw text, every token learned) in this tokenizer's
    format, cut to seq_len tokens. end=False: the answer is cut off (a sample that reached its length limit), so
    its end-of-turn tokens are learned by no chunk."""
    backend = tokenizer.backend
    if prompt is None:  # raw text: every token after the first is a target (build_examples' "text" rows)
        enc = backend.encode(answer, add_special_tokens=True)
        ids = list(enc.ids)
        spans = [BEFORE if special else (a, b) for (a, b), special in zip(enc.offsets, enc.special_tokens_mask)]
        if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_id):
            ids, spans = [tokenizer.bos_id, *ids], [BEFORE, *spans]
        if tokenizer.eos_id is not None:
            ids, spans = [*ids, tokenizer.eos_id], [*spans, END]
        labels, first = list(ids), 0
    elif tokenizer.has_chat_template:
        messages = [*prompt, {"role": "assistant", "content": answer}]
        full, turns = assistant_spans(tokenizer, messages)
        s0, s1 = turns[-1]  # only the last turn is learned: earlier assistant turns are context
        at = full.find(answer, s0)
        if at < 0 or at + len(answer) > s1:
            raise PocketLMError("the chat template rewrites the answer's text: cannot align the two tokenizers on it")
        enc = backend.encode(full, add_special_tokens=False)
        ids, labels, spans = list(enc.ids), [], []
        for token, (a, b) in zip(enc.ids, enc.offsets):
            inside = a < s1 and b > s0 if b > a else s0 <= a < s1  # encode_conversation's rule
            labels.append(token if inside else IGNORE)
            spans.append(answer_chars(a, b, at, len(answer)))
        first = next(i for i, label in enumerate(labels) if label != IGNORE)
    else:  # no chat template: the prompt as raw text, then the answer and EOS (encode_raw_pair)
        p = tokenizer.encode(raw_prompt(prompt), add_special_tokens=True)
        enc = backend.encode(answer, add_special_tokens=False)
        a_ids, a_spans = list(enc.ids), list(enc.offsets)
        if tokenizer.eos_id is not None:
            a_ids, a_spans = a_ids + [tokenizer.eos_id], a_spans + [END]
        ids, labels, spans, first = p + a_ids, [IGNORE] * len(p) + a_ids, [BEFORE] * len(p) + a_spans, len(p)
    ids, labels, spans = ids[:seq_len], labels[:seq_len], spans[:seq_len]
    if not end:
        spans = [BEFORE if s == END else s for s in spans]
    learned = [spans[i] for i in range(1, len(ids)) if labels[i] != IGNORE]  # target order: position t predicts t + 1
    return Side(ids, labels, learned, ids[:first])


def answer_chars(a: int, b: int, at: int, n: int) -> tuple[int, int]:
    """A token's characters [a, b) of a rendered text, as characters of the answer at [at, at + n)."""
    if b <= at and a < at:
        return BEFORE
    if a >= at + n:
        return END
    return min(max(a, at), at + n) - at, min(max(b, at), at + n) - at


def sampled_side(tokenizer, prompt: list[int], sample: list[int], stop_ids) -> tuple[Side, str, bool]:
    """A side made of a model's own sampled tokens (on-policy): (side, the sample's text, whether it ended with a
    stop token). Each token's characters come from decoding the sample's prefixes; a token whose prefix does not
    decode to a prefix of the whole (half a UTF-8 character) spells nothing and joins its neighbour's chunk."""
    ended = bool(sample) and sample[-1] in stop_ids
    body = sample[:-1] if ended else sample
    text = tokenizer.decode(body)
    spans, done = [], 0
    for k in range(1, len(body) + 1):
        piece = tokenizer.decode(body[:k])
        at = len(piece) if text.startswith(piece) else done
        spans.append((done, max(done, at)))
        done = max(done, at)
    spans += [END] if ended else []
    ids = prompt + sample
    return Side(ids, [IGNORE] * len(prompt) + sample, spans, prompt), text, ended


# ------------------------------------------------------------------------------------------ alignment


def cuts(spans: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The places the text tokens of `spans` can be cut: (lo, hi, k) for a cut before text token k (k = n: after
    the last), anywhere in characters [lo, hi] (a gap of characters no token spells, e.g. dropped spaces). No cut
    falls inside a character two tokens share (a byte-fallback character)."""
    n = len(spans)
    if n == 0:
        return []
    suffix_start = [0] * n
    low = math.inf
    for k in range(n - 1, -1, -1):
        low = min(low, spans[k][0])
        suffix_start[k] = low
    out, high = [(suffix_start[0], suffix_start[0], 0)], -1
    for k in range(1, n + 1):
        high = max(high, spans[k - 1][1])
        start = suffix_start[k] if k < n else high
        if high <= start:
            out.append((high, start, k))
    return out


def align(s_spans: list[tuple[int, int]], t_spans: list[tuple[int, int]]) -> tuple[list[int], list[int], int]:
    """Chunks of the answer both sides can be cut into -> (student's chunk per learned token, teacher's, number
    of chunks); -1 for a token in no chunk (before the first shared cut, after the last, or BEFORE)."""
    s_text = [k for k, s in enumerate(s_spans) if s[0] >= 0]  # learned tokens that spell answer text
    t_text = [k for k, s in enumerate(t_spans) if s[0] >= 0]
    s_cuts, t_cuts = cuts([s_spans[k] for k in s_text]), cuts([t_spans[k] for k in t_text])
    shared, i, j = [], 0, 0  # (k_student, k_teacher): the cuts whose character ranges meet
    while i < len(s_cuts) and j < len(t_cuts):
        (slo, shi, sk), (tlo, thi, tk) = s_cuts[i], t_cuts[j]
        if max(slo, tlo) <= min(shi, thi):
            if not shared or (sk > shared[-1][0] and tk > shared[-1][1]):
                shared.append((sk, tk))
            i, j = i + 1, j + 1
        elif shi < thi:
            i += 1
        else:
            j += 1
    s_chunk, t_chunk = [-1] * len(s_spans), [-1] * len(t_spans)
    n = 0
    for (s0, t0), (s1, t1) in zip(shared, shared[1:]):
        for k in s_text[s0:s1]:
            s_chunk[k] = n
        for k in t_text[t0:t1]:
            t_chunk[k] = n
        n += 1
    # the end of the answer: both sides' end-of-turn tokens, after both spelled the whole text
    s_end = [k for k, s in enumerate(s_spans) if s == END]
    t_end = [k for k, s in enumerate(t_spans) if s == END]
    whole = bool(shared) and shared[-1] == (len(s_text), len(t_text))
    if s_end and t_end and (whole or not (s_text or t_text)):
        for k in s_end:
            s_chunk[k] = n
        for k in t_end:
            t_chunk[k] = n
        n += 1
    return s_chunk, t_chunk, n


# ------------------------------------------------------------------------------------------ the loss


def chunk_logp(token_logp: torch.Tensor, chunk: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """token_logp (N,) the log-probabilities of the tokens read, chunk (N,) each one's chunk (-1: none) ->
    (n_chunks,) each chunk's log-likelihood: the sum of its tokens'."""
    keep = chunk >= 0
    out = torch.zeros(n_chunks, dtype=token_logp.dtype, device=token_logp.device)
    return out.index_add(0, chunk[keep], token_logp[keep])


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012); finite (NEG) where exp(x) rounds to 1."""
    x = x.clamp(max=-1e-7)
    out = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return out.clamp(min=NEG)


def binary_divergence(kind: str, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Chunk log-likelihoods (C,) of teacher and student -> (C,) D((p, 1-p) || (q, 1-q)), D as
    pocketlm.compress.distill.divergence."""
    from pocketlm.compress.distill import divergence

    logp = torch.stack([teacher.clamp(max=0), log1mexp(teacher)], dim=-1)  # (C, 2)
    logq = torch.stack([student.clamp(max=0), log1mexp(student)], dim=-1)  # (C, 2)
    return divergence(kind, logp, logq)


def teacher_reads(model, ids: torch.Tensor, labels: torch.Tensor, temperature: float, starts: torch.Tensor | None = None,
                  top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """ids, labels (B, T) -> (the log-probability at temperature T of each target token (N,) (labels[:, 1:] != IGNORE,
    row-major), and at the target positions `starts` (S,) the top_k tokens' log-probabilities (S, k) and ids (S, k)).
    The log-softmax is taken a slice of positions at a time: a 262k vocabulary's (N, V) block is large."""
    keep = labels[:, 1:] != IGNORE  # (B, T-1)
    h = model.hidden(ids)[:, :-1][keep]  # (N, D)
    targets = labels[:, 1:][keep]  # (N,)
    parts = []
    for b in range(0, len(h), 256):
        logits = model.logits(h[b : b + 256]).float() / temperature  # (n, V)
        parts.append(logits.gather(-1, targets[b : b + 256, None])[:, 0] - logits.logsumexp(-1))
    token_logp = torch.cat(parts) if parts else h.new_zeros(0)
    if starts is None or not top_k:
        return token_logp, None, None
    logits = model.logits(h[starts]).float() / temperature  # (S, V)
    top = torch.log_softmax(logits, dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)  # (S, k)
    return token_logp, top.values, top.indices


# ------------------------------------------------------------------------------------------ tokens both vocabularies spell


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id spells, None for special tokens and single bytes of a longer character (<0xNN>):
    byte-level BPE characters mapped back to their bytes (GPT-2's table), SentencePiece's "\u2581" read as a space,
    an added token that is not special (Gemma's runs of newlines) as its own text."""
    import json

    from pocketlm.tokenizer import _bytes_to_unicode

    data = json.loads(tokenizer.backend.to_str())
    byte_level = "ByteLevel" in json.dumps([data.get("pre_tokenizer"), data.get("decoder")])
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    added = {t["id"]: None if t.get("special", True) else t["content"].encode() for t in data.get("added_tokens") or []}
    out: list[bytes | None] = []
    for i in range(tokenizer.vocab_size):
        token = tokenizer.id_to_token(i)
        if i in added:
            out.append(added[i])
        elif token is None or (token.startswith("<0x") and token.endswith(">") and len(token) == 6):
            out.append(None)
        elif byte_level:
            out.append(bytes(to_byte[c] for c in token) if all(c in to_byte for c in token) else None)
        else:
            out.append(token.replace("\u2581", " ").encode())
    return out


def vocab_map(teacher_tok, student_tok, size: int = 0) -> torch.Tensor:
    """(max(V_teacher, size),) the student's token that spells the same bytes as each teacher token, -1 where none
    (exact matches: the zero-distance case of FuseLLM's minimum-edit-distance token mapping, Wan et al. 2024); the
    teacher's stop tokens map to the student's end of turn (its EOS). size: the teacher model's output rows, which
    may outnumber its tokenizer's (padding rows spell nothing)."""
    student = {b: i for i, b in enumerate(token_bytes(student_tok)) if b}
    spelled = [student.get(b, -1) if b else -1 for b in token_bytes(teacher_tok)]
    out = torch.tensor(spelled + [-1] * (size - len(spelled)))
    if student_tok.eos_id is not None:
        out[[i for i in teacher_tok.stop_ids if i < len(out)]] = student_tok.eos_id
    return out


def chunk_starts(chunk: list[int], n_chunks: int) -> list[int]:
    """The target index of each chunk's first token (chunks are numbered in text order; -1 for a chunk with none)."""
    first = [-1] * n_chunks
    for k, c in enumerate(chunk):
        if c >= 0 and first[c] < 0:
            first[c] = k
    return first


def coarse_pair(teacher_top: torch.Tensor, ids: torch.Tensor, student_logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """teacher_top (S, k) log-probabilities of the teacher's top tokens, ids (S, k) the student tokens spelling them (-1:
    none), student_logq (S, V) -> both distributions over the same outcomes (S, k + 1): each matched token, then all
    the rest together (distill.coarsen's coarser distribution, here over what both vocabularies spell)."""
    # teacher tokens spelled by one student token (its stop tokens: all the student's EOS) are one outcome: their
    # probabilities summed at the first of them, the others left out (else the student's would count twice)
    same = (ids[:, :, None] == ids[:, None, :]) & (ids >= 0)[:, :, None]  # (S, k, k)
    first = ~same.tril(-1).any(-1)  # (S, k): no earlier token spells the same
    matched = (ids >= 0) & first  # (S, k)
    summed = teacher_top[:, None, :].masked_fill(~same, NEG).logsumexp(-1)  # (S, k): over the tokens spelling the same
    p = summed.masked_fill(~matched, NEG)  # (S, k): an unmatched token's probability joins the rest
    q = student_logq.gather(-1, ids.clamp(min=0)).masked_fill(~matched, NEG)  # (S, k)
    p_rest, q_rest = log1mexp(p.logsumexp(-1, keepdim=True)), log1mexp(q.logsumexp(-1, keepdim=True))  # (S, 1)
    return torch.cat([p, p_rest], dim=-1), torch.cat([q, q_rest], dim=-1)


class CrossTokenizerLoss(nn.Module):
    """The student's summed loss over a batch: (1 - kd_weight) * the data's cross-entropy (on the targets ce_mask
    marks) + kd_weight * T^2 * (the sum over aligned chunks of D(teacher's chunk || student's chunk), and where the
    teacher's top tokens are given, at each chunk's first position D over the tokens both vocabularies spell).
    Named like finetune's CausalLMLoss (`model`), so checkpoints name parameters alike."""

    def __init__(self, student: nn.Module, kd_loss: str, temperature: float, kd_weight: float):
        super().__init__()
        from pocketlm.finetune.config import KD_LOSSES

        if kd_loss not in KD_LOSSES:
            raise PocketLMError(f"unknown distillation loss {kd_loss!r}; choose one of {', '.join(KD_LOSSES)}")
        self.model = student
        self.kd_loss, self.temperature, self.kd_weight = kd_loss, temperature, kd_weight

    def forward(self, ids, labels, lengths, ce_mask, chunk, teacher_chunk_logp, starts=None, teacher_top=None, top_ids=None) -> torch.Tensor:
        # ids, labels (B, T); ce_mask, chunk (N,) per target position; teacher_chunk_logp (C,); starts (S,) target
        # positions of chunk starts, teacher_top (S, k) the teacher's top log-probabilities there, top_ids (S, k) the
        # student's tokens spelling them (-1: none)
        from pocketlm.compress.distill import divergence

        keep = labels[:, 1:] != IGNORE  # (B, T-1)
        h = self.model.hidden(ids)[:, :-1][keep]  # (N, D)
        logits = self.model.logits(h).float()  # (N, V)
        targets = labels[:, 1:][keep]  # (N,)
        loss = (1 - self.kd_weight) * F.cross_entropy(logits[ce_mask], targets[ce_mask], reduction="sum")
        logq = torch.log_softmax(logits / self.temperature, dim=-1)  # (N, V)
        student = chunk_logp(logq.gather(-1, targets[:, None])[:, 0], chunk, len(teacher_chunk_logp))  # (C,)
        kd = binary_divergence(self.kd_loss, teacher_chunk_logp.float(), student).sum()
        if teacher_top is not None and len(starts):
            kd = kd + divergence(self.kd_loss, *coarse_pair(teacher_top.float(), top_ids, logq[starts])).sum()
        return loss + self.kd_weight * self.temperature**2 * kd
