"""The model a job runs on (`conf/model/*.yaml`) and how its prompts are rendered (`prompt:`), typed:
frozen dataclasses shared by both jobs.

Generation serves `path`; training trains on `train_path` (an AWQ model's float original) or
`path`, and records the model in the adapter's manifest. Each job builds it from the composed
config and checks it in its own settings module (`pipeline.generate.settings`,
`pipeline.train.settings`), where local paths are made absolute.

Pure module: standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSettings:
    """The model (`conf/model/*.yaml`)."""

    path: str
    """A Hugging Face hub id or a local folder (absolute once checked)."""
    name: str | None = None
    """Short name recorded in manifests and matched against an adapter's base model."""
    build: str | None = None
    """null, or `tiny` / `tiny-awq`: build the project's tiny model at `path` if missing."""
    seed: int = 0
    """The tiny model's seed: same seed, same files."""
    train_path: str | None = None
    """The float weights adapters are trained on (an AWQ model's unquantized original; absolute once checked)."""
    revision: str | None = None
    """Hub models: the branch, tag or commit (null: main, resolved to a commit at start)."""
    quantization: str | None = None
    """Passed to vLLM; null reads it from the checkpoint."""
    dtype: str = "auto"
    """The dtype vLLM computes in."""
    max_model_len: int = 4096
    """The context the engine serves: prompt plus answer."""
    date_string: str | None = None
    """The date the chat template writes into system headers; prompt.date_string follows it."""


@dataclass(frozen=True)
class PromptSettings:
    """How conversations are rendered (`prompt:` in both jobs' configs)."""

    date_string: str | None = "26 Jul 2024"
    """The date Llama 3.1's template writes into the system header (the model's, in both jobs):
    pinned so that prompts render alike on every day and in training and generation."""
