"""The LoRA training job: `job.run(cfg)` (entry point: `python -m jobs.train_lora`).

    settings   TrainSettings: one frozen dataclass per config section, checked at once (TrainConfigError)
    data       rows -> conversations, the data fingerprint, the demo training set (DataError)
    labels     conversations -> token ids with labels on assistant tokens only
    loop       the training loop (torch, PEFT), one process or one DDP rank; FitJob, what it trains
    ray_train  several workers with Ray Train (the only module here that imports Ray)
    job        the job: data -> examples -> loop or Ray Train -> registry staging -> manifest

Empty on purpose: importing a pure module of this package must not import Ray, vLLM or torch.
"""
