"""pipeline.generate.answers: tool calls out of the model's text (realistic Llama 3.1 answers, and
property tests over arbitrary text), and their Parquet storage."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.generate.answers import (
    ParsedAnswer,
    encode_tool_calls,
    load_outputs,
    parse_tool_calls,
    read_tool_calls,
)

OFFERED = ("get_weather", "get_time")
TOOL_CALL_TYPE = pa.struct([("name", pa.string()), ("arguments", pa.string())])


# ---------------------------------------------------------------------------------------------
# parse_tool_calls


def call(name, **arguments):
    return {"name": name, "arguments": arguments}


PARIS = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
TOKYO_TIME = '{"name": "get_time", "parameters": {"tz": "Asia/Tokyo"}}'


@pytest.mark.parametrize(
    "text, calls, response",
    [
        (PARIS, [call("get_weather", city="Paris")], ""),
        (f"  \n{PARIS}\n ", [call("get_weather", city="Paris")], ""),
        (f"<|python_tag|>{PARIS}", [call("get_weather", city="Paris")], ""),
        (f"<|python_tag|>{PARIS}<|eom_id|>", [call("get_weather", city="Paris")], ""),
        (f"{PARIS}; {TOKYO_TIME}", [call("get_weather", city="Paris"), call("get_time", tz="Asia/Tokyo")], ""),
        (f"{PARIS}\n{TOKYO_TIME}\n", [call("get_weather", city="Paris"), call("get_time", tz="Asia/Tokyo")], ""),
        (f"<|python_tag|>{PARIS};{TOKYO_TIME}", [call("get_weather", city="Paris"), call("get_time", tz="Asia/Tokyo")], ""),
        (f"[{PARIS}, {TOKYO_TIME}]", [call("get_weather", city="Paris"), call("get_time", tz="Asia/Tokyo")], ""),
        (f"```json\n{PARIS}\n```", [call("get_weather", city="Paris")], ""),
        (f"```\n[{PARIS},\n {TOKYO_TIME}]\n```", [call("get_weather", city="Paris"), call("get_time", tz="Asia/Tokyo")], ""),
        (f"```json\n{PARIS}\n```\n```json\n{TOKYO_TIME}\n```", [call("get_weather", city="Paris"), call("get_time", tz="Asia/Tokyo")], ""),
        ('{"name": "get_weather", "arguments": {"city": "Paris"}}', [call("get_weather", city="Paris")], ""),
        ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', [call("get_weather", city="Paris")], ""),
        ('{"name": "get_weather", "parameters": "{\\"city\\": \\"Paris\\"}"}', [call("get_weather", city="Paris")], ""),
        # Llama 3.1 often echoes the "type" it saw in the tool definitions.
        ('{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}', [call("get_weather", city="Paris")], ""),
        (
            '{"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}',
            [call("get_weather", city="Paris")],
            "",
        ),
        ('{"name": "get_weather", "parameters": {"city": "P"}, "arguments": {"city": "A"}}', [call("get_weather", city="P")], ""),
        ('{"name": "get_time"}', [call("get_time")], ""),
        ('{"name": "get_time", "parameters": {}}', [call("get_time")], ""),
        ('{"name": "get_time", "parameters": null}', [call("get_time")], ""),
        ('{"name": "get_time", "arguments": ""}', [call("get_time")], ""),
        (
            '{"name": "get_weather", "parameters": {"city": "Paris", "opts": {"days": [1, 2, {"x": null}], "hourly": true}}}',
            [{"name": "get_weather", "arguments": {"city": "Paris", "opts": {"days": [1, 2, {"x": None}], "hourly": True}}}],
            "",
        ),
        ('{"name": "get_weather", "parameters": {"city": "Zürich 東京 🌧"}}', [call("get_weather", city="Zürich 東京 🌧")], ""),
        ('{"name": "get_weather", "parameters": {"city": "Z\\u00fcrich"}}', [call("get_weather", city="Zürich")], ""),
        (
            f"Let me look that up for you.\n\n{PARIS}",
            [call("get_weather", city="Paris")],
            "Let me look that up for you.",
        ),
        (
            f"I'll check the weather.\n```json\n{PARIS}\n```\nOne moment.",
            [call("get_weather", city="Paris")],
            "I'll check the weather.\nOne moment.",
        ),
    ],
)
def test_calls_are_parsed(text, calls, response):
    assert parse_tool_calls(text, OFFERED) == ParsedAnswer(response, calls, "parsed")


def test_argument_order_is_kept():
    parsed = parse_tool_calls('{"name": "get_weather", "parameters": {"unit": "celsius", "city": "Oslo"}}', OFFERED)
    assert list(parsed.tool_calls[0]["arguments"]) == ["unit", "city"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "It is sunny in Paris today.",
        "Use curly braces like {this} or [that].",
        # JSON that is an answer, not a call, stays in the response.
        '{"name": "Ada Lovelace", "born": 1815}',
        '{"city": "Paris", "temperature": 21}',
        '[{"name": "Ada"}, {"name": "Alan"}]',
    ],
)
def test_plain_answers(text):
    assert parse_tool_calls(text, OFFERED) == ParsedAnswer(text, [], "none")


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "parameters": {"city": "Paris"',  # cut off by max_tokens
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}',
        "<|python_tag|>",
        '<|python_tag|>brave_search.call(query="weather in Paris")',
        "{'name': 'get_weather', 'parameters': {'city': 'Paris'}}",  # Python, not JSON
        '{"name": "get_weather", "parameters": {"temperature": NaN}}',  # not JSON either
        f"{PARIS}; {{\"name\": \"get_time\", \"parameters\": {{",  # second call broken
        'Sure.\n{"name": "get_weather", "parameters": {"city": "Paris",}}',  # trailing comma
        '{"name": "get_weather", "parameters": "city=Paris"}',  # arguments text that is not JSON
        '{"name": "get_weather", "parameters": ["Paris"]}',  # arguments not an object
        '{"name": "get_weather", "arguments": "[\\"Paris\\"]"}',
        '{"name": "get_weather", "city": "Paris"}',  # arguments written flat
        '{"name": 3, "parameters": {}}',
        '{"name": "", "parameters": {}}',
        f'[{PARIS}, "get_time"]',  # a list of calls with a stray item
        f"[{PARIS}, {TOKYO_TIME}",  # a list cut off: more calls may have followed
    ],
)
def test_malformed_calls_keep_the_text(text):
    assert parse_tool_calls(text, OFFERED) == ParsedAnswer(text, [], "malformed")


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_stock_price", "parameters": {"ticker": "NET"}}',
        f"{PARIS}; {{\"name\": \"send_email\", \"parameters\": {{\"to\": \"a@b.c\"}}}}",
        '<|python_tag|>[{"name": "GET_WEATHER", "parameters": {"city": "Paris"}}]',
    ],
)
def test_unknown_tools_keep_the_text(text):
    assert parse_tool_calls(text, OFFERED) == ParsedAnswer(text, [], "unknown_tool")


@pytest.mark.parametrize("offered", [(), [], None, set()])
def test_no_tools_offered_means_no_parsing(offered):
    assert parse_tool_calls(PARIS, offered) == ParsedAnswer(PARIS, [], "none")


def test_a_single_name_is_not_a_collection_of_letters():
    assert parse_tool_calls(PARIS, "get_weather").status == "parsed"


@pytest.mark.parametrize(
    "text, status",
    [
        ("[" * 20000, "none"),
        ("{" * 20000, "none"),
        ("[{" * 10000, "none"),
        ('[{"a": ' * 3000, "none"),
        ('{"name": ' * 5000, "malformed"),  # deeper than the JSON decoder recurses
        ('[{"name": "get_time", "parameters": ' * 3000, "malformed"),
    ],
)
def test_pathological_text_is_fast_and_safe(text, status):
    assert parse_tool_calls(text, OFFERED) == ParsedAnswer(text, [], status)


# Fragments of the things a tool-calling answer is made of, so that generated text often comes
# close to a call and exercises the parser's edges, not just its early exits.
FRAGMENTS = [
    "{", "}", "[", "]", ":", ",", ";", "\n", " ", '"', "\\", '"name"', '"parameters"', '"arguments"',
    '"get_weather"', '"get_time"', '"other"', '"city"', '"Paris"', "null", "1", "NaN", "<|python_tag|>",
    "<|eom_id|>", "```", "```json", "Sure.", "é", PARIS, TOKYO_TIME,
]
texts = st.one_of(st.text(), st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, offered=st.sampled_from([OFFERED, ("get_weather",), ()]))
def test_parser_never_raises_and_never_loses_text(text, offered):
    parsed = parse_tool_calls(text, offered)
    assert parsed.status in ("none", "parsed", "unknown_tool", "malformed")
    if parsed.status != "parsed":
        assert parsed.response == text and parsed.tool_calls == []
    else:
        assert parsed.tool_calls
        for c in parsed.tool_calls:
            assert c["name"] in offered and isinstance(c["arguments"], dict)
    encoded = encode_tool_calls(parsed.tool_calls)
    assert read_tool_calls(encoded) == parsed.tool_calls


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(
    arguments=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    key=st.sampled_from(["parameters", "arguments"]),
    as_text=st.booleans(),
    frame=st.sampled_from(["{}", "<|python_tag|>{}", "```json\n{}\n```", "[{}]", "Checking.\n{}", "{}<|eot_id|>"]),
)
def test_any_well_formed_call_round_trips(arguments, key, as_text, frame):
    value = json.dumps(arguments) if as_text else arguments
    text = frame.replace("{}", json.dumps({"name": "get_weather", key: value}, ensure_ascii=False))
    parsed = parse_tool_calls(text, OFFERED)
    assert parsed.status == "parsed"
    assert parsed.tool_calls == [{"name": "get_weather", "arguments": arguments}]
    assert parsed.response == ("Checking." if frame.startswith("Checking") else "")


# ---------------------------------------------------------------------------------------------
# Storage


def test_encode_keeps_unicode_and_key_order():
    encoded = encode_tool_calls([{"name": "get_weather", "arguments": {"unit": "c", "city": "Zürich"}}])
    assert encoded == [{"name": "get_weather", "arguments": '{"unit": "c", "city": "Zürich"}'}]


def test_encode_escapes_what_utf8_cannot_hold():
    parsed = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "\\ud800"}}', OFFERED)
    encoded = encode_tool_calls(parsed.tool_calls)
    assert encoded[0]["arguments"] == '{"city": "\\ud800"}'
    pa.array([encoded], pa.list_(TOOL_CALL_TYPE))  # writable
    assert read_tool_calls(encoded) == parsed.tool_calls


def test_encode_rejects_arguments_that_are_not_objects():
    with pytest.raises(TypeError):
        encode_tool_calls([{"name": "f", "arguments": "[1]"}])


CALLS = [
    [call("get_weather", city="Zürich", opts={"days": [1, 2]}), call("get_time", tz="UTC")],
    [],
    None,
    [call("get_time")],
]


def write_outputs(path, rows):
    table = pa.table(
        {
            "id": pa.array([r[0] for r in rows], pa.string()),
            "tool_calls": pa.array(
                [None if r[1] is None else encode_tool_calls(r[1]) for r in rows], pa.list_(TOOL_CALL_TYPE)
            ),
        }
    )
    pq.write_table(table, path)


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "out.parquet"
    write_outputs(path, [(str(i), c) for i, c in enumerate(CALLS)])
    table = pq.read_table(path)
    assert table.schema.field("tool_calls").type == pa.list_(TOOL_CALL_TYPE)
    cells = table.column("tool_calls").to_pylist()
    assert [read_tool_calls(c) for c in cells] == [c or [] for c in CALLS]
    # pyarrow scalars decode the same way
    assert read_tool_calls(table.column("tool_calls")[0]) == CALLS[0]


def test_load_outputs_from_a_file_and_from_a_folder(tmp_path):
    write_outputs(tmp_path / "part-00001.parquet", [("c", CALLS[3])])
    write_outputs(tmp_path / "part-00000.parquet", [("a", CALLS[0]), ("b", None)])
    (tmp_path / "manifest.json").write_text("{}")
    rows = load_outputs(tmp_path)
    assert rows == [
        {"id": "a", "tool_calls": CALLS[0]},
        {"id": "b", "tool_calls": []},
        {"id": "c", "tool_calls": CALLS[3]},
    ]
    assert load_outputs(str(tmp_path / "part-00001.parquet")) == [{"id": "c", "tool_calls": CALLS[3]}]


def test_load_outputs_explains_a_wrong_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        load_outputs(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such output file or folder"):
        load_outputs(tmp_path / "missing")


@pytest.mark.parametrize(
    "cell, expected",
    [
        (None, []),
        ("[]", []),
        ('[{"name": "f", "arguments": "{\\"a\\": 1}"}]', [{"name": "f", "arguments": {"a": 1}}]),
        ([{"name": "f", "arguments": None}], [{"name": "f", "arguments": {}}]),
        ([{"name": "f", "arguments": {"a": 1}}], [{"name": "f", "arguments": {"a": 1}}]),
        ((x for x in [{"name": "f", "arguments": "{}"}]), [{"name": "f", "arguments": {}}]),
    ],
)
def test_read_tool_calls_accepts_stored_forms(cell, expected):
    assert read_tool_calls(cell) == expected


@pytest.mark.parametrize(
    "cell, message",
    [
        ([{"name": "f", "arguments": "{oops"}], "tool_calls[0].arguments: not valid JSON text"),
        ([{"name": "f", "arguments": "[1]"}], "tool_calls[0].arguments: expected a JSON object (got [1])"),
        ([{"arguments": "{}"}], "tool_calls[0]: expected an object with name and arguments"),
        ({"name": "f"}, "tool_calls: expected a list of {name, arguments} (got a single object)"),
        ("[", "tool_calls: not valid JSON text"),
    ],
)
def test_read_tool_calls_explains_bad_cells(cell, message):
    with pytest.raises(ValueError) as info:
        read_tool_calls(cell)
    assert str(info.value).startswith(message)


# ---------------------------------------------------------------------------------------------


def test_module_is_pure():
    code = (
        "import sys, pipeline.generate.answers; "
        "print(sorted(m for m in ('pyarrow', 'torch', 'vllm', 'ray', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
