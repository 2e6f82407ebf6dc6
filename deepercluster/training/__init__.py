"""The training stage: train the body and fresh heads on a round's pseudo-labels, under torchrun."""

from deepercluster.training.launch import (
    TrainError,
    check_train_inputs,
    train_command,
    train_env,
    train_round,
)

__all__ = ["TrainError", "check_train_inputs", "train_command", "train_env", "train_round"]
