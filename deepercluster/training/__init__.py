"""The training stage: train the body and fresh heads on a round's pseudo-labels, under torchrun."""

from deepercluster.training.launch import (
    TrainError,
    check_train_inputs,
    run_train_stage,
    train_command,
    train_env,
)

__all__ = ["TrainError", "check_train_inputs", "run_train_stage", "train_command", "train_env"]
