"""python -m jobs.report FOLDER: (re)build FOLDER/report.html for a generation job's output folder,
finished or interrupted, or for an adapter of the registry (pipeline/generate/report.py,
pipeline/train/report.py)."""

import argparse
import os
import sys

from pipeline.cli import exit_on_user_error
from pipeline.lora_registry import ADAPTER_CONFIG


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a generation job's output.path, or an adapter's folder (lora/<name>)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        if os.path.isfile(os.path.join(args.folder, ADAPTER_CONFIG)):
            from pipeline.train.report import write_report
        else:
            from pipeline.generate.report import write_report
        print(write_report(args.folder))


if __name__ == "__main__":
    sys.exit(main())
