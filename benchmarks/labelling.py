"""The labelling-shaped comparison: rows that share one long instruction and differ in a short
text, with answers of a few tokens (`--label-*` flags); the job, bare vLLM and Ray Data LLM on the
same rows, as in the main comparison (`benchmarks.generation.compare`).

Every row's prompt starts with the same instruction (a system message of about
`--label-instruction-tokens` tokens), so almost all of a row's prefill is shared: vLLM's prefix
caching (on by default, on the CPU too; `engine.enable_prefix_caching`, which every contender gets
through the job's engine settings) computes it once per engine while it stays cached. What is left
per row is the short text and a few output tokens, so the work is dominated by per-row overheads:
scheduling, batching, preparing and committing rows.
"""

from __future__ import annotations

import json
import random

from benchmarks.workload import WORDS

NAME = "labelling"
# Words per token of the common-English prompts with the tiny model's tokenizer (measured on the
# instruction below); the comparison reports the measured prompt tokens either way.
TOKENS_PER_WORD = 1.75


def instruction(tokens: int, seed: int) -> str:
    """A labelling instruction of about `tokens` tokens: a task sentence, then guidance text."""
    rng = random.Random(f"instruction-{seed}")
    words = max(1, int(tokens / TOKENS_PER_WORD))
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return ("Label the text the user gives as one of: positive, negative, neutral. Answer with the label only. "
            f"Guidance: {body}.")


def make_labelling_requests(n: int, max_tokens: int, seed: int, instruction_tokens: int) -> list[dict]:
    """`n` requests sharing one instruction of about `instruction_tokens` tokens, each with its own
    short text (4 to 30 words) and at most `max_tokens` answer tokens."""
    system = instruction(instruction_tokens, seed)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))).capitalize() + "."
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Text: {text}"}]
        rows.append({"messages": json.dumps(messages), "max_tokens": max_tokens, "temperature": 0.0})
    return rows


def labelling_comparison(args, model_path, workdir, mem, phases, time_left) -> dict:
    """The contenders of `phases` on `--label-rows` labelling rows; the results' `labelling`."""
    from benchmarks.generation import compare

    rows = args.label_rows or args.rows
    requests = make_labelling_requests(rows, args.label_max_tokens, args.seed, args.label_instruction_tokens)
    one = make_labelling_requests(1, 1, args.seed, args.label_instruction_tokens)
    result = compare(args, model_path, workdir, mem, phases, time_left, requests, one, NAME)
    return {**result, "instruction_tokens_asked": args.label_instruction_tokens}
