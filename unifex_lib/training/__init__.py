"""Small helpers of the training loop in :mod:`unifex_lib.train`: schedules, optimizers, sampling,
checkpoints, the frozen-backbone feature cache, distributed setup and run plots."""
