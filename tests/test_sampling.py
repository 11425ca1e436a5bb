"""SamplingParams validation; the Sampler's greedy path, distributions, seeds and logprobs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite_llm.sampling import (
    Sampler,
    SampleResult,
    SamplingParams,
    SamplingParamsError,
    make_generator,
)
from infinite_llm.sampling import _top_k_top_p as top_k_top_p

sampler = Sampler()


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
) -> SampleResult:
    return sampler(logits, params, generators or [None] * len(params))


def draw_many(row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n independent draws from one row, as one batch of n copies (default RNG, fixed seed)."""
    torch.manual_seed(seed)
    result = sample(row.expand(n, -1).contiguous(), [params] * n)
    return torch.tensor(result.token_ids)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


# 99.9% quantile of chi-square with 3 degrees of freedom: a fair sampler fails 1 time in 1000.
CHI2_DF3_999 = 16.27


# --- SamplingParams -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 2}, "n"),
        ({"n": True}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"seed": False}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
        ({"skip_special_tokens": None}, "skip_special_tokens"),
    ],
)
def test_bad_field_raises_naming_it(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(SamplingParamsError, match=field) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)


def test_error_message_shows_bad_value() -> None:
    with pytest.raises(SamplingParamsError, match=r"temperature.*-0\.25"):
        SamplingParams(temperature=-0.25)
    with pytest.raises(SamplingParamsError, match=r"max_tokens.*True"):
        SamplingParams(max_tokens=True)


def test_n_error_says_only_one_supported() -> None:
    with pytest.raises(SamplingParamsError, match="must be 1"):
        SamplingParams(n=3)


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (1, 1.0, 1.0, 0, 16)
    assert p.seed is None and p.logprobs is None and not p.greedy
    assert p.stop == () and p.stop_token_ids == ()
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_normalisation() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[2, 7]).stop_token_ids == (2, 7)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=5).top_k == 5
    p = SamplingParams(temperature=0, top_p=1)
    assert p.greedy and isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert SamplingParams(seed=2**64 - 1, logprobs=20).logprobs == 20


def test_frozen_and_hashable() -> None:
    p = SamplingParams(stop=["x"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    assert hash(p) == hash(SamplingParams(stop=("x",)))


def test_make_generator() -> None:
    assert make_generator(None, "cpu") is None
    a, b = make_generator(123, "cpu"), make_generator(123, torch.device("cpu"))
    assert a is not None and b is not None and a.initial_seed() == 123
    assert torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


# --- greedy and degenerate filters ---------------------------------------------------------------

logit_rows = st.lists(
    # Drawing from a coarse grid makes ties common, so the lowest-index rule is exercised.
    st.integers(-8, 8).map(lambda v: v / 2),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(logit_rows, min_size=1, max_size=4), width=st.integers(1, 40))
def test_greedy_equals_argmax(rows: list[list[float]], width: int) -> None:
    logits = torch.tensor([(r * width)[:width] for r in rows])  # rows of one width
    result = sample(logits, [SamplingParams(temperature=0)] * len(rows))
    assert result.token_ids == logits.argmax(-1).tolist()
    assert result.logprobs == [None] * len(rows)


def test_greedy_ties_pick_lowest_index_in_mixed_batch() -> None:
    logits = torch.tensor([[0.0, 5.0, 5.0, 1.0], [5.0, 1.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0), SamplingParams()]
    assert sample(logits, params).token_ids[:2] == [1, 0]


def test_greedy_draws_no_random_numbers() -> None:
    g = make_generator(5, "cpu")
    assert g is not None
    logits = torch.randn(3, 50)
    before, default_before = g.get_state(), torch.get_rng_state()
    sample(logits, [SamplingParams(temperature=0, seed=5)] * 3, [g, None, None])
    assert torch.equal(g.get_state(), before)
    assert torch.equal(torch.get_rng_state(), default_before)


def test_top_k_1_and_tiny_top_p_equal_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(64, 1000)
    expected = logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams(top_k=1)] * 64).token_ids == expected
    assert sample(logits, [SamplingParams(top_p=1e-6)] * 64).token_ids == expected


def test_tiny_temperature_is_argmax_without_nan() -> None:
    torch.manual_seed(2)
    logits = torch.randn(16, 100) * 30
    tokens = sample(logits, [SamplingParams(temperature=1e-30)] * 16).token_ids
    assert tokens == logits.argmax(-1).tolist()


def test_masked_tokens_never_sampled() -> None:
    row = torch.zeros(8)
    row[::2] = -math.inf
    tokens = draw_many(row, SamplingParams(temperature=0.7), 4000)
    assert set(tokens.tolist()) == {1, 3, 5, 7}


# --- distributions -------------------------------------------------------------------------------


def test_top_k_only_the_k_largest_appear() -> None:
    row = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.9, 1.7, -0.2, 0.0])
    tokens = draw_many(row, SamplingParams(top_k=3), 4000)
    assert set(tokens.tolist()) == {1, 3, 5}


@pytest.mark.parametrize(("top_p", "nucleus"), [(0.45, {0}), (0.7, {0, 1}), (0.8, {0, 1, 2})])
def test_top_p_only_the_nucleus_appears(top_p: float, nucleus: set[int]) -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    tokens = draw_many(probs.log(), SamplingParams(top_p=top_p), 4000)
    assert set(tokens.tolist()) == nucleus
    kept = probs[sorted(nucleus)]
    counts = torch.bincount(tokens, minlength=4)[sorted(nucleus)]
    if len(nucleus) > 1:  # frequencies follow the renormalised nucleus
        assert chi_square(counts, kept / kept.sum()) < CHI2_DF3_999


def test_filters_apply_in_order_temperature_top_k_top_p() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # top_p=0.5 alone keeps {0, 1} (0.4 < 0.5); after top_k=2 renormalises, 4/7 >= 0.5 keeps {0}.
    assert set(draw_many(logits, SamplingParams(top_p=0.5), 2000).tolist()) == {0, 1}
    assert set(draw_many(logits, SamplingParams(top_k=2, top_p=0.5), 2000).tolist()) == {0}
    # temperature 0.5 squares the probabilities before top_p: 0.16 / 0.30 >= 0.5 keeps {0}.
    assert set(draw_many(logits, SamplingParams(temperature=0.5, top_p=0.5), 2000).tolist()) == {0}


def test_top_p_one_keeps_tokens_that_float_rounding_puts_past_full_mass() -> None:
    # In float32 the top token's probability rounds to exactly 1, so the mass before the others is
    # 1 >= top_p; top_p=1 must still keep them (top_k=0 and top_k=4 are both "keep all four").
    logits = torch.tensor([[0.0, -30.0, -30.0, -30.0]] * 2)
    kept = top_k_top_p(logits, torch.tensor([0, 4]), torch.tensor([1.0, 1.0]))
    assert torch.equal(kept, logits)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_frequencies_match_softmax(temperature: float) -> None:
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    tokens = draw_many(logits, SamplingParams(temperature=temperature), 20000)
    expected = torch.softmax(logits / temperature, -1)
    assert chi_square(torch.bincount(tokens, minlength=4), expected) < CHI2_DF3_999


def test_seeded_rows_frequencies_match_softmax() -> None:
    n = 4000
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(n, -1).contiguous()
    params = [SamplingParams(seed=s) for s in range(n)]
    generators = [make_generator(s, "cpu") for s in range(n)]
    tokens = torch.tensor(sample(logits, params, generators).token_ids)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert chi_square(torch.bincount(tokens, minlength=4), probs) < CHI2_DF3_999


def allowed_set(row: torch.Tensor, p: SamplingParams) -> set[int]:
    """Reference top-k/top-p set in float64 (distinct logits), a little wider at the top_p edge."""
    scaled = row.double() / p.temperature
    order = sorted(range(len(row)), key=lambda t: -float(scaled[t]))
    if p.top_k:
        order = order[: p.top_k]
    probs = torch.softmax(scaled[order], -1).tolist()
    kept, mass = set(), 0.0
    for t, q in zip(order, probs, strict=True):
        if mass < p.top_p + 1e-4:
            kept.add(t)
        mass += q
    return kept


@settings(max_examples=60, deadline=None)
@given(
    # Distinct logits on a 1/8 grid: float32 and the float64 reference order them alike.
    row=st.lists(st.integers(-40, 40), min_size=2, max_size=30, unique=True),
    top_k=st.integers(-1, 6),
    top_p=st.floats(0.05, 1.0),
    temperature=st.floats(0.1, 3.0),
    seed=st.integers(0, 2**32),
)
def test_sampled_token_within_top_k_top_p(
    row: list[int], top_k: int, top_p: float, temperature: float, seed: int
) -> None:
    params = SamplingParams(top_k=top_k, top_p=top_p, temperature=temperature)
    logits = torch.tensor(row) / 8
    tokens = draw_many(logits, params, 64, seed=seed)
    assert set(tokens.tolist()) <= allowed_set(logits, params)


# --- reproducibility ------------------------------------------------------------------------------

VOCAB, STEPS = 500, 12


def seeded_run(
    seed: int, params: SamplingParams, neighbours: list[SamplingParams], position: int
) -> list[int]:
    """Decode STEPS tokens for one seeded row placed at `position` among `neighbours`."""
    target_logits = torch.randn(STEPS, VOCAB, generator=torch.Generator().manual_seed(99))
    rows = list(neighbours)
    rows.insert(position, params)
    gens = [make_generator(p.seed, "cpu") for p in rows]
    gens[position] = make_generator(seed, "cpu")
    out = []
    for step in range(STEPS):
        logits = torch.randn(len(rows), VOCAB) * 3  # neighbours see fresh logits every step
        logits[position] = target_logits[step]
        out.append(sample(logits, rows, gens).token_ids[position])
    return out


neighbour_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.7, 1.0]),
    top_k=st.sampled_from([0, 5]),
    top_p=st.sampled_from([1.0, 0.9]),
    seed=st.none() | st.integers(0, 100),
    logprobs=st.none() | st.integers(0, 3),
)


@pytest.mark.parametrize("params", [SamplingParams(seed=0), SamplingParams(seed=0, top_p=0.9)])
def test_same_seed_same_tokens_alone_and_across_runs(params: SamplingParams) -> None:
    first = seeded_run(1234, params, [], 0)
    assert first == seeded_run(1234, params, [], 0)
    assert len(set(first)) > 1  # really sampling, not a constant


@settings(max_examples=25, deadline=None)
@given(neighbours=st.lists(neighbour_params, max_size=4), data=st.data())
def test_seeded_tokens_do_not_depend_on_batch(
    neighbours: list[SamplingParams], data: st.DataObject
) -> None:
    params = SamplingParams(seed=1234, temperature=0.9, top_p=0.95)
    position = data.draw(st.integers(0, len(neighbours)))
    torch.manual_seed(data.draw(st.integers(0, 1000)))  # unseeded neighbours vary too
    assert seeded_run(1234, params, neighbours, position) == seeded_run(1234, params, [], 0)


def test_different_seeds_differ() -> None:
    params = SamplingParams(seed=0)
    assert seeded_run(1, params, [], 0) != seeded_run(2, params, [], 0)


# --- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_top_n_and_sampled_token() -> None:
    torch.manual_seed(3)
    logits = torch.randn(4, 300)
    params = [
        SamplingParams(temperature=0.5, logprobs=5, seed=8),
        SamplingParams(logprobs=None),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(top_k=50, logprobs=1, seed=9),
    ]
    gens = [make_generator(p.seed, "cpu") for p in params]
    result = sample(logits, params, gens)
    reference = torch.log_softmax(logits, -1)
    assert result.logprobs[1] is None
    for i in (0, 2, 3):
        entry = result.logprobs[i]
        assert entry is not None
        n = params[i].logprobs
        assert n is not None
        token = result.token_ids[i]
        top = reference[i].topk(n).indices.tolist() if n else []
        assert token in entry
        assert list(entry)[:n] == top  # top-n first, best first
        assert set(entry) == {*top, token}
        for t, value in entry.items():  # unscaled by temperature, unfiltered by top-k
            assert value == pytest.approx(float(reference[i, t]), abs=1e-5)
    assert result.token_ids[2] == int(logits[2].argmax())


def test_logprobs_add_sampled_token_outside_top_n() -> None:
    logits = torch.zeros(64, 1000)
    logits[:, 0] = 0.1  # a top token that a flat distribution rarely samples
    torch.manual_seed(4)
    result = sample(logits, [SamplingParams(logprobs=1)] * 64)
    outside = [e for e, t in zip(result.logprobs, result.token_ids, strict=True) if t != 0]
    assert outside and all(e is not None and len(e) == 2 and 0 in e for e in outside)


def test_batch_size_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="one params"):
        sampler(torch.zeros(2, 4), [SamplingParams()], [None, None])
