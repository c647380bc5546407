"""The endpoint's one vLLM caller: vLLM's async engine (`AsyncLLM`), fed with requests prepared
by the batch job's own `Preparer` and built into vLLM requests by the job's `engine_request`, so a
request validates, renders, seeds and samples exactly as a batch row does.

A request without a seed is seeded from the server's seed and its request id (`row_seed`), as a
batch row is from the job's seed and its row id. A request whose client goes away is aborted in
the engine (vLLM aborts it when its output stream is cancelled); `stats` counts those.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator

from pipeline.generate.config import ensure_model, vllm_rank
from pipeline.generate.engine import engine_kwargs, engine_request, has_cuda, on_cpu_platform
from pipeline.generate.samples import token_logprobs
from pipeline.generate.tasks import preparer_for
from pipeline.serve.adapters import ServedAdapters
from pipeline.serve.gate import KindGate
from pipeline.serve.settings import ServeSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Completion:
    """A request's answer so far: the text of this piece (`delta`), and the totals."""

    delta: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finished: bool
    finish_reason: str | None = None
    token_ids: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)


class ServeEngine:
    """One `AsyncLLM` and the preparer and adapters in front of it."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.llm = None
        self.preparer = None
        self.adapters = ServedAdapters(settings.lora_root, settings.model, settings.prompt.date_string,
                                       settings.engine.lora.max_rank_limit, enabled=settings.adapters)
        self.gate = KindGate(separate=False)
        self.counts = {"finished": 0, "aborted": 0, "failed": 0}

    def start(self) -> None:
        """Build the model if it is the tiny one, the preparer, and the engine (its core runs in a
        process of its own, which vLLM's async engine requires)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        started = time.perf_counter()
        s = self.settings
        if s.engine.batch_invariant and has_cuda():
            # As the batch job's engine: read by vLLM (and its engine process) when it starts, so
            # that an answer does not depend on the requests it shares the GPU with.
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        model_path = ensure_model(s.model)
        base = preparer_for(s.preparer_settings(), model_path, revision=s.model.revision)
        self.preparer = dataclasses.replace(base, resolve_lora=self.adapters.check)
        on_cpu = on_cpu_platform()
        engine = dataclasses.asdict(s.engine)
        engine["seed"] = s.seed
        if on_cpu and engine.get("kv_cache_gib") is None:
            engine["kv_cache_gib"] = 1.0  # as the batch job: vLLM's CPU default reserves far more
        engine["lora"] = {"enabled": s.adapters, "max_rank": vllm_rank(s.engine.lora.max_rank_limit),
                          "max_loras": s.engine.lora.max_loras_limit}
        kwargs = engine_kwargs(engine, model_path, on_cpu=on_cpu)
        if s.model.revision:
            kwargs["revision"] = kwargs["tokenizer_revision"] = s.model.revision
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs, disable_log_stats=True))
        self.gate = KindGate(separate=on_cpu and s.adapters)
        log.info("engine ready in %.1fs (%s)", time.perf_counter() - started, model_path)

    def prepare(self, request_id: str, request_json: str) -> dict:
        """The batch job's `prepare_row` on the request: its prompt tokens, sampling parameters,
        seed, adapter and offered tools, or `_error` with the text a batch row would get."""
        return self.preparer.prepare_row(request_id, request_json)

    async def generate(self, request_id: str, prepared: dict, stream: bool) -> AsyncIterator[Completion]:
        """The answer to a prepared request: pieces as they come (`stream`), or the whole at the end."""
        from vllm.sampling_params import RequestOutputKind

        lora = prepared.get("_lora")
        adapter = self.adapters.entry(lora) if lora is not None else None
        prompt, params, lora_request = engine_request(prepared["_prompt_token_ids"], prepared["_params"], lora, adapter)
        params.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        text, token_ids, logprobs = "", [], []
        done = False
        async with self.gate.enter("base" if lora is None else "lora"):
            try:
                async for out in self.llm.generate(prompt, params, request_id, lora_request=lora_request):
                    piece = out.outputs[0]
                    text += piece.text
                    token_ids.extend(piece.token_ids)
                    logprobs.extend(piece.logprobs or [])
                    done = out.finished
                    yield Completion(piece.text, text, len(prepared["_prompt_token_ids"]), len(token_ids),
                                     out.finished, piece.finish_reason, token_ids, logprobs)
            except (asyncio.CancelledError, GeneratorExit):
                if not done:
                    self.counts["aborted"] += 1
                    log.info("request %s aborted by its client after %d tokens", request_id, len(token_ids))
                raise
            except Exception:
                self.counts["failed"] += 1
                raise
        self.counts["finished"] += 1

    def logprobs(self, prepared: dict, completion: Completion) -> list | None:
        """The answer's token log-probabilities, when the request asked (the batch job's `logprobs` column)."""
        top = json.loads(prepared["_params"]).get("logprobs")
        return None if top is None else token_logprobs(completion.token_ids, completion.logprobs, top)

    def stats(self) -> dict:
        unfinished = self.llm.get_num_unfinished_requests() if self.llm is not None else 0
        return {**self.counts, "engine_unfinished": unfinished, "ready": self.ready}

    @property
    def ready(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
