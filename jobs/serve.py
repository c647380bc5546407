"""python -m jobs.serve [key=value ...]: the Workers-AI-compatible endpoint (conf/serve.yaml).

Installed, the same server is the console script `llama-batch-serve`."""

from pathlib import Path

from pipeline.cli import hydra_entry, run_serve

main = hydra_entry(run_serve, "serve", config_path=str(Path(__file__).resolve().parents[1] / "conf"))

if __name__ == "__main__":
    main()
