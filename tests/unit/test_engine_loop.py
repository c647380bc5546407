"""`pipeline.generate.engine_loop.EngineLoop`'s bookkeeping, on a fake engine that records what it runs together.

The real engine behind the loop is tested through the job (tests/integration); here the point is
the logic around it: outputs go back to the call that asked, calls overlap in the engine, base and
adapter rows never share it when told so, and failures reach the right callers."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from pipeline.generate.engine_loop import EngineLoop


@dataclass
class Out:
    request_id: str
    value: object
    finished: bool = True


@dataclass
class FakeEngine:
    """Requests finish after `steps` steps each; records the set of requests alive at each step."""

    steps: int = 3
    alive: dict = field(default_factory=dict)  # internal id -> [prompt, lora, steps left]
    history: list = field(default_factory=list)
    fail_step_on: object = None
    aborted: list = field(default_factory=list)

    def has_unfinished_requests(self):
        return bool(self.alive)

    def step(self):
        time.sleep(0.001)  # a step takes time, so calls arriving together find each other in the engine
        self.history.append({(v[0], v[1]) for v in self.alive.values()})
        if self.fail_step_on is not None and any(v[0] == self.fail_step_on for v in self.alive.values()):
            raise RuntimeError(f"engine choked on {self.fail_step_on}")
        done = []
        for rid, v in list(self.alive.items()):
            v[2] -= 1
            if v[2] == 0:
                del self.alive[rid]
                done.append(Out(rid.split("-")[0], f"out:{v[0]}"))
        return done

    def abort_request(self, ids, internal=False):
        self.aborted.extend(ids)
        for rid in ids:
            self.alive.pop(rid, None)


class FakeLLM:
    def __init__(self, steps=3):
        self.llm_engine = FakeEngine(steps=steps)
        self.counter = 0
        self.lock = threading.Lock()

    def enqueue(self, prompts, params, lora_request=None, use_tqdm=False):
        ids = []
        for i, p in enumerate(prompts):
            if p == "refused":
                raise ValueError("prompt refused")
            rid = f"{self.counter}-abcdefgh"
            self.counter += 1
            lora = lora_request[i] if lora_request else None
            self.llm_engine.alive[rid] = [p, lora, self.llm_engine.steps]
            ids.append(rid)
        return ids


def reqs(*prompts, lora=None):
    return [(p, {"seed": 1}, lora) for p in prompts]


def run_together(loop, *calls):
    """Run each call's requests from its own thread, as Ray Data's UDF threads do."""
    results, errors = [None] * len(calls), [None] * len(calls)
    start = threading.Barrier(len(calls))

    def worker(k):
        start.wait()
        try:
            results[k] = loop.run(calls[k])
        except Exception as exc:
            errors[k] = exc

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    return results, errors


def test_outputs_return_to_their_call_in_order():
    loop = EngineLoop(FakeLLM())
    assert [o.value for o in loop.run(reqs("a", "b", "c"))] == ["out:a", "out:b", "out:c"]
    assert loop.run([]) == []


def test_concurrent_calls_share_the_engine():
    llm = FakeLLM(steps=50)
    loop = EngineLoop(llm)
    results, errors = run_together(loop, reqs("a1", "a2"), reqs("b1"), reqs("c1", "c2", "c3"))
    assert errors == [None, None, None]
    assert [[o.value for o in r] for r in results] == [["out:a1", "out:a2"], ["out:b1"], ["out:c1", "out:c2", "out:c3"]]
    # With 50 steps per request, calls arriving together overlap in the engine.
    assert max(len(alive) for alive in llm.llm_engine.history) >= 4


def test_base_and_adapter_rows_never_share_the_engine_when_separated():
    llm = FakeLLM(steps=5)
    loop = EngineLoop(llm, separate_base_and_lora=True)
    mixed = reqs("base1") + reqs("lora1", lora="x") + reqs("base2") + reqs("lora2", lora="y")
    results, errors = run_together(loop, mixed, reqs("base3"), reqs("lora3", lora="x"))
    assert errors == [None, None, None]
    assert [o.value for o in results[0]] == ["out:base1", "out:lora1", "out:base2", "out:lora2"]
    for alive in llm.llm_engine.history:
        kinds = {lora is None for _, lora in alive}
        assert len(kinds) == 1, alive


def test_without_separation_kinds_mix():
    llm = FakeLLM(steps=5)
    loop = EngineLoop(llm)
    loop.run(reqs("base1") + reqs("lora1", lora="x"))
    assert any(len({lora is None for _, lora in alive}) == 2 for alive in llm.llm_engine.history)


def test_a_refused_call_fails_alone():
    llm = FakeLLM(steps=20)
    loop = EngineLoop(llm)
    results, errors = run_together(loop, reqs("ok1", "refused"), reqs("ok2"))
    assert isinstance(errors[0], ValueError) and results[0] is None
    assert errors[1] is None and [o.value for o in results[1]] == ["out:ok2"]


def test_a_failing_step_fails_the_calls_in_the_engine_and_the_loop_goes_on():
    llm = FakeLLM(steps=3)
    llm.llm_engine.fail_step_on = "poison"
    loop = EngineLoop(llm)
    with pytest.raises(RuntimeError, match="choked on poison"):
        loop.run(reqs("x", "poison"))
    assert sorted(llm.llm_engine.aborted) == ["0-abcdefgh", "1-abcdefgh"]
    assert [o.value for o in loop.run(reqs("later"))] == ["out:later"]


def test_a_dead_engine_fails_every_later_call():
    class EngineDeadError(RuntimeError):
        pass

    llm = FakeLLM()

    def die():
        raise EngineDeadError("engine core died")

    llm.llm_engine.step = die
    loop = EngineLoop(llm)
    with pytest.raises(EngineDeadError):
        loop.run(reqs("a"))
    with pytest.raises(EngineDeadError):
        loop.run(reqs("b"))


# ---- first_alone: the first call has the engine to itself ---------------------------------------


def run_in_order(loop, *calls, gap=0.02):
    """Start each call from its own thread, `gap` seconds apart (so the first call is the first to
    reach the loop); return their results and the order in which they returned."""
    results, errors, returned = [None] * len(calls), [None] * len(calls), []
    lock = threading.Lock()

    def worker(k):
        try:
            results[k] = loop.run(calls[k])
        except Exception as exc:
            errors[k] = exc
        with lock:
            returned.append(k)

    threads = []
    for k in range(len(calls)):
        threads.append(threading.Thread(target=worker, args=(k,)))
        threads[-1].start()
        time.sleep(gap)
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    return results, errors, returned


def test_the_first_call_runs_alone_then_the_others_together():
    llm = FakeLLM(steps=150)  # the others arrive 10 and 20 ms after the first, long before its 150 steps end
    loop = EngineLoop(llm, first_alone=True)
    results, errors, returned = run_in_order(loop, reqs("a1", "a2"), reqs("b1"), reqs("c1", "c2", "c3"), gap=0.01)
    assert errors == [None, None, None]
    assert [[o.value for o in r] for r in results] == [["out:a1", "out:a2"], ["out:b1"], ["out:c1", "out:c2", "out:c3"]]
    history = llm.llm_engine.history
    first = {("a1", None), ("a2", None)}
    # The first call's 150 steps with nothing else in the engine, though the others were waiting...
    assert history[:150] == [first] * 150
    # ...then the others, which arrived meanwhile, all share the engine.
    assert history[150] == {("b1", None), ("c1", None), ("c2", None), ("c3", None)}
    assert returned[0] == 0


def test_without_first_alone_the_first_call_shares_the_engine():
    llm = FakeLLM(steps=400)  # 0.4 s or more: the second call, 20 ms later, finds the first still running
    loop = EngineLoop(llm)
    _, errors, returned = run_in_order(loop, reqs("a1", "a2"), reqs("b1"))
    assert errors == [None, None]
    assert {("a1", None), ("a2", None), ("b1", None)} in llm.llm_engine.history


def test_only_the_first_call_runs_alone():
    llm = FakeLLM(steps=400)  # a1 still runs when b1 arrives 20 ms later, even on a loaded machine
    loop = EngineLoop(llm, first_alone=True)
    assert [o.value for o in loop.run(reqs("first"))] == ["out:first"]
    _, errors, _ = run_in_order(loop, reqs("a1"), reqs("b1"))
    assert errors == [None, None]
    assert {("a1", None), ("b1", None)} in llm.llm_engine.history


@pytest.mark.parametrize("first", ["refused", "poison"])
def test_a_first_call_that_fails_holds_no_one_back(first):
    llm = FakeLLM(steps=10)
    llm.llm_engine.fail_step_on = "poison"
    loop = EngineLoop(llm, first_alone=True)
    results, errors, _ = run_in_order(loop, reqs(first), reqs("b1"), reqs("c1"))
    assert errors[0] is not None and results[0] is None
    assert errors[1:] == [None, None]
    assert [[o.value for o in r] for r in results[1:]] == [["out:b1"], ["out:c1"]]
    if first == "refused":  # never in the engine: the next call is the first, and runs alone
        assert llm.llm_engine.history[:10] == [{("b1", None)}] * 10


class ThreadRecordingEngine(FakeEngine):
    """Also records the thread of each step."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.step_threads: set = set()

    def step(self):
        self.step_threads.add(threading.get_ident())
        return super().step()


def test_an_engine_the_loop_builds_is_built_and_stepped_on_the_loops_thread():
    built_on = []

    def build():
        built_on.append(threading.get_ident())
        llm = FakeLLM()
        llm.llm_engine = ThreadRecordingEngine(steps=3)
        return llm

    loop = EngineLoop(build=build, first_alone=True)
    assert built_on == [loop.thread.ident] and loop.thread.ident != threading.get_ident()
    results, errors = run_together(loop, reqs("a1", "a2"), reqs("b1"))
    assert errors == [None, None]
    assert [[o.value for o in r] for r in results] == [["out:a1", "out:a2"], ["out:b1"]]
    assert loop.llm.llm_engine.step_threads == {loop.thread.ident}


def test_an_engine_that_cannot_be_built_raises_to_the_caller():
    class NoRoomForTheCache(RuntimeError):
        pass

    def build():
        raise NoRoomForTheCache("no memory left for the KV cache")

    with pytest.raises(NoRoomForTheCache, match="KV cache"):
        EngineLoop(build=build)


@pytest.mark.parametrize("given", [{}, {"llm": "engine", "build": lambda: "engine"}])
def test_the_loop_takes_an_engine_or_a_way_to_build_one(given):
    with pytest.raises(ValueError, match="an engine or a function that builds one: exactly one"):
        EngineLoop(**given)
