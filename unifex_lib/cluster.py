"""Cluster discrimination: pseudo-classes from k-means on foundation-model features.

Manual labels do not scale. UNICOM (An et al., "Unicom: Universal and Compact Representation
Learning for Image Retrieval", ICLR 2023, arXiv:2304.05884) clusters a large unlabelled image
collection into many pseudo-classes with k-means on CLIP features, then trains a margin-based
softmax (ArcFace) over the pseudo-classes with random partial class sampling (Partial FC: An et
al., "Partial FC: Training 10 Million Identities on a Single Machine", arXiv:2010.05222) and
random feature dropping (here the ``dropout`` of the ``proj_layer`` neck; Partial FC is the
``sample_rate`` head parameter). Here, at this repo's scale:

1. :func:`extract_features` embeds the images of an image folder or annotation table with a
   chosen backbone (or any embedder) and L2-normalises them, ``f <- f / ||f||_2``;
2. :func:`kmeans` runs faiss k-means (Johnson et al., "Billion-scale similarity search with
   GPUs", arXiv:1702.08734; GPU when faiss has one), spherical: after each update the centroids
   are renormalised to the unit sphere, so assignment ``argmin_c ||f - mu_c||^2`` equals
   ``argmax_c <f, mu_c>``;
3. :func:`drop_small_clusters` removes clusters of fewer than ``min_cluster_size`` images and
   renumbers the rest ``0..C'-1``;
4. :func:`write_pseudo_labels` writes an annotation table (``path,label,domain,split``; split
   ``train``) and its class-count file, which the training notebook takes like any curated set;
5. :func:`adjusted_rand_index` scores the clusters against true classes when they are known,
   :func:`plot_cluster_sizes` draws the size distribution and :func:`class_centre_memory` sizes
   the margin head that training on ``C'`` pseudo-classes needs.

:func:`cluster_images` runs 1-5 and writes everything under one folder.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from unifex_lib.data.annotations import write_annotations, write_class_counts
from unifex_lib.plots import save_figure

OPTIMIZER_STATE = {"SGD": 1, "Adam": 2, "AdamW": 2}  # float tensors per parameter kept by the optimizer


# ----------------------------------------------------------------------------- features
def read_source(source, data_root=None) -> tuple[pd.DataFrame, Path]:
    """``(table, root)`` of an image folder (every file under it, sorted; ``domain`` = its first
    sub-folder, no labels) or of an annotation table (``.csv`` / ``.parquet``; paths relative to
    ``data_root``, default the table's folder)."""
    from unifex_lib.data.annotations import read_annotations
    from unifex_lib.data.dataset import image_folder_dataset

    source = Path(source)
    if source.is_dir():
        paths = image_folder_dataset(source).paths
        if not paths:
            raise ValueError(f"image folder {source} holds no files")
        domains = [p.split("/")[0] if "/" in p else source.name for p in paths]
        return pd.DataFrame({"path": paths, "domain": domains}), source
    if source.suffix in (".csv", ".parquet"):
        return read_annotations(source), Path(data_root) if data_root is not None else source.parent
    raise ValueError(f"source {source} is neither an image folder nor an annotation table (.csv / .parquet)")


def extract_features(model: "torch.nn.Module", table: pd.DataFrame, root, transform="center_crop", *,
                     batch_size: int = 256, device: str = "cpu", cache_dir=None,
                     num_workers: int = 0) -> np.ndarray:
    """L2-normalised float32 ``[N, D]`` features of ``table``'s images (``root / path``), row order kept.

    ``model``: a backbone (:func:`unifex_lib.models.create_backbone`) or any embedder (images ->
    ``[B, D]``); ``transform``: a deterministic transform name (built from ``model.data_config``) or
    a callable. With ``cache_dir`` the frozen-backbone feature cache of training
    (:func:`unifex_lib.training.feature_cache.cached_features`, keyed as :mod:`unifex_lib.train`
    keys it: backbone ``model_id``, weights, transform, the images' bytes) is read or filled, so
    training on the same table with ``output_dir/feature_cache`` as ``cache_dir`` reuses it;
    otherwise :func:`unifex_lib.uned.extract_embeddings` runs. An unreadable image gives a zero row.
    """
    from unifex_lib.uned import default_transform, extract_embeddings

    name = transform if isinstance(transform, str) else "custom"
    transform = default_transform(model, transform) if isinstance(transform, str) else transform
    paths = table["path"].astype(str).tolist()
    if cache_dir is None:
        return extract_embeddings(model, [{"path": p} for p in paths], root, transform, batch_size=batch_size,
                                  device=device, num_workers=num_workers, desc="features")
    import torch

    from unifex_lib.data.dataset import ImageDataset
    from unifex_lib.training import feature_cache as fc

    if not hasattr(model, "model_id") or not hasattr(model, "num_features"):
        raise ValueError(f"cache_dir needs a backbone with model_id and num_features (create_backbone), "
                         f"got {type(model).__name__}; pass cache_dir=None for other embedders")
    key = fc.cache_key(model.model_id, fc.weights_fingerprint(model), f"{name}:{transform!r}",
                       fc.dataset_hash(paths, root))
    model.eval().to(device)
    feats = np.nan_to_num(np.array(fc.cached_features(
        model, ImageDataset(paths, [0] * len(paths), root, transform), key, cache_dir, batch_size,
        torch.device(device), num_workers)), nan=0.0)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return (feats / np.where(norms > 0, norms, 1.0)).astype(np.float32)


# ----------------------------------------------------------------------------- k-means
@dataclass
class KMeansResult:
    """``centroids [K, D]`` float32 (unit norm when spherical), ``labels [N]`` int64 (nearest
    centroid), ``objective`` per iteration (faiss: sum of squared distances, or of inner products
    when spherical) and the settings used."""
    centroids: np.ndarray
    labels: np.ndarray
    objective: list
    settings: dict = field(default_factory=dict)


def _use_gpu(gpu) -> bool:
    import faiss

    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if gpu == "auto":
        return available
    if gpu and not available:
        raise ValueError("gpu=True but this faiss build sees no GPU; install faiss-gpu or use gpu='auto'/False")
    return bool(gpu)


_SMALL_WORK = 50_000_000  # n * K * D below which k-means runs on one thread


@contextmanager
def _faiss_threads(threads: Optional[int]):
    """faiss's OpenMP thread count set to ``threads`` (None: unchanged) for the block, then restored."""
    import faiss

    before = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def kmeans(features, num_clusters: int, *, niter: int = 20, seed: int = 0, spherical: bool = True,
           nredo: int = 1, max_points_per_centroid: int = 256, gpu="auto", threads: Optional[int] = None,
           verbose: bool = False) -> KMeansResult:
    """faiss k-means of ``features [N, D]`` into ``num_clusters`` clusters.

    Lloyd iterations: assign ``l_i = argmin_c ||x_i - mu_c||^2``, update ``mu_c = mean{x_i : l_i = c}``
    (renormalised to ``||mu_c|| = 1`` when ``spherical``), ``niter`` times from ``K`` points drawn
    with ``seed``; the best of ``nredo`` runs is kept. faiss trains on at most
    ``max_points_per_centroid * K`` points (a seeded subsample) and the returned ``labels`` assign
    every point to its nearest final centroid. The same ``seed`` and inputs give the same result.
    ``gpu``: ``"auto"`` (a GPU when faiss sees one), True or False. ``threads``: faiss's OpenMP
    threads (default: faiss's own count, but one thread when ``N K D < 5e7``, where OpenMP start-up
    and spin-waiting on a shared machine cost more than the work).
    """
    import faiss

    x = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-d array [N, D], got shape {x.shape}")
    n, d = x.shape
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters={num_clusters} must be in 1..{n} (the number of points)")
    if niter < 1 or nredo < 1:
        raise ValueError(f"niter={niter} and nredo={nredo} must be >= 1")
    settings = dict(num_clusters=int(num_clusters), niter=int(niter), seed=int(seed), spherical=bool(spherical),
                    nredo=int(nredo), max_points_per_centroid=int(max_points_per_centroid), gpu=_use_gpu(gpu),
                    n=int(n), dim=int(d))
    km = faiss.Kmeans(d, int(num_clusters), niter=int(niter), seed=int(seed), spherical=bool(spherical),
                      nredo=int(nredo), max_points_per_centroid=int(max_points_per_centroid),
                      min_points_per_centroid=1, gpu=settings["gpu"], verbose=verbose)
    if threads is None and n * num_clusters * d < _SMALL_WORK:
        threads = 1
    settings["threads"] = int(threads or faiss.omp_get_max_threads())
    with _faiss_threads(threads):
        km.train(x)
        _, labels = km.index.search(x, 1)
    return KMeansResult(np.asarray(km.centroids, dtype=np.float32).copy(), labels[:, 0].astype(np.int64),
                        [float(o) for o in km.obj], settings)


def drop_small_clusters(labels, min_size: int) -> np.ndarray:
    """Labels with clusters of fewer than ``min_size`` members set to ``-1`` and the kept clusters
    renumbered ``0..C'-1`` in the order of their original ids (``min_size <= 1`` only renumbers
    away empty ids)."""
    labels = np.asarray(labels, dtype=np.int64)
    if (labels < 0).any():
        raise ValueError("labels must be non-negative cluster ids")
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    kept = np.flatnonzero(sizes >= max(int(min_size), 1))
    new_id = np.full(len(sizes), -1, dtype=np.int64)
    new_id[kept] = np.arange(len(kept))
    return new_id[labels]


def adjusted_rand_index(true_labels, cluster_labels) -> float:
    """Adjusted Rand index (Hubert & Arabie, "Comparing partitions", J. Classification 1985).

    With the contingency table ``n_ij``, row sums ``a_i``, column sums ``b_j`` and ``C(x) = x(x-1)/2``:
    ``ARI = (sum_ij C(n_ij) - E) / ((sum_i C(a_i) + sum_j C(b_j)) / 2 - E)``,
    ``E = sum_i C(a_i) sum_j C(b_j) / C(n)``. 1 for identical partitions, about 0 for random ones.
    Points with cluster label ``-1`` (dropped) are left out. Computed by
    ``sklearn.metrics.adjusted_rand_score``.
    """
    from sklearn.metrics import adjusted_rand_score

    true_labels, cluster_labels = np.asarray(true_labels), np.asarray(cluster_labels)
    if true_labels.shape != cluster_labels.shape:
        raise ValueError(f"true_labels {true_labels.shape} and cluster_labels {cluster_labels.shape} differ in shape")
    kept = cluster_labels >= 0
    return float(adjusted_rand_score(true_labels[kept], cluster_labels[kept]))


# ----------------------------------------------------------------------------- outputs
def pseudo_label_table(table: pd.DataFrame, labels) -> pd.DataFrame:
    """``table`` (rows in feature order; ``path``, optional ``domain``/``label``) relabelled by
    cluster: ``label`` = pseudo-class, ``split = "train"``, rows with label ``-1`` dropped; a true
    ``label`` column is kept as ``true_label``."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(table):
        raise ValueError(f"{len(labels)} cluster labels for a table of {len(table)} rows")
    out = pd.DataFrame({"path": table["path"].astype(str).to_numpy(), "label": labels,
                        "domain": table["domain"].astype(str).to_numpy() if "domain" in table else "unlabelled",
                        "split": "train"})
    if "label" in table:
        out["true_label"] = table["label"].to_numpy()
    return out[labels >= 0].reset_index(drop=True)


def write_pseudo_labels(table: pd.DataFrame, out_dir, name: str = "pseudo_labels") -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.csv`` (annotation table) and ``<out_dir>/<name>_class_counts.csv``.

    Pass the two paths as ``annotations`` / ``class_counts`` (and the source's root as
    ``data_root``) to train on the pseudo-classes.
    """
    out_dir = Path(out_dir)
    return (write_annotations(table, out_dir / f"{name}.csv"),
            write_class_counts(table["label"], out_dir / f"{name}_class_counts.csv"))


def plot_cluster_sizes(labels, path, min_size: Optional[int] = None, title: str = "cluster sizes") -> Path:
    """Cluster sizes, largest first (log y), with the ``min_size`` cut as a dashed line; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels, dtype=np.int64)
    sizes = np.sort(np.bincount(labels[labels >= 0]))[::-1]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(np.arange(len(sizes)), sizes, width=1.0, color="tab:blue")
    if min_size is not None and min_size > 1:
        ax.axhline(min_size, color="tab:red", linestyle="--", label=f"min_cluster_size = {min_size}")
        ax.legend()
    ax.set(yscale="log", xlabel="cluster (by size)", ylabel="images",
           title=f"{title}: {len(sizes)} clusters, median {int(np.median(sizes)) if len(sizes) else 0}")
    return save_figure(fig, path)


def class_centre_memory(num_classes: int, embedding_dim: int, k: int = 1, *, sample_rate: float = 1.0,
                        optimizer: str = "SGD", batch_size: int = 128, world_size: int = 1,
                        bytes_per_value: int = 4) -> dict:
    """Memory of a margin head's class-centre matrix ``W [num_classes * k, embedding_dim]`` per process.

    ``weights = C k D b / world_size`` (Partial FC shards the centres over ``world_size`` ranks),
    ``gradients = weights`` (the gradient of ``W`` is dense), ``optimizer_state = s * weights``
    (``s`` = 1 for SGD momentum, 2 for Adam/AdamW moments), and the per-step logits
    ``B * ceil(sample_rate * C k / world_size) * b`` for a global batch of ``B`` (Partial FC gathers
    every rank's embeddings and scores them against the sampled local centres only). ``b`` =
    ``bytes_per_value`` (4 for float32). Returns the byte counts, their sum and a one-line text.
    """
    if optimizer not in OPTIMIZER_STATE:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_STATE)}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate} must be in (0, 1]")
    local_centres = -(-num_classes * k // world_size)
    weights = local_centres * embedding_dim * bytes_per_value
    sampled = int(np.ceil(sample_rate * local_centres))
    out = {"num_classes": num_classes, "k": k, "embedding_dim": embedding_dim, "sample_rate": sample_rate,
           "world_size": world_size, "weights": weights, "gradients": weights,
           "optimizer_state": OPTIMIZER_STATE[optimizer] * weights,
           "logits": batch_size * sampled * bytes_per_value}
    out["total"] = out["weights"] + out["gradients"] + out["optimizer_state"] + out["logits"]
    out["text"] = (f"class centres {num_classes} x k={k} x D={embedding_dim}: weights {_mib(weights)}, "
                   f"+ grads {_mib(weights)} + {optimizer} state {_mib(out['optimizer_state'])} + logits "
                   f"(B={batch_size}, sample_rate={sample_rate}) {_mib(out['logits'])} = {_mib(out['total'])}"
                   + (f" per rank of {world_size}" if world_size > 1 else ""))
    return out


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.3g} MiB"


# ----------------------------------------------------------------------------- the pipeline
@dataclass
class ClusterResult:
    """What :func:`cluster_images` wrote and measured (paths under ``out_dir``)."""
    table: pd.DataFrame  # the pseudo-label annotation table (dropped images left out)
    annotations: Path  # pseudo_labels.csv
    class_counts: Path  # pseudo_labels_class_counts.csv
    plot: Path  # cluster_sizes.png
    summary: Path  # clusters.json
    kmeans: KMeansResult
    labels: np.ndarray  # per source row: pseudo-class 0..C'-1, or -1 (dropped / unreadable)
    num_clusters: int  # C', clusters kept
    ari: Optional[float]  # against the source's labels when it has them


def cluster_images(source, out_dir, model, *, num_clusters: int, data_root=None, transform="center_crop",
                   min_cluster_size: int = 1, seed: int = 0, niter: int = 20, batch_size: int = 256,
                   device: str = "cpu", cache_dir=None, gpu="auto", verbose: bool = False) -> ClusterResult:
    """Pseudo-classes for an image folder or annotation table: features -> k-means -> table.

    ``model`` embeds the images (:func:`extract_features`); ``num_clusters`` k-means clusters
    (:func:`kmeans`, ``seed``, ``niter``) of fewer than ``min_cluster_size`` images are dropped
    (:func:`drop_small_clusters`). Writes under ``out_dir``: ``pseudo_labels.csv`` and
    ``pseudo_labels_class_counts.csv`` (train with ``data_root`` = the source's root,
    ``annotations`` / ``class_counts`` = these files), ``cluster_sizes.png`` and ``clusters.json``
    (settings, sizes, ARI). When the source has true labels, their adjusted Rand index is computed.
    Feature extraction shows a progress bar; ``verbose`` prints faiss's k-means iterations.
    """
    import json

    table, root = read_source(source, data_root)
    feats = extract_features(model, table, root, transform, batch_size=batch_size, device=device,
                             cache_dir=cache_dir)
    readable = np.flatnonzero(np.linalg.norm(feats, axis=1) > 0)
    result = kmeans(feats[readable], num_clusters, niter=niter, seed=seed, gpu=gpu, verbose=verbose)
    labels = np.full(len(table), -1, dtype=np.int64)
    labels[readable] = drop_small_clusters(result.labels, min_cluster_size)
    out_dir = Path(out_dir)
    pseudo = pseudo_label_table(table, labels)
    annotations, class_counts = write_pseudo_labels(pseudo, out_dir)
    plot = plot_cluster_sizes(labels, out_dir / "cluster_sizes.png", min_cluster_size)
    ari = adjusted_rand_index(table["label"], labels) if "label" in table else None
    kept = int(labels.max()) + 1 if (labels >= 0).any() else 0
    summary = out_dir / "clusters.json"
    summary.write_text(json.dumps({
        "source": str(source), "data_root": str(root), "model": getattr(model, "model_id", type(model).__name__),
        "kmeans": result.settings, "min_cluster_size": int(min_cluster_size), "images": len(table),
        "unreadable": int(len(table) - len(readable)), "dropped": int((labels < 0).sum()),
        "clusters_kept": kept, "cluster_sizes": np.bincount(labels[labels >= 0], minlength=kept).tolist(),
        "objective": result.objective[-1] if result.objective else None, "ari": ari}, indent=1))
    return ClusterResult(pseudo, annotations, class_counts, plot, summary, result, labels, kept, ari)


def compare_with_zero_shot(params, num_clusters: int, *, min_cluster_size: int = 2, seed: int = 0,
                           split: str = "test", supervised: bool = True) -> pd.DataFrame:
    """Cluster discrimination against the zero-shot baseline of the same backbone, on held-out classes.

    1. ``zero-shot``: ``params``' backbone (built as :func:`unifex_lib.train.train` builds it, same
       seed) with the weight-free ``pooling`` neck, evaluated on the UnED ``split``;
    2. the training images (``params.data.annotations``; their labels unused) are clustered with
       that backbone's features (:func:`cluster_images`, ``num_clusters``, ``min_cluster_size``,
       ``seed``) into ``<output_dir>/<run_name>_clusters/``;
    3. ``pseudo-labels``: :func:`unifex_lib.train.train` on the pseudo-label table (run
       ``<run_name>_pseudo``), its best checkpoint evaluated on ``split``;
    4. ``supervised`` (reference, when ``supervised``): the same recipe on the true labels
       (run ``<run_name>_supervised``).

    Training picks its best checkpoint on ``params.eval.eval_split`` (keep it ``val`` when ``split``
    is ``test``). Returns one row per model: ``model, classes, ARI, <metrics>, class_centre_MiB``
    (weights + gradients + optimizer state + logits, :func:`class_centre_memory`), also written to
    ``<output_dir>/<run_name>_clusters/cluster_vs_zero_shot.csv``.
    """
    import dataclasses

    import torch

    from unifex_lib.data.transforms import create_transform
    from unifex_lib.models import create_model
    from unifex_lib.train import load_checkpoint_model, train
    from unifex_lib.training.distributed import resolve_device
    from unifex_lib.uned import evaluate_uned

    p, e = params, params.eval
    device = str(resolve_device(p.train.device))
    out_dir = Path(p.output_dir) / f"{p.run_name}_clusters"

    def evaluate(model) -> dict:
        table = evaluate_uned(model.eval(), p.eval_root, domains=p.data.eval_domains, split=split,
                              mode=e.eval_mode, transform=create_transform(p.data.eval_transform, model.data_config),
                              batch_size=e.eval_batch_size, device=device, metrics=e.metrics, backend=e.knn_backend)
        return table[table["domain"] == "mean"].iloc[0][list(e.metrics)].to_dict()

    def memory(num_classes: int) -> float:
        return class_centre_memory(num_classes, p.model.embedding_dim, p.head.k, sample_rate=p.head.sample_rate,
                                   optimizer=p.train.optimizer, batch_size=p.train.batch_size)["total"] / 2 ** 20

    torch.manual_seed(p.train.seed)  # train() seeds the same way before building its model
    zero_shot = create_model(dataclasses.replace(p.model, neck="pooling"), image_size=p.data.image_size)
    rows = [{"model": "zero-shot", "classes": 0, "ARI": None, **evaluate(zero_shot), "class_centre_MiB": 0.0}]
    clusters = cluster_images(p.data_path(p.data.annotations), out_dir, zero_shot.backbone, num_clusters=num_clusters,
                              data_root=p.data.data_root, transform=p.data.train_transform,
                              min_cluster_size=min_cluster_size, seed=seed, batch_size=e.eval_batch_size,
                              device=device, cache_dir=Path(p.output_dir) / "feature_cache")
    runs = [("pseudo-labels", dataclasses.replace(p, run_name=f"{p.run_name}_pseudo", data=dataclasses.replace(
        p.data, annotations=str(clusters.annotations.resolve()), class_counts=str(clusters.class_counts.resolve()))),
        clusters.num_clusters, clusters.ari)]
    if supervised:
        num_classes = int(pd.read_csv(p.data_path(p.data.annotations))["label"].max()) + 1
        runs.append(("supervised", dataclasses.replace(p, run_name=f"{p.run_name}_supervised"), num_classes, 1.0))
    for name, run_params, num_classes, ari in runs:
        train(run_params)
        model, _ = load_checkpoint_model(run_params.run_dir)
        rows.append({"model": name, "classes": num_classes, "ARI": ari, **evaluate(model),
                     "class_centre_MiB": memory(num_classes)})
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "cluster_vs_zero_shot.csv", index=False)
    return table
