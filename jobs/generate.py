"""python -m jobs.generate [key=value ...]: the generation job (conf/generate.yaml).

Installed, the same job is the console script `llama-batch-generate`."""

from pathlib import Path

from pipeline.cli import hydra_entry, run_generate

main = hydra_entry(run_generate, "generate", config_path=str(Path(__file__).resolve().parents[1] / "conf"))

if __name__ == "__main__":
    main()
