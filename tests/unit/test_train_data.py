"""Training data (`pipeline.train.data`): reading rows, building conversations, the data
fingerprint and the validation split. pyarrow only; no model, no torch."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.train.settings import DataSettings
from data.build_train_sample import SAMPLE_ANSWER, sample_conversations, write_sample_dataset
from pipeline.train.data import (
    DataError,
    conversations_from_rows,
    data_columns,
    data_fingerprint,
    normalize_messages,
    read_rows,
    split_validation,
)

MESSAGES = DataSettings(path=("unused.parquet",), messages_column="messages", error_column="error")
HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Héllo"}]


def test_fingerprint_is_sha256_of_canonical_json_lines():
    """Pinned: the fingerprint is recorded in every adapter's manifest, so its recipe must not drift."""
    line = '[{"content":"Hi","role":"user"},{"content":"Héllo","role":"assistant"}]\n'
    assert data_fingerprint([HI]) == "sha256:" + hashlib.sha256(line.encode()).hexdigest()
    assert data_fingerprint(sample_conversations(48)) == (
        "sha256:adc55822646fc8d1ade8334a66463e622f432ace8207fb802010db2dbe29b671")


def test_fingerprint_ignores_key_order_but_not_conversation_order_or_content():
    reordered = [{"content": m["content"], "role": m["role"]} for m in HI]
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert data_fingerprint([HI, other]) == data_fingerprint([reordered, other])
    assert data_fingerprint([HI, other]) != data_fingerprint([other, HI])
    assert data_fingerprint([HI]) != data_fingerprint([other])
    assert data_fingerprint([HI, HI]) != data_fingerprint([HI])


def test_nested_and_json_text_messages_are_the_same_data(tmp_path):
    nested = write_sample_dataset(tmp_path / "nested.parquet", n=12)
    as_json = write_sample_dataset(tmp_path / "json.parquet", n=12, json_messages=True)
    assert pq.read_schema(as_json).field("messages").type == pa.string()
    convs = {}
    for name, path in (("nested", nested), ("json", as_json)):
        rows = read_rows([str(path)], data_columns(MESSAGES))
        convs[name], skipped = conversations_from_rows(rows, MESSAGES)
        assert not skipped
    assert convs["nested"] == convs["json"] == sample_conversations(12)
    assert data_fingerprint(convs["nested"]) == data_fingerprint(convs["json"])


def test_sample_conversations_are_fixed_and_all_answered_alike():
    convs = sample_conversations(8)
    assert convs == sample_conversations(8) and len(convs) == 8
    assert all(c[-1] == {"role": "assistant", "content": SAMPLE_ANSWER} for c in convs)
    assert sum(m["role"] == "assistant" for m in convs[3]) == 2  # every fourth has two turns


def test_folder_reads_parquet_and_jsonl_not_bookkeeping_files(tmp_path):
    folder = tmp_path / "out"
    (folder / "parts").mkdir(parents=True)
    (folder / ".hydra").mkdir()
    pq.write_table(pa.table({"messages": [json.dumps(HI)], "other": [1]}), folder / "parts" / "part-0.parquet")
    pq.write_table(pa.table({"messages": [json.dumps(HI)]}), folder / ".hydra" / "x.parquet")
    pq.write_table(pa.table({"messages": [json.dumps(HI)]}), folder / "_tmp.parquet")
    (folder / "more.jsonl").write_text(json.dumps({"messages": HI, "extra": "x"}) + "\n\n")
    (folder / "manifest.json").write_text(json.dumps([{"messages": HI}]))  # a job's manifest, not data
    rows = read_rows([str(folder)], ["messages", "error"])
    assert rows == [{"messages": HI}, {"messages": json.dumps(HI)}]  # sorted by path: more.jsonl, parts/


def test_globs_and_json_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"messages": HI}]))
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": HI}) + "\n")
    (tmp_path / "c.txt").write_text("not data")
    assert len(read_rows([str(tmp_path / "*")], ["messages"])) == 2


def test_a_glob_matching_nothing_is_a_user_error(tmp_path):
    with pytest.raises(DataError) as info:
        read_rows([str(tmp_path / "*.parquet")], ["messages"])
    assert isinstance(info.value, UserError)
    assert str(info.value) == f"data.path: {str(tmp_path / '*.parquet')!r} matches no .parquet/.jsonl/.json file"
    assert info.value.problems == [str(info.value)]


def test_prompt_rows_with_an_appended_response_and_error_rows_skipped():
    data = DataSettings(path=("unused.parquet",), messages_column="messages", prompt_column="prompt",
                        append_response_column="response", error_column="error")
    rows = [
        {"prompt": "Q1", "messages": None, "response": "A1", "error": None},
        {"prompt": None, "messages": json.dumps([{"role": "system", "content": "S"}, {"role": "user", "content": "Q2"}]),
         "response": "A2", "error": None},
        {"prompt": "Q3", "messages": None, "response": None, "error": "invalid request: temperature"},
        {"prompt": "Q4", "messages": None, "response": "  ", "error": None},
        {"prompt": " ", "messages": None, "response": "A5", "error": None},
    ]
    convs, skipped = conversations_from_rows(rows, data)
    assert convs == [
        [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
    ]
    assert skipped == {"row has an error": 1, "no response": 1, "no messages or prompt": 1}


def test_messages_rows_are_skipped_by_reason():
    rows = [{"messages": v} for v in (
        "not json", [], "[1]", json.dumps([{"role": "robot", "content": "x"}]),
        [{"role": "user", "content": 3}], [{"role": "user", "content": "only a question"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}], None,
    )]
    convs, skipped = conversations_from_rows(rows, MESSAGES)
    assert convs == []
    assert skipped == {
        "messages is not valid JSON": 1, "messages must be a non-empty list": 1, "a message is not an object": 1,
        "a message's role is not one of system, user, assistant, tool, ipython": 1,
        "a message's content is not a string": 1, "no assistant message to learn from": 2, "no messages": 1,
    }


def test_normalize_messages_keeps_only_role_and_content():
    assert normalize_messages([{"role": "user", "content": "x", "name": "n"}]) == [{"role": "user", "content": "x"}]


def test_validation_split_is_seeded_disjoint_and_never_empty_or_everything():
    train, val = split_validation(48, 0.1, seed=0)
    assert (train, val) == split_validation(48, 0.1, seed=0)
    assert split_validation(48, 0.1, seed=1) != (train, val)
    assert len(val) == 5 and sorted(train + val) == list(range(48)) and train == sorted(train)
    assert len(split_validation(3, 0.01, seed=0)[1]) == 1  # at least one when asked for any
    assert len(split_validation(2, 0.5, seed=0)[0]) == 1  # never all
    assert split_validation(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    assert split_validation(1, 0.5, seed=0) == ([0], [])


def test_data_columns_are_the_configured_ones():
    assert data_columns(DataSettings(path=("unused.parquet",), messages_column="m", prompt_column=None,
                                     response_column="", append_response_column="r", error_column="e")) == ["m", "r", "e"]
