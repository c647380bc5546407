"""Memory and CPU of this process and every process under it, sampled while a contender runs.

The contenders put their work in different processes (bare vLLM in this one; the job and Ray Data
LLM in Ray's workers, beside Ray's daemons), so only the whole tree compares fairly. Each run opens
a window; the window's peak, its rise over the start, and the CPU time each kind of process used
become the run's `Memory`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import threading
import time

from benchmarks.report import log
from benchmarks.results import Memory

GiB = 2**30


class TreeMemory:
    """Samples this process and all its descendants (the driver, Ray's daemons and workers,
    engine subprocesses): summed RSS every `interval` s, summed PSS every `pss_every` s, and the
    CPU time each kind of process used, for the windows (phases) open at the time.

    RSS counts a shared page (Ray's object store, shared libraries) once per process that maps it,
    so the sum overstates what the tree uses; PSS splits shared pages between the processes.
    CPU time says where the cores went during a phase (the engine, the driver, Ray's daemons);
    a process that exits loses at most its last interval.
    """

    def __init__(self, interval: float = 0.25, pss_every: float = 2.0, heartbeat: float = 30.0):
        import psutil

        self._psutil = psutil
        self.me = psutil.Process(os.getpid())
        self.interval, self.pss_every, self.heartbeat = interval, pss_every, heartbeat
        self.lock = threading.Lock()
        self.windows: list[dict] = []
        self.label = None
        self.cpu_seen: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds at last sample)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)
        self.thread.start()

    def _procs(self):
        try:
            return [self.me, *self.me.children(recursive=True)]
        except self._psutil.Error:
            return [self.me]

    def _kind(self, p) -> str:
        if p.pid == self.me.pid:
            return "driver (this process)"
        try:
            cmd = p.cmdline()
            name = p.name()
        except self._psutil.Error:
            return "?"
        first = cmd[0] if cmd else name
        if first.startswith("ray::"):
            # Ray's process titles: "ray::MapWorker(MapBatches(GenerationWorker)).__init__" etc.
            return re.sub(r"\)\.\w+$", ")", first.split(" ")[0])
        if not name.startswith("python"):
            return name  # raylet, gcs_server, or a retitled process such as vLLM's engine core
        if "setup_worker.py" in " ".join(cmd):
            return "ray worker (starting)"
        if "-m" in cmd[1:-1]:  # python -m jobs.generate: the job's driver
            return f"python -m {cmd[cmd.index('-m', 1) + 1]}"
        if "-c" in cmd[1:-1]:  # a script handed to the interpreter (bare vLLM's)
            return "python -c (script)"
        script = next((c for c in cmd[1:] if c.endswith(".py")), None)
        return os.path.basename(script) if script else f"python ({name})"

    def sample(self, pss: bool) -> dict:
        rss = pss_sum = 0
        procs = self._procs()
        cpu: dict[int, tuple[str, float]] = {}
        by_kind: dict[str, int] = {}
        pss_by_kind: dict[str, int] = {}
        for p in procs:
            try:
                if pss:
                    info = p.memory_full_info()
                    rss += info.rss
                    pss_sum += info.pss
                else:
                    info = p.memory_info()
                    rss += info.rss
                t = p.cpu_times()
                # Recomputed each time: Ray retitles a worker once it takes an actor or task.
                kind = self._kind(p)
                cpu[p.pid] = (kind, t.user + t.system)
                group = memory_group(kind)
                by_kind[group] = by_kind.get(group, 0) + info.rss
                if pss:
                    pss_by_kind[group] = pss_by_kind.get(group, 0) + info.pss
            except self._psutil.Error:  # exited between listing and reading
                continue
        return {"rss": rss, "pss": pss_sum if pss else None, "procs": len(procs), "cpu": cpu, "by_kind": by_kind,
                "pss_by_kind": pss_by_kind}

    def _account(self, s: dict) -> None:
        """Add the CPU time used since the last sample to every open window, by process kind."""
        for pid, (kind, total) in s["cpu"].items():
            before = self.cpu_seen.get(pid, (kind, 0.0))[1]
            delta = max(0.0, total - before)
            for w in self.windows:
                if pid in w["_pids_at_start"] and pid not in w["_seen"]:
                    # Present when the window opened: only what it uses from now on counts.
                    delta_w = max(0.0, total - w["_pids_at_start"][pid])
                else:
                    delta_w = delta
                w["_seen"].add(pid)
                w["cpu_s"][kind] = w["cpu_s"].get(kind, 0.0) + delta_w
        self.cpu_seen = dict(s["cpu"])

    def _loop(self) -> None:
        last_pss = last_beat = 0.0
        while not self.stop.is_set():
            now = time.perf_counter()
            want_pss = now - last_pss >= self.pss_every
            s = self.sample(want_pss)
            if want_pss:
                last_pss = now
            with self.lock:
                self._account(s)
                for w in self.windows:
                    w["peak_rss"] = max(w["peak_rss"], s["rss"])
                    if s["pss"] is not None:
                        w["peak_pss"] = max(w["peak_pss"], s["pss"])
                    w["peak_procs"] = max(w["peak_procs"], s["procs"])
                    peak_by_kind(w, s)
                label = self.label
            if label and now - last_beat >= self.heartbeat:
                last_beat = now
                log(f"  ... {label}: tree RSS {s['rss'] / GiB:.2f} GiB over {s['procs']} processes")
            self.stop.wait(self.interval)

    @contextlib.contextmanager
    def window(self, label: str):
        start = self.sample(pss=True)
        w = {"start_rss": start["rss"], "start_pss": start["pss"], "peak_rss": start["rss"],
             "peak_pss": start["pss"], "peak_procs": start["procs"], "cpu_s": {}, "peak_rss_by_kind": {},
             "peak_pss_by_kind": {},
             "_pids_at_start": {pid: t for pid, (_, t) in start["cpu"].items()}, "_seen": set(),
             "_t0": time.perf_counter()}
        with self.lock:
            self.windows.append(w)
            self.label = label
        try:
            yield w
        finally:
            end = self.sample(pss=True)
            with self.lock:
                self._account(end)
                self.windows.remove(w)
                self.label = None
            w["peak_rss"] = max(w["peak_rss"], end["rss"])
            w["peak_pss"] = max(w["peak_pss"], end["pss"])
            peak_by_kind(w, end)
            w["wall"] = time.perf_counter() - w["_t0"]

    def settle(self, timeout: float = 90.0) -> None:
        """Wait for the engine processes of the previous phase to exit (Ray Data tears its actor
        pools down in the background), so that a phase's memory is its own."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            busy = [k for k in map(self._kind, self._procs()[1:]) if k.startswith("ray::MapWorker") or "EngineCore" in k]
            if not busy:
                break
            time.sleep(0.5)
        else:
            log(f"  (engine processes still alive after {timeout:.0f}s: {busy})")
        gc.collect()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


# Ray's own processes that are not workers: its daemons (the raylet, which holds the object store,
# is kept apart) and the agents the raylet starts.
RAY_DAEMONS = ("gcs_server", "dashboard.py", "monitor.py", "log_monitor.py", "agent.py", "main.py",
               "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def memory_group(kind: str) -> str:
    """The group a kind of process (`TreeMemory._kind`) is counted in for memory. A Ray worker
    process takes one title after another (idle, a read task, a prepare task), so worker kinds
    are grouped: the engine actors on their own, every other worker together."""
    if "MapWorker" in kind or "EngineCore" in kind:
        return "engine actor"
    if kind in RAY_DAEMONS:
        return "Ray's daemons"
    if kind.startswith("ray::") or kind in ("ray worker (starting)", "default_worker.py"):
        return "Ray workers (tasks, Ray Data's actors)"
    return kind


def peak_by_kind(w: dict, s: dict) -> None:
    """Raise the window's peak RSS (and PSS) of each group of processes (summed over the group's
    processes in one sample) to the sample's. PSS tells a short-lived fork of a big process (to
    start a compiler, say), which RSS counts at the size of the pages it shares, from growth."""
    for key, peaks in (("by_kind", w["peak_rss_by_kind"]), ("pss_by_kind", w["peak_pss_by_kind"])):
        for kind, size in s[key].items():
            peaks[kind] = max(peaks.get(kind, 0), size)


def memory_figures(w: dict) -> Memory:
    """A closed window's figures."""
    cpu = sorted(w["cpu_s"].items(), key=lambda kv: -kv[1])
    return Memory(
        cpu_s={k: round(v, 1) for k, v in cpu if v >= 0.05},
        cpu_share_of_cores=round(sum(v for _, v in cpu) / (w["wall"] * (os.cpu_count() or 1)), 3),
        peak_rss_gib=round(w["peak_rss"] / GiB, 3),
        rise_rss_gib=round((w["peak_rss"] - w["start_rss"]) / GiB, 3),
        peak_pss_gib=round(w["peak_pss"] / GiB, 3),
        rise_pss_gib=round((w["peak_pss"] - w["start_pss"]) / GiB, 3),
        peak_processes=w["peak_procs"],
        peak_rss_by_kind_gib=by_size(w["peak_rss_by_kind"]),
        peak_pss_by_kind_gib=by_size(w["peak_pss_by_kind"]),
    )


def by_size(sizes: dict) -> dict:
    """Bytes by group as GiB, largest first, leaving out groups under 10 MiB."""
    return {k: round(v / GiB, 3) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]) if v >= 0.01 * GiB}
