"""pipeline.tools: tool specs in (both shapes, every validation path), tool calls out of the
model's text (realistic Llama 3.1 answers, and a property test over arbitrary text), their
Parquet storage, and response_format."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.tools import (
    ParsedAnswer,
    ResponseFormatError,
    ToolSpecError,
    encode_tool_calls,
    load_outputs,
    normalize_tools,
    parse_tool_calls,
    read_tool_calls,
    validate_response_format,
)

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "description": "celsius or fahrenheit", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
FLAT = {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER_PARAMS}
NESTED = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string", "description": "IANA zone"}}},
    },
}
OFFERED = ("get_weather", "get_time")
TOOL_CALL_TYPE = pa.struct([("name", pa.string()), ("arguments", pa.string())])


def tool_problems(tools=None, functions=None):
    with pytest.raises(ToolSpecError) as info:
        normalize_tools(tools, functions)
    assert str(info.value) == "; ".join(info.value.problems)
    return info.value.problems


def flat(**overrides):
    tool = json.loads(json.dumps(FLAT))
    tool.update(overrides)
    return tool


def with_params(**overrides):
    params = json.loads(json.dumps(WEATHER_PARAMS))
    params.update(overrides)
    return flat(parameters=params)


# ---------------------------------------------------------------------------------------------
# normalize_tools


def test_both_shapes_normalise_to_the_template_shape():
    tools = normalize_tools([FLAT, NESTED], None)
    assert tools == [
        {"type": "function", "function": FLAT},
        {"type": "function", "function": NESTED["function"]},
    ]
    assert list(tools[0]) == ["type", "function"]
    assert list(tools[0]["function"]) == ["name", "description", "parameters"]


def test_normalised_tools_are_copies():
    source = flat()
    tools = normalize_tools([source], None)
    source["parameters"]["properties"]["city"]["description"] = "changed"
    assert tools[0]["function"]["parameters"]["properties"]["city"]["description"] == "City name"


def test_extra_schema_keys_survive_and_unknown_tool_keys_are_dropped():
    tool = flat(strict=True)
    out = normalize_tools([tool], None)[0]["function"]
    assert "strict" not in out
    assert out["parameters"]["properties"]["unit"]["enum"] == ["celsius", "fahrenheit"]


def test_a_tool_without_arguments():
    tool = flat(name="get_date", parameters={"type": "object", "properties": {}})
    assert normalize_tools([tool], None)[0]["function"]["parameters"] == {"type": "object", "properties": {}}


@pytest.mark.parametrize("tools, functions", [(None, None), ([], None), (None, []), ([], [])])
def test_nothing_offered(tools, functions):
    assert normalize_tools(tools, functions) == []


@pytest.mark.parametrize(
    "tools, expected",
    [
        ({"name": "x"}, 'tools: must be a list of tool objects (got {"name": "x"})'),
        ("get_weather", 'tools: must be a list of tool objects (got "get_weather")'),
        ([42], "tools[0]: must be an object (got 42)"),
        ([flat(name=None)], "tools[0].name: must be a string (got null)"),
        ([{"description": "d", "parameters": WEATHER_PARAMS}], 'tools[0]: missing "name"'),
        ([flat(name=7)], "tools[0].name: must be a string (got 7)"),
        ([flat(name="  ")], 'tools[0].name: must not be empty (the model calls a tool by its name)'),
        ([{"name": "f", "parameters": WEATHER_PARAMS}], 'tools[0]: missing "description"'),
        ([flat(description=["a"])], 'tools[0].description: must be a string (got ["a"])'),
        (
            [{"name": "f", "description": "d"}],
            'tools[0]: missing "parameters" (a JSON schema object; for a tool without arguments use '
            '{"type": "object", "properties": {}})',
        ),
        (
            [flat(parameters="city")],
            'tools[0].parameters: must be an object with "type" and "properties" (got "city"); '
            'for a tool without arguments use {"type": "object", "properties": {}}',
        ),
        ([flat(parameters={"properties": {}})], 'tools[0].parameters: missing "type" (usually "object")'),
        ([with_params(type=1)], "tools[0].parameters.type: must be a string (got 1)"),
        (
            [flat(parameters={"type": "object"})],
            'tools[0].parameters: missing "properties" (an object: parameter name -> {type, description})',
        ),
        (
            [with_params(properties=["city"])],
            'tools[0].parameters.properties: must be an object mapping parameter names to {type, description} '
            '(got ["city"])',
        ),
        (
            [with_params(properties={"city": "string"})],
            'tools[0].parameters.properties.city: must be an object with type and description (got "string")',
        ),
        ([with_params(properties={"city": {"description": "c"}})], 'tools[0].parameters.properties.city: missing "type"'),
        (
            [with_params(properties={"city": {"type": "string"}})],
            'tools[0].parameters.properties.city: missing "description"',
        ),
        (
            [with_params(properties={"city": {"type": ["string", "null"], "description": "c"}})],
            'tools[0].parameters.properties.city.type: must be a string (got ["string", "null"])',
        ),
        (
            [with_params(properties={"city": {"type": "string", "description": None}})],
            "tools[0].parameters.properties.city.description: must be a string (got null)",
        ),
        (
            [with_params(properties={"zip code": {"type": "string"}})],
            'tools[0].parameters.properties["zip code"]: missing "description"',
        ),
        ([with_params(required="city")], 'tools[0].parameters.required: must be a list of parameter names (got "city")'),
        ([with_params(required=["city", 3])], "tools[0].parameters.required[1]: must be a string (got 3)"),
        ([{"function": NESTED["function"]}], 'tools[0]: missing "type" (must be "function")'),
        ([{"type": "retrieval", "function": NESTED["function"]}], 'tools[0].type: must be "function" (got "retrieval")'),
        ([{"type": "function"}], 'tools[0]: missing "function" (a {type: "function", function: {...}} tool)'),
        (
            [{"type": "function", "function": "get_time"}],
            'tools[0].function: must be an object with name, description and parameters (got "get_time")',
        ),
        ([{"type": "function", "function": {"name": "f", "parameters": WEATHER_PARAMS}}], 'tools[0].function: missing "description"'),
        (
            [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}],
            'tools[0].function.parameters.properties.a: missing "description"',
        ),
        (
            [{"type": "function", "function": NESTED["function"], "name": "get_time"}],
            'tools[0]: mixes the two tool shapes (has "function" and a top-level "name"); use either '
            '{name, description, parameters} or {type: "function", function: {name, description, parameters}}',
        ),
    ],
)
def test_each_tool_rule_names_its_path(tools, expected):
    assert tool_problems(tools) == [expected]


def test_long_values_are_shortened():
    assert tool_problems([flat(description=list(range(50)))]) == [
        "tools[0].description: must be a string (got a list of 50 items)"
    ]
    assert tool_problems([flat(name=None, description={"a": 1})]) == [
        "tools[0].name: must be a string (got null)",
        'tools[0].description: must be a string (got {"a": 1})',
    ]
    long_type = "x" * 100
    assert tool_problems([{"type": long_type, "function": NESTED["function"]}]) == [
        f'tools[0].type: must be "function" (got "{"x" * 29}…" (100 characters))'
    ]


def test_every_problem_is_reported_at_once():
    tools = [
        with_params(properties={"city": {"type": "string"}}),  # 0: property without description
        "oops",  # 1
        {"type": "function", "function": {"name": "get_weather", "description": 5, "parameters": WEATHER_PARAMS}},
    ]
    assert tool_problems(tools) == [
        'tools[0].parameters.properties.city: missing "description"',
        'tools[1]: must be an object (got "oops")',
        "tools[2].function.description: must be a string (got 5)",
        'tools[2].function.name: duplicate tool name "get_weather" (also at tools[0].name); '
        "tool names must be unique, because a call names its tool",
    ]


def test_duplicate_names_across_shapes():
    twin = {"type": "function", "function": dict(FLAT)}
    assert tool_problems([FLAT, NESTED, twin]) == [
        'tools[2].function.name: duplicate tool name "get_weather" (also at tools[0].name); '
        "tool names must be unique, because a call names its tool"
    ]


def test_tool_spec_error_is_a_value_error():
    assert issubclass(ToolSpecError, ValueError)


FUNCTIONS_REJECTED = (
    "functions: not supported: batch jobs do not run request code (Workers AI's embedded function calling); "
    "describe each function in 'tools' as {name, description, parameters} and run the calls returned in "
    "the tool_calls column yourself"
)


def test_functions_are_rejected_with_the_way_out():
    assert tool_problems([FLAT], [{"name": "add", "code": "return a + b"}]) == [FUNCTIONS_REJECTED]


def test_functions_are_checked_against_the_schema_too():
    assert tool_problems(None, [{"name": "add"}, {"name": 1, "code": "x"}, "f"]) == [
        FUNCTIONS_REJECTED,
        'functions[0]: missing "code"',
        "functions[1].name: must be a string (got 1)",
        'functions[2]: must be an object with name and code (got "f")',
    ]
    assert tool_problems(None, {"name": "add"}) == [
        'functions: must be a list of {name, code} objects (got {"name": "add"})'
    ]


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
# response_format

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"]}


@pytest.mark.parametrize(
    "value, expected",
    [
        ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}, {"json": PERSON}),
        ({"type": "json_schema", "json_schema": {"schema": PERSON}}, {"json": PERSON}),
        ({"type": "json_schema", "json_schema": PERSON}, {"json": PERSON}),  # Workers AI's JSON mode
        ({"type": "json_schema", "json_schema": json.dumps(PERSON)}, {"json": PERSON}),
        (PERSON, {"json": PERSON}),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, {"json": {"anyOf": [{"type": "string"}, {"type": "null"}]}}),
        ({"type": "json_object"}, {"json_object": True}),
        ({"type": "choice", "choices": ["positive", "negative", "neutral"]}, {"choice": ["positive", "negative", "neutral"]}),
        (json.dumps({"type": "json_object"}), {"json_object": True}),
        ({"type": "text"}, None),
        (
            {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {}},
            {"json": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {}}},
        ),
    ],
)
def test_response_formats(value, expected):
    normalised = validate_response_format(value)
    assert normalised == expected
    if normalised is not None:
        # One keyword of vLLM's StructuredOutputsParams, JSON-serialisable for the row's params.
        assert len(normalised) == 1 and set(normalised) <= {"json", "json_object", "choice"}
        assert json.loads(json.dumps(normalised)) == normalised


def test_response_format_schema_is_a_copy():
    schema = json.loads(json.dumps(PERSON))
    out = validate_response_format(schema)
    schema["properties"]["age"]["type"] = "string"
    assert out["json"]["properties"]["age"]["type"] == "integer"


TYPES = "array, boolean, integer, null, number, object, string"


@pytest.mark.parametrize(
    "value, problems",
    [
        (5, ['must be an object such as {"type": "json_schema", "json_schema": {...}} (got 5)']),
        ("{nope", ["not valid JSON text (Expecting property name enclosed in double quotes at character 1)"]),
        (
            {"type": "json_scheme"},
            [
                "type: must be one of json_schema, json_object, choice, text (or, for a bare JSON schema, "
                f'one of {TYPES}) (got "json_scheme")'
            ],
        ),
        ({"type": "json_schema"}, ['missing "json_schema" (the JSON schema the answer must follow)']),
        (
            {"type": "json_schema", "json_schema": {"name": "person", "strict": True}},
            ['json_schema: missing "schema" (give the schema as json_schema.schema, or as json_schema itself)'],
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"age": {"type": "integr"}}}}},
            [f'json_schema.schema.properties.age.type: must be one of {TYPES}, or a list of them (got "integr")'],
        ),
        (
            {"type": "json_schema", "json_schema": {"type": "object", "required": "name", "minProperties": -1}},
            ["json_schema.minProperties: must be >= 0 (got -1)", 'json_schema.required: must be of type array (got "name")'],
        ),
        (
            {"type": "json_schema", "json_schema": [PERSON]},
            ['json_schema: must be a JSON schema object, e.g. {"type": "object", ...} (got a list of 1 items)'],
        ),
        ({"type": "json_schema", "json_schema": "{"}, ["json_schema: not valid JSON text (Expecting property name enclosed in double quotes at character 1)"]),
        ({"type": "object", "properties": {"x": {"type": "strin"}}}, [f'properties.x.type: must be one of {TYPES}, or a list of them (got "strin")']),
        ({"type": "json_object", "schema": PERSON}, ['schema: not allowed with type "json_object" (allowed: type)']),
        ({"type": "choice"}, ['missing "choices" (a list of the strings the answer may be)']),
        ({"type": "choice", "choices": []}, ["choices: must be a non-empty list of strings (got [])"]),
        ({"type": "choice", "choices": "yes,no"}, ['choices: must be a non-empty list of strings (got "yes,no")']),
        (
            {"type": "choice", "choices": ["yes", 1, "yes", ""]},
            [
                "choices[1]: must be a non-empty string (got 1)",
                'choices[2]: duplicate choice "yes"',
                'choices[3]: must be a non-empty string (got "")',
            ],
        ),
    ],
)
def test_response_format_problems(value, problems):
    with pytest.raises(ResponseFormatError) as info:
        validate_response_format(value)
    assert info.value.problems == problems
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------


def test_module_is_pure():
    code = (
        "import sys, pipeline.tools; "
        "print(sorted(m for m in ('pyarrow', 'torch', 'vllm', 'ray', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
