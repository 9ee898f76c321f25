"""Draft heads (pocketlm.models.draft_head, pocketlm train-draft): the target's final-norm hidden states from the
fused step and prefill, the head's identity start and its vocabulary subset, speculative decoding with a head
(greedy text equals the target's own, a head that always guesses right has every proposal kept), loading a head
(int4, attached to its target; a head for another model refused), training (the held-out loss falls, the target's
own answers are the ones pocketlm generates) and the CLI.

The target is a native tiny Llama with the byte-level vocabulary of tests/tiny_models.py (278 tokens, a chat
template), its weights drawn wide so that its next-token distributions are peaked (as tests/test_distill.py's
teacher): a whole training run takes a couple of seconds.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from pocketlm.compress.draft_head import (
    DraftTrainConfig, encode_rows, frequent_tokens, save_draft_head, split_prompt, train_draft_head,
)
from pocketlm.engine.generate import encode_raw, generate, prefill
from pocketlm.engine.sampling import SamplingParams
from pocketlm.engine.speculative import logits_and_hidden
from pocketlm.errors import PocketLMError
from pocketlm.finetune.data import IGNORE
from pocketlm.load import LoadedModel, load, load_draft
from pocketlm.models.draft_head import DraftHead, DraftHeadConfig
from tiny_models import drive_batch

WORDS = "hello world the of x is a he said hello world of the x".split()
PROMPT = "hello world of the x"


def make_llama(folder, dim: int = 64, std: float = 0.3, seed: int = 1, repeat: bool = False):
    """repeat: the blocks' output projections zeroed, so each hidden state is the normed embedding of its own
    token and (tied, wide embeddings) the target's greedy choice is always the token it just read."""
    from tiny_models import byte_level_metadata

    from pocketlm.config import LlamaConfig
    from pocketlm.formats.hf import write_model_folder
    from pocketlm.models.llama import LlamaForCausalLM
    from pocketlm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(byte_level_metadata())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=2 * dim,
                      tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, std)
            if repeat and name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
    return write_model_folder(folder, cfg.to_hf(), model.state_dict(), tok)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("draft-head") / "target")


@pytest.fixture(scope="module")
def target(target_dir):
    return load(str(target_dir))


def random_head(lm, n_tokens: int = 64, hidden_dim: int = 64, seed: int = 0) -> DraftHead:
    """An untrained head over n_tokens random ids of lm's vocabulary, attached to lm."""
    torch.manual_seed(seed)
    cfg = DraftHeadConfig(dim=lm.config.dim, hidden_dim=hidden_dim, n_tokens=n_tokens, target_vocab_size=lm.config.vocab_size)
    head = DraftHead(cfg)
    with torch.no_grad():
        head.token_ids.copy_(torch.randperm(lm.config.vocab_size)[:n_tokens])
        for p in head.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return head.eval().attach(lm.model)


def identity_head(lm, token_ids: torch.Tensor) -> DraftHead:
    """train-draft's starting point: down zeroed (a step keeps the state), the target's own head rows."""
    cfg = DraftHeadConfig(dim=lm.config.dim, hidden_dim=32, n_tokens=len(token_ids), target_vocab_size=lm.config.vocab_size)
    head = DraftHead(cfg)
    with torch.no_grad():
        head.token_ids.copy_(token_ids)
        head.head.weight.copy_(lm.model.lm_head.weight[token_ids])
        head.down.weight.zero_()
    return head.eval().attach(lm.model)


def as_draft(lm, head) -> LoadedModel:
    return LoadedModel(name="head", path=lm.path, source=lm.path, config=head.cfg, model=head, tokenizer=lm.tokenizer)


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory):
    rng = random.Random(0)
    rows = [{"instruction": sentence(rng, 2, 4), "input": "", "output": sentence(rng, 5, 12) + "."} for _ in range(40)]
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_config(target_dir, data, out, **kw) -> DraftTrainConfig:
    small = dict(n_tokens=64, hidden_dim=64, unroll=2, epochs=3, batch_tokens=256, lr=1e-2, warmup_steps=1,
                 eval_split=0.2, eval_every=2, device="cpu", quiet=True)
    return DraftTrainConfig(target=str(target_dir), data=str(data), out=str(out), **{**small, **kw})


# ------------------------------------------------------------------------------ the target's hidden states


@pytest.mark.parametrize("fused", [True, False])
def test_logits_and_hidden_match_the_modules(target_dir, fused, monkeypatch):
    """A prompt, then a verify-pass-like chunk of 4 tokens after it: hidden states and logits as the modules
    compute them on a second copy of the model (fused: through cpu.cpp's decode_step; else the modules)."""
    import pocketlm.kernels

    if fused and pocketlm.kernels.library() is None:
        pytest.skip("pocketlm's CPU kernels are not built here")
    if not fused:
        monkeypatch.setattr(pocketlm.kernels, "_lib", False)
    model, reference = load(str(target_dir)).model, load(str(target_dir)).model
    for m in (model, reference):
        m.setup_cache(1, 32)
    ids = torch.tensor([[1, 40, 77, 120, 9, 250, 3, 66, 101, 17]])
    with torch.inference_mode():
        for begin, end in [(0, 6), (6, 10)]:
            pos = torch.arange(begin, end)
            logits, hidden = logits_and_hidden(model, ids[:, begin:end], pos)
            h = reference.hidden(ids[:, begin:end], pos)[0]  # (T, D) through the modules
            assert logits.shape == (end - begin, 278) and hidden.shape == (end - begin, 64)
            torch.testing.assert_close(hidden, h, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(logits, model.logits(hidden), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(logits, reference.logits(h), atol=1e-3, rtol=1e-4)
    assert bool(model.decode_step) == fused  # the fused step took the calls (and only then)


@pytest.mark.parametrize("n", [7, 70])  # 70 > fused_step.MAX_TOKENS: the last chunk runs through the modules
def test_prefill_fills_the_last_positions_hidden_state(target_dir, n):
    model, reference = load(str(target_dir)).model, load(str(target_dir)).model
    ids = torch.tensor([[(7 * i + 3) % 278 for i in range(n)]])
    for m in (model, reference):
        m.setup_cache(1, 80)
    hidden = torch.full((1, 64), float("nan"))
    logits = prefill(model, ids, hidden=hidden)
    with torch.inference_mode():
        h = reference.hidden(ids, torch.arange(n))[:, -1]  # (1, D)
        torch.testing.assert_close(hidden, h, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits, reference.logits(h), atol=1e-3, rtol=1e-4)


# ------------------------------------------------------------------------------ the head


def test_frequent_tokens_keeps_the_always_ids_first_then_the_most_frequent():
    examples = [
        ([0] * 9, [IGNORE, IGNORE, 7, 7, 7, 3, 3, 5, 9]),
        ([0] * 6, [IGNORE, 7, 7, 3, 2, 4]),
        ([0] * 4, [IGNORE, IGNORE, IGNORE, IGNORE]),
    ]  # counts: 7 x5, 3 x3, then 5, 9, 2, 4 once each
    ids = frequent_tokens(examples, 4, [2, None, 5, 2])
    assert ids.dtype == torch.long and ids.tolist() == [2, 5, 7, 3]  # 2 and 5 not counted again
    assert frequent_tokens(examples, 100, [2]).tolist()[:3] == [2, 7, 3]
    assert sorted(frequent_tokens(examples, 100, [2]).tolist()) == [2, 3, 4, 5, 7, 9]  # never IGNORE, no duplicates
    assert frequent_tokens(examples, 1, [2, 5]).tolist() == [2, 5]  # the always-ids even past n_tokens


def test_encode_rows_labels_only_the_answer(target, alpaca):
    rows = encode_rows(target.tokenizer, str(alpaca), max_len=1024)
    assert len(rows) == 40
    for ids, labels in rows:
        prompt = split_prompt(ids, labels)
        assert 0 < len(prompt) < len(ids) and len(labels) == len(ids)
        assert all(t == IGNORE for t in labels[: len(prompt)]) and labels[len(prompt) :] == ids[len(prompt) :]
    assert all(len(ids) <= 12 for ids, _ in encode_rows(target.tokenizer, str(alpaca), max_len=12))


def test_identity_start_gives_the_targets_logits_on_its_tokens(target):
    token_ids = torch.tensor([5, 2, 277, 40, 100, 63])
    head = identity_head(target, token_ids)
    ids = encode_raw(target.tokenizer, PROMPT)
    with torch.inference_mode():
        h = target.model.hidden(torch.tensor([ids]))[0]  # (T, D)
        want = target.model.logits(h)  # (T, V)
        state, logits = head.step(h, head.embed(torch.tensor(ids[1:] + [7])))  # any next token: no effect yet
        torch.testing.assert_close(state, h)
        torch.testing.assert_close(logits, want[:, token_ids], atol=1e-5, rtol=1e-5)
        full = head.full_logits(logits)  # (T, V)
    assert full.shape == want.shape
    outside = torch.ones(278, dtype=torch.bool)
    outside[token_ids] = False
    assert torch.isneginf(full[:, outside]).all()
    torch.testing.assert_close(full[:, token_ids], want[:, token_ids], atol=1e-5, rtol=1e-5)
    assert head.rows_of[token_ids].tolist() == list(range(6)) and (head.rows_of[outside] == -1).all()


# ------------------------------------------------------------------------------ speculative decoding


@pytest.fixture(scope="module")
def saved_head(target, tmp_path_factory):
    """A random head written by save_draft_head and loaded back (int4) by load_draft."""
    head = random_head(target, seed=3)
    folder = tmp_path_factory.mktemp("head")
    save_draft_head(head, folder, {"target": target.name})
    return head, load_draft(str(folder), target)


def test_load_draft_attaches_an_int4_head_to_its_target(target, saved_head):
    from pocketlm.quant.int4 import Int4Linear

    head, loaded = saved_head
    assert isinstance(loaded.model, DraftHead) and loaded.tokenizer is target.tokenizer
    assert loaded.meta["draft_head_for"] == target.name and loaded.meta["weights"].startswith("int4")
    assert all(isinstance(getattr(loaded.model, n), Int4Linear) for n in ("gate_up", "down", "head"))
    assert torch.equal(loaded.model.token_ids, head.token_ids) and loaded.model.embed is target.model.model.embed_tokens
    with torch.inference_mode():
        state = torch.randn(3, 64)
        embedded = target.model.model.embed_tokens(torch.tensor([4, 50, 200]))
        (s0, l0), (s1, l1) = head.step(state, embedded), loaded.model.step(state, embedded)
    assert torch.nn.functional.cosine_similarity(l0, l1).min() > 0.98  # int4 weights, the same head
    assert torch.nn.functional.cosine_similarity(s0, s1).min() > 0.98


def plain_and_speculative(lm, draft, params, k):
    ids = encode_raw(lm.tokenizer, PROMPT)
    plain = generate(lm, ids, params)
    plain.text()
    spec = generate(lm, ids, params, draft=draft, draft_tokens=k)
    spec.text()
    return plain.stats, spec.stats


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("penalty", [1.0, 1.1])
@pytest.mark.parametrize("which", ["random", "loaded"])
def test_greedy_with_a_draft_head_equals_plain_greedy(target, saved_head, k, penalty, which):
    draft = as_draft(target, random_head(target)) if which == "random" else saved_head[1]
    params = SamplingParams(max_new_tokens=20, temperature=0, repetition_penalty=penalty, ignore_eos=True)
    plain, spec = plain_and_speculative(target, draft, params, k)
    assert len(plain.token_ids) == 20
    assert spec.token_ids == plain.token_ids
    assert spec.draft_tokens > 0 and 0 <= spec.draft_accepted <= spec.draft_tokens


def test_greedy_with_a_draft_head_under_the_modules(target, saved_head, aten_kernels):
    """The same with no fused step: the verify pass's hidden states come from the modules."""
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    plain, spec = plain_and_speculative(target, saved_head[1], params, 3)
    assert spec.token_ids == plain.token_ids and spec.draft_tokens > 0


@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_a_head_that_always_guesses_right_has_every_proposal_kept(tmp_path, penalty):
    """A target that repeats the token it read (its hidden state is that token's normed embedding) and the
    identity-start head: every proposal is the target's own greedy token, including the first of a round after
    all k were kept (the head's state then is the verify pass's last hidden state)."""
    lm = load(str(make_llama(tmp_path / "repeater", repeat=True)))
    head = identity_head(lm, torch.arange(lm.config.vocab_size).flip(0))  # head row i proposes token V - 1 - i
    params = SamplingParams(max_new_tokens=17, temperature=0, repetition_penalty=penalty, ignore_eos=True)
    plain, spec = plain_and_speculative(lm, as_draft(lm, head), params, 4)
    assert len(set(plain.token_ids)) == 1  # the premise: the target repeats the prompt's last token
    assert spec.token_ids == plain.token_ids
    assert spec.draft_tokens >= 12 and spec.draft_accepted == spec.draft_tokens


def test_sampled_with_a_draft_head_completes_with_valid_tokens(target, saved_head):
    ids = encode_raw(target.tokenizer, PROMPT)
    params = SamplingParams(max_new_tokens=24, temperature=0.8, seed=5, ignore_eos=True)
    runs = []
    for _ in range(2):
        g = generate(target, ids, params, draft=saved_head[1], draft_tokens=3)
        assert isinstance(g.text(), str)
        runs.append(g.stats)
    assert len(runs[0].token_ids) == 24 and all(0 <= t < 278 for t in runs[0].token_ids)
    assert runs[0].token_ids == runs[1].token_ids  # the seed decides
    assert runs[0].draft_tokens > 0 and 0 <= runs[0].draft_accepted <= runs[0].draft_tokens


@pytest.mark.parametrize("other", ["dim", "vocab"])
def test_a_head_for_another_model_is_refused(target, tmp_path, other):
    dim, vocab = (32, 278) if other == "dim" else (64, 300)
    head = DraftHead(DraftHeadConfig(dim=dim, hidden_dim=32, n_tokens=8, target_vocab_size=vocab))
    save_draft_head(head, tmp_path, {"target": "some-other-model"})
    with pytest.raises(PocketLMError) as e:
        load_draft(str(tmp_path), target)
    message = str(e.value)
    assert "\n" not in message and "train-draft" in message and "some-other-model" in message


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(target_dir, alpaca, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    last = train_draft_head(train_config(target_dir, alpaca, out))
    return out, last


def test_training_lowers_the_held_out_loss(trained, target):
    out, last = trained
    assert {"config.json", "model.safetensors", "loss.png", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) >= 3 and evals[-1] == last
    assert evals[-1]["eval_loss"] < 0.9 * evals[0]["eval_loss"], evals
    assert all(0 <= r["accept_2"] <= r["accept_1"] <= 1 for r in evals)
    config = json.loads((out / "config.json").read_text())
    assert config["pocketlm"]["lineage"]["target"] == target.name
    loaded = load_draft(str(out), target)  # the trained head decodes the target's greedy text
    assert config["n_tokens"] == len(loaded.model.token_ids) <= 64  # the data's answers hold fewer distinct tokens
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    plain, spec = plain_and_speculative(target, loaded, params, 2)
    assert spec.token_ids == plain.token_ids
    eos = set(target.tokenizer.stop_ids) | {target.tokenizer.eos_id}
    assert eos <= set(loaded.model.token_ids.tolist())  # the end tokens can always be proposed


@pytest.mark.parametrize("penalty", [1.1, 1.0])
def test_target_answers_are_the_targets_own_greedy_answers(target_dir, target, alpaca, tmp_path, penalty):
    cfg = train_config(target_dir, alpaca, tmp_path, target_answers=5, max_new_tokens=6, epochs=1, repetition_penalty=penalty)
    train_draft_head(cfg)
    rows = [json.loads(line) for line in (tmp_path / "target_answers.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    stops = target.tokenizer.stop_ids
    for row in rows:
        g = generate(target, row["prompt"], SamplingParams(max_new_tokens=6, temperature=0, repetition_penalty=penalty))
        g.text()
        answer, got = row["answer"], g.stats
        if got.finish_reason == "stop":  # the answer keeps its end token, the generation's text does not
            assert answer[:-1] == got.token_ids and answer[-1] in stops, (answer, got.token_ids)
        else:
            assert answer == got.token_ids and len(answer) == 6, (answer, got.token_ids)


# ------------------------------------------------------------------------------ the CLI


def pocketlm(*args):
    return subprocess.run([sys.executable, "-m", "pocketlm.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_train_draft_help():
    result = pocketlm("train-draft", "--help")
    assert result.returncode == 0 and "--target" in result.stdout and "--n-tokens" in result.stdout


def test_cli_run_with_a_head_for_another_model_is_one_line(target_dir, tmp_path, throwaway_home):
    head = DraftHead(DraftHeadConfig(dim=32, hidden_dim=32, n_tokens=8, target_vocab_size=278))
    save_draft_head(head, tmp_path, {"target": "some-other-model"})
    result = pocketlm("run", str(target_dir), "hello", "--raw", "-n", "4", "--draft", str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pocketlm: error: ") and "train-draft" in lines[0], result.stderr


def test_a_target_answers_file_is_data_with_labels_on_the_answers(target, tmp_path):
    path = tmp_path / "target_answers.jsonl"
    path.write_text(json.dumps({"prompt": [5, 6, 7], "answer": [8, 9]}) + "\n" + json.dumps({"text": "plain words"}) + "\n")
    (ids, labels), (text_ids, text_labels) = encode_rows(target.tokenizer, str(path), max_len=1024)
    assert ids == [5, 6, 7, 8, 9] and labels == [IGNORE, IGNORE, IGNORE, 8, 9]
    assert text_labels == text_ids


def batch_run(lm, head, prompts, params, k):
    """Sequences through a server's Batch with the head as its draft (the scheduler's rule: rows while the draft
    guessed right) -> (token ids of each, proposals made, proposals kept)."""
    from pocketlm.engine.batch import Batch
    from pocketlm.engine.generate import Sequence

    batch = Batch(lm.model, max_batch=2, context_length=lm.context_length, draft=head, draft_tokens=k)
    params = params if isinstance(params, list) else [params] * len(prompts)
    seqs = [Sequence(lm.tokenizer, encode_raw(lm.tokenizer, p), sp, lm.context_length) for p, sp in zip(prompts, params)]
    proposed, kept = drive_batch(batch, seqs)
    return [s.stats.token_ids for s in seqs], proposed, kept


@pytest.mark.parametrize("k", [1, 3])
def test_a_servers_batch_with_a_draft_head_keeps_the_greedy_text(target, k):
    """Alone, a greedy sequence is checked speculatively (the head reads the hidden states of prefill, verify
    passes and batched steps); two together decode in one batch, then the longer one goes on alone."""
    params = SamplingParams(max_new_tokens=18, temperature=0, ignore_eos=True)
    short = SamplingParams(max_new_tokens=5, temperature=0, repetition_penalty=1.0, ignore_eos=True)
    head = random_head(target, seed=4)
    alone = []
    for prompt, p in [(PROMPT, params), ("the x of world", short)]:
        g = generate(target, encode_raw(target.tokenizer, prompt), p)
        g.text()
        alone.append(g.stats.token_ids)
    texts, proposed, _ = batch_run(target, head, [PROMPT], params, k)
    assert texts == alone[:1] and proposed > 0
    from pocketlm.engine.batch import Batch

    batch = Batch(target.model, max_batch=2, context_length=target.context_length, draft=head, draft_tokens=k)
    assert batch.models() == [target.model]  # the head keeps no cache
    texts, proposed, _ = batch_run(target, head, [PROMPT, "the x of world"], [params, short], k)
    assert texts == alone and proposed > 0


def test_a_servers_batch_keeps_every_right_guess(tmp_path):
    lm = load(str(make_llama(tmp_path / "repeater", repeat=True)))
    head = identity_head(lm, torch.arange(lm.config.vocab_size).flip(0))
    params = SamplingParams(max_new_tokens=17, temperature=0, ignore_eos=True)
    texts, proposed, kept = batch_run(lm, head, [PROMPT], params, 4)
    assert len(set(texts[0])) == 1 and len(texts[0]) == 17
    assert proposed >= 12 and kept == proposed


def test_the_kernels_draft_step_equals_the_modules(target, saved_head):
    from pocketlm import kernels
    from pocketlm.models.fused_step import DraftHeadStep

    if kernels.library() is None:
        pytest.skip("pocketlm's kernels are not built here")
    head = saved_head[1].model
    state = torch.randn(1, target.config.dim)
    with torch.inference_mode():
        want_state, want_logits = head.step(state, head.embed(torch.tensor([7])))
        got_state, got_logits = head.decode(state, 7)
    assert isinstance(head.fused, DraftHeadStep)
    torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got_state, state)  # a new state; the one given is left as it was


def test_an_unsure_head_guesses_once_per_check(target):
    """A head spreads its guesses over its tokens (small random weights): past the first guess of a round it would
    be below HEAD_GOES_ON_P, so each check holds one guess whatever --draft-tokens allows; the text is the same."""
    from pocketlm.engine import speculative

    head = random_head(target, seed=6)
    with torch.no_grad():
        head.head.weight.mul_(1e-3)  # near-uniform guesses over its tokens
    params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    plain, spec = plain_and_speculative(target, as_draft(target, head), params, 4)
    assert spec.token_ids == plain.token_ids
    assert spec.draft_checks > 0 and spec.draft_tokens == spec.draft_checks
    assert speculative.HEAD_GOES_ON_P > 1 / head.cfg.n_tokens


def test_a_killed_training_resumes_to_the_same_head(target_dir, alpaca, tmp_path, monkeypatch, trained):
    """Killed after its second checkpoint, then run again with resume: the head is the one a run without a stop
    made (same batches, optimizer and schedule state), and the metrics have each step once."""
    import pocketlm.compress.draft_head as draft_head
    from safetensors.torch import load_file

    saved, real_save = [], draft_head.save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        saved.append(args[2])
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(draft_head, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_draft_head(train_config(target_dir, alpaca, tmp_path))
    monkeypatch.setattr(draft_head, "save_checkpoint", real_save)
    assert saved == [2, 4] and not (tmp_path / "model.safetensors").exists()
    train_draft_head(train_config(target_dir, alpaca, tmp_path, resume=True))
    want, got = load_file(trained[0] / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == sorted(set(steps))


def test_resume_with_other_settings_or_nothing_to_resume_is_one_line(target_dir, alpaca, tmp_path):
    with pytest.raises(PocketLMError, match="no checkpoint"):
        train_draft_head(train_config(target_dir, alpaca, tmp_path, resume=True))
    train_draft_head(train_config(target_dir, alpaca, tmp_path, epochs=0.5))
    with pytest.raises(PocketLMError, match=r"other settings \(lr=") as e:
        train_draft_head(train_config(target_dir, alpaca, tmp_path, epochs=0.5, lr=5e-3, resume=True))
    assert "\n" not in str(e.value)
