"""Building models: the tiny model, its corpus, AWQ/GPTQ checkpoints, the vLLM plugin.

Empty on purpose: importing a pure module of this package must not import Ray, vLLM or torch.
"""
