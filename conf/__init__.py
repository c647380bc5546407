"""The jobs' Hydra configs. Installed, this folder is the package `pipeline.conf`, so the console
scripts find the same configs from any directory (see pyproject.toml and pipeline/cli.py)."""
