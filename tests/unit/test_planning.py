"""Input planning: files, folders and globs; stable row ids; every bad-input case named up front."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.generate.planning import InputError, derived_row_id, plan_shards, resolve_inputs


def write(path, rows, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, **kwargs)
    return path


def test_file_folder_and_glob(tmp_path):
    a = write(str(tmp_path / "in" / "a.parquet"), [{"prompt": "x"}])
    b = write(str(tmp_path / "in" / "sub" / "b.parquet"), [{"prompt": "y"}])
    assert resolve_inputs(a) == [a]
    assert resolve_inputs(str(tmp_path / "in")) == [a, b]
    assert resolve_inputs(str(tmp_path / "in" / "**" / "*.parquet")) == [a, b]


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(InputError) as info:
        resolve_inputs([str(tmp_path / "nope.parquet"), str(tmp_path / "*.parquet")])
    text = str(info.value)
    assert "nope.parquet' does not exist" in text and "matches no file" in text


def test_shards_follow_row_groups_and_ids_are_stable(tmp_path):
    path = write(str(tmp_path / "d" / "r.parquet"), [{"prompt": str(i)} for i in range(100)], row_group_size=10)
    plan = plan_shards(str(tmp_path / "d"), rows_per_shard=25)
    assert plan.total_rows == 100
    assert [s.num_rows for s in plan.shards] == [20, 20, 20, 20, 20]
    assert [s.first_row for s in plan.shards] == [0, 20, 40, 60, 80]
    assert plan.shards[1].row_groups == (2, 3)
    assert plan.shards[0].source == "r.parquet"
    assert plan.shards[0].columns == ("prompt",)
    assert derived_row_id("r.parquet", 7) == "r.parquet#7"
    assert plan.files == (path,)


def test_not_parquet_is_named(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("this is not parquet")
    with pytest.raises(InputError) as info:
        plan_shards(str(bad))
    assert f"{bad}: not a readable Parquet file" in str(info.value)


def test_missing_request_columns(tmp_path):
    path = write(str(tmp_path / "x.parquet"), [{"text": "x"}])
    with pytest.raises(InputError) as info:
        plan_shards(path)
    assert "has neither a 'prompt' nor a 'messages' column (columns: text)" in str(info.value)


def test_missing_id_column(tmp_path):
    path = write(str(tmp_path / "x.parquet"), [{"prompt": "x"}])
    with pytest.raises(InputError) as info:
        plan_shards(path, id_column="uid")
    assert "has no id column 'uid'" in str(info.value)


def test_empty_dataset(tmp_path):
    path = str(tmp_path / "e.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    with pytest.raises(InputError) as info:
        plan_shards(path)
    assert "hold no rows" in str(info.value)


def test_passthrough_types_must_agree(tmp_path):
    a = write(str(tmp_path / "a.parquet"), [{"prompt": "x", "label": 1}])
    b = write(str(tmp_path / "b.parquet"), [{"prompt": "x", "label": "one"}])
    with pytest.raises(InputError) as info:
        plan_shards([a, b], passthrough=["label"])
    assert "passthrough column 'label' has different types across files" in str(info.value)


def test_all_problems_at_once(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1garbage")
    other = write(str(tmp_path / "o.parquet"), [{"x": 1}])
    with pytest.raises(InputError) as info:
        plan_shards([str(bad), other])
    assert len(info.value.problems) == 2


def test_same_file_twice(tmp_path):
    a = write(str(tmp_path / "a.parquet"), [{"prompt": "x"}])
    with pytest.raises(InputError, match="named more than once"):
        resolve_inputs([a, str(tmp_path / "*.parquet")])


def test_inputs_named_many_times_over_are_found_in_time_linear_in_the_files(tmp_path, monkeypatch):
    """Duplicates among the inputs are counted once over the list: 100,000 files given one by one
    (the scale docs/benchmark.md plans) are checked in well under a second, where a count per file
    took minutes. Listing is not what this measures: each name stands for itself."""
    import time

    import pyarrow.fs as pafs

    from pipeline import storage
    from pipeline.generate import planning

    local = pafs.LocalFileSystem()
    monkeypatch.setattr(storage, "expand", lambda spec, setting: [storage.Location(spec, spec, local)])
    names = [str(tmp_path / f"part-{i:06d}.parquet") for i in range(100_000)]
    started = time.perf_counter()
    assert planning.resolve_inputs(names) == names
    assert time.perf_counter() - started < 10  # ~0.1 s; counting each name over the list took minutes
    with pytest.raises(InputError) as info:
        planning.resolve_inputs([*names[:3], names[1], names[2], names[1]])
    assert [p.split("'")[1] for p in info.value.problems] == names[1:3]


def test_the_same_files_on_another_store_plan_to_the_same_ids_and_fingerprints(tmp_path):
    """Row ids and fingerprints name files relative to the inputs' common folder, so the same
    files plan the same on a local disk and on any other store (here fsspec's memory://); read
    tasks open the store from the shard's URI."""
    import uuid

    from pipeline import storage
    from pipeline.generate.sinks import Resume
    from pipeline.generate.tasks import read_shard, rows_to_skip

    rows = {"a.parquet": [{"prompt": f"p{i}", "seed": i} for i in range(30)],
            "sub/b.parquet": [{"prompt": f"q{i}"} for i in range(12)]}
    remote = storage.resolve(f"memory://plan-{uuid.uuid4().hex[:8]}/in")
    for name, batch in rows.items():
        write(str(tmp_path / "in" / name), batch, row_group_size=10)
        target = remote.join(name)
        pq.write_table(pa.Table.from_pylist(batch), target.path, filesystem=target.filesystem, row_group_size=10)
    (tmp_path / "in" / ".hidden.parquet").write_bytes(b"a writer's temporary file")
    remote.join(".hidden.parquet").write_bytes(b"a writer's temporary file")

    local_plan = plan_shards(str(tmp_path / "in"), rows_per_shard=10)
    remote_plan = plan_shards(remote.uri, rows_per_shard=10)
    assert remote_plan.files == (remote.join("a.parquet").uri, remote.join("sub/b.parquet").uri)
    assert remote_plan.fingerprints == local_plan.fingerprints and set(remote_plan.fingerprints) == set(rows)
    assert remote_plan.rows_in == local_plan.rows_in == {"a.parquet": 30, "sub/b.parquet": 12}
    assert [(s.source, s.first_row) for s in remote_plan.shards] == [(s.source, s.first_row) for s in local_plan.shards]

    def ids(plan):
        out = []
        for shard in plan.shards:
            for block in read_shard(shard, None, (), {}, rows_to_skip(shard, Resume(), None)):
                out += block.column("_id").to_pylist()
        return out

    assert ids(remote_plan) == ids(local_plan) == [f"a.parquet#{i}" for i in range(30)] + [
        f"sub/b.parquet#{i}" for i in range(12)]
