"""SamplingParams: vLLM defaults, normalisation, and a ValueError naming the field for every bad value."""
import dataclasses

import numpy as np
import pytest

from kvtier.engine.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert p.seed is None and p.max_tokens == 16 and p.logprobs is None
    assert p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False and p.include_stop_str_in_output is False
    assert not p.is_greedy


def test_public_reexport():
    import kvtier

    assert kvtier.SamplingParams is SamplingParams


@pytest.mark.parametrize(
    "stop, expected",
    [(None, []), ("###", ["###"]), (["a", "bc"], ["a", "bc"]), (("x",), ["x"]), ([], [])],
)
def test_stop_is_normalised_to_a_list(stop, expected):
    p = SamplingParams(stop=stop)
    assert p.stop == expected and isinstance(p.stop, list)


def test_stop_token_ids_normalised():
    assert SamplingParams(stop_token_ids=(3, np.int64(7))).stop_token_ids == [3, 7]
    assert type(SamplingParams(stop_token_ids=[np.int64(7)]).stop_token_ids[0]) is int


def test_numbers_are_normalised():
    p = SamplingParams(temperature=1, top_p=1, min_p=0, top_k=-1, seed=np.int64(5))
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float) and isinstance(p.min_p, float)
    assert p.top_k == 0  # -1 and 0 both mean "disabled"; one spelling downstream
    assert p.seed == 5 and type(p.seed) is int


@pytest.mark.parametrize("temperature, greedy", [(0.0, True), (0, True), (1e-6, True), (1e-4, False), (0.7, False)])
def test_is_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_valid_edges_accepted():
    SamplingParams(top_p=1.0, min_p=1.0, top_k=1, max_tokens=1, logprobs=0, seed=0)
    SamplingParams(top_p=1e-9, min_p=0.0, seed=-(1 << 63), max_tokens=None)
    SamplingParams(seed=(1 << 64) - 1, temperature=100.0, logprobs=20)


INVALID = [
    ("n", 2), ("n", 0), ("n", 1.0), ("n", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "1"), ("temperature", True), ("temperature", None),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1), ("top_p", float("nan")), ("top_p", True), ("top_p", "0.9"),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True), ("top_k", "5"), ("top_k", None),
    ("min_p", -0.01), ("min_p", 1.01), ("min_p", float("nan")), ("min_p", False),
    ("seed", 1.0), ("seed", True), ("seed", "7"), ("seed", 1 << 64), ("seed", -(1 << 63) - 1),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 2.0), ("max_tokens", True),
    ("logprobs", -1), ("logprobs", 1.0), ("logprobs", True),
    ("stop", 5), ("stop", [1]), ("stop", ["ok", None]), ("stop", ""), ("stop", ["a", ""]), ("stop", {"a"}),
    ("stop_token_ids", 5), ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", [True]),
    ("stop_token_ids", "12"),
    ("ignore_eos", 1), ("ignore_eos", None), ("ignore_eos", "yes"),
    ("include_stop_str_in_output", 0), ("include_stop_str_in_output", None),
    ("park", {"ttl_s": 5}), ("park", True), ("park", "keep"),
    ("deterministic", 1), ("deterministic", "yes"),
]


@pytest.mark.parametrize("kwargs, field", [
    (dict(ttl_s=0), "ttl_s"), (dict(ttl_s=-1), "ttl_s"), (dict(ttl_s=float("inf")), "ttl_s"),
    (dict(ttl_s="5"), "ttl_s"), (dict(ttl_s=True), "ttl_s"), (dict(expected_pause_s=-1), "expected_pause_s"),
    (dict(expected_pause_s=float("nan")), "expected_pause_s"), (dict(tool=""), "tool"), (dict(tool=3), "tool"),
])
def test_invalid_park_params_name_the_field(kwargs, field):
    from kvtier import ParkParams

    with pytest.raises(ValueError, match=f"park.{field}"):
        ParkParams(**kwargs)


@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_naming_field(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert str(info.value).startswith(f"{field}: "), str(info.value)


def test_every_field_has_an_invalid_case():
    covered = {field for field, _ in INVALID}
    assert covered == {f.name for f in dataclasses.fields(SamplingParams)}


def test_n_message_says_only_one_supported():
    with pytest.raises(ValueError, match="only n=1 is supported"):
        SamplingParams(n=4)


def test_replace_revalidates():
    with pytest.raises(ValueError, match="^top_p: "):
        dataclasses.replace(SamplingParams(), top_p=2.0)


def test_keyword_only():
    with pytest.raises(TypeError):
        SamplingParams(1, 0.5)  # positional order differs from vLLM's; refuse it outright
