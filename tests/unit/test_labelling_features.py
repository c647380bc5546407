"""The pure parts of the labelling and synthetic-data features: templates over columns, n answers
per row, label probabilities, limit previews, the exactly-once check with n and a limit, and the
settings that turn them on (the real job runs them in tests/integration/test_labelling_job.py)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pyarrow as pa
import pytest

from pipeline.errors import UserError
from pipeline.generate.coverage import check_exactly_once, part_entry
from pipeline.generate.planning import Shard, ShardPlan, limit_rows
from pipeline.generate.prepare import canonical_block, job_request_defaults
from pipeline.generate.samples import expand_samples, label_probabilities, token_logprobs
from pipeline.generate.settings import GenerationSettings
from pipeline.row_templates import RowTemplate, TemplateRowError, template_problems
from pipeline.sampling import engine_seed, sample_seed
from pipeline.schema import RequestError, parse_request
from tests.conftest import compose


def shard(n: int) -> Shard:
    return Shard(path="in.parquet", source="in.parquet", row_groups=(0,), first_row=0, num_rows=n, columns=())


# ---- templates ---------------------------------------------------------------------------------

def test_template_writes_messages_from_columns_and_names_its_columns():
    t = RowTemplate("Label: {{ text }} ({{ stars }} stars, {{ labels | join('/') }})", system="Be {{ tone }}.",
                    variables={"labels": ["a", "b"]})
    assert t.columns == ("stars", "text", "tone")
    assert t.messages({"text": "Nice", "stars": 5, "tone": "brief"}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Label: Nice (5 stars, a/b)"},
    ]


def test_a_null_column_is_a_row_error_and_the_sandbox_holds():
    t = RowTemplate("{{ text }}")
    with pytest.raises(TemplateRowError, match="column 'text' is null or missing in this row"):
        t.messages({"text": None})
    with pytest.raises(TemplateRowError, match="SecurityError|unsafe"):
        RowTemplate("{{ text.__class__.__mro__ }}").messages({"text": "x"})


def test_template_problems_name_the_setting():
    problems = template_problems("{{ text", "{% if %}", variables=[1])
    assert problems[0].startswith("prompt.vars:")
    assert any(p.startswith("prompt.template: not a valid Jinja template") for p in problems)
    assert any(p.startswith("prompt.system: not a valid Jinja template") for p in problems)
    assert template_problems(None, "x") == ["prompt.system: needs prompt.template (the user message) as well"]


def test_canonical_block_renders_the_template_keeps_other_fields_and_errors_per_row():
    table = pa.table({
        "text": ["good", None, "bad"],
        "max_tokens": [5, 6, 7],
        "messages": [None, None, json.dumps([{"role": "user", "content": "own request"}])],
    })
    block = canonical_block(table, shard(3), None, (), template=RowTemplate("Rate: {{ text }}", keep_requests=True))
    requests = block.column("_request").to_pylist()
    errors = block.column("_read_error").to_pylist()
    assert json.loads(requests[0]) == {"max_tokens": 5, "messages": [{"role": "user", "content": "Rate: good"}]}
    assert requests[1] is None and errors[1] == "template: column 'text' is null or missing in this row (prompt.template)"
    assert json.loads(json.loads(requests[2])["messages"]) == [{"role": "user", "content": "own request"}]  # kept

    ignored = canonical_block(table, shard(3), None, (), template=RowTemplate("{{ text }}", request_columns=False))
    assert json.loads(ignored.column("_request")[0].as_py()) == {"messages": [{"role": "user", "content": "good"}]}


# ---- n answers per row -------------------------------------------------------------------------

def test_expand_samples_gives_each_answer_its_id_and_seed():
    params = json.dumps({"max_tokens": 4, "seed": engine_seed(77)})
    batch = pa.table({"_id": ["a", "b"], "_seed": [77, None], "_params": [params, None], "_error": [None, "bad"]})
    out = expand_samples(batch, 3)
    assert out.column("_id").to_pylist() == ["a#0", "a#1", "a#2", "b#0", "b#1", "b#2"]
    assert out.column("_sample").to_pylist() == [0, 1, 2, 0, 1, 2]
    seeds = out.column("_seed").to_pylist()
    assert seeds[0] == 77 and len(set(seeds[:3])) == 3 and seeds[3:] == [None] * 3
    assert [json.loads(p)["seed"] for p in out.column("_params").to_pylist()[:3]] == [engine_seed(s) for s in seeds[:3]]
    assert out.column("_error").to_pylist()[3:] == ["bad"] * 3
    same = expand_samples(batch, 1)
    assert same.column("_id").to_pylist() == ["a", "b"] and same.column("_sample").to_pylist() == [0, 0]


def test_sample_seeds_are_stable_and_the_first_is_the_rows_own():
    assert sample_seed(12345, 0) == 12345
    assert sample_seed(12345, 1) == sample_seed(12345, 1) != sample_seed(12345, 2)
    assert 1 <= sample_seed(12345, 5) < 2**32


# ---- label probabilities and logprobs ---------------------------------------------------------

def test_label_probabilities_normalise_over_the_labels():
    probs = label_probabilities(["yes", "no", "maybe"], [math.log(0.2), math.log(0.05), -math.inf])
    assert [p["label"] for p in probs] == ["yes", "no", "maybe"]
    assert [round(p["prob"], 6) for p in probs] == [0.8, 0.2, 0.0]
    assert all(p["prob"] is None for p in label_probabilities(["a", "b"], [-math.inf, -math.inf]))


def test_token_logprobs_has_openais_shape():
    lp = lambda x, rank, tok: SimpleNamespace(logprob=x, rank=rank, decoded_token=tok)  # noqa: E731
    positions = [{7: lp(-0.5, 2, "b"), 3: lp(-0.1, 1, "a")}, {9: lp(-1.0, 1, "c")}]
    assert token_logprobs([7, 9], positions, top=2) == [
        {"token": "b", "logprob": -0.5, "top_logprobs": [{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -0.5}]},
        {"token": "c", "logprob": -1.0, "top_logprobs": [{"token": "c", "logprob": -1.0}]},
    ]
    assert token_logprobs([7], [{7: lp(-0.5, 2, "b")}], top=0)[0]["top_logprobs"] == []


# ---- request extensions and job defaults -------------------------------------------------------

def test_stop_min_tokens_logprobs_are_validated_per_row():
    r = parse_request({"prompt": "x", "stop": "###", "min_tokens": 3, "logprobs": True, "top_logprobs": 2})
    assert (r.stop, r.min_tokens, r.logprobs, r.top_logprobs) == (("###",), 3, True, 2)
    with pytest.raises(RequestError) as e:
        parse_request({"prompt": "x", "stop": [""], "min_tokens": -1, "top_logprobs": 21, "logprobs": "yes",
                       "max_tokens": 4})
    text = str(e.value)
    for part in ("stop: must be a non-empty string", "min_tokens: must be an integer >= 0",
                 "top_logprobs: must be an integer between 0 and 20", "logprobs: must be true or false"):
        assert part in text
    with pytest.raises(RequestError, match=r"min_tokens: must be <= max_tokens \(4\)"):
        parse_request({"prompt": "x", "min_tokens": 9, "max_tokens": 4})


def test_job_request_defaults_merge_the_extension_settings():
    assert job_request_defaults({"temperature": 0}, stop=("a", "b"), min_tokens=None, logprobs=False,
                                top_logprobs=3) == {"temperature": 0, "stop": ["a", "b"], "top_logprobs": 3}


def test_settings_of_the_features_and_their_problems():
    s = GenerationSettings.from_config(compose("generate", [
        "model=tiny", "n=3", "limit=10", "stop='###'", "top_logprobs=2", "prompt.template='{{ text }}'",
        "request_defaults={temperature: 0}",
    ]))
    assert (s.n, s.limit, s.stop, s.top_logprobs, s.template.columns, s.request_defaults) == (
        3, 10, ("###",), 2, ("text",), {"temperature": 0})
    with pytest.raises(UserError) as e:
        GenerationSettings.from_config(compose("generate", [
            "model=tiny", "n=5000", "limit=0", "request_defaults={messages: x, temperature: 9}",
        ]))
    text = str(e.value)
    for part in ("n: at most 1000", "limit: must be an integer >= 1", "request_defaults.messages: not a default",
                 ):
        assert part in text


@pytest.mark.parametrize("recipe", ["label", "judge", "synthesize"])
def test_every_recipe_composes_into_valid_settings(recipe):
    s = GenerationSettings.from_config(compose("generate", ["model=tiny", f"recipe={recipe}"]))
    assert s.template is not None and s.template.columns


# ---- limit and the exactly-once check --------------------------------------------------------

def test_limit_spreads_over_every_file_and_is_the_same_every_time():
    plan = ShardPlan(files=("a", "b", "c"), shards=(), total_rows=100, id_column=None, passthrough=(),
                     rows_in={"a.parquet": 50, "b.parquet": 30, "c.parquet": 20})
    picked = limit_rows(plan, 10)
    assert picked == limit_rows(plan, 10)
    assert sum(len(v) for v in picked.values()) == 10 and set(picked) == {"a.parquet", "b.parquet", "c.parquet"}
    assert limit_rows(plan, 1000) == {"a.parquet": list(range(50)), "b.parquet": list(range(30)),
                                      "c.parquet": list(range(20))}


def part(rows: list[int], source: str = "in.parquet") -> dict:
    return part_entry("p", pa.table({"source_file": [source] * len(rows), "source_row": rows}))


def test_exactly_once_counts_n_answers_per_row_and_only_the_selected_rows():
    assert check_exactly_once([part([0, 0, 1, 1, 2, 2])], {"in.parquet": 3}, per_row=2) == []
    assert check_exactly_once([part([0, 0, 1, 2, 2])], {"in.parquet": 3}, per_row=2) == [
        "in.parquet: row 1 committed 1 times (expected 2: n=2)"]
    assert check_exactly_once([part([3, 7])], {"in.parquet": 10}, selected={"in.parquet": [3, 7]}) == []
    problems = check_exactly_once([part([3, 4])], {"in.parquet": 10}, selected={"in.parquet": [3, 7]})
    assert problems == ["in.parquet: row 4 committed, but not among the rows the plan selected (limit)",
                        "in.parquet: row 7 missing"]


def test_a_retry_reseeds_every_row_and_raises_only_the_truncated_rows_budget():
    from pipeline.generate.retry import reseed_for_retry
    from pipeline.sampling import retry_seed

    params = [json.dumps({"max_tokens": 4, "seed": engine_seed(s)}) for s in (7, 8, 9)]
    batch = pa.table({"_id": ["a", "b", "c"], "_seed": [7, 8, 9], "_params": params,
                      "_prompt_token_ids": pa.array([[1] * 10, [1] * 10, [1] * 95], pa.list_(pa.int32()))})
    out = reseed_for_retry(batch, 2, frozenset({"b", "c"}), 64, max_model_len=100)
    assert out.column("_seed").to_pylist() == [retry_seed(s, 2) for s in (7, 8, 9)]
    kwargs = [json.loads(p) for p in out.column("_params").to_pylist()]
    assert [k["seed"] for k in kwargs] == [engine_seed(retry_seed(s, 2)) for s in (7, 8, 9)]
    assert [k["max_tokens"] for k in kwargs] == [4, 64, 5]  # c: only the room its context leaves
