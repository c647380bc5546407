"""The engine loop: one thread that owns a `vllm.LLM`, adds every caller's requests as they
arrive and steps the engine while anything is unfinished (see `pipeline.generate.engine`).

Ray Data hands each worker several batches at once, each call in its own thread; each call
hands its requests to the loop and waits for its own results, so the engine's continuous
batching never waits for the slowest row of a batch or for the next batch to be delivered.

The first call runs alone (`first_alone`): when an engine starts, the batches that were
prepared while it started all arrive together, and with every one of their rows decoding
together the first batch would come back about when the whole first wave does. Alone, its rows
decode in short steps and the job's first rows are committed that much sooner; the batches held
back run right after it, as they would have run at the end of the job otherwise.

The loop thread can build the engine itself (`build`), and the job's workers have it do so: then
the model's compilation and warm-up and every later step run on one thread. On CPU each thread
that runs torch's parallel work gets an OpenMP thread team of its own; an engine built on one
thread and stepped on another keeps two teams, more OpenMP threads than cores, and each step's
model pass took 5-7% longer (`docs/benchmark.md`).

Pure module: the engine, or the function that builds it, is passed in (tests drive it with a fake
that records what ran together); vLLM itself is imported by `pipeline.generate.engine` only.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Any, Callable

log = logging.getLogger("pipeline.generate.engine")


class _Submission:
    """One call's requests on their way through the engine loop."""

    def __init__(self, requests: list[tuple]):
        self.requests = requests
        self.kind = "lora" if requests[0][2] is not None else "base"
        self.results: list = [None] * len(requests)
        self.remaining = len(requests)
        self.error: BaseException | None = None
        self.done = threading.Event()

    def finish(self, index: int, output) -> None:
        self.results[index] = output
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def fail(self, exc: BaseException) -> None:
        if not self.done.is_set():
            self.error = exc
            self.done.set()


class EngineLoop:
    """The one thread that adds requests to a `vllm.LLM` and steps it.

    Callers (Ray Data's UDF threads) hand over a list of (prompt, params, lora) requests with
    `run` and block until those are finished; meanwhile the loop keeps admitting other callers'
    requests, so the engine always has work while any is queued. With `separate_base_and_lora`,
    requests with and without an adapter never share the engine (a caller's mixed list is split);
    a group of the other kind waits until the engine has drained, first come first served.
    With `first_alone`, the first call's requests have the engine to themselves until they are
    all finished; the others wait for it.
    """

    def __init__(self, llm=None, separate_base_and_lora: bool = False, first_alone: bool = False,
                 build: Callable[[], Any] | None = None):
        if (llm is None) == (build is None):
            raise ValueError("EngineLoop takes an engine or a function that builds one: exactly one of the two")
        self.llm = llm
        self.separate = separate_base_and_lora
        self.first_alone = first_alone
        self.leading: _Submission | None = None  # the first call, while it runs alone
        self.leading_since = 0.0
        self.inbox: queue.Queue[_Submission] = queue.Queue()
        self.waiting: collections.deque[_Submission] = collections.deque()
        self.in_engine: dict[str, tuple[_Submission, int]] = {}  # external request id -> (call, index)
        self.internal_ids: dict[str, str] = {}  # external -> internal request id (for aborts)
        self.engine_kind: str | None = None
        self.dead: BaseException | None = None
        self.built = threading.Event()
        self.build_error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, args=(build,), name="engine-loop", daemon=True)
        self.thread.start()
        if build is not None:  # the engine is built on the loop thread; the caller waits for it
            self.built.wait()
            if self.build_error is not None:
                raise self.build_error

    def run(self, requests: list[tuple]) -> list:
        """The engine's outputs for `requests`, in order; raises what the engine raised for them."""
        if not requests:
            return []
        if self.separate:
            groups = [[i for i, r in enumerate(requests) if (r[2] is None) == base] for base in (True, False)]
            groups = [g for g in groups if g]
        else:
            groups = [list(range(len(requests)))]
        subs = [_Submission([requests[i] for i in g]) for g in groups]
        for sub in subs:
            if self.dead is not None:
                raise self.dead
            self.inbox.put(sub)
        results: list = [None] * len(requests)
        for g, sub in zip(groups, subs):
            sub.done.wait()
            if sub.error is not None:
                raise sub.error
            for i, out in zip(g, sub.results):
                results[i] = out
        return results

    # ---- the loop thread ----------------------------------------------------------------------

    def _loop(self, build: Callable[[], Any] | None) -> None:
        if build is not None:
            try:
                self.llm = build()
            except BaseException as exc:  # raised to the caller by __init__; the thread ends
                self.build_error = exc
                return
            finally:
                self.built.set()
        try:
            self._steps()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            log.exception("engine loop stopped")
            self._die(exc)
            for sub, _ in self.in_engine.values():
                sub.fail(exc)
            while True:
                self.inbox.get().fail(exc)

    def _steps(self) -> None:
        engine = self.llm.llm_engine
        while True:
            if self.dead is not None:  # fail whatever still arrives
                self._collect(block=True)
                self._admit()
                continue
            busy = engine.has_unfinished_requests()
            self._collect(block=not busy and not self.waiting)
            self._admit()
            if not engine.has_unfinished_requests():
                self.engine_kind = None
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # the engine failed these requests; the callers decide
                self._fail_in_engine(exc)
                continue
            for out in outputs:
                if out.finished and out.request_id in self.in_engine:
                    sub, index = self.in_engine.pop(out.request_id)
                    del self.internal_ids[out.request_id]
                    sub.finish(index, out)

    def _collect(self, block: bool) -> None:
        if block:
            self.waiting.append(self.inbox.get())
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _admit(self) -> None:
        while self.waiting:
            sub = self.waiting[0]
            if self.dead is not None:
                self.waiting.popleft().fail(self.dead)
                continue
            if self.leading is not None:
                if not self.leading.done.is_set():
                    return  # the first call has the engine to itself until it is done
                log.info("the first call's %d requests answered in %.2fs; admitting the others",
                         len(self.leading.requests), time.perf_counter() - self.leading_since)
                self.leading = None
            if self.separate and self.in_engine and sub.kind != self.engine_kind:
                return  # the other kind runs once the engine has drained
            self.waiting.popleft()
            prompts, params, loras = zip(*sub.requests)
            try:
                ids = self.llm.enqueue(
                    list(prompts), list(params),
                    lora_request=list(loras) if any(l is not None for l in loras) else None,
                    use_tqdm=False,
                )
            except Exception as exc:  # enqueue aborts what it added; the caller retries row by row
                sub.fail(exc)
                if engine_dead(exc):
                    self._die(exc)
                continue
            self.engine_kind = sub.kind
            if self.first_alone:
                self.first_alone, self.leading, self.leading_since = False, sub, time.perf_counter()
                log.info("first call: %d requests, alone in the engine until they finish", len(ids))
            for index, internal_id in enumerate(ids):
                # enqueue returns the engine's internal ids ("<n>-<random suffix>"); outputs
                # carry the external id, LLM's counter "<n>".
                self.in_engine[internal_id.split("-", 1)[0]] = (sub, index)
                self.internal_ids[internal_id.split("-", 1)[0]] = internal_id

    def _fail_in_engine(self, exc: Exception) -> None:
        ids = list(self.internal_ids.values())
        subs = {id(sub): sub for sub, _ in self.in_engine.values()}
        self.in_engine.clear()
        self.internal_ids.clear()
        if engine_dead(exc):
            self._die(exc)
        else:
            try:
                self.llm.llm_engine.abort_request(ids, internal=True)
            except Exception as abort_exc:
                self._die(abort_exc)
        for sub in subs.values():
            sub.fail(exc)

    def _die(self, exc: BaseException) -> None:
        self.dead = exc
        while self.waiting:
            self.waiting.popleft().fail(exc)


def engine_dead(exc: Exception) -> bool:
    """An engine that died takes every later row with it: that stops the job, not the row."""
    name = type(exc).__name__
    return name in ("EngineDeadError", "EngineGenerateError") or "EngineCore" in str(exc)
