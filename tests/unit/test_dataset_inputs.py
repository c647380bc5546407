"""A `datasets` dataset as the generation job's input (saved to disk here: no hub access)."""

from __future__ import annotations

import pytest

from pipeline.generate.dataset_inputs import is_dataset_name, parquet_inputs
from pipeline.generate.planning import InputError, plan_shards


def test_names_files_uris_and_saved_datasets_are_told_apart(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"prompt": ["a"]}).save_to_disk(str(tmp_path / "saved"))
    assert is_dataset_name("stanfordnlp/imdb") and is_dataset_name(str(tmp_path / "saved"))
    for files in ("s3://bucket/in", "data/*.parquet", "missing.parquet", "outputs/synth/parts", str(tmp_path)):
        assert not is_dataset_name(files)


def test_a_saved_dataset_split_is_planned_like_a_parquet_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(7)], "label": list(range(7))}),
        "test": datasets.Dataset.from_dict({"prompt": ["t0", "t1"], "label": [0, 1]}),
    })
    splits.save_to_disk(str(tmp_path / "saved"))
    cache = str(tmp_path / "cache")
    files = parquet_inputs([str(tmp_path / "saved")], "test", None, cache)
    assert files[0].startswith(cache) and files[0].endswith("/test.parquet")
    plan = plan_shards(files, passthrough=["label"])
    assert plan.total_rows == 2 and plan.rows_in == {"test.parquet": 2}
    # the same split again: the same file, not a second export
    assert parquet_inputs([str(tmp_path / "saved")], "test", None, cache) == files
    with pytest.raises(InputError, match=r"has no split 'validation' \(splits: train, test\); set dataset.split"):
        parquet_inputs([str(tmp_path / "saved")], "validation", None, cache)
