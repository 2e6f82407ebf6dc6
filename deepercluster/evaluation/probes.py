"""Frozen-feature probes: a linear classifier (multinomial logistic regression) and a cosine kNN vote.

Both take a train split and a test split of ``(features, labels)`` and return the test accuracy; both are
deterministic for the same inputs on the same machine (full-batch L-BFGS, exact faiss search)."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from deepercluster.clustering.pca import l2_normalise
from deepercluster.errors import DataError


@dataclass(frozen=True)
class ProbeResult:
    train_acc: float
    test_acc: float
    iterations: int


def _rows(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 rows (any trailing shape flattened; zero rows allowed)."""
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))


def _check(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> None:
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise DataError("probe: features and labels differ in length")
    if len(train_x) == 0 or len(test_x) == 0:
        raise DataError("probe: the train and the test split must both hold images (raise eval.probe_train/test)")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"probe: train features {train_x.shape[1:]} and test features {test_x.shape[1:]} differ")
    for name, x in (("train", train_x), ("test", test_x)):
        if not np.isfinite(x).all():
            raise DataError(f"probe: the {name} features hold non-finite values: re-extract them")


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 weight_decay: float = 1e-4, max_iter: int = 300, device: str | torch.device = "cpu") -> ProbeResult:
    """Multinomial logistic regression on features standardised with the train split's mean and deviation,
    ``mean CE + weight_decay / 2 * |W|^2``, full-batch L-BFGS (strong Wolfe line search) from zero weights."""
    train_x, test_x = _rows(train_x), _rows(test_x)
    _check(train_x, train_y, test_x, test_y)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    xs = torch.from_numpy((train_x - mean) / std).to(device)
    ys = torch.from_numpy(np.asarray(train_y, dtype=np.int64)).to(device)
    w = torch.zeros(xs.shape[1], n_classes, device=device, requires_grad=True)
    b = torch.zeros(n_classes, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, ys) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    iterations = int(opt.state[w].get("n_iter", 0))
    with torch.no_grad():
        train_acc = float(((xs @ w + b).argmax(1) == ys).float().mean())
        xt = torch.from_numpy((test_x - mean) / std).to(device)
        pred = (xt @ w + b).argmax(1).cpu().numpy()
    return ProbeResult(train_acc, float((pred == np.asarray(test_y)).mean()), iterations)


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int = 20,
                batch: int = 4096) -> np.ndarray:
    """Majority vote of the ``k`` nearest train rows by cosine similarity (ties: the smallest class id)."""
    train_x = l2_normalise(_rows(train_x)).astype(np.float32)
    test_x = l2_normalise(_rows(test_x)).astype(np.float32)
    train_y = np.asarray(train_y, dtype=np.int64)
    k = min(k, len(train_x))
    n_classes = int(train_y.max()) + 1
    index = faiss.IndexFlatIP(train_x.shape[1])
    index.add(np.ascontiguousarray(train_x))
    out = np.empty(len(test_x), dtype=np.int64)
    for lo in range(0, len(test_x), batch):
        _, idx = index.search(np.ascontiguousarray(test_x[lo : lo + batch]), k)
        votes = np.zeros((len(idx), n_classes), dtype=np.int64)
        np.add.at(votes, (np.repeat(np.arange(len(idx)), k), train_y[idx].ravel()), 1)
        out[lo : lo + batch] = votes.argmax(axis=1)
    return out


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 k: int = 20) -> float:
    """Test accuracy of :func:`knn_predict`."""
    _check(_rows(train_x), train_y, _rows(test_x), test_y)
    return float((knn_predict(train_x, train_y, test_x, k) == np.asarray(test_y)).mean())
