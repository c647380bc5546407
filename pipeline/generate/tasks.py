"""What the generation job's Ray tasks run, as plain functions (no Ray here): reading a planned
shard into canonical rows (`read_shard`), and the preparer each worker process builds once
(`preparer_for`). The job (`pipeline.generate.job`) hands them to Ray Data; the plan preview
(`pipeline.generate.preview`) and the benchmark call them directly.
"""

from __future__ import annotations

import functools
import json

import pyarrow as pa

from pipeline.errors import JobFailure
from pipeline.generate.config import AdapterSet
from pipeline.generate.planning import Shard, open_parquet
from pipeline.generate.prefix_groups import group_by_prefix
from pipeline.generate.prepare import JOB_DEFAULTS, Preparer, canonical_block, job_request_defaults, unreadable_block
from pipeline.generate.settings import GenerationSettings
from pipeline.generate.sinks import Resume
from pipeline.storage import shown


def rows_to_skip(shard: Shard, resume: Resume, selected: dict[str, list[int]] | None) -> frozenset[int]:
    """The rows of `shard` not to generate: committed by an earlier run, or left out by `limit`."""
    rows = set(shard.row_range)
    skip = resume.skip_for(shard.source) & rows
    if selected is not None:
        skip |= rows - set(selected.get(shard.source, ()))
    return frozenset(skip)


def preparer_for(settings: GenerationSettings, model_path: str, adapters: AdapterSet | None = None,
                 revision: str | None = None) -> Preparer:
    """The `Preparer` the job's prepare tasks use for `settings`: the same template, tokenizer,
    seeds and sampling parameters, for a caller that feeds an engine without the job (a benchmark)."""
    return _preparer(**preparer_args(settings, model_path, adapters or AdapterSet(), revision))


def preparer_args(settings: GenerationSettings, model_path: str, adapters: AdapterSet, revision: str | None) -> dict:
    # Plain, hashable values: they travel to every prepare task and key the preparer's cache there.
    return {
        "model_path": model_path,
        "job_seed": settings.seed,
        "max_model_len": settings.engine.max_model_len,
        "date_string": settings.prompt.date_string,
        "ignore_eos": settings.engine.ignore_eos,
        "adapters_json": json.dumps(adapters.adapters, sort_keys=True),
        "response_format_json": json.dumps(settings.response_format),
        "defaults_json": json.dumps(job_request_defaults(settings.request_defaults,
                                                         **{k: getattr(settings, k) for k in JOB_DEFAULTS})),
        "label_probs": settings.label_probs,
        "revision": revision,
    }


def prepare_block(block: pa.Table, group_prefixes: bool = False, **kwargs) -> pa.Table:
    """A canonical block's rows prepared for the engines (`Preparer.prepare_block`); with
    `group_prefixes`, rows that share a prompt prefix next to each other (`prefix_groups`)."""
    prepared = _preparer(**kwargs).prepare_block(block)
    return group_by_prefix(prepared) if group_prefixes else prepared


@functools.lru_cache(maxsize=4)
def _preparer(model_path, job_seed, max_model_len, date_string, ignore_eos, adapters_json, response_format_json,
              defaults_json="{}", label_probs=False, revision=None) -> Preparer:
    """One preparer per worker process: the template and tokenizer load once, not per block."""
    from tokenizers import Tokenizer

    from pipeline.generate.config import check_adapter_request
    from pipeline.model_files import resolve_model_file
    from pipeline.prompts import ChatTemplate

    tokenizer_file = str(resolve_model_file(model_path, "tokenizer.json", revision))
    tokenizer = Tokenizer.from_file(tokenizer_file)
    literal = Tokenizer.from_file(tokenizer_file)
    literal.encode_special_tokens = True  # special-token text is split like any other text
    adapters = json.loads(adapters_json)

    def encode(text: str) -> list[int]:
        # The rendered text already holds <|begin_of_text|>; the tokenizer must not add another.
        return tokenizer.encode(text, add_special_tokens=False).ids

    def encode_literal(text: str) -> list[int]:
        return literal.encode(text, add_special_tokens=False).ids

    special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    longest = max((len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)

    return Preparer(
        template=ChatTemplate.from_model(model_path, revision=revision),
        encode=encode,
        job_seed=job_seed,
        max_model_len=max_model_len,
        date_string=date_string,
        ignore_eos=ignore_eos,
        resolve_lora=functools.partial(check_adapter_request, adapters),
        default_response_format=json.loads(response_format_json),
        max_token_chars=max(1, longest),
        special_token_ids=special,
        encode_literal=encode_literal,
        defaults=json.loads(defaults_json),
        label_probs=label_probs,
    )


def read_shard(shard: Shard, id_column, passthrough, passthrough_types, skip, template=None):
    # `shard.path` is a path or URI: the store is opened here, on whatever node runs the task,
    # with that node's credentials.
    try:
        source = open_parquet(shard.path)
    except (OSError, pa.ArrowException) as exc:
        # Not about some rows: the file that planning read is gone, unreadable or replaced. The
        # job stops (and resumes once the file is back) rather than turning its rows into errors.
        raise InputFileChanged(
            f"input file {shown(shard.path)} can no longer be read as planned ({type(exc).__name__}: {exc}); "
            "restore it and rerun the same command to resume"
        ) from exc
    try:
        table = source.read_row_groups(list(shard.row_groups), columns=list(shard.columns))
        table = table.slice(shard.skip_rows, shard.num_rows)
        if table.num_rows != shard.num_rows:
            raise pa.ArrowInvalid(f"{table.num_rows} rows where the footer says {shard.num_rows}")
    except (OSError, pa.ArrowException) as exc:
        # Damaged data pages: the file's footer was fine when planned, its rows are not. Each row
        # becomes an error row rather than the job failing or the rows vanishing.
        error = f"rows {shard.first_row}-{shard.first_row + shard.num_rows - 1} of {shard.source}: {exc}"
        return [unreadable_block(shard, error, passthrough, passthrough_types, frozenset(skip))]
    return [canonical_block(table, shard, id_column, passthrough, passthrough_types, frozenset(skip), template)]


class InputFileChanged(JobFailure):
    """An input file cannot be read the way planning found it: the job stops, resumable."""


