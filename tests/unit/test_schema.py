"""Every rule of the input schema, in both modes: valid rows parse with the schema's defaults,
broken rows raise one RequestError naming each field, value and rule."""

import json

import pytest

from pipeline.schema import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, RequestError, decode_nested, parse_request

MSG = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def problems(fields):
    with pytest.raises(RequestError) as info:
        parse_request(fields)
    return info.value.problems


def test_prompt_mode_defaults():
    r = parse_request({"prompt": "hello"})
    assert r.mode == "prompt" and r.prompt == "hello" and r.raw is False
    assert r.max_tokens == DEFAULT_MAX_TOKENS == 256
    assert r.temperature == DEFAULT_TEMPERATURE == 0.6
    assert r.top_p is r.top_k is r.seed is r.lora is None
    assert r.conversation() == [{"role": "user", "content": "hello"}]


def test_messages_mode_nested_and_json_text_agree():
    nested = parse_request({"messages": MSG})
    text = parse_request({"messages": json.dumps(MSG)})
    assert nested == text
    assert nested.mode == "messages" and nested.conversation() == MSG


def test_exactly_one_mode():
    assert problems({}) == ["request: give exactly one of 'prompt' (prompt mode) or 'messages' (messages mode); neither is set"]
    assert "not both" in problems({"prompt": "a", "messages": MSG})[0]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("temperature", 5.01, "temperature: must be <= 5 (got 5.01)"),
        ("temperature", -0.1, "temperature: must be >= 0 (got -0.1)"),
        ("top_p", 2.5, "top_p: must be <= 2 (got 2.5)"),
        ("top_p", -1, "top_p: must be >= 0 (got -1)"),
        ("top_k", 0, "top_k: must be >= 1 (got 0)"),
        ("top_k", 51, "top_k: must be <= 50 (got 51)"),
        ("top_k", 2.5, "top_k: must be of type integer (got 2.5)"),
        ("seed", 0, "seed: must be >= 1 (got 0)"),
        ("seed", 10_000_000_000, "seed: must be <= 9999999999 (got 10000000000)"),
        ("repetition_penalty", 2.1, "repetition_penalty: must be <= 2 (got 2.1)"),
        ("repetition_penalty", -0.5, "repetition_penalty: must be >= 0 (got -0.5)"),
        ("frequency_penalty", 3, "frequency_penalty: must be <= 2 (got 3)"),
        ("presence_penalty", -1, "presence_penalty: must be >= 0 (got -1)"),
        ("max_tokens", 0, "max_tokens: must be >= 1 (got 0)"),
        ("max_tokens", "many", 'max_tokens: must be of type integer (got "many")'),
        ("stream", "yes", 'stream: must be of type boolean (got "yes")'),
        ("lora", 3, "lora: must be of type string (got 3)"),
    ],
)
@pytest.mark.parametrize("mode", ["prompt", "messages"])
def test_ranges_in_both_modes(mode, field, value, message):
    base = {"prompt": "hi"} if mode == "prompt" else {"messages": MSG}
    assert problems({**base, field: value}) == [message]


@pytest.mark.parametrize("mode", ["prompt", "messages"])
def test_schema_limits_are_accepted(mode):
    base = {"prompt": "hi"} if mode == "prompt" else {"messages": MSG}
    r = parse_request(
        {**base, "temperature": 5, "top_p": 2, "top_k": 50, "seed": 9_999_999_999, "repetition_penalty": 0,
         "frequency_penalty": 2, "presence_penalty": 2, "max_tokens": 1, "stream": True}
    )
    assert (r.temperature, r.top_p, r.top_k, r.seed, r.repetition_penalty) == (5.0, 2.0, 50, 9_999_999_999, 0.0)
    assert r.stream is True


def test_prompt_length_limits():
    assert problems({"prompt": ""}) == ["prompt: must be at least 1 character long (got 0 characters)"]
    assert problems({"prompt": "x" * 131073}) == ["prompt: must be at most 131072 characters long (got 131073 characters)"]
    assert parse_request({"prompt": "x" * 131072}).prompt


def test_prompt_type():
    assert problems({"prompt": 42}) == ["prompt: must be of type string (got 42)"]


def test_raw_only_in_prompt_mode():
    assert parse_request({"prompt": "<|begin_of_text|>hi", "raw": True}).raw is True
    assert problems({"messages": MSG, "raw": True})[0].startswith("raw: only allowed with 'prompt'")
    assert problems({"prompt": "hi", "raw": "true"}) == ['raw: must be of type boolean (got "true")']


def test_message_rules():
    assert problems({"messages": [{"role": "user"}]}) == ["messages[0].content: required, but missing"]
    assert problems({"messages": [{"content": "x"}]}) == ["messages[0].role: required, but missing"]
    assert problems({"messages": [{"role": "user", "content": 5}]}) == ["messages[0].content: must be of type string (got 5)"]
    assert problems({"messages": [{"role": "robot", "content": "x"}]}) == [
        'messages[0].role: must be one of system, user, assistant, tool, ipython (got "robot")'
    ]
    assert problems({"messages": []}) == ["messages: must hold at least one message (got an empty list)"]
    assert problems({"messages": "not json"})[0].startswith("messages: not valid JSON text")
    assert problems({"messages": {"role": "user"}}) == ['messages: must be of type array (got {"role": "user"})']


def test_every_problem_is_reported_at_once():
    found = problems({"prompt": "", "temperature": 9, "top_k": 0, "seed": 0})
    assert len(found) == 4


def test_image_is_rejected_per_row():
    for image in ([1, 2, 3], "iVBORw0KGgo="):
        assert problems({"prompt": "describe", "image": image}) == [
            "image: not supported: Llama 3.1 8B Instruct reads text only; remove the image"
        ]


def test_tools_only_with_messages():
    tool = {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}
    assert problems({"prompt": "hi", "tools": [tool]})[0].startswith("tools: only allowed with 'messages'")


def test_nan_is_an_error_not_a_default():
    assert problems({"prompt": "hi", "temperature": float("nan")}) == ["temperature: must be a number (got NaN)"]


def test_integral_float_counts_as_integer():
    # Pandas writes integer columns with gaps as float64; 42.0 is the integer 42.
    assert parse_request({"prompt": "hi", "seed": 42.0, "max_tokens": 8.0}).seed == 42


def test_decode_nested_drops_arrow_nulls_and_maps():
    # An Arrow struct column holds every key of every row's shape, null where a row has none.
    assert decode_nested([{"role": "user", "content": "x", "name": None}]) == [{"role": "user", "content": "x"}]
    assert decode_nested([("a", 1), ("b", None)]) == {"a": 1}
    assert decode_nested(b'[{"role": "user", "content": "x"}]') == [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("blank", ["", " ", "\t"])
def test_blank_lora_means_the_base_model(blank):
    # pandas writes missing strings as "" after fillna(""): the schema accepts it, and it names no adapter.
    assert parse_request({"prompt": "hi", "lora": blank}).lora is None
    assert parse_request({"messages": [{"role": "user", "content": "hi"}], "lora": blank}).lora is None


@pytest.mark.parametrize("field", ["messages", "tools", "response_format"])
def test_deep_json_text_is_a_problem_not_a_crash(field):
    deep = "[" * 5000 + "]" * 5000
    fields = {"messages": [{"role": "user", "content": "hi"}], field: deep}
    assert any(p.startswith(f"{field}: nested more than") for p in problems(fields))


def test_deep_arrow_cells_and_tool_parameters_are_problems():
    nested = {}
    for _ in range(3000):
        nested = {"type": "object", "properties": {"x": nested}}
    tool = {"name": "f", "description": "d", "parameters": nested}
    assert problems({"messages": [{"role": "user", "content": "hi"}], "tools": [tool]})


def test_lone_surrogates_and_invalid_utf8_are_problems():
    text = '[{"role": "user", "content": "a\\ud800b"}]'
    assert problems({"messages": text}) == [
        "messages[0].content: holds \\ud800 at character 1, a lone surrogate that is not valid Unicode"
    ]
    assert problems({"messages": b"[\xff]"}) == ["messages: not valid UTF-8 text (byte 0xff at position 1)"]
    assert problems({"prompt": "a\udfffb"})[0].startswith("prompt: holds \\udfff")
