"""pocketlm distill beyond one tokenizer and beyond the data: a teacher with another tokenizer (character-aligned
chunks, pocketlm.compress.xtok), on-policy batches (the student's own samples, pocketlm.compress.rollout) and the
teacher's own answers as targets (sequence-level, stored and resumed).

The teacher is a tiny Llama with a SentencePiece vocabulary of Gemma's kind and no chat template (raw prompts);
the student a tiny Llama with the byte-level BPE vocabulary and ChatML template of tests/tiny_models.py. The data
is a made-up task whose answers are random: after each of 8 prompts one of 3 words, with probabilities 0.7, 0.2
and 0.1. The teacher learns the distribution from 800 answers; the student sees 16, so on its own it believes the
answers it happened to see, and the teacher's likelihoods are what can correct it.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from pocketlm.cli import main
from pocketlm.compress.distill import divergence
from pocketlm.compress.distill_config import DistillConfig
from pocketlm.compress.distill_recipe import distill, with_samples
from pocketlm.compress.rollout import TeacherAnswers, sample
from pocketlm.compress.xtok import END, NEG, align, binary_divergence, coarse_pair, encode_side, sampled_side, vocab_map
from pocketlm.errors import PocketLMError
from pocketlm.finetune import FinetuneConfig, finetune

WORDS = "hello world the of x is a he said".split()
PROBS = (0.9, 0.1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread does the work in seconds, where two OpenMP threads on busy cores wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_llama(folder, metadata: dict, dim: int, n_layers: int, seed: int):
    from pocketlm.config import LlamaConfig
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.models.llama import LlamaForCausalLM
    from pocketlm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(metadata)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, intermediate_size=2 * dim,
                      tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    return write_model_folder(folder, cfg.to_hf(), model.state_dict(), tok)


class Task:
    """8 prompts of 3 words; after each, one of 2 words (its own) with probabilities PROBS, then a full stop."""

    def __init__(self):
        rng = random.Random(0)
        self.prompts = [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(8)]
        self.answers = {p: rng.sample(WORDS, 2) for p in self.prompts}

    def rows(self, n: int, seed: int) -> list[dict]:
        """n answers drawn from the task's distribution."""
        rng = random.Random(seed)
        prompts = [rng.choice(self.prompts) for _ in range(n)]
        return [{"prompt": p, "completion": rng.choices(self.answers[p], PROBS)[0] + "."} for p in prompts]

    def balanced_rows(self) -> list[dict]:
        """Each prompt once with each of its answers: a small data set that shows the rare answer as often as the
        common one (the student's data; the teacher's likelihoods say how rare it is)."""
        return [{"prompt": p, "completion": a + "."} for p in self.prompts for a in self.answers[p]]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder, task = tmp_path_factory.mktemp("xtok-data"), Task()
    return {"teacher": write_rows(folder / "teacher.jsonl", task.rows(800, 1)),
            "student": write_rows(folder / "student.jsonl", task.balanced_rows()),
            "held_out": write_rows(folder / "held-out.jsonl", task.rows(200, 3))}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, data):
    """A teacher of the other tokenizer that learned the task from 800 answers."""
    from tiny_models import sentencepiece_gemma_metadata

    folder = tmp_path_factory.mktemp("xtok")
    start = make_llama(folder / "start", sentencepiece_gemma_metadata(), dim=64, n_layers=2, seed=1)
    finetune(FinetuneConfig(model=str(start), data=str(data["teacher"]), out=str(folder / "teacher"), steps=60, batch_size=32,
                            lr=1e-2, seq_len=64, quiet=True, save_every=0))
    return folder / "teacher"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    from tiny_models import byte_level_metadata

    return make_llama(tmp_path_factory.mktemp("xtok") / "student", byte_level_metadata(), dim=64, n_layers=1, seed=2)


@pytest.fixture(scope="module")
def tokenizers():
    from tiny_models import byte_level_metadata, sentencepiece_gemma_metadata

    from pocketlm.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(byte_level_metadata()), Tokenizer.from_gguf_metadata(sentencepiece_gemma_metadata())


# ------------------------------------------------------------------------------------------ alignment


def chunk_texts(tokenizer, side, chunk, n) -> list[str]:
    """The text each chunk spells on one side, from its tokens (END tokens spell '<end>')."""
    learned = [t for t, label in zip(side.ids[1:], side.labels[1:]) if label != -100]
    tokens, ends = [[] for _ in range(n)], [0] * n
    for token, span, c in zip(learned, side.spans, chunk):
        if c >= 0 and span == END:
            ends[c] += 1
        elif c >= 0:
            tokens[c].append(token)
    return [tokenizer.decode(ids) + "<end>" * e for ids, e in zip(tokens, ends)]


@pytest.mark.parametrize("prompt", [[{"role": "user", "content": "x is a"}], None])
def test_aligned_chunks_spell_the_same_text_on_both_sides(tokenizers, prompt):
    byte_level, sentencepiece = tokenizers
    answer = "hello world the  of x said \u00e9."  # a double space, and a character both spell in two byte tokens
    s, t = encode_side(byte_level, prompt, answer, 512), encode_side(sentencepiece, prompt, answer, 512)
    s_chunk, t_chunk, n = align(s.spans, t.spans)
    s_text, t_text = chunk_texts(byte_level, s, s_chunk, n), chunk_texts(sentencepiece, t, t_chunk, n)
    assert [x.replace("<end>", "").replace("\u2581", " ") for x in t_text] == [x.replace("<end>", "") for x in s_text]
    assert n >= 10 and all(s_text) and all(t_text)
    if prompt is not None:  # a chat answer: both end, and the ends are a chunk of their own
        assert s_text[-1] == "<end><end>" and t_text[-1] == "<end>"  # ChatML's <|im_end|> + newline; the teacher's EOS
        assert "".join(s_text[:-1]) == answer
    else:  # raw text: the first token is read, not predicted (no BOS on the byte-level side)
        assert "".join(s_text[:-1]).endswith("world the  of x said \u00e9.")
    assert "\u00e9" in s_text  # the two byte tokens of one character stay in one chunk


def test_a_sampled_answer_aligns_and_a_cut_off_one_has_no_end_chunk(tokenizers):
    byte_level, sentencepiece = tokenizers
    prompt = [{"role": "user", "content": "x is a"}]
    p_ids = encode_side(byte_level, prompt, "", 512).prompt_ids
    tokens = byte_level.encode("he said hello.", add_special_tokens=False)
    for ended in (True, False):
        side, text, got_end = sampled_side(byte_level, p_ids, tokens + [2] if ended else tokens, byte_level.stop_ids)
        assert text == "he said hello." and got_end == ended
        t = encode_side(sentencepiece, prompt, text, 512, end=ended)
        s_chunk, t_chunk, n = align(side.spans, t.spans)
        s_text = chunk_texts(byte_level, side, s_chunk, n)
        assert (s_text[-1] == "<end>") == ended and "".join(x for x in s_text if x != "<end>") == text


def test_binary_divergence_is_zero_for_equal_chunks_and_grows_apart():
    teacher = torch.tensor([0.7, 0.2, 1.0 - 1e-9]).log()
    assert binary_divergence("forward_kl", teacher, teacher).abs().max() < 1e-5
    near, far = torch.tensor([0.6, 0.25, 0.9]).log(), torch.tensor([0.1, 0.9, 0.3]).log()
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert (binary_divergence(kind, teacher, far) > binary_divergence(kind, teacher, near)).all(), kind


# ------------------------------------------------------------------------------------------ tokens both vocabularies spell


def test_vocab_map_pairs_the_tokens_that_spell_the_same_bytes(tokenizers):
    byte_level, sentencepiece = tokenizers
    mapped = vocab_map(sentencepiece, byte_level, size=sentencepiece.vocab_size + 3)  # a model with 3 padding rows
    assert len(mapped) == sentencepiece.vocab_size + 3 and (mapped[-3:] == -1).all()
    pairs = {"\u2581world": "\u0120world", "\u2581hello": "\u0120hello", "\u2581": "\u0120", "he": "he", "\n": "\u010a", "H": "H"}
    for teacher, student in pairs.items():  # SentencePiece's space and byte-level BPE's, each side's newline
        assert mapped[sentencepiece.token_to_id(teacher)] == byte_level.token_to_id(student), teacher
    for teacher in ("\u2581said", "\u2581is", "<0x41>", "<start_of_turn>", "<pad>"):  # spelled by no student token; a byte; specials
        assert mapped[sentencepiece.token_to_id(teacher)] == -1, teacher
    assert mapped[sentencepiece.eos_id] == byte_level.eos_id  # the teacher's stop is the student's end of turn


@pytest.mark.slow
def test_vocab_map_between_gemma_and_smollm2():
    """The real vocabularies: SentencePiece (262k, with newline runs as added tokens) and byte-level BPE (49k)."""
    from conftest import gemma3_path, smollm2_path

    from pocketlm.formats.gguf import read_gguf
    from pocketlm.tokenizer import Tokenizer

    gemma, smollm2 = (Tokenizer.from_gguf_metadata(read_gguf(path()).metadata) for path in (gemma3_path, smollm2_path))
    mapped = vocab_map(gemma, smollm2)
    assert len(mapped) == gemma.vocab_size and 40_000 < int((mapped >= 0).sum()) < smollm2.vocab_size
    words = [" the", "ing", " Paris", "hello", "\n", "\n\n", " caf\u00e9", ",", " because", "The"]
    for word in words:
        (g,), (s,) = gemma.encode(word, add_special_tokens=False), smollm2.encode(word, add_special_tokens=False)
        assert mapped[g] == s, word
    assert all(mapped[i] == smollm2.eos_id for i in gemma.stop_ids)  # <eos> and <end_of_turn>: SmolLM2's <|im_end|>
    assert mapped[gemma.encode("\u4e2d\u6587", add_special_tokens=False)].tolist() == [-1]  # a Chinese word SmolLM2 has no token for


def test_coarse_pair_gives_two_distributions_over_the_same_outcomes():
    torch.manual_seed(0)
    teacher = torch.log_softmax(torch.randn(3, 12), -1).topk(5, -1).values  # (S, k): a teacher's top 5 of 12
    ids = torch.tensor([[4, 7, -1, 7, 0], [1, 2, 3, 5, 6], [-1] * 5])  # the student's tokens spelling them (-1: none)
    logq = torch.log_softmax(torch.randn(3, 8), -1)
    p, q = coarse_pair(teacher, ids, logq)  # (S, k + 1)
    torch.testing.assert_close(p.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(q.exp().sum(-1), torch.ones(3))
    # two teacher tokens spelled by one student token (both of its stop tokens, say): one outcome
    torch.testing.assert_close(p[0, 1].exp(), teacher[0, 1].exp() + teacher[0, 3].exp())
    assert q[0, 1] == logq[0, 7] and p[0, 3] <= NEG and q[0, 3] <= NEG and p[0, 2] <= NEG
    torch.testing.assert_close(p[0, -1].exp(), 1 - teacher[0, [0, 1, 3, 4]].exp().sum())  # the rest: unmatched included
    assert (p[2, :-1] <= NEG).all() and p[2, -1] == 0  # nothing matched: one outcome, certain on both sides
    # a student that gives the matched tokens the teacher's probabilities matches it: the divergence is 0
    probs = torch.zeros(8)
    probs[ids[1]] = teacher[1].exp()
    probs[[0, 4, 7]] = (1 - probs.sum()) / 3
    p, q = coarse_pair(teacher[1:2], ids[1:2], probs.log()[None])
    assert divergence("forward_kl", p, q).abs().item() < 1e-6


def test_the_teachers_top_tokens_add_a_term_whose_gradient_reaches_the_student(data, teacher_dir, student_dir):
    from pocketlm.compress.distill_recipe import build_units, micro_loss
    from pocketlm.compress.xtok import CrossTokenizerLoss
    from pocketlm.finetune.data import read_jsonl
    from pocketlm.load import load

    student, teacher = load(str(student_dir)), load(str(teacher_dir))
    cfg = DistillConfig(model=str(student_dir), teacher=str(teacher_dir), data=str(data["student"]), out="unused", seq_len=64)
    units = build_units(cfg, student.tokenizer, teacher.tokenizer, read_jsonl(data["student"]), 256)[:4]
    student.model.requires_grad_(True)
    loss_module = CrossTokenizerLoss(student.model, "forward_kl", 1.0, kd_weight=1.0)  # the teacher's terms only
    pads = (student.tokenizer.pad_id, teacher.tokenizer.pad_id)
    vocab = vocab_map(teacher.tokenizer, student.tokenizer, teacher.config.vocab_size)
    spans_only = micro_loss(loss_module, teacher.model, units, pads, 1.0, "cpu")
    with_top = micro_loss(loss_module, teacher.model, units, pads, 1.0, "cpu", top_k=8, vocab=vocab)
    assert with_top.item() > spans_only.item() + 1e-3  # the top tokens' divergence is added
    (with_top - spans_only).backward()  # that term alone
    grads = [p.grad for p in student.model.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert not any(p.grad is not None for p in teacher.model.parameters())


# ------------------------------------------------------------------------------------------ the recipe


def test_cross_tokenizer_distillation_lowers_held_out_loss_against_labels_alone(tmp_path, data, teacher_dir, student_dir):
    """The same student, data, steps and seed; the only difference is the teacher (of another tokenizer)."""
    settings = dict(model=str(student_dir), data=str(data["student"]), eval_data=str(data["held_out"]), steps=160, batch_size=8,
                    lr=1e-2, seq_len=64, quiet=True, save_every=0)
    alone = finetune(FinetuneConfig(out=str(tmp_path / "alone"), **settings))
    taught = distill(DistillConfig(out=str(tmp_path / "taught"), teacher=str(teacher_dir), kd_weight=0.5, **settings))
    # measured: 0.130 alone, 0.098 taught (students from other seeds: 0.323 -> 0.145, 0.136 -> 0.114)
    assert taught["eval"]["eval_loss"] < 0.9 * alone["eval"]["eval_loss"], (alone["eval"], taught["eval"])
    # and with the teacher's top tokens where both sides start a chunk alike: 0.108 (other seeds 0.109, 0.125)
    top = distill(DistillConfig(out=str(tmp_path / "top"), teacher=str(teacher_dir), kd_weight=0.5, xtok_top_k=32, **settings))
    assert top["eval"]["eval_loss"] < 0.9 * alone["eval"]["eval_loss"], (alone["eval"], top["eval"])
    assert top["eval"]["eval_loss"] != taught["eval"]["eval_loss"]
    lineage = json.loads((tmp_path / "taught" / "config.json").read_text())["pocketlm"]
    assert lineage["recipe"]["cross_tokenizer"] is True and lineage["recipe"]["teacher"] == str(teacher_dir)


def test_on_policy_batches_hold_the_students_own_samples(data, teacher_dir, student_dir, tokenizers):
    from pocketlm.compress.distill_recipe import build_units
    from pocketlm.finetune.data import read_jsonl
    from pocketlm.load import load

    byte_level, sentencepiece = tokenizers
    cfg = DistillConfig(model=str(student_dir), teacher=str(teacher_dir), data=str(data["student"]), out="unused", on_policy=0.5,
                        on_policy_tokens=6, seq_len=64)
    units = build_units(cfg, byte_level, sentencepiece, read_jsonl(data["student"]), 256)[:8]
    student = load(str(student_dir)).model
    mixed = with_samples(student, byte_level, sentencepiece, units, cfg, torch.Generator().manual_seed(5), 256)
    sampled = [i for i, u in enumerate(mixed) if u.sampled]
    assert len(sampled) == 4 and all(mixed[i] is units[i] for i in range(8) if i not in sampled)

    # the same draws again: which units, then the student's samples to their prompts
    g = torch.Generator().manual_seed(5)
    torch.rand((), generator=g)
    assert sorted(torch.randperm(8, generator=g)[:4].tolist()) == sampled
    expected = sample(student, [units[i].prompt_ids for i in sampled], 6, 1.0, byte_level.stop_ids, g)
    for i, answer in zip(sampled, expected):
        u = mixed[i]
        assert u.student.ids == units[i].prompt_ids + answer  # the student's own tokens after the data's prompt
        assert u.student.labels[len(units[i].prompt_ids):] == answer and u.student.ids != units[i].student.ids
        ended = answer[-1] in byte_level.stop_ids
        text = byte_level.decode(answer[:-1] if ended else answer)
        assert u.teacher.ids == encode_side(sentencepiece, units[i].prompt, text, 256, end=ended).ids  # the teacher reads its text
        assert len(u.s_chunk) == sum(label != -100 for label in u.student.labels[1:])


def test_on_policy_run_trains_on_samples_and_resumes_to_the_same_loss(tmp_path, data, teacher_dir, student_dir):
    def run(out, **kw):
        return distill(DistillConfig(model=str(student_dir), teacher=str(teacher_dir), data=str(data["student"]), out=str(out),
                                     on_policy=0.5, on_policy_tokens=8, steps=4, batch_size=4, lr=1e-3, seq_len=64, quiet=True,
                                     save_every=2, **kw))

    whole = run(tmp_path / "a")
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sampled"] for r in rows if "sampled" in r] == [2, 2, 2, 2]
    run(tmp_path / "b", stop_after=2)
    assert run(tmp_path / "b", resume=True)["final_loss"] == pytest.approx(whole["final_loss"], abs=1e-5)


def test_on_policy_with_a_teacher_of_the_same_tokenizer(tmp_path, data, student_dir):
    """The teacher's whole next-token distribution scores each sampled token (here the student teaches a copy)."""
    summary = distill(DistillConfig(model=str(student_dir), teacher=str(student_dir), data=str(data["student"]), out=str(tmp_path / "o"),
                                    on_policy=1.0, on_policy_tokens=4, kd_weight=1.0, steps=2, batch_size=4, lr=1e-3, seq_len=64,
                                    quiet=True, save_every=0))
    # the student is its own teacher and only its own samples are read: the divergence is 0
    assert summary["steps"] == 2 and summary["final_loss"] == pytest.approx(0.0, abs=1e-5)


def test_teacher_answers_are_stored_resumed_and_become_the_targets(tmp_path, data, teacher_dir, student_dir):
    from pocketlm.load import load

    teacher = load(str(teacher_dir))
    prompts = [[{"role": "user", "content": p}] for p in Task().prompts] * 2  # 16
    path = tmp_path / "answers.jsonl"
    first = TeacherAnswers.open_or_build(path, "t", teacher.model, teacher.tokenizer, prompts, 8, batch=4)
    assert len(first) == 16 and all(a.rstrip(".") in WORDS for a in first)  # greedy: the likeliest word and the stop
    assert first[:8] == first[8:]
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5]) + "\n" + lines[5][:10])  # killed while writing the 6th answer
    calls = []
    again = TeacherAnswers.open_or_build(path, "t", lambda: calls.append(1) or teacher.model, teacher.tokenizer, prompts, 8, batch=4)
    assert again == first and calls == [1] and len(path.read_text().splitlines()) == 16
    TeacherAnswers.open_or_build(path, "t", lambda: calls.append(1) or teacher.model, teacher.tokenizer, prompts, 8)
    assert calls == [1]  # complete: the teacher is not loaded
    with pytest.raises(PocketLMError, match="other settings"):
        TeacherAnswers.open_or_build(path, "t", teacher.model, teacher.tokenizer, prompts, 9)

    out = tmp_path / "student"
    assert main(["distill", "--student", str(student_dir), "--teacher", str(teacher_dir), "--data", str(data["student"]), "-o", str(out),
                 "--teacher-answers", "--kd-weight", "0", "--steps", "2", "--batch-size", "4", "--seq-len", "64", "--quiet"]) == 0
    stored = [json.loads(line) for line in (out / "teacher_answers.jsonl").read_text().splitlines()]
    data_rows = [json.loads(line) for line in data["student"].read_text().splitlines()]
    assert [r["prompt"][-1]["content"] for r in stored] == [r["prompt"] for r in data_rows]
    greedy = {r["prompt"][-1]["content"]: r["answer"] for r in stored}
    assert all(greedy[p] == first[Task().prompts.index(p)] for p in greedy)


def test_refusals(tmp_path, data, teacher_dir, student_dir):
    cfg = dict(model=str(student_dir), teacher=str(teacher_dir), data=str(data["student"]), out=str(tmp_path / "o"), steps=1, quiet=True)
    with pytest.raises(PocketLMError, match="no --pack"):
        distill(DistillConfig(pack=True, **cfg))
    text = write_rows(tmp_path / "text.jsonl", [{"text": "hello world of x"}] * 4)
    with pytest.raises(PocketLMError, match="--on-policy needs prompts"):
        distill(DistillConfig(**{**cfg, "data": str(text)}, on_policy=0.5))
    with pytest.raises(PocketLMError, match="on_policy must be a fraction"):
        DistillConfig(**cfg, on_policy=1.5)
