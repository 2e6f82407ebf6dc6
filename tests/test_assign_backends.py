"""The GPU search backends' parts that run without a GPU: which backend is picked, and the faiss path's shared
post-processing (top-2 candidates -> float64 near-tie re-check), with faiss-cpu's IndexFlatL2 standing in for the
GPU index. The GPU itself is exercised by ``bench/gpu_check.py`` on a CUDA machine, not here."""

from __future__ import annotations

import os
import sys

import faiss
import numpy as np
import pytest
import torch

from deepercluster.clustering import assign
from deepercluster.clustering.assign import FAISS_GPU, NearestCentroid, resolve_backend
from deepercluster.clustering.kmeans import kmeans, snap_to_grid
from deepercluster.errors import ConfigError


@pytest.fixture
def cuda_visible(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """torch sees a GPU and an NVIDIA driver is there (as on a CUDA machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_exists = os.path.exists
    monkeypatch.setattr(assign.os.path, "exists", lambda p: p == "/proc/driver/nvidia" or real_exists(p))
    return monkeypatch


def _faiss_reports(monkeypatch: pytest.MonkeyPatch, gpus: int | Exception) -> None:
    """faiss as faiss-gpu would look with ``gpus`` GPUs (or raising when asked)."""
    def count() -> int:
        if isinstance(gpus, Exception):
            raise gpus
        return gpus

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", count)


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_cuda_picks_faiss_gpu_only_when_faiss_reports_a_gpu(cuda_visible, device):
    _faiss_reports(cuda_visible, 1)
    assert resolve_backend(device) == FAISS_GPU
    assert resolve_backend("cpu") == "cpu"  # an explicit cpu is never overridden
    _faiss_reports(cuda_visible, 0)
    assert resolve_backend(device) == "cuda"
    _faiss_reports(cuda_visible, RuntimeError("CUDA driver version is insufficient"))
    assert resolve_backend(device) == "cuda"


def test_faiss_cpu_or_no_faiss_means_torch_on_cuda(cuda_visible):
    if hasattr(faiss, "StandardGpuResources"):  # pragma: no cover - a machine with faiss-gpu installed
        cuda_visible.delattr(faiss, "StandardGpuResources")
    cuda_visible.setattr(faiss, "get_num_gpus", lambda: 1)  # faiss-cpu without GPU resources: not usable
    assert resolve_backend("cuda") == "cuda"
    cuda_visible.setitem(sys.modules, "faiss", None)  # import faiss fails
    assert resolve_backend("auto") == "cuda"


def test_no_cuda_never_picks_a_gpu_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _faiss_reports(monkeypatch, 1)
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_backend("cuda")
    monkeypatch.setattr(assign.os.path, "exists", lambda p: True)  # a driver, but torch sees no GPU
    assert resolve_backend("auto") == "cpu"


@pytest.fixture
def faiss_cpu_standin(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The faiss-gpu backend's index replaced by faiss-cpu's IndexFlatL2 (same search API and float32 distances);
    returns a list that counts the indexes built."""
    built: list[int] = []

    def cpu_index(centroids: np.ndarray) -> faiss.IndexFlatL2:
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        built.append(len(centroids))
        return index

    monkeypatch.setattr(assign, "_faiss_gpu_index", cpu_index)
    return built


def _tied_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows and centroids with exact ties: a duplicate centroid (its rows must go to the lower index) and a row
    exactly halfway between two centroids."""
    rng = np.random.default_rng(seed)
    x = snap_to_grid(rng.normal(size=(3000, 24)).astype(np.float32))
    x[0] = 0
    c = rng.normal(size=(300, 24)).astype(np.float32)
    c[3] = c[7] = x[1]
    c[10], c[11] = 1e-3, -1e-3  # the origin (row 0) is exactly as far from both: it goes to 10
    return x, c


def test_faiss_candidates_go_through_the_same_near_tie_recheck(faiss_cpu_standin):
    x, c = _tied_data()
    want, _ = NearestCentroid(c, backend="cpu").assign(x)
    nc = NearestCentroid(c, backend=FAISS_GPU)
    done: list[tuple[int, int]] = []
    got, dist = nc.assign(x, rows_done=lambda lo, hi, labels: done.append((lo, hi)))
    assert faiss_cpu_standin == [300] and done == [(0, len(x))]
    assert np.array_equal(got, want) and got[0] == 10 and got[1] == 3 and not (got == 7).any()
    assert nc.rechecked >= 2  # at least the two exact ties were re-decided in float64
    exact = ((x.astype(np.float64) - c[got].astype(np.float64)) ** 2).sum(1)
    np.testing.assert_allclose(dist, exact, rtol=1e-4, atol=1e-5)
    # batches of any size (faiss-cpu switches from direct sums to BLAS at 20 rows) give the same labels
    for step in (1, 7, 19, 20, 1000):
        parts = [nc.assign(x[lo : lo + step])[0] for lo in range(0, 400, step)]
        assert np.array_equal(np.concatenate(parts)[:400], want[:400])


def test_one_centroid_needs_no_second_candidate(faiss_cpu_standin):
    x, c = _tied_data()
    labels, dist = NearestCentroid(c[:1], backend=FAISS_GPU).assign(x)
    assert (labels == 0).all() and (dist >= 0).all()


def test_kmeans_on_the_faiss_path_is_bit_identical_to_cpu(faiss_cpu_standin):
    x, _ = _tied_data(1)
    a, b = kmeans(x, 40, 6, 2, backend=FAISS_GPU), kmeans(x, 40, 6, 2, backend="cpu")
    assert np.array_equal(a.assign, b.assign) and np.array_equal(a.centroids, b.centroids) and a.inertia == b.inertia
