"""The mapping from schema sampling fields to vLLM SamplingParams, and row seeds."""

import pytest

from pipeline.sampling import engine_seed, row_seed, sampling_kwargs
from pipeline.schema import parse_request


def kwargs(**fields):
    return sampling_kwargs(parse_request({"prompt": "hi", **fields}), seed=fields.get("seed", 7))


def test_defaults_follow_the_schema_not_vllm():
    assert kwargs() == {"max_tokens": 256, "temperature": 0.6, "seed": 7}


def test_temperature_above_vllm_range_is_clamped():
    assert kwargs(temperature=5)["temperature"] == 2.0
    assert kwargs(temperature=2)["temperature"] == 2.0
    assert kwargs(temperature=0)["temperature"] == 0.0


def test_top_p():
    assert kwargs(top_p=1.7)["top_p"] == 1.0
    assert kwargs(top_p=0.3)["top_p"] == 0.3
    zero = kwargs(top_p=0)
    assert "top_p" not in zero and zero["top_k"] == 1  # the smallest nucleus: the top token


def test_top_k_and_penalties_pass_through():
    k = kwargs(top_k=40, frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.2)
    assert (k["top_k"], k["frequency_penalty"], k["presence_penalty"], k["repetition_penalty"]) == (40, 1.5, 0.5, 1.2)


def test_repetition_penalty_zero_means_no_penalty():
    # vLLM multiplies repeated tokens' logits by 1/penalty: 0 cannot be taken literally, and its
    # nearest positive value would reward repetition a hundredfold. 0 reads as the neutral 1.
    assert kwargs(repetition_penalty=0)["repetition_penalty"] == 1.0
    assert kwargs(repetition_penalty=0.001)["repetition_penalty"] == 0.01
    assert kwargs(repetition_penalty=0.5)["repetition_penalty"] == 0.5


def test_seed_keeps_low_32_bits():
    assert kwargs(seed=9_999_999_999)["seed"] == 1_410_065_407 == engine_seed(9_999_999_999)
    assert kwargs(seed=123)["seed"] == 123


def test_ignore_eos_and_response_format():
    assert sampling_kwargs(parse_request({"prompt": "x"}), 1, ignore_eos=True)["ignore_eos"] is True


def test_row_seed_depends_on_job_seed_and_id_only():
    a = row_seed(0, "file.parquet#1")
    assert a == row_seed(0, "file.parquet#1")
    assert a != row_seed(1, "file.parquet#1") and a != row_seed(0, "file.parquet#2")
    seeds = {row_seed(0, f"f#{i}") for i in range(10_000)}
    assert len(seeds) == 10_000
    assert all(1 <= s <= 2**32 - 1 for s in seeds)


@pytest.mark.parametrize("seed", [1, 2**32 - 1, 2**32, 9_999_999_999])
def test_engine_seed_range(seed):
    assert 0 <= engine_seed(seed) < 2**32
