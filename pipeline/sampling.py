"""From a request's sampling fields to vLLM `SamplingParams` keyword arguments, and row seeds.

The Workers AI schema allows wider ranges than vLLM accepts. Each difference is mapped on
purpose, identically on every backend (the table is in docs/sampling.md):

| field              | schema                     | vLLM 0.32             | mapping here                                   |
|--------------------|----------------------------|-----------------------|------------------------------------------------|
| max_tokens         | integer, default 256       | default 16            | as given (default 256)                         |
| temperature        | 0..5, default 0.6          | 0..2                  | above 2 -> 2 (0 is greedy)                     |
| top_p              | 0..2                       | (0, 1]                | above 1 -> 1 (keep every token); 0 -> top_k=1  |
| top_k              | 1..50                      | -1 or >= 1            | as given                                       |
| seed               | 1..9,999,999,999           | any int; CPU: 32 bits | low 32 bits, on every backend                  |
| repetition_penalty | 0..2                       | > 0                   | 0 -> 1 (no penalty); else below 0.01 -> 0.01   |
| frequency_penalty  | 0..2                       | -2..2                 | as given                                       |
| presence_penalty   | 0..2                       | -2..2                 | as given                                       |

Extensions (not in the schema; docs/sampling.md): `stop` and `min_tokens` as vLLM takes them;
`logprobs: true` asks for the chosen tokens' log-probabilities (vLLM's logprobs=0), `top_logprobs: k`
for the k most likely alternatives too (vLLM's logprobs=k).

Pure module: no vLLM import; the engine builds `SamplingParams(**kwargs)`.
"""

from __future__ import annotations

import hashlib

from pipeline.schema import Request

VLLM_MAX_TEMPERATURE = 2.0
MIN_REPETITION_PENALTY = 0.01
SEED_BITS = 32


def row_seed(job_seed: int, row_id: str) -> int:
    """The seed of a row that gives none: a hash of the job's seed and the row's id.

    It depends on nothing else (not the shard, batch, worker or file order), so a row samples
    the same tokens however the job is split. The result lies in the schema's seed range.
    """
    return _hashed_seed(f"{int(job_seed)}\x00{row_id}")


def sample_seed(seed: int, sample: int) -> int:
    """The seed of answer `sample` of a row seeded `seed` (n answers per row): the row's own seed
    for the first, so n=1 and the first of n give the same answer; a hash of both for the others."""
    if sample == 0:
        return int(seed)
    return _hashed_seed(f"{int(seed)}\x00#{int(sample)}")


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of a row redone by retry `attempt` (1, 2, ...; `pipeline.generate.retry`): new for
    every attempt, the same for the same attempt."""
    return _hashed_seed(f"{int(seed)}\x00retry\x00{int(attempt)}")


def _hashed_seed(key: str) -> int:
    """A seed in the schema's range, from a hash of `key`."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**SEED_BITS - 1) + 1


def engine_seed(seed: int) -> int:
    """The seed handed to the engine: its low 32 bits.

    vLLM's CPU sampler keeps only the low 32 bits of a seed; GPUs keep 64. Reducing it here makes
    a seed mean the same tokens on both (9,999,999,999 and 1,410,065,407 are the same seed).
    """
    return int(seed) % 2**SEED_BITS


def sampling_kwargs(request: Request, seed: int, *, ignore_eos: bool = False) -> dict:
    """Keyword arguments for `vllm.SamplingParams` for one request.

    `seed` is the row's seed: the request's own, or `row_seed(...)` when it has none. Every row is
    seeded, because on CPU an unseeded request in a batch can change a seeded one's tokens.
    """
    kwargs: dict = {
        "max_tokens": request.max_tokens,
        "temperature": min(request.temperature, VLLM_MAX_TEMPERATURE),
        "seed": engine_seed(seed),
    }
    if request.top_p is not None:
        if request.top_p == 0:
            # The smallest nucleus holds just the most likely token.
            kwargs["top_k"] = 1
        else:
            kwargs["top_p"] = min(request.top_p, 1.0)
    if request.top_k is not None and "top_k" not in kwargs:
        kwargs["top_k"] = request.top_k
    if request.repetition_penalty is not None:
        # 0 is how a row says "no penalty" for the other two penalties; for this one vLLM's
        # neutral value is 1, and values below 1 reward repetition (0.01: a hundredfold).
        penalty = request.repetition_penalty
        kwargs["repetition_penalty"] = 1.0 if penalty == 0 else max(penalty, MIN_REPETITION_PENALTY)
    if request.frequency_penalty is not None:
        kwargs["frequency_penalty"] = request.frequency_penalty
    if request.presence_penalty is not None:
        kwargs["presence_penalty"] = request.presence_penalty
    if request.response_format is not None:
        kwargs["structured_outputs"] = dict(request.response_format)
    if request.stop:
        kwargs["stop"] = list(request.stop)
    if request.min_tokens:
        kwargs["min_tokens"] = request.min_tokens
    if request.top_logprobs is not None or request.logprobs:
        kwargs["logprobs"] = request.top_logprobs or 0
    if ignore_eos:
        kwargs["ignore_eos"] = True
    return kwargs
