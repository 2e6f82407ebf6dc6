"""Choosing the torch device: the same code runs on CPU and CUDA."""

from __future__ import annotations

import torch


def resolve_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        from deepercluster.errors import ConfigError

        raise ConfigError("runtime.device is 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'")
    return torch.device(setting)
