"""python -m benchmarks [flags]: see `benchmarks.cli` (--help) and docs/benchmark.md."""

import sys

from benchmarks.cli import main

sys.exit(main())
