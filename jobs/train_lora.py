"""python -m jobs.train_lora adapter.name=<name> [key=value ...]: train a LoRA adapter (conf/train_lora.yaml)."""

import logging
import sys

import hydra


@hydra.main(config_path="../conf", config_name="train_lora", version_base="1.3")
def main(cfg) -> None:
    from pipeline.lora_registry import AdapterError
    from pipeline.train import DataError, TrainConfigError, run

    try:
        run(cfg)
    except (TrainConfigError, DataError, AdapterError) as exc:
        # A bad config, dataset or adapter name is the user's to fix: say what, without a traceback.
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
