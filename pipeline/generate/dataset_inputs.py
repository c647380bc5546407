"""A Hugging Face `datasets` dataset as the job's input, the way training's `data.path` takes one:
a hub name (`input=stanfordnlp/imdb`, with `dataset.split` and `dataset.config_name`) or a
folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.

The split is loaded with `datasets` (its own cache and credentials, `HF_TOKEN`) and written once
as one Parquet file, `<split>.parquet`, into a local cache folder named by the split's
fingerprint; the job then plans and reads that file like any other, so its rows get ids
`<split>.parquet#<row>`. The copy is local to the machine that plans the job: on a cluster give
the hub's own Parquet files instead, which every node opens itself
(`input='hf://datasets/<name>@~parquet/<config>/<split>/*.parquet'`, see docs/generate.md).

`datasets` is imported only when an input is a dataset.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from pipeline.settings_common import looks_local
from pipeline.storage import is_remote

# What `save_to_disk` leaves in a folder: one split, or a dict of splits.
_SAVED_DATASET = ("state.json", "dataset_info.json")
_SAVED_DICT = "dataset_dict.json"
# A hub dataset's id: `name` or `owner/name` (a deeper relative path is a missing local folder).
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_saved_dataset(spec: str) -> bool:
    folder = Path(os.path.expanduser(spec))
    return folder.is_dir() and (all((folder / f).is_file() for f in _SAVED_DATASET)
                                or (folder / _SAVED_DICT).is_file())


def is_dataset_name(spec: str) -> bool:
    """Whether an input names a `datasets` dataset rather than files: a hub name (`name` or
    `owner/name`, not an existing local path) or a folder saved by `save_to_disk`."""
    spec = str(spec)
    if is_remote(spec) or spec.lower().endswith((".parquet", ".parq")):
        return False  # a missing Parquet file is reported as one, not looked up on the hub
    return bool(_HUB_NAME.match(spec)) and not looks_local(spec) or is_saved_dataset(spec)


def parquet_inputs(specs, split: str, config_name: str | None, cache: str) -> list[str]:
    """`specs` with every `datasets` dataset replaced by the Parquet file of its split."""
    return [_export(str(s), split, config_name, cache) if is_dataset_name(str(s)) else str(s) for s in specs]


def _export(spec: str, split: str, config_name: str | None, cache: str) -> str:
    from pipeline.generate.planning import InputError

    try:
        dataset = _load(spec, split, config_name)
    except InputError:
        raise
    except Exception as exc:  # datasets raises many kinds; its message is what helps
        raise InputError([
            f"input: '{spec}' is not a local file, folder, glob or URI, and `datasets` could not load it "
            f"(split {split!r}, config {config_name!r}): {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}; "
            "check the name, dataset.split and dataset.config_name"
        ]) from None
    folder = Path(cache) / "datasets" / dataset._fingerprint
    target = folder / f"{split}.parquet"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{split}.parquet.tmp-{uuid.uuid4().hex}"
        try:
            dataset.to_parquet(str(tmp))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return str(target)


def _load(spec: str, split: str, config_name: str | None):
    import datasets

    from pipeline.generate.planning import InputError

    if not is_saved_dataset(spec):
        return datasets.load_dataset(spec, config_name, split=split)
    saved = datasets.load_from_disk(os.path.expanduser(spec))
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise InputError([f"input: the dataset saved in '{spec}' has no split {split!r} "
                              f"(splits: {', '.join(saved)}); set dataset.split"])
        return saved[split]
    return saved
