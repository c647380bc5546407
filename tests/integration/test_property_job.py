"""The real job on hypothesis-generated datasets: it never crashes, and every input row comes out
as exactly one output row, generated or with an error."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pipeline.generate.planning import FIELD_KINDS, InputError, request_column_problem
from pipeline.schema import RequestError, parse_request
from tests.strategies import request_rows, to_table

pytestmark = pytest.mark.integration
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


# Each example runs real jobs: a failure is reported as found, not shrunk over dozens of reruns.
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck),
          phases=NO_SHRINK)
@given(rows=st.lists(request_rows(), min_size=40, max_size=120))
def test_job_survives_any_requests(generate_job, tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("prop")
    src = str(folder / "in.parquet")
    table = to_table(rows)
    # A scalar field whose values share no type becomes a column of JSON text, which cannot hold
    # a number or a boolean: planning refuses such a file before writing anything, naming it.
    refused = [n for n in table.column_names if n in FIELD_KINDS and request_column_problem(n, table.schema.field(n).type)]
    if refused:
        pq.write_table(table, src)
        with pytest.raises(InputError) as info:
            generate_job(src, output=str(folder / "refused"))
        assert all(f"column '{n}': type" in str(info.value) for n in refused)
        assert not os.path.exists(folder / "refused")
        table = table.drop_columns(refused)
    pq.write_table(table, src)
    manifest, out = generate_job(src, output=str(folder / "out"))
    got = {r["id"]: r for r in pq.read_table(os.path.join(out, "parts")).to_pylist()}
    assert sorted(got) == sorted(f"in.parquet#{i}" for i in range(len(rows)))
    assert manifest["counts"]["rows_out"] == len(rows)
    for i, row in enumerate(table.to_pylist()):
        out_row = got[f"in.parquet#{i}"]
        try:
            parse_request({k: v for k, v in row.items() if v is not None})
            valid = True
        except RequestError:
            valid = False
        if not valid:
            assert out_row["error"].startswith("invalid request: "), out_row
        elif out_row["error"] is None:
            assert out_row["response"] is not None and out_row["completion_tokens"] >= 0
        else:  # valid by the schema, refused later: an unknown adapter or a prompt too long
            assert out_row["error"].startswith(("lora: ", "prompt: ")), out_row["error"]
