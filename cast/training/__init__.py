"""The training engine: one trainer for every CAST stage, with resumable checkpoints, DDP,
metrics and plots."""
from cast.training.trainer import NonFiniteLossError, Objective, TrainData, Trainer

__all__ = ["NonFiniteLossError", "Objective", "TrainData", "Trainer"]
