import pytest
import torch

from pocketlm.engine.generate import StopStrings
from pocketlm.engine.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    logit_bias_processor,
    min_p_filter,
    presence_frequency_processor,
    sample,
    top_k_filter,
    top_p_filter,
)
from pocketlm.errors import PocketLMError

NEG = float("-inf")


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert top_k_filter(logits, 2).tolist() == [[NEG, 4.0, 3.0, NEG]]
    assert top_k_filter(logits, 0).tolist() == logits.tolist()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = top_p_filter(logits, 0.8).isfinite().tolist()  # 0.5 + 0.3 reaches 0.8: two tokens
    assert kept == [[True, True, False, False]]
    assert top_p_filter(logits, 0.81).isfinite().tolist() == [[True, True, True, False]]
    assert top_p_filter(logits, 0.1).isfinite().tolist() == [[True, False, False, False]]  # never empty


def test_min_p_is_relative_to_the_top_token():
    probs = torch.tensor([[0.6, 0.3, 0.06, 0.04]])
    kept = min_p_filter(probs.log(), 0.09).isfinite().tolist()  # threshold 0.054
    assert kept == [[True, True, True, False]]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_is_argmax_and_seed_reproduces():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    assert sample(logits, greedy, torch.empty(1, 0, dtype=torch.long), None).item() == logits.argmax().item()
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    draws = [
        [sample(logits, params, torch.empty(1, 0, dtype=torch.long), g).item() for _ in range(20)]
        for g in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))
    ]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_greedy_takes_the_first_of_equal_logits_per_row():
    """As torch's argmax (the greedy pick runs on numpy's, 14x faster on a 49k row): ties go to the lowest id,
    each row of a batch on its own, -inf (a banned token) never wins."""
    logits = torch.tensor([[1.0, 3.0, 3.0, NEG], [NEG, 0.5, 0.5, 0.5], [NEG, NEG, NEG, -1e30]])
    greedy = SamplingParams(temperature=0, repetition_penalty=1.0)
    picked = sample(logits, greedy, torch.empty(3, 0, dtype=torch.long), None)
    assert picked.dtype == torch.long and picked.tolist() == [1, 1, 3] == logits.argmax(-1).tolist()


def test_sampling_follows_the_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(
        torch.stack([sample(probs.log(), params, torch.empty(1, 0, dtype=torch.long), g) for _ in range(4000)]).flatten(),
        minlength=3,
    )
    assert torch.allclose(counts / 4000, probs[0], atol=0.03)


def test_logit_bias_and_penalties_change_only_their_ids_in_place():
    """Each step's fp32 logits are its own: the processors add at the few ids they name instead of copying
    the whole row per token (measured: a copy of SmolLM2's 49k logits was most of a server's sampling time)."""
    logits = torch.zeros(2, 10)
    biased = logit_bias_processor({3: 5.0, 7: -100.0})(logits, [])
    assert biased.data_ptr() == logits.data_ptr()
    assert biased[:, 3].tolist() == [5.0, 5.0] and biased[:, 7].tolist() == [-100.0, -100.0] and biased.abs().sum() == 210
    penalized = presence_frequency_processor(0.5, 0.25)(torch.zeros(1, 10), [2, 2, 4])
    assert penalized[0, 2] == -1.0 and penalized[0, 4] == -0.75 and penalized.abs().sum() == 1.75
    halves = torch.zeros(1, 10, dtype=torch.bfloat16)  # a bf16 model's logits: processed in an fp32 copy
    assert logit_bias_processor({1: 2.0})(halves, []).dtype == torch.float32 and halves.abs().sum() == 0


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1), dict(max_new_tokens=0)])
def test_invalid_params_are_clear_errors(bad):
    with pytest.raises(PocketLMError):
        SamplingParams(**bad)


def test_stop_strings_hold_back_a_forming_stop():
    stops = StopStrings(["###", "\nUser:"])
    assert stops.push("Hello #") == ("Hello ", False)  # "#" might start "###": held back
    assert stops.push("# x") == ("## x", False)  # it did not: released
    assert stops.push(" done\nUs") == (" done", False)
    assert stops.push("er: hi") == ("", True)  # stop hit: nothing after it is shown
    stops = StopStrings(["END"])
    assert stops.push("abcEN") == ("abc", False)
    assert stops.flush() == "EN"  # at the end of generation, held text that never became a stop is shown
