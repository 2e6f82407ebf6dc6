"""Validated configuration for every stage and for the whole pipeline.

A config is built from a method preset (``deepcluster``, ``rotnet``, ``deepercluster``) with the user's YAML
merged on top, then validated by pydantic. Every error a user can make is reported in one line through
:class:`ConfigError`. The resolved config is saved into the run (``config.yaml``, with its schema version and its
hash); the ``runtime`` section (where to compute: Dask address, number of workers, device) is left out of the hash.
A saved config is read back without looking at the disk: its data source may have moved since.
"""

from __future__ import annotations

import copy
import hashlib
import json
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from deepercluster.errors import ConfigError

Method = Literal["deepcluster", "rotnet", "deepercluster", "clusterfit"]
Arch = Literal["smallnet", "alexnet", "vgg16", "resnet18", "resnet50"]
SourceKind = Literal["auto", "folder", "list", "yfcc100m", "webdataset"]
BUNDLED_SOURCES = {"digits": 1797}
MIN_IMAGE_SIZE = {"smallnet": 8, "alexnet": 64, "vgg16": 32, "resnet18": 32, "resnet50": 32}
# keys that moved from a hashed section to ``runtime``, still accepted (with a warning) at their old place
MOVED_TO_RUNTIME = {"cluster": {"memory_budget_mb", "stream_threads"}}
# version of the layout of a saved config.yaml; a config saved without one predates it and is version 1
SCHEMA_VERSION = 1
_NEUTRAL = "(result-neutral: not fingerprinted)"


def _is_number(annotation: Any) -> bool:
    """Whether a field's type takes numbers: int, float, a union or a tuple of them (bool excluded)."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) in (Union, types.UnionType, tuple):
        return any(_is_number(arg) for arg in get_args(annotation) if arg is not Ellipsis)
    return False


def _saved(info: ValidationInfo) -> bool:
    """Whether a config saved into a run is being read back (nothing of it is checked against the disk then)."""
    return bool(info.context and info.context.get("saved"))


class _Section(BaseModel):
    # stricter than YAML: a float must be finite (``.inf``, ``.nan`` are refused) and a boolean is no number
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """pydantic reads ``true`` as 1 for an int or float field: ``rounds: true`` is a mistake, not one round."""
        values = v if isinstance(v, list | tuple) else [v]
        if any(isinstance(x, bool) for x in values) and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expects a number, got a boolean ({json.dumps(v, default=str)})")
        return v


class DataConfig(_Section):
    source: str = Field("digits", description="'digits' (bundled), an image folder, a file list (txt/csv/parquet), a "
                        "YFCC100M metadata file or webdataset tars (a path or any fsspec URL)")
    kind: SourceKind = Field("auto", description="how to read `source`; auto: a folder, a list by suffix, .tar")
    limit: int | None = Field(None, ge=1, description="use only the first N images of the sorted listing")
    shard_size: int = Field(256, ge=1, description="images per shard: the unit of extraction and of zarr writes")
    image_size: int = Field(32, ge=8, description="side of the square network input")
    crop_ratio: float = Field(0.875, gt=0, le=1, description="clustering view (extraction): resize the short side to "
                              "size/ratio, centre crop size; 0.875 is the papers' Resize(256) + CenterCrop(224)")
    max_pixels: int = Field(89_478_485, ge=1, description="images above this pixel count are rejected")
    min_side: int = Field(1, ge=1, description="images whose shorter side is below this are rejected")
    max_side: int = Field(16384, ge=1, description="images with a side above this are rejected ('too large side'), "
                          "checked from the header before decoding, in the shard stage and in every decode: a decoded "
                          "image never holds more than max_side^2 pixels (4 bytes each)")
    max_aspect: float = Field(50.0, ge=1, description="images whose long side / short side is above this are "
                              "rejected ('extreme aspect ratio'), checked from the header before decoding: resizing "
                              "the short side then makes at most max_aspect x side^2 pixels")
    skip_hidden: bool = Field(False, description="folder source: names starting with '.' or '_' (files, and folders "
                              "not entered) become rejects 'hidden (data.skip_hidden)' instead of being listed "
                              "(off: '_DSC0001.jpg' is an image like any other)")
    label_column: str = Field("label", description="file list: the column (csv/parquet) holding an optional label")
    path_template: str | None = Field(None, description="yfcc100m: image location of a photo, e.g. "
                                      "'s3://bucket/{hash[:3]}/{hash[3:6]}/{hash}.jpg' or '/mirror/{id}.jpg'")
    id_list: str | None = Field(None, description="yfcc100m: keep only these photo ids (.npy, .txt or .parquet)")
    part_size: int = Field(2048, ge=1, description="listing rows per scan task (the shard stage's unit of work); "
                           "fewer, larger parts cost less bookkeeping, more parts balance better across workers "
                           + _NEUTRAL)
    repack: bool = Field(False, description="also copy the kept images of each shard into one webdataset tar "
                         "(data/packed/shard-XXXXX.tar) that the extract and train stages then read sequentially")

    @field_validator("source")
    @classmethod
    def _source_exists(cls, v: str, info: ValidationInfo) -> str:
        if v in BUNDLED_SOURCES or "://" in v or _saved(info):  # a saved source was resolved when it was built
            return v
        path = Path(v).expanduser()
        if "{" in v:  # a brace pattern of webdataset tars: its folder must exist
            if not path.parent.is_dir():
                raise ValueError(f"folder of {v!r} does not exist")
            return str(path.parent.resolve() / path.name)
        if not path.exists():
            raise ValueError(f"data source {v!r} does not exist (give an image folder, a file list, a YFCC100M "
                             "metadata file, webdataset tars or 'digits')")
        return str(path.resolve())

    @model_validator(mode="after")
    def _yfcc_needs_a_template(self) -> DataConfig:
        if self.kind == "yfcc100m":
            from deepercluster.data.yfcc import check_template

            if not self.path_template:
                raise ValueError("data.kind yfcc100m needs data.path_template (where each photo's image lies)")
            check_template(self.path_template)
        elif self.path_template or self.id_list:
            raise ValueError("data.path_template and data.id_list apply only to data.kind: yfcc100m")
        return self

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
    bn_calibration: int = Field(4096, ge=0, description="images whose clustering views set the batch-norm statistics "
                                "of the model each round starts from (the random init's defaults, or training's "
                                "averages over augmented views, otherwise make the clustered features those of "
                                "another function than the one trained); 0 = off. A checkpoint given as "
                                "init_checkpoint keeps its own")


class ExtractConfig(_Section):
    batch_size: int = Field(256, ge=1, description="images per forward pass; a batch never mixes two image shards (so "
                            "a resumed run's features equal an uninterrupted run's bit for bit): a data.shard_size "
                            "that is a multiple of it keeps every batch full")
    layer: str = Field("output", description="'output' (the body's feature layer: fc7 pre-ReLU for VGG/AlexNet, "
                       "pooled last conv for ResNet) or a module of the body, e.g. 'trunk.layer3' (conv maps are "
                       "average-pooled)")
    decode_threads: int = Field(2, ge=1, description="threads decoding images ahead of the forward pass " + _NEUTRAL)
    prefetch_batches: int = Field(2, ge=1, description="batches decoding ahead of the forward pass (>= threads) "
                                  + _NEUTRAL)
    autocast: Literal["bfloat16", "float16", "off"] = Field("bfloat16", description="CUDA autocast (CPU: float32)")
    shards_per_task: int = Field(4, ge=1, description="consecutive image shards one Dask task extracts in one stream "
                                 "(each still written and recorded on its own): no pipeline drain between them, and "
                                 "the write of one overlaps the next " + _NEUTRAL)


class ClusterConfig(_Section):
    super_clusters: int = Field(1, ge=1, description="m: level-1 clusters (1 = flat DeepCluster k-means)")
    k: int = Field(100, ge=1, description="level-2 clusters inside each super-cluster")
    pca_dim: int = Field(32, ge=1, description="PCA-whitening output dimension (capped at the feature width)")
    pca_sample: int = Field(100_000, ge=2, description="images the PCA is fitted on")
    niter: int = Field(20, ge=1, description="Lloyd iterations per k-means")
    super_sample: int = Field(4096, ge=0, description="level 1 is fitted on at most this many vectors per "
                              "super-cluster, drawn at random, then every vector is assigned to its nearest "
                              "super-cluster (faiss's max_points_per_centroid); 0 = fit on every vector")
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
    epoch_images: int | None = Field(None, ge=1, description="images drawn (uniformly over the clusters) per epoch; "
                                     "default: as many as the round's images. A fixed epoch size, as DeeperCluster's, "
                                     "keeps a round's cost independent of the dataset size")
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank " + _NEUTRAL)
    nnodes: int = Field(1, ge=1, description="torchrun nodes (world = nnodes x nproc); more than 1: the train stage "
                        "runs one agent per node, each on its own Dask worker, meeting at a rendezvous the first "
                        "publishes")
    head_init: Literal["random", "centroids"] = Field(
        "centroids", description="how each round's sub-heads start: 'centroids' = the nearest-mean classifier of the "
        "new clusters (mean ReLU feature of each sub-cluster, as DeepCluster-v2 starts from its centroids), so no "
        "round begins by back-propagating a random classifier into the body; 'random' = N(0, 0.01) as in the papers")
    head_groups: bool = Field(True, description="when the world is at least the number of super-classes, one "
                              "communication group of ranks per super-class holding only its sub-head (DeeperCluster)"
                              "; false: every rank holds every head")

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {list(v)}")
        return v


def _split_size(v: float | int, what: str) -> float | int:
    if isinstance(v, float) and not 0 < v < 1:
        raise ValueError(f"{what} must be a fraction in (0, 1) or a count of images (an integer >= 1), got {v}")
    if isinstance(v, int) and v < 1:
        raise ValueError(f"{what} must be a fraction in (0, 1) or a count of images (an integer >= 1), got {v}")
    return v


class EvalConfig(_Section):
    """Evaluation of each round's features against the labels the source may have (class sub-folders).

    The probes use two disjoint splits of the labelled images, drawn by a permutation seeded by ``split_seed``
    (so every method and every round of a benchmark sees the same splits): ``probe_train`` then ``probe_test``
    images of it, each a fraction of the labelled images or a count."""

    kmeans_nmi: bool = Field(True, description="also k-means (k = number of classes) the features against labels")
    kmeans_runs: int = Field(5, ge=1, description="k-means runs (independent seeds) the k-means NMI/ARI are averaged "
                             "over; one run's NMI moves by several points with its seed alone")
    linear_probe: bool = Field(True, description="accuracy of a linear classifier trained on the frozen features")
    knn: bool = Field(True, description="accuracy of a cosine k-nearest-neighbour vote on the frozen features")
    knn_k: int = Field(20, ge=1, description="neighbours of the kNN vote")
    probe_train: float | int = Field(0.5, description="labelled images the probes learn from (fraction or count)")
    probe_test: float | int = Field(0.5, description="labelled images the probes are scored on (fraction or count)")
    split_seed: int = Field(0, description="seed of the train/test split of the labelled images")
    sample: int = Field(100_000, ge=2, description="labelled images the k-means NMI/ARI, the linear probe and the kNN "
                        "read at most: a seeded sample of them (the same for every round and method, seeded by "
                        "split_seed) when there are more, and the probe splits are drawn within it; so the evaluate "
                        "stage's memory stays bounded whatever the number of images. With fewer labelled images "
                        "(every bundled or benchmark set: digits, MNIST, CIFAR-10, Fashion-MNIST's 70,000) all are "
                        "read, as before. Cluster NMI/ARI against the labels and the previous round use every image")
    probe_weight_decay: float = Field(1e-4, ge=0, description="L2 penalty of the linear probe (standardised inputs)")
    probe_max_iter: int = Field(300, ge=1, description="L-BFGS iterations of the linear probe")
    layer: str | None = Field(None, description="layer the probes read: None = the extracted features; else a module "
                              "of the body, e.g. 'trunk.12' (conv maps are average-pooled), run on the split images")
    tensorboard: bool = Field(True, description="write TensorBoard event files into <run>/tb: training curves, "
                              "per-round metrics, cluster-size histograms, galleries, embedding projector")
    embedding_sample: int = Field(1000, ge=0, description="images of each round in TensorBoard's embedding projector "
                                  "(seeded sample, with cluster id, label and thumbnail); 0 = no projector")
    final_round: bool = Field(True, description="after the last round's training, also extract and evaluate the "
                              "model it produced (a history row with round = rounds: what all the training gave)")

    @field_validator("probe_train", "probe_test")
    @classmethod
    def _fraction_or_count(cls, v: float | int, info: Any) -> float | int:
        return _split_size(v, f"eval.{info.field_name}")


class ClusterFitConfig(_Section):
    """ClusterFit's source network: a checkpoint of ours (``model.pt``/``final.pt`` or a bare body state dict) or a
    torchvision state dict (``format: torchvision``, for resnet18/resnet50/vgg16 = vgg16_bn). The network trained
    from scratch on the k-means labels of its features is the ``model`` section."""

    checkpoint: str | None = Field(None, description="weights of the source network (a local path or fsspec URL)")
    format: Literal["deepercluster", "torchvision"] = "deepercluster"
    model: ModelConfig = Field(ModelConfig(), description="architecture of the source network")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or "://" in v or _saved(info):  # a saved checkpoint path was resolved when it was built
            return v
        path = Path(v).expanduser()
        if not path.is_file():
            raise ValueError(f"source checkpoint {v!r} does not exist")
        return str(path.resolve())


class RuntimeConfig(_Section):
    """Where to compute. Not part of the config hash (nor of any stage's fingerprint): the same run can resume on
    other machines. The device and the thread counts may still change floating-point rounding."""

    dask_address: str | None = Field(None, description="existing Dask scheduler (tcp://host:8786); default local")
    dask_workers: int = Field(2, ge=1, description="LocalCluster worker processes when no address is given")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    rdzv_endpoint: str | None = Field(None, description="host:port of the torchrun c10d rendezvous when "
                                      "train.nnodes > 1; default: a free port of the first node's host")
    gpu_workers: bool = Field(False, description="send GPU work only to Dask workers with the resource GPU: "
                              "extraction and clustering GPU=1 per task, training GPU=train.nproc on one worker; a "
                              "local cluster started here then has one GPU=1 worker per visible GPU")
    memory_budget_mb: float = Field(4096, gt=0, description="cluster stage: memory for one k-means unit's whitened "
                                    "vectors; a (super-)cluster larger than this is clustered out of core, streaming "
                                    "its shards (same assignments)")
    stream_threads: int = Field(2, ge=1, description="cluster stage: feature shards read ahead in parallel")
    block_rows: int = Field(1 << 18, ge=1, description="cluster stage: rows of consecutive image shards one unit "
                            "whitens, assigns or sums for a sharded Lloyd iteration (at least one shard); a level-1 "
                            "k-means whose rows fit one block runs as one unit. Any value gives the same results")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options of a remote run "
                                            "store, e.g. {endpoint_url: http://minio:9000}; credentials belong in "
                                            "the environment (AWS_ACCESS_KEY_ID...), never here")

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, v: dict[str, Any]) -> dict[str, Any]:
        secret = sorted(k for k in v if any(w in k.lower() for w in ("key", "secret", "token", "password")))
        if secret:
            raise ValueError(f"{', '.join(secret)} would be saved in the run's config.yaml: give credentials "
                             "through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) instead")
        return v


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
    clusterfit: ClusterFitConfig = ClusterFitConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="before")
    @classmethod
    def _moved_to_runtime(cls, data: Any) -> Any:
        """Keys that left a hashed section for ``runtime`` (they never change results) are still read from their
        old place, with a warning; a value given in ``runtime`` wins."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for section, keys in MOVED_TO_RUNTIME.items():
            old = data.get(section)
            if not isinstance(old, dict) or not keys & old.keys():
                continue
            moved = {key: old[key] for key in sorted(keys & old.keys())}
            warnings.warn(f"{', '.join(f'{section}.{key}' for key in moved)} moved to runtime.* (it never changes "
                          "results): set it under runtime in the config", FutureWarning, stacklevel=2)
            runtime = data.get("runtime") or {}
            runtime = runtime.model_dump(exclude_unset=True) if isinstance(runtime, BaseModel) else dict(runtime)
            data["runtime"] = {**moved, **runtime}
            data[section] = {key: value for key, value in old.items() if key not in moved}
        return data

    @model_validator(mode="after")
    def _clusterfit_has_a_source(self) -> PipelineConfig:
        if self.method != "clusterfit":
            return self
        if not self.clusterfit.checkpoint:
            raise ValueError("method clusterfit needs clusterfit.checkpoint (the weights of the source network)")
        if self.rounds != 1:
            raise ValueError("clusterfit clusters once: rounds must be 1 (train longer with train.epochs)")
        if self.train.head_init != "random":
            raise ValueError("clusterfit trains a new network on another network's clusters, whose feature means "
                             "mean nothing to it: train.head_init must be random")
        min_size = MIN_IMAGE_SIZE[self.clusterfit.model.arch]
        if self.data.image_size < min_size:
            raise ValueError(f"data.image_size {self.data.image_size} is too small for the source "
                             f"{self.clusterfit.model.arch} (at least {min_size})")
        return self

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
        """The config saved into a run; ``config_hash`` is informative (it is recomputed when read back)."""
        return yaml.safe_dump({"schema_version": SCHEMA_VERSION, **self.model_dump(mode="json"),
                               "config_hash": self.hash}, sort_keys=False)


# Fields that never change results: a stage's fingerprint leaves them out, so changing one never redoes work.
RESULT_NEUTRAL: frozenset[str] = frozenset({
    # only splits the listing into scan tasks: the manifest keeps the listing's order whatever the parts
    "data.part_size",
    # decode threads and prefetch only change when images are decoded, not which images make each batch
    "extract.decode_threads",
    "extract.prefetch_batches",
    # groups consecutive shards into one task, but a batch never mixes two shards: the batches stay the same
    "extract.shards_per_task",
    # the DataLoader workers deliver the same samples (each seeded by the sampler) in the same order
    "train.loader_workers",
    # NOT here: extract.batch_size (a batch's size changes the floating-point reductions of the forward pass)
}) | frozenset(
    # runtime is where to compute, deliberately out of the hash and of every fingerprint so that a run resumes on
    # other machines, although runtime.device and some thread counts do change floating-point rounding
    f"runtime.{name}" for name in RuntimeConfig.model_fields
)


def _field(dotted: str) -> FieldInfo:
    """The pydantic FieldInfo of a dotted config field (``cluster.k``); ConfigError if there is none."""
    model: type[BaseModel] | None = PipelineConfig
    info = None
    for name in dotted.split("."):
        if model is None or name not in model.model_fields:
            raise ConfigError(f"unknown config field {dotted!r}")
        info = model.model_fields[name]
        section = info.annotation
        model = section if isinstance(section, type) and issubclass(section, BaseModel) else None
    assert info is not None
    return info


def field_description(dotted: str) -> str:
    """Description of a dotted config field (``cluster.k``), '' when it has none; ConfigError if unknown."""
    return _field(dotted).description or ""


def iter_fields(cfg: PipelineConfig) -> Iterator[tuple[str, Any, Any, str]]:
    """``(dotted name, value, default, description)`` of every leaf field of ``cfg``, in declaration order, the
    sections flattened with dots (``clusterfit.model.arch``). The default is the field's own, not a preset's."""

    def walk(section: BaseModel, prefix: str) -> Iterator[tuple[str, Any, Any, str]]:
        for name, info in type(section).model_fields.items():
            value = getattr(section, name)
            if isinstance(value, BaseModel):
                yield from walk(value, f"{prefix}{name}.")
            else:
                yield (f"{prefix}{name}", value, info.get_default(call_default_factory=True),
                       info.description or "")

    yield from walk(cfg, "")


# Method presets: what each paper's method means in this pipeline (see ARCHITECTURE.md).
PRESETS: dict[str, dict[str, Any]] = {
    "deepcluster": {"cluster": {"super_clusters": 1, "k": 100}, "train": {"rotations": False}},
    "rotnet": {"cluster": {"super_clusters": 1, "k": 1}, "train": {"rotations": True}},
    "deepercluster": {"cluster": {"super_clusters": 2, "k": 50}, "train": {"rotations": True}},
    # k-means the source network's features once, train a new network from scratch on them, evaluate both
    "clusterfit": {"rounds": 1, "cluster": {"super_clusters": 1, "k": 100},
                   "train": {"rotations": False, "head_init": "random"},
                   "eval": {"final_round": True}},
}


# Defaults of the bundled sources, under the preset and the user's values: 8 x 8 digits are not mirror-symmetric
# (a flipped 2 is no digit) and a crop of half their area cuts a digit in two; 1,797 images make 14 global batches
# an epoch, and 4 epochs a round is what made their features improve over the random network (bench/recipe.py).
SOURCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"train": {"hflip": False, "crop_scale": (0.8, 1.0), "epochs": 4}},
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
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


def _check_schema_version(version: Any) -> None:
    if version is None:  # saved before configs had a version
        return
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        given = json.dumps(version, default=str)
        raise ConfigError(f"invalid config: schema_version: expects an integer >= 1, got {given}")
    if version > SCHEMA_VERSION:
        raise ConfigError(f"config written by a newer deepercluster (schema {version}, this one reads up to "
                          f"{SCHEMA_VERSION}): upgrade")


def _build(overrides: dict[str, Any] | None, method: str | None, saved: bool) -> PipelineConfig:
    overrides = dict(overrides or {})
    _check_schema_version(overrides.pop("schema_version", None))
    overrides.pop("config_hash", None)
    method = method or overrides.get("method") or "deepercluster"
    if method not in PRESETS:
        raise ConfigError(f"invalid config: method: unknown method {method!r}; choose one of {', '.join(PRESETS)}")
    data, default_source = overrides.get("data"), DataConfig.model_fields["source"].default
    source = data.get("source", default_source) if isinstance(data, dict) else default_source
    base = deep_merge(PRESETS[method], SOURCE_DEFAULTS.get(source, {}))
    merged = deep_merge(base, {**overrides, "method": method})
    try:
        return PipelineConfig.model_validate(merged, context={"saved": saved})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def build_config(overrides: dict[str, Any] | None = None, method: str | None = None) -> PipelineConfig:
    """Preset of ``method`` (or of ``overrides['method']``) with ``overrides`` merged on top, validated."""
    return _build(overrides, method, saved=False)


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(f"key {key!r} is given twice (lines {first} and {again}): keep one")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges keys that may then be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first_line.get(key)
            except TypeError:  # unhashable key: the SafeLoader reports it
                continue
            if seen is not None:
                raise _DuplicateKeyError(key, seen, key_node.start_mark.line + 1)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, where: str, empty_hint: str) -> dict[str, Any]:
    """The mapping of sections a config's YAML holds; every problem is a one-line ConfigError naming ``where``."""
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader
    except _DuplicateKeyError as err:
        raise ConfigError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML: {problem}{at}") from None
    if loaded is None:
        raise ConfigError(f"{where} is empty: {empty_hint}")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def parse_sets(sets: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``section.field=value`` settings (the command line's ``--set``) as nested overrides; each value is read as
    YAML (``0.1``, ``true``, ``[0.5, 1]``, ``null``), so it is validated exactly as in a config file."""
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. cluster.k=1000")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set to a value and used as a section")
        node[leaf] = value
    return out


def load_config(path: str | Path | None = None, method: str | None = None, sets: list[str] | tuple[str, ...] = (),
                rounds: int | None = None) -> PipelineConfig:
    """Read a YAML config file (or none: the preset's defaults), apply ``sets`` (``section.field=value``) and
    ``rounds`` over it, and validate the result."""
    overrides: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        overrides = _parse_yaml(p.read_text(), f"config file {str(p)!r}",
                                "give at least one field, or leave out --config to use the preset's defaults")
    overrides = deep_merge(overrides, parse_sets(sets))
    if rounds is not None:
        overrides["rounds"] = rounds
    return build_config(overrides, method=method)


def config_from_yaml_text(text: str, where: str = "saved config") -> PipelineConfig:
    """Rebuild a config saved into a run (``config.yaml``). Nothing is checked against the disk (the data source or
    the clusterfit checkpoint may have moved since); fields the config predates take their defaults."""
    overrides = _parse_yaml(text, where, "restore the run's config.yaml, or start a new run")
    return _build(overrides, None, saved=True)
