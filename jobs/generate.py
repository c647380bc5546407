"""python -m jobs.generate [key=value ...]: the generation job (conf/generate.yaml)."""

import logging
import sys

import hydra

from pipeline.cli import exit_on_user_error


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg) -> None:
    from pipeline.generate.job import run

    with exit_on_user_error():
        run(cfg)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
