"""Prepared rows grouped by shared prompt prefix (`prepare.group_prefixes`), so that rows that
share a prefix reach the same engine one after the other while it is still in that engine's
prefix cache.

vLLM caches the KV blocks of the prompts it has prefilled and reuses them for later prompts that
start with the same tokens, until newer blocks evict them. Rows arrive in input order; with many
distinct long prefixes (several questions about each of many documents, shuffled; several
instructions in one labelling job) a prefix is evicted long before the next row that shares it
arrives, and is prefilled again for every row. Sorting a prepared block's rows by their prompt
token ids (lexicographically) puts every row that shares a prefix of any length next to the
others, so the engine batches cut from the block (consecutive rows) hold them together.

Only the order changes: a row's prompt, parameters and seed (derived from its id, never from its
position) stay the same, so its answer does too, and the output is the same set of rows.

Pure module: pyarrow and numpy.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def prefix_order(token_ids: pa.Array | pa.ChunkedArray, loras: list[str | None] | None = None) -> list[int]:
    """The indices of a block's rows in grouped order: the rows with prompt tokens by adapter
    (none first; rows of different adapters share no cache) and then by their token ids,
    lexicographically, ties in block order; then the rows without tokens (error rows) in
    block order.

    Token ids compare as big-endian 32-bit bytes, which order like the id sequences themselves
    (a prefix before its extensions) and compare in C, not element by element in Python."""
    if isinstance(token_ids, pa.ChunkedArray):
        token_ids = token_ids.combine_chunks()
    n = len(token_ids)
    if n == 0:
        return []
    offsets = token_ids.offsets.to_numpy(zero_copy_only=False)
    # The child values, unsliced: `.offsets` (slice-aware) index into them.
    flat = token_ids.values.to_numpy(zero_copy_only=False)
    data = flat.astype(">u4", copy=False).tobytes()
    valid = token_ids.is_valid().to_numpy(zero_copy_only=False)
    loras = loras if loras is not None else [None] * n
    runnable = [i for i in range(n) if valid[i]]
    keys = {i: (loras[i] is not None, loras[i] or "", data[4 * int(offsets[i]):4 * int(offsets[i + 1])])
            for i in runnable}
    runnable.sort(key=keys.__getitem__)  # stable: rows with the same prompt keep their block order
    return runnable + [i for i in range(n) if not valid[i]]


def group_by_prefix(block: pa.Table) -> pa.Table:
    """A prepared block (`pipeline.generate.prepare.PREPARED` columns and the rest) with its rows
    in `prefix_order`; every row kept, error rows last."""
    order = prefix_order(block.column("_prompt_token_ids"), block.column("_lora").to_pylist())
    if order == list(range(block.num_rows)):
        return block
    return block.take(pa.array(np.asarray(order, dtype=np.int64)))
