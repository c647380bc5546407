"""python -m jobs.train_lora adapter.name=<name> [key=value ...]: train a LoRA adapter (conf/train_lora.yaml).

Installed, the same job is the console script `llama-batch-train`."""

from pathlib import Path

from pipeline.cli import hydra_entry, run_train

main = hydra_entry(run_train, "train_lora", config_path=str(Path(__file__).resolve().parents[1] / "conf"))

if __name__ == "__main__":
    main()
