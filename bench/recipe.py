"""Recipe study: which training recipe makes the features learn? The round loop of the pipeline (extract, PCA-whiten,
two-level k-means, train on uniform-over-clusters samples, evaluate) run in ONE process on images held in memory,
built from the library's own pieces (bodies, heads, loss, training view, sampler, k-means, probes), so that many
variants x seeds fit in the time one pipeline run takes. It measures recipes; `bench/quality.py` then confirms the
chosen one through the real pipeline (Prefect, Dask, torchrun).

    python bench/recipe.py --data digits --variants deepercluster,deepcluster,rotnet --seeds 3
    python bench/recipe.py --data ../shared/data/cifar10-test --image-size 32 --sobel \
        --variants "deepercluster;deepercluster:head_init=centroids" --seeds 3

A variant is ``method[:field=value,...]`` with fields: ``head_init`` (random | centroids), ``k`` (sub-clusters per
super-cluster), ``m`` (super-clusters), ``lr``, ``head_lr``, ``epochs``, ``crop_low``, ``share_rotations``
(sub-heads shared by the 4 rotations of a super-cluster: true | false). Prints one row per variant: the final
round's k-means NMI, linear probe and kNN as mean +- std over the seeds, and round 0 (the random network).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from deepercluster.clustering.kmeans import ArrayVectors, kmeans  # noqa: E402
from deepercluster.clustering.means import relu_cluster_means  # noqa: E402
from deepercluster.clustering.pca import fit_pca  # noqa: E402
from deepercluster.clustering.whitening import whiten as whiten_rows  # noqa: E402
from deepercluster.config import ModelConfig  # noqa: E402
from deepercluster.data.transforms import TrainingView, normalize_batch  # noqa: E402
from deepercluster.evaluation.metrics import kmeans_agreement  # noqa: E402
from deepercluster.evaluation.probes import knn_accuracy, linear_probe  # noqa: E402
from deepercluster.features.calibrate import calibrate_batchnorm  # noqa: E402
from deepercluster.models import SubHeads, build_body, super_head  # noqa: E402
from deepercluster.models.heads import init_heads_from_means  # noqa: E402
from deepercluster.training.loss import hierarchical_loss  # noqa: E402
from deepercluster.training.sampler import uniform_epoch  # noqa: E402

METHODS = {"rotnet": (1, 1, True), "deepcluster": (1, 100, False), "deepercluster": (2, 50, True)}


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    m: int
    k: int
    rotations: bool
    head_init: str = "random"
    lr: float = 0.05
    head_lr: float | None = None
    epochs: int = 1
    crop_low: float = 0.5
    share_rotations: bool = False
    recal_bn: bool = False
    hflip: bool = True
    rot_means: bool = False  # rotated sub-heads start from the means of their rotated clustering views


def parse_variant(text: str, args: argparse.Namespace) -> Variant:
    method, _, rest = text.partition(":")
    m, k, rot = METHODS[method]
    if method == "deepcluster":
        k = args.k
    elif method == "deepercluster":
        m, k = args.m, max(1, args.k // args.m)
    v = Variant(text, method, m, k, rot, lr=args.lr, epochs=args.epochs, crop_low=args.crop_low)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        field = {f.name: f for f in Variant.__dataclass_fields__.values()}[key]
        cast = {"int": int, "float": float, "float | None": float, "bool": lambda s: s.lower() == "true",
                "str": str}[str(field.type)]
        v = replace(v, **{key: cast(value)})
    return v


def load_images(data: str, limit: int | None) -> tuple[list[Image.Image], np.ndarray]:
    """PIL RGB images and integer labels of a labelled set (digits, an IDX folder or class sub-folders)."""
    if data == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pix = np.clip(bunch.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
        images, labels = [Image.fromarray(p).convert("RGB") for p in pix], bunch.target
    else:
        from deepercluster.data.idx import is_idx_folder, labelled_folder, load_idx_folder

        if is_idx_folder(data):
            pix, labels = load_idx_folder(data)
            images = [Image.fromarray(p).convert("RGB") for p in pix]
        else:
            uris, labels, _ = labelled_folder(data)
            images = [Image.open(u).convert("RGB") for u in uris]
    labels = np.asarray(labels, dtype=np.int64)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def clustering_batch(images: list[Image.Image], size: int) -> torch.Tensor:
    """uint8 (N, S, S, 3): the whole image resized to the input size (the crop_ratio 1.0 clustering view)."""
    return torch.from_numpy(np.stack([np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
                                      for im in images]))


@torch.inference_mode()
def features(body: torch.nn.Module, pixels: torch.Tensor, batch: int = 1024) -> np.ndarray:
    body.eval()
    out = [body(normalize_batch(pixels[i:i + batch])).float() for i in range(0, len(pixels), batch)]
    return torch.cat(out).numpy()


def recalibrate_bn(body: torch.nn.Module, pixels: torch.Tensor, batch: int = 256, max_images: int = 4096) -> None:
    """The library's batch-norm calibration on (up to ``max_images``) clustering views, then eval mode."""
    n = min(len(pixels), max_images)
    calibrate_batchnorm(body, (normalize_batch(pixels[i:i + batch]) for i in range(0, n, batch)))
    body.eval()


def whiten(x: np.ndarray, dim: int) -> np.ndarray:
    """PCA-whitened, L2-normalised rows on the k-means grid, as the cluster stage makes them."""
    return whiten_rows(fit_pca(x, dim), x)


def cluster(xw: np.ndarray, m: int, k: int, seed: int, r: int, niter: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-level k-means: super ids (m clusters), sub ids (k clusters inside each super-cluster)."""
    sup = np.zeros(len(xw), np.int64) if m == 1 else kmeans(xw, m, niter, np.random.SeedSequence([seed, r, 1])).assign
    sub = np.zeros(len(xw), np.int64)
    if k > 1:
        for s in range(m):
            rows = np.flatnonzero(sup == s)
            sub[rows] = kmeans(xw[rows], k, niter, np.random.SeedSequence([seed, r, 2, s])).assign
    return sup, sub


def evaluate(x: np.ndarray, xw: np.ndarray, y: np.ndarray, split: tuple[np.ndarray, np.ndarray],
             seed: int) -> dict[str, float]:
    tr, te = split
    out = {"nmi": kmeans_agreement(xw, y, 20, 5, np.random.SeedSequence([seed, 99]))["kmeans_nmi_labels"]}
    out["probe"] = linear_probe(x[tr], y[tr], x[te], y[te]).test_acc
    out["knn"] = knn_accuracy(x[tr], y[tr], x[te], y[te], 20)
    centre = x[tr].mean(0)  # the train split's mean, as the linear probe standardises with the train split's
    out["knn_centred"] = knn_accuracy(x[tr] - centre, y[tr], x[te] - centre, y[te], 20)
    out["knn_whitened"] = knn_accuracy(xw[tr], y[tr], xw[te], y[te], 20)  # the vectors k-means clusters
    # the features' common offset: |mean| over the rms distance to the mean (cosine kNN drowns in a large offset)
    out["offset"] = float(np.linalg.norm(x.mean(0)) / np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()))
    return out


def train_round(body, v: Variant, images, pixels, sup, sub, x_relu, seed: int, r: int, args) -> float:
    n_rot = 4 if v.rotations else 1
    n_super = v.m * n_rot
    gen = np.random.SeedSequence([seed, r, 7]).generate_state(1)[0]
    head = super_head(body.feature_dim, n_super, int(gen))
    head_classes = v.m if v.share_rotations else n_super
    subs = SubHeads(body.feature_dim, head_classes, v.k, seed=int(gen)) if v.k > 1 else None
    if v.head_init == "centroids" and subs is not None:

        def super_means(h: np.ndarray) -> tuple[list[torch.Tensor], float]:
            """Per super-cluster: the mean of ``h`` over each sub-cluster; and the summed spread."""
            out, within = [], 0.0
            for s in range(v.m):
                rows = np.flatnonzero(sup == s)
                mu, w = relu_cluster_means(ArrayVectors(h[rows]), sub[rows], v.k)
                out.append(torch.from_numpy(mu))
                within += w
            return out, within

        upright, within = super_means(x_relu)
        temperature = within / len(x_relu)
        if v.rot_means and not v.share_rotations and n_rot > 1:
            by_class = {s * n_rot: mu for s, mu in enumerate(upright)}
            for t in range(1, n_rot):
                rotated, _ = super_means(np.maximum(features(body, torch.rot90(pixels, t, dims=(1, 2))), 0))
                by_class.update({s * n_rot + t: mu for s, mu in enumerate(rotated)})
            init_heads_from_means(subs, by_class, temperature, n_rotations=1)
        else:
            init_heads_from_means(subs, dict(enumerate(upright)), temperature,
                                  n_rotations=1 if v.share_rotations else n_rot)
    params = [{"params": body.parameters(), "lr": v.lr}]
    heads = [h for h in (head, subs) if h is not None]
    params += [{"params": h.parameters(), "lr": v.head_lr or v.lr} for h in heads]
    opt = torch.optim.SGD(params, lr=v.lr, momentum=0.9, weight_decay=1e-5)
    view = TrainingView(args.image_size, (v.crop_low, 1.0), v.hflip)
    targets = sup * v.k + sub
    losses = []
    body.train()
    for epoch in range(v.epochs):
        rows, seeds = uniform_epoch(targets, seed, r, epoch, size=args.epoch_images)
        for lo in range(0, len(rows) - args.batch_size + 1, args.batch_size):
            rr, ss = rows[lo:lo + args.batch_size], seeds[lo:lo + args.batch_size]
            rot = (ss % n_rot).astype(np.int64)
            x = torch.stack([view(images[i], seed=int(s), rotation=int(t))
                             for i, s, t in zip(rr, ss, rot, strict=True)])
            h = torch.relu(body(normalize_batch(x)))
            sc = torch.from_numpy(sup[rr] * n_rot + rot)
            hc = torch.from_numpy(sup[rr]) if v.share_rotations else sc
            loss, _ = hierarchical_loss(head(h) if head is not None else None,
                                        subs(h, hc) if subs is not None else None, sc, torch.from_numpy(sub[rr]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return float(np.mean(losses[-20:]))


def run(v: Variant, seed: int, images, pixels, y, split, args) -> list[dict[str, float]]:
    torch.manual_seed(seed)
    body = build_body(ModelConfig(arch="smallnet", feature_dim=args.feature_dim, sobel=args.sobel), seed=args.net_seed)
    history = []
    for r in range(args.rounds + 1):
        if v.recal_bn:
            recalibrate_bn(body, pixels)
        x = features(body, pixels)
        xw = whiten(x, args.pca_dim)
        row = {"round": r, **evaluate(x, xw, y, split, seed)}
        if r < args.rounds:
            sup, sub = cluster(xw, v.m, v.k, seed, r, args.niter)
            row["loss"] = train_round(body, v, images, pixels, sup, sub, np.maximum(x, 0), seed, r, args)
        history.append(row)
        print(f"  {v.name} seed {seed} " + json.dumps({k: round(val, 4) for k, val in row.items()}), flush=True)
    return history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits")
    p.add_argument("--limit", type=int)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--feature-dim", type=int, default=128)
    p.add_argument("--sobel", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--epoch-images", type=int)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--m", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--crop-low", type=float, default=0.5)
    p.add_argument("--pca-dim", type=int, default=32)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--net-seed", type=int, default=0, help="the random network every run starts from")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", default="rotnet,deepcluster,deepercluster", help="';' or ',' between variants "
                   "without fields; use ';' when a variant has fields")
    p.add_argument("--out", default=None, help="append every history row here (jsonl)")
    args = p.parse_args(argv)
    sep = ";" if ";" in args.variants or ":" in args.variants else ","
    variants = [parse_variant(t.strip(), args) for t in args.variants.split(sep) if t.strip()]
    images, y = load_images(args.data, args.limit)
    pixels = clustering_batch(images, args.image_size)
    perm = np.random.default_rng(0).permutation(len(y))
    half = len(y) // 2
    split = (np.sort(perm[:half]), np.sort(perm[half:]))
    print(f"{len(y)} images, {len(np.unique(y))} classes; {len(variants)} variants x {args.seeds} seeds", flush=True)
    results: dict[str, list[list[dict[str, float]]]] = {}
    for v in variants:
        for seed in range(args.seeds):
            tick = time.perf_counter()
            h = run(v, seed, images, pixels, y, split, args)
            results.setdefault(v.name, []).append(h)
            if args.out:
                with open(args.out, "a") as f:
                    for row in h:
                        f.write(json.dumps({"variant": v.name, "seed": seed, **row, "args": vars(args)}) + "\n")
            print(f"  {v.name} seed {seed}: {time.perf_counter() - tick:.0f} s", flush=True)
    print(f"\n{'variant':50s} {'k-means NMI':>15s} {'linear probe':>15s} {'kNN':>15s}   (round 0 -> final)")
    for name, runs in results.items():
        cells = []
        for key in ("nmi", "probe", "knn"):
            final = np.array([h[-1][key] for h in runs])
            cells.append(f"{final.mean():.3f} +- {final.std():.3f}")
        first = runs[0][0]
        print(f"{name:50s} {cells[0]:>15s} {cells[1]:>15s} {cells[2]:>15s}   "
              f"(r0 {first['nmi']:.3f} / {first['probe']:.3f} / {first['knn']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
