"""The generation job: planning, prepare, engine, answers, the output folder (sinks, folder_lock,
part_files, coverage), stats, and job (`run`). docs/architecture.md draws how a row flows.

Empty on purpose: importing a pure module of this package must not import Ray, vLLM or torch.
"""
