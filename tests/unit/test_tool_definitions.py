"""pipeline.tool_definitions: tool specs in, in both shapes, through every validation path, with
every problem reported at once and named by its path."""

import json
import subprocess
import sys

import pytest

from pipeline.errors import UserError
from pipeline.tool_definitions import ToolSpecError, normalize_tools

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


def test_tool_spec_error_is_a_user_error():
    assert issubclass(ToolSpecError, UserError) and issubclass(ToolSpecError, ValueError)


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


def test_module_is_pure():
    code = (
        "import sys, pipeline.tool_definitions; "
        "print(sorted(m for m in ('pyarrow', 'torch', 'vllm', 'ray', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
