"""Batch-norm statistics of the clustering view for the model a round starts from (``model.bn_calibration``).

A network's eval-mode forward (extraction) normalises with running averages, its train-mode forward with the
batch's own statistics. For a fresh network the running averages are the defaults (mean 0, variance 1), so
round 0's features are those of a different function than the one training then back-propagates through (on the
default digits run they are ~30x smaller); after training they average augmented, rotated views. Before a round's
``model.pt`` is written, its batch norms get the exact statistics of the clustering view of a fixed sample of the
run's images (a train-mode pass of the batch norms alone: dropout stays off, no weight changes), so the features
that are clustered, and the heads initialised from them, are those of the network training will run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from deepercluster.config import PipelineConfig
from deepercluster.data.images import decode, read_bytes
from deepercluster.data.repack import image_uris
from deepercluster.data.shard import load_manifest
from deepercluster.data.transforms import clustering_view
from deepercluster.store import RunStore

CALIBRATION_KEY = 11
CALIBRATION_BATCH = 256


def calibration_uris(store: RunStore, cfg: PipelineConfig, r: int) -> list[str]:
    """The images (up to ``model.bn_calibration``, drawn with seed (seed, r)) whose views set round ``r``'s
    statistics."""
    manifest = load_manifest(store)[["image_id", "uri"]].sort_values("image_id")
    n, count = len(manifest), min(cfg.model.bn_calibration, len(manifest))
    rows = np.sort(np.random.default_rng([cfg.seed, r, CALIBRATION_KEY]).choice(n, count, replace=False))
    return image_uris(store, manifest.iloc[rows])


@torch.no_grad()
def calibrate_batchnorm(body: nn.Module, batches, device: torch.device | str = "cpu") -> int:
    """Set every batch norm's running mean and variance to the exact statistics over ``batches`` (normalised
    NCHW float tensors): cumulative averages (momentum None) of a forward pass in which only the batch norms are in
    train mode. Returns the number of images seen (0: nothing changed)."""
    norms = [m for m in body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    was_training = body.training
    body.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    for x in batches:
        body(x.to(device))
        seen += len(x)
    for m, (momentum, mean, var, tracked) in zip(norms, saved, strict=True):
        m.momentum = momentum
        if seen == 0:  # nothing to calibrate on: keep what was there
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
    body.train(was_training)
    return seen


def calibrate_round_model(store: RunStore, cfg: PipelineConfig, r: int, body: nn.Module,
                          device: torch.device | str = "cpu") -> int:
    """Give ``body`` (the model round ``r`` starts from) the clustering view's batch-norm statistics."""
    if cfg.model.bn_calibration <= 0:
        return 0
    view = clustering_view(cfg.data.image_size, cfg.data.crop_ratio)
    body.to(device)
    try:
        return calibrate_batchnorm(body, view_batches(calibration_uris(store, cfg, r), view), device)
    finally:
        body.to("cpu")


def view_batches(uris: list[str], view: Callable[[Image.Image], torch.Tensor],
                 batch: int = CALIBRATION_BATCH) -> Iterator[torch.Tensor]:
    """Batches of the views of ``uris``. An image that no longer decodes (changed since the shard stage) is left
    out: it is only a calibration sample, and the extract stage reports it with its one-line error."""
    views: list[torch.Tensor] = []
    for uri in uris:
        try:
            views.append(view(decode(read_bytes(uri))))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if len(views) == batch:
            yield torch.stack(views)
            views = []
    if views:
        yield torch.stack(views)
