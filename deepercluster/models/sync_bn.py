"""Batch normalisation over the whole distributed batch, on any device and any backend (gloo included).

DeeperCluster trains each communication group on one super-class only, so a rank's own batch statistics describe
one super-class; normalising with the statistics of the global batch (every rank) is what keeps the body the same
network for all of them (the paper's README calls it crucial). torch's ``SyncBatchNorm`` does this on GPUs only;
:class:`GlobalBatchNorm` is the same computation for CPU ranks: per-rank mean, variance and count are all-gathered
and combined exactly, and the backward pass all-reduces the two per-channel sums it needs. Parameters and buffers
keep ``BatchNorm2d``'s names, so a trained body loads into the plain network.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Function


class _GlobalBatchNorm(Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, eps: float, momentum: float,
                group: Any) -> torch.Tensor:
        channels = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        count = torch.full((1,), x.numel() // channels, dtype=torch.float32, device=x.device)
        local = torch.cat([mean, var, count])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)  # (world, 2C + 1)
        means, variances, counts = stats[:, :channels], stats[:, channels:2 * channels], stats[:, -1:]
        n = counts.sum()
        g_mean = (means * counts).sum(0) / n
        g_var = ((variances + (means - g_mean) ** 2) * counts).sum(0) / n
        invstd = torch.rsqrt(g_var + eps)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(g_mean.to(running_mean.dtype), alpha=momentum)
                unbiased = g_var * (n / (n - 1).clamp(min=1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        xhat = (x.float() - g_mean.view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.float().view(shape) + bias.float().view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.group, ctx.n, ctx.shape, ctx.dims = group, n, shape, dims
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xhat, invstd, weight = ctx.saved_tensors
        shape, dims = ctx.shape, ctx.dims
        dy32 = dy.float()
        sum_dy = dy32.sum(dims)
        sum_dy_xhat = (dy32 * xhat).sum(dims)
        both = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(both, group=ctx.group)
        g_sum_dy, g_sum_dy_xhat = both.chunk(2)
        scale = invstd if weight is None else invstd * weight.float()
        dx = scale.view(shape) * (dy32 - g_sum_dy.view(shape) / ctx.n - xhat * (g_sum_dy_xhat.view(shape) / ctx.n))
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None else None  # this rank's part: DDP averages
        grad_b = sum_dy.to(weight.dtype) if weight is not None else None
        return dx.to(dy.dtype), grad_w, grad_b, None, None, None, None, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``BatchNorm`` whose training statistics are those of the batch of every rank of ``group`` (default: all)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, group: Any = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        synced = self.training and dist.is_available() and dist.is_initialized() and \
            dist.get_world_size(self.group) > 1
        if not synced:
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, self.running_mean if self.track_running_stats
                                      else None, self.running_var if self.track_running_stats else None,
                                      self.eps, momentum, self.group)


def convert_global_batchnorm(module: nn.Module, group: Any = None) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a :class:`GlobalBatchNorm` holding the same state."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, group)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_global_batchnorm(child, group))
    return out
