"""The fixed Sobel front-end of DeepCluster/DeeperCluster: RGB -> grey (1x1 conv, weights 1/3) -> two 3x3 Sobel
filters. Frozen: it removes colour, which otherwise is the easiest cue for k-means to latch onto."""

from __future__ import annotations

import torch
from torch import nn


class Sobel(nn.Module):
    out_channels = 2

    def __init__(self) -> None:
        super().__init__()
        grey = torch.full((1, 3, 1, 1), 1.0 / 3.0)
        gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("grey", grey)
        self.register_buffer("kernels", torch.stack([gx, gx.t()]).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = nn.functional.conv2d(x, self.grey)
        return nn.functional.conv2d(g, self.kernels, padding=1)
