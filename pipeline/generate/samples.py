"""n answers per row, and the numbers that come with an answer: token log-probabilities and the
probability of each label of a `choice` answer.

- `expand_samples`: a batch of prepared rows -> n rows per row, ids `<id>#<k>`, each with its own
  seed (`pipeline.sampling.sample_seed`). Done inside the engine's batch, so the n answers of a
  row are committed together (in one part), and a resumed job never holds part of a row's answers.
- `token_logprobs`: vLLM's per-position logprobs -> the `logprobs` column (OpenAI's shape).
- `label_scoring_params` / `label_probabilities`: each label of a `choice` answer scored as the
  model's probability of answering with exactly that text (its tokens, then the end of the turn),
  normalised over the labels, from one prompt-logprobs pass per label.

Pure module: pyarrow, numpy; the engine passes vLLM's outputs in.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from pipeline.sampling import engine_seed, sample_seed

TOP_LOGPROB_TYPE = pa.struct([("token", pa.string()), ("logprob", pa.float64())])
LOGPROBS_TYPE = pa.list_(pa.struct([
    ("token", pa.string()), ("logprob", pa.float64()), ("top_logprobs", pa.list_(TOP_LOGPROB_TYPE)),
]))
LABEL_PROBS_TYPE = pa.list_(pa.struct([("label", pa.string()), ("prob", pa.float64())]))


def sample_id(row_id: str, sample: int) -> str:
    return f"{row_id}#{sample}"


def expand_samples(batch: pa.Table, n: int) -> pa.Table:
    """Each prepared row `n` times (row-major: all answers of a row together), with `_sample` k,
    id `<id>#<k>` and seed `sample_seed(seed, k)` in `_seed` and in `_params`. With n = 1 the
    rows are unchanged (ids and seeds as they were) and `_sample` is 0."""
    rows = batch.num_rows
    if n == 1:
        return batch.append_column("_sample", pa.array(np.zeros(rows, dtype=np.int64)))
    out = batch.take(pa.array(np.repeat(np.arange(rows, dtype=np.int64), n)))
    samples = np.tile(np.arange(n, dtype=np.int64), rows).tolist()
    ids = [sample_id(row_id, k) for row_id, k in zip(out.column("_id").to_pylist(), samples)]
    seeds = [sample_seed(s, k) if s is not None else None for s, k in zip(out.column("_seed").to_pylist(), samples)]
    out = with_seeds(out, seeds)
    out = out.set_column(out.schema.get_field_index("_id"), "_id", pa.array(ids, pa.string()))
    return out.append_column("_sample", pa.array(samples, pa.int64()))


def with_seeds(batch: pa.Table, seeds: list[int | None], max_tokens: list[int | None] | None = None) -> pa.Table:
    """Prepared rows with `_seed` set to `seeds`, the same seed in each row's sampling parameters,
    and (where `max_tokens` gives one) a new `max_tokens` there too."""
    params = batch.column("_params").to_pylist()
    for i, seed in enumerate(seeds):
        if seed is None or params[i] is None:
            continue
        kwargs = json.loads(params[i])
        kwargs["seed"] = engine_seed(seed)
        if max_tokens is not None and max_tokens[i] is not None:
            kwargs["max_tokens"] = max_tokens[i]
        params[i] = json.dumps(kwargs)
    for name, values, kind in (("_seed", seeds, pa.int64()), ("_params", params, pa.string())):
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, kind))
    return batch


def token_logprobs(token_ids: list[int], logprobs: list[dict] | None, top: int) -> list[dict] | None:
    """The `logprobs` cell of one answer: per generated token its text and log-probability, and
    the `top` most likely tokens at that position. `logprobs` is vLLM's per-position list of
    {token id: Logprob(logprob, rank, decoded_token)}."""
    if logprobs is None:
        return None
    out = []
    for token_id, position in zip(token_ids, logprobs):
        chosen = position.get(token_id)
        alternatives = sorted((lp for lp in position.values() if lp.rank is not None and lp.rank <= top),
                              key=lambda lp: lp.rank)
        out.append({
            "token": chosen.decoded_token if chosen is not None else None,
            "logprob": _finite(chosen.logprob) if chosen is not None else None,
            "top_logprobs": [{"token": lp.decoded_token, "logprob": _finite(lp.logprob)} for lp in alternatives],
        })
    return out


def label_scoring_params(seed: int) -> str:
    """vLLM sampling parameters (JSON) of one label's scoring request: nothing to generate but
    one token; the log-probability of each prompt token is what is wanted."""
    return json.dumps({"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "seed": engine_seed(seed)})


def continuation_logprob(prompt_logprobs: list, prompt_len: int, continuation: list[int]) -> float:
    """Sum of the log-probabilities of `continuation`, the last tokens of a scored prompt whose
    first `prompt_len` tokens are the row's own prompt."""
    total = 0.0
    for offset, token_id in enumerate(continuation):
        position = prompt_logprobs[prompt_len + offset]
        total += position[token_id].logprob
    return total


def label_probabilities(labels: list[str], logprob_sums: list[float]) -> list[dict]:
    """Each label's probability, normalised over the labels (a softmax of their log-probabilities)."""
    top = max(logprob_sums)
    if not math.isfinite(top):  # no label is possible at all: no probabilities to give
        return [{"label": label, "prob": None} for label in labels]
    weights = [math.exp(x - top) if math.isfinite(x) else 0.0 for x in logprob_sums]
    total = sum(weights) or 1.0
    return [{"label": label, "prob": w / total} for label, w in zip(labels, weights)]


def _finite(x: float) -> float | None:
    """-inf (a token the sampler could not pick) has no Parquet-friendly JSON form: null."""
    return float(x) if math.isfinite(x) else None
