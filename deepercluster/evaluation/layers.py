"""Activations of a chosen layer of a round's body (``eval.layer``) for the probes, computed on the split images
only, with the extract stage's layer cutting (conv maps are average-pooled to one vector per image)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from deepercluster.config import PipelineConfig
from deepercluster.data.datasets import ImageList
from deepercluster.data.transforms import clustering_view
from deepercluster.device import resolve_device
from deepercluster.features import FeatureModel, model_rel
from deepercluster.models import load_body
from deepercluster.store import RunStore


def layer_features(store: RunStore, cfg: PipelineConfig, r: int, layer: str, uris: Sequence[str]) -> np.ndarray:
    """``(len(uris), C)`` float32 activations of ``layer`` of ``rounds/<r>/model.pt``."""
    device = resolve_device(cfg.runtime.device)
    body = load_body(cfg.model, store.load_torch(model_rel(r))["body"])
    model = FeatureModel(body, layer, device, cfg.extract.autocast)
    images = ImageList(list(uris), clustering_view(cfg.data.image_size, cfg.data.crop_ratio))
    out = []
    for lo in range(0, len(images), cfg.extract.batch_size):
        batch = torch.stack([images[i] for i in range(lo, min(lo + cfg.extract.batch_size, len(images)))])
        out.append(model(batch).float().cpu().numpy())
    return np.concatenate(out)
