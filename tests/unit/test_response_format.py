"""pipeline.response_format: every accepted shape of response_format mapped onto vLLM's structured
outputs, and every problem reported with its path inside response_format."""

import json
import subprocess
import sys

import pytest

from pipeline.errors import UserError
from pipeline.response_format import ResponseFormatError, validate_response_format


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
    assert str(info.value) == "; ".join(problems)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)



# ---------------------------------------------------------------------------------------------


def test_module_is_pure():
    code = (
        "import sys, pipeline.response_format; "
        "print(sorted(m for m in ('pyarrow', 'torch', 'vllm', 'ray', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
