"""python -m jobs.export_lora NAME --to workers-ai|merged|peft OUT [--root lora]: an adapter of the
registry written out for deployment (pipeline/train/export.py).

Installed, the same command is the console script `llama-batch-export`."""

import sys

from pipeline.cli import export_lora

if __name__ == "__main__":
    sys.exit(export_lora())
