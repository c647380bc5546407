"""python -m jobs.report OUTPUT: (re)build OUTPUT/report.html for a generation job's output folder,
finished or interrupted (see pipeline/generate/report.py)."""

import argparse
import sys

from pipeline.cli import exit_on_user_error


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="a generation job's output.path")
    args = parser.parse_args(argv)
    from pipeline.generate.report import write_report

    with exit_on_user_error():
        print(write_report(args.output))


if __name__ == "__main__":
    sys.exit(main())
