"""SamplingParams: defaults, validation, and the stop-string helper the LLM layer uses."""

from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams


def test_defaults_are_the_documented_ones():
    params = SamplingParams()
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (1.0, -1, 1.0, 0.0)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (params.seed, params.max_tokens, params.ignore_eos, params.n, params.logprobs) == (
        None,
        16,
        False,
        1,
        None,
    )
    assert params.stop_token_ids == [] and params.stop == []
    assert not params.is_greedy and not params.has_penalties
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(frequency_penalty=0.5).has_penalties


def test_list_defaults_are_not_shared_between_instances():
    first, second = SamplingParams(), SamplingParams()
    first.stop_token_ids.append(7)
    assert second.stop_token_ids == []


def test_a_lone_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids"),
        ({"stop": ["ok", ""]}, "stop strings"),
        ({"n": 0}, "n must"),
        ({"logprobs": -1}, "logprobs"),
        ({"max_tokens": True}, "max_tokens"),
    ],
)
def test_invalid_values_raise_a_value_error_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_valid_edge_values_are_accepted():
    SamplingParams(temperature=0.0, top_k=1, top_p=1.0, min_p=1.0, presence_penalty=-2.0, logprobs=0, seed=0)


def test_find_stop_string_returns_the_earliest_match():
    params = SamplingParams(stop=["world", "lo"])
    assert params.find_stop_string("hello world") == 3
    assert params.find_stop_string("nothing here") is None
    assert SamplingParams().find_stop_string("anything") is None


def test_find_stop_string_only_reports_matches_reaching_new_text():
    params = SamplingParams(stop=["STOP"])
    text = "a STOP b"
    # The match lies wholly in text already checked (new text starts after it).
    assert params.find_stop_string(text, new_text_start=7) is None
    # A stop string straddling the old/new boundary is found.
    assert params.find_stop_string(text, new_text_start=5) == 2
    assert params.find_stop_string(text, new_text_start=0) == 2


def test_find_stop_string_incrementally_matches_a_one_shot_search():
    params = SamplingParams(stop=["<end>", "\n\n"])
    pieces = ["Hi", " th", "ere<e", "n", "d> more", "\n", "\n"]
    text, found = "", None
    for piece in pieces:
        checked = len(text)
        text += piece
        found = params.find_stop_string(text, new_text_start=checked)
        if found is not None:
            break
    assert found == params.find_stop_string(text) == len("Hi there")
