"""Training memory models: the Trainer and its TrainConfig, data tasks (``memlm.train.data``), YAML recipes."""

from .trainer import StepResult, TrainConfig, Trainer, checkpoint_path

__all__ = ["StepResult", "TrainConfig", "Trainer", "checkpoint_path"]
