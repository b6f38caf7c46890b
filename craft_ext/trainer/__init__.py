"""The trainer behind `python -m craft_ext.train`: lerobot's factories around the CRaFT step.

  factory     accelerator, datasets, policy, processors, dataloader (lerobot's factories)
  checks      bad input caught before training (dataset, anchor cache, unsupported options)
  step        one optimisation step: task and retention backward, surgery, optimiser
  constraint  anchor batches, epsilon schedule, the multiplier lambda
  checkpoint  lerobot's checkpoint layout + the CRaFT state, written atomically
  metrics     metrics.jsonl, progress bar
  loop        `train(cfg)` = `setup(cfg)` (everything built, as a `Run`) + `run_loop(run)`
"""

from .loop import NonFiniteTrainingError, Run, TrainResult, run_loop, setup, train

__all__ = ["NonFiniteTrainingError", "Run", "TrainResult", "run_loop", "setup", "train"]
