"""Validated configuration for every stage and for the whole pipeline.

A config is built from a method preset (``deepcluster``, ``rotnet``, ``deepercluster``) with the user's YAML
merged on top, then validated by pydantic. Every error a user can make is reported in one line through
:class:`ConfigError`. The resolved config is saved into the run with its hash; the ``runtime`` section (where
to compute: Dask address, number of workers, device) is left out of the hash because it does not change results.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deepercluster.errors import ConfigError

Method = Literal["deepcluster", "rotnet", "deepercluster"]
Arch = Literal["smallnet", "alexnet", "vgg16", "resnet18", "resnet50"]
BUNDLED_SOURCES = {"digits": 1797}
MIN_IMAGE_SIZE = {"smallnet": 8, "alexnet": 64, "vgg16": 32, "resnet18": 32, "resnet50": 32}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: str = Field("digits", description="'digits' (bundled) or an image folder (path or fsspec URL)")
    limit: int | None = Field(None, ge=1, description="use only the first N images of the sorted listing")
    shard_size: int = Field(256, ge=1, description="images per shard: the unit of extraction and of zarr writes")
    image_size: int = Field(32, ge=8, description="side of the square network input")
    crop_ratio: float = Field(1.0, gt=0, le=1, description="clustering view: resize to size/ratio, centre crop")
    max_pixels: int = Field(89_478_485, ge=1, description="images above this pixel count are rejected")

    @field_validator("source")
    @classmethod
    def _source_exists(cls, v: str) -> str:
        if v in BUNDLED_SOURCES or "://" in v:
            return v
        if not Path(v).expanduser().is_dir():
            raise ValueError(f"image folder {v!r} does not exist (give a folder of images or 'digits')")
        return str(Path(v).expanduser().resolve())

    def expected_images(self) -> int | None:
        """Number of images the source holds, when it is known before listing it."""
        n = BUNDLED_SOURCES.get(self.source)
        if n is None:
            return self.limit
        return min(n, self.limit) if self.limit else n


class ModelConfig(_Section):
    arch: Arch = "smallnet"
    sobel: bool = Field(False, description="fixed Sobel front-end (grey + two 3x3 Sobel filters), as in the papers")
    feature_dim: int = Field(128, ge=2, description="width of the feature layer (smallnet only)")
    init_checkpoint: str | None = Field(None, description="weights round 0 starts from (default: random init)")


class ExtractConfig(_Section):
    batch_size: int = Field(256, ge=1)


class ClusterConfig(_Section):
    super_clusters: int = Field(1, ge=1, description="m: level-1 clusters (1 = flat DeepCluster k-means)")
    k: int = Field(100, ge=1, description="level-2 clusters inside each super-cluster")
    pca_dim: int = Field(32, ge=1, description="PCA-whitening output dimension (capped at the feature width)")
    pca_sample: int = Field(100_000, ge=2, description="images the PCA is fitted on")
    niter: int = Field(20, ge=1, description="Lloyd iterations per k-means")
    whiten: bool = True

    @property
    def n_targets(self) -> int:
        return self.super_clusters * self.k


class TrainConfig(_Section):
    epochs: int = Field(2, ge=1, description="epochs per round on each round's pseudo-labels")
    batch_size: int = Field(64, ge=2, description="images per rank per iteration")
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-5, ge=0)
    rotations: bool = Field(False, description="predict which of 4 rotations was applied (RotNet, DeeperCluster)")
    nproc: int = Field(2, ge=1, description="torchrun processes (ranks) on this node")
    checkpoint_every: int = Field(10, ge=1, description="iterations between checkpoints")
    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="RandomResizedCrop scale range")
    hflip: bool = True
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {list(v)}")
        return v


class EvalConfig(_Section):
    kmeans_nmi: bool = Field(True, description="also k-means (k = number of classes) the features against labels")


class RuntimeConfig(_Section):
    """Where to compute. Not part of the config hash: it never changes the results."""

    dask_address: str | None = Field(None, description="existing Dask scheduler (tcp://host:8786); default local")
    dask_workers: int = Field(2, ge=1, description="LocalCluster worker processes when no address is given")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PipelineConfig(_Section):
    method: Method = "deepercluster"
    rounds: int = Field(3, ge=1)
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    extract: ExtractConfig = ExtractConfig()
    cluster: ClusterConfig = ClusterConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _fits_the_data(self) -> PipelineConfig:
        min_size = MIN_IMAGE_SIZE[self.model.arch]
        if self.data.image_size < min_size:
            raise ValueError(f"data.image_size {self.data.image_size} is too small for {self.model.arch} "
                             f"(at least {min_size})")
        n = self.data.expected_images()
        if n is not None and self.cluster.n_targets > n:
            raise ValueError(
                f"cluster.k x cluster.super_clusters = {self.cluster.n_targets} exceeds the {n} images of the source"
            )
        return self

    def hashed_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"runtime"})

    @property
    def hash(self) -> str:
        blob = json.dumps(self.hashed_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump({**self.model_dump(mode="json"), "config_hash": self.hash}, sort_keys=False)


# Method presets: what each paper's method means in this pipeline (see ARCHITECTURE.md).
PRESETS: dict[str, dict[str, Any]] = {
    "deepcluster": {"cluster": {"super_clusters": 1, "k": 100}, "train": {"rotations": False}},
    "rotnet": {"cluster": {"super_clusters": 1, "k": 1}, "train": {"rotations": True}},
    "deepercluster": {"cluster": {"super_clusters": 2, "k": 50}, "train": {"rotations": True}},
}


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``section.field: message``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(parts)


def build_config(overrides: dict[str, Any] | None = None, method: str | None = None) -> PipelineConfig:
    """Preset of ``method`` (or of ``overrides['method']``) with ``overrides`` merged on top, validated."""
    overrides = dict(overrides or {})
    method = method or overrides.get("method") or "deepercluster"
    if method not in PRESETS:
        raise ConfigError(f"invalid config: method: unknown method {method!r}; choose one of {', '.join(PRESETS)}")
    merged = _deep_merge(PRESETS[method], {**overrides, "method": method})
    merged.pop("config_hash", None)
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | Path | None = None, method: str | None = None) -> PipelineConfig:
    """Read a YAML config file (or none: the preset's defaults) and validate it."""
    overrides: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        overrides = loaded or {}
    return build_config(overrides, method=method)


def config_from_yaml_text(text: str) -> PipelineConfig:
    """Rebuild a config saved into a run (``config.yaml``)."""
    return build_config(yaml.safe_load(text))
