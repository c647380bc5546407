"""python -m jobs.train_lora adapter.name=<name> [key=value ...]: train a LoRA adapter (conf/train_lora.yaml)."""

import logging
import sys

import hydra

from pipeline.cli import exit_on_user_error


@hydra.main(config_path="../conf", config_name="train_lora", version_base="1.3")
def main(cfg) -> None:
    from pipeline.train.job import run

    with exit_on_user_error():
        run(cfg)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
