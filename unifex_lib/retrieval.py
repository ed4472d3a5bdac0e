"""k-nearest-neighbour search and retrieval metrics.

Search (:func:`build_index` / :func:`knn_search`): similarity is the inner product of the
(L2-normalised) embeddings.

* ``faiss`` (Johnson et al., "Billion-scale similarity search with GPUs", arXiv:1702.08734):
  ``faiss_index="flat"`` is exact (``IndexFlatIP``); ``"ivf"`` (inverted lists: ``nlist``
  k-means cells, default ``min(4 sqrt(N), N / 39)``, trained on ``64 nlist`` sampled items;
  ``nprobe`` cells visited per query) and ``"hnsw"`` (Malkov & Yashunin, "Efficient and robust
  approximate nearest neighbor search using Hierarchical Navigable Small World graphs",
  arXiv:1603.09320; ``hnsw_m`` links, ``ef_search``) are approximate. ``device="cuda[:N]"``
  moves the index to a GPU (needs a faiss build with GPU support, e.g. ``faiss-gpu``).
* ``torch``: brute force ``Q @ X^T`` and ``torch.topk`` on any torch device (the reference).
* ``annoy`` (Spotify's random-projection forests): ``annoy_metric`` and ``n_trees`` (300 in
  the earlier PyTorch UnED evaluation), ``search_k``; approximate.

Queries are searched in chunks of ``chunk_size`` so memory stays bounded. Every backend
returns ``(scores [Q,k] float32, ids [Q,k] int64)``, best first; a missing neighbour (an
approximate index that found fewer than ``k``) has id ``-1`` and score ``-inf``.

Metrics are plain functions of a relevance matrix ``rel [Q,k]`` (``rel[q, j-1]`` = 1 when
the ``j``-th neighbour of ``q`` is relevant, the query itself already excluded) and
``n_q [Q]`` (number of relevant index items of ``q``). With ``P@j = (1/j) sum_{i<=j} rel_i``:

* ``R@1 = rel_1``; ``Recall@K = 1[sum_{j<=K} rel_j > 0]`` (hit rate, K in 1, 10, 100, 1000, ...)
* ``mMP@5 = (1/min(n_q,5)) sum_{j<=min(n_q,5)} rel_j`` (modified mean precision, UnED /
  Kaggle GUIEC; Ypsilantis et al., "Towards Universal Image Embeddings", arXiv:2309.01858)
* ``mAP@5 = (1/min(n_q,5)) sum_{j<=5} P@j rel_j`` (as the official UnED code)
* ``R-precision = (1/R) sum_{j<=R} rel_j`` and ``MAP@R = (1/R) sum_{j<=R} P@j rel_j`` with
  ``R = n_q`` (Musgrave et al., "A Metric Learning Reality Check", arXiv:2003.08505)
* ``mAP = (1/n_q) sum_{j<=k} P@j rel_j``: average precision over the top ``k``; exact when
  ``k`` reaches the rank of the last relevant item (``evaluate`` then searches the whole index).

A query with ``n_q = 0`` has no defined value (NaN); means are taken over the queries with
``n_q > 0`` (as pytorch-metric-learning's "lone queries") and the ``n_q = 0`` count is reported.
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import numpy as np
import torch

BACKENDS = ("faiss", "torch", "annoy")
FAISS_INDEXES = ("flat", "ivf", "hnsw")
ANNOY_METRICS = ("angular", "dot", "euclidean")


# ----------------------------------------------------------------------------- search
def _as_float32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array [N, D], got shape {x.shape}")
    return x


def _faiss_gpu_id(device: str) -> Optional[int]:
    """None for CPU, the GPU number for ``cuda`` / ``cuda:N``."""
    if device == "cpu":
        return None
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"device={device!r} is not valid; choose cpu, cuda or cuda:N")
    return int(device.partition(":")[2] or 0)


class KnnIndex:
    """An index over ``[N, D]`` embeddings; :meth:`search` finds the ``k`` best by inner product."""

    def __init__(self, index, backend: str = "faiss", *, faiss_index: str = "flat", nlist: Optional[int] = None,
                 nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 128, annoy_metric: str = "angular",
                 n_trees: int = 300, search_k: int = -1, device: str = "cpu", chunk_size: int = 8192,
                 seed: int = 0):
        if backend not in BACKENDS:
            raise ValueError(f"unknown kNN backend '{backend}'; choose one of {', '.join(BACKENDS)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        self.backend, self.device, self.chunk_size = backend, device, chunk_size
        x = _as_float32(index)
        self.ntotal, self.dim = x.shape
        if backend == "faiss":
            self._index = self._build_faiss(x, faiss_index, nlist, nprobe, hnsw_m, ef_search, seed)
        elif backend == "torch":
            self._index = torch.from_numpy(x).to(device)
        else:
            self._index = self._build_annoy(x, annoy_metric, n_trees, seed)
            self._annoy_metric, self._search_k = annoy_metric, search_k

    def _build_faiss(self, x, kind, nlist, nprobe, hnsw_m, ef_search, seed):
        import faiss

        gpu = _faiss_gpu_id(self.device)
        if kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif kind == "ivf":
            nlist = nlist or max(1, min(int(4 * np.sqrt(self.ntotal)), self.ntotal // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(seed).permutation(self.ntotal)[:64 * nlist]  # k-means training set
            index.cp.seed = seed
            index.train(x[np.sort(sample)])
            index.nprobe = nprobe
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
        else:
            raise ValueError(f"unknown faiss_index '{kind}'; choose one of {', '.join(FAISS_INDEXES)}")
        if gpu is not None:
            if not hasattr(faiss, "StandardGpuResources"):
                raise RuntimeError(f"device={self.device!r} needs a faiss build with GPU support (faiss-gpu); "
                                   "this one is CPU-only: use device='cpu'")
            if kind == "hnsw":
                raise ValueError("faiss_index='hnsw' has no GPU version; use 'flat' or 'ivf', or device='cpu'")
            self._gpu_res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_res, gpu, index)
        index.add(x)
        return index

    def _build_annoy(self, x, metric, n_trees, seed):
        try:
            from annoy import AnnoyIndex
        except ImportError:
            raise ImportError("backend='annoy' needs the annoy package: pip install annoy "
                              "(part of the dev extra: pip install -e '.[dev]')") from None

        if metric not in ANNOY_METRICS:
            raise ValueError(f"unknown annoy_metric '{metric}'; choose one of {', '.join(ANNOY_METRICS)}")
        index = AnnoyIndex(self.dim, metric)
        index.set_seed(seed)
        for i, v in enumerate(x):
            index.add_item(i, v)
        index.build(n_trees, n_jobs=-1)
        return index

    def search(self, queries, k: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [Q,k], ids [Q,k])`` of the ``k`` most similar index items, best first."""
        q = _as_float32(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        kk = min(k, self.ntotal)
        starts = range(0, len(q), self.chunk_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc=f"kNN search ({self.backend})", unit="chunk")
        for s in starts:
            e = min(s + self.chunk_size, len(q))
            scores[s:e, :kk], ids[s:e, :kk] = self._search_chunk(q[s:e], kk)
        return scores, ids

    def _search_chunk(self, q: np.ndarray, k: int):
        if self.backend == "faiss":
            return self._index.search(q, k)
        if self.backend == "torch":
            sims = torch.from_numpy(q).to(self.device) @ self._index.T
            top = torch.topk(sims, k, dim=1)
            return top.values.cpu().numpy(), top.indices.cpu().numpy()
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        for i, v in enumerate(q):
            nn, dist = self._index.get_nns_by_vector(v, k, search_k=self._search_k, include_distances=True)
            dist = np.asarray(dist, dtype=np.float32)
            # annoy's angular distance is sqrt(2 - 2 cos) and euclidean |a-b|: for unit vectors
            # the inner product is 1 - d^2 / 2; its 'dot' metric returns the inner product itself
            scores[i, :len(nn)] = dist if self._annoy_metric == "dot" else 1.0 - dist ** 2 / 2.0
            ids[i, :len(nn)] = nn
        return scores, ids


def build_index(index, backend: str = "faiss", **options) -> KnnIndex:
    """Build a :class:`KnnIndex` once, to search several query sets (options as ``KnnIndex``)."""
    return KnnIndex(index, backend, **options)


def knn_search(queries, index, k: int, backend: str = "faiss", **options) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [Q,k], ids [Q,k])``: the ``k`` index items of largest inner product per query.

    ``backend``: faiss | torch | annoy; ``options`` as :class:`KnnIndex` (``faiss_index``,
    ``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``, ``annoy_metric``, ``n_trees``,
    ``search_k``, ``device``, ``chunk_size``). Ties are ordered as the backend orders them.
    """
    return build_index(index, backend, **options).search(queries, k)


def exclude_self(scores: np.ndarray, ids: np.ndarray, self_ids: np.ndarray, k: int):
    """Drop each query's own index entry *by identity* from ``k + 1`` neighbours, keep ``k``.

    ``self_ids[q]`` is the position of query ``q`` in the index (``-1`` when it is not
    there). The column whose id equals ``self_ids[q]`` is removed wherever it is ranked;
    when it is not among the ``k + 1`` (or ``self_ids[q] = -1``), the last column is.

    This differs from dropping rank 1 (the official UnED code, pytorch-metric-learning's
    ``ref_includes_query``) when another index item scores as high as the query itself: an
    exact duplicate image, or a tie in the scores. The search may then rank the duplicate
    first and the query second; dropping rank 1 would remove the duplicate (a relevant hit,
    if it has the query's class) and count the query itself as its own neighbour, while
    identity removes the query and keeps the duplicate. Without ties the two agree.
    """
    if ids.shape[1] != k + 1:
        raise ValueError(f"exclude_self needs k + 1 = {k + 1} neighbours per query, got {ids.shape[1]}")
    self_ids = np.asarray(self_ids, dtype=np.int64)[:, None]
    keep = (ids != self_ids) | (self_ids < 0)
    keep[keep.all(axis=1), -1] = False
    return scores[keep].reshape(len(ids), k), ids[keep].reshape(len(ids), k)


# ----------------------------------------------------------------------------- labels / relevance
def label_matrix(labels) -> np.ndarray:
    """Labels as int64 ``[N, L]``, ``-1`` padded: each item's classes (an int or a list of ints)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    if isinstance(labels, np.ndarray) and labels.dtype != object:
        out = labels.astype(np.int64)
        return out[:, None] if out.ndim == 1 else out
    rows = [list(c) if isinstance(c, (list, tuple, np.ndarray)) else [c] for c in labels]
    width = max((len(r) for r in rows), default=1)
    out = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        if any(int(c) < 0 for c in r):
            raise ValueError(f"item {i}: class ids must be >= 0 (got {r})")
        out[i, :len(r)] = r
    return out


def relevance(query_labels: np.ndarray, index_labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``rel [Q,k]``: neighbour ``ids[q, j]`` shares at least one class with query ``q`` (ids ``-1``: 0)."""
    nb = index_labels[np.maximum(ids, 0)]  # [Q, k, Li]
    match = (query_labels[:, None, :, None] == nb[:, :, None, :]) & (query_labels[:, None, :, None] >= 0)
    return match.any(axis=(2, 3)) & (ids >= 0)


def count_relevant(query_labels: np.ndarray, index_labels: np.ndarray, self_ids=None) -> np.ndarray:
    """``n_q [Q]``: index items having class c, summed over the query's classes c, minus 1 for self."""
    n_q = np.zeros(len(query_labels), dtype=np.int64)
    values, counts = np.unique(index_labels[index_labels >= 0], return_counts=True)
    if len(values):
        pos = np.minimum(np.searchsorted(values, query_labels), len(values) - 1)
        n_q = np.where((query_labels >= 0) & (values[pos] == query_labels), counts[pos], 0).sum(axis=1)
    if self_ids is not None:
        n_q = n_q - (np.asarray(self_ids) >= 0)
    return n_q.astype(np.int64)


# ----------------------------------------------------------------------------- metrics
def _precision_at_j(rel: np.ndarray) -> np.ndarray:
    return np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)


def _per_query(values: np.ndarray, n_q: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(n_q) > 0, values, np.nan)


def _need_columns(rel: np.ndarray, k: int, name: str) -> None:
    if rel.shape[1] < k:
        raise ValueError(f"{name} needs at least {k} neighbours per query, got {rel.shape[1]}")


def recall_at_k(rel: np.ndarray, n_q: np.ndarray, k: int = 1) -> np.ndarray:
    """Per query ``1[sum_{j<=k} rel_j > 0]`` (``R@1`` is ``k=1``); NaN where ``n_q = 0``."""
    _need_columns(rel, k, f"Recall@{k}")
    return _per_query(rel[:, :k].any(axis=1).astype(np.float64), n_q)


def mmp_at_k(rel: np.ndarray, n_q: np.ndarray, k: int = 5) -> np.ndarray:
    """Per query ``(1/min(n_q,k)) sum_{j<=min(n_q,k)} rel_j``; NaN where ``n_q = 0``."""
    _need_columns(rel, k, f"mMP@{k}")
    m = np.minimum(np.asarray(n_q), k)
    hits = (rel[:, :k] * (np.arange(k) < m[:, None])).sum(axis=1)
    return _per_query(hits / np.maximum(m, 1), n_q)


def map_at_k(rel: np.ndarray, n_q: np.ndarray, k: int = 5) -> np.ndarray:
    """Per query ``(1/min(n_q,k)) sum_{j<=k} P@j rel_j``; NaN where ``n_q = 0``."""
    _need_columns(rel, k, f"mAP@{k}")
    r = rel[:, :k].astype(np.float64)
    return _per_query((_precision_at_j(r) * r).sum(axis=1) / np.maximum(np.minimum(n_q, k), 1), n_q)


def _at_r(rel: np.ndarray, n_q: np.ndarray, name: str) -> np.ndarray:
    """``rel`` with the ranks after ``R = n_q`` zeroed, truncated to ``max R`` columns."""
    r_max = max(int(np.max(n_q, initial=0)), 1)
    _need_columns(rel, r_max, name)
    return rel[:, :r_max] * (np.arange(r_max) < np.asarray(n_q)[:, None])


def r_precision(rel: np.ndarray, n_q: np.ndarray) -> np.ndarray:
    """Per query ``(1/R) sum_{j<=R} rel_j``, ``R = n_q``; NaN where ``n_q = 0``."""
    r = _at_r(rel, n_q, "R-precision")
    return _per_query(r.sum(axis=1) / np.maximum(n_q, 1), n_q)


def map_at_r(rel: np.ndarray, n_q: np.ndarray) -> np.ndarray:
    """Per query ``(1/R) sum_{j<=R} P@j rel_j``, ``R = n_q``; NaN where ``n_q = 0``."""
    r = _at_r(rel, n_q, "MAP@R").astype(np.float64)
    return _per_query((_precision_at_j(r) * r).sum(axis=1) / np.maximum(n_q, 1), n_q)


def average_precision(rel: np.ndarray, n_q: np.ndarray) -> np.ndarray:
    """Per query ``(1/n_q) sum_{j<=k} P@j rel_j`` over all ``k`` columns; NaN where ``n_q = 0``."""
    r = rel.astype(np.float64)
    return _per_query((_precision_at_j(r) * r).sum(axis=1) / np.maximum(n_q, 1), n_q)


_PATTERNS: tuple[tuple[str, Callable, Callable], ...] = (
    # regex, metric(rel, n_q, K), neighbours needed(K, max n_q, n_index)
    (r"R@1", lambda rel, n_q, _: recall_at_k(rel, n_q, 1), lambda _, __, ___: 1),
    (r"Recall@(\d+)", recall_at_k, lambda k, _, __: k),
    (r"mMP@(\d+)", mmp_at_k, lambda k, _, __: k),
    (r"mAP@(\d+)", map_at_k, lambda k, _, __: k),
    (r"MAP@R", lambda rel, n_q, _: map_at_r(rel, n_q), lambda _, r, __: r),
    (r"R-precision", lambda rel, n_q, _: r_precision(rel, n_q), lambda _, r, __: r),
    (r"mAP", lambda rel, n_q, _: average_precision(rel, n_q), lambda _, __, n: n),
)
METRICS = ("R@1", "mMP@5", "mAP@5", "Recall@1", "Recall@10", "Recall@100", "Recall@1000", "MAP@R",
           "R-precision", "mAP")


def _resolve_metric(name: str):
    for pattern, fn, need in _PATTERNS:
        m = re.fullmatch(pattern, name)
        if m:
            k = int(m.group(1)) if m.groups() else 0
            if m.groups() and k < 1:
                break
            return (lambda rel, n_q: fn(rel, n_q, k)), (lambda r, n: need(k, r, n))
    raise ValueError(f"unknown metric '{name}'; choose from {', '.join(METRICS)} "
                     "(any K >= 1 in Recall@K, mMP@K, mAP@K)")


def check_metrics(metrics: Sequence[str]) -> list[str]:
    """Validate metric names (raises ``ValueError`` naming the valid ones); returns them as a list."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    for name in metrics:
        _resolve_metric(name)
    return metrics


def compute_metrics(rel: np.ndarray, n_q: np.ndarray, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-query values ``{name: [Q]}`` of each metric from ``rel [Q,k]`` and ``n_q [Q]``."""
    return {name: _resolve_metric(name)[0](rel, np.asarray(n_q)) for name in check_metrics(metrics)}


def summarize(per_query: dict, n_q: np.ndarray) -> dict:
    """Means over queries with ``n_q > 0``, plus ``n_queries`` and ``n_q0`` (queries with ``n_q = 0``)."""
    n_q = np.asarray(n_q)
    out = {name: float(np.nanmean(v)) if (n_q > 0).any() else float("nan") for name, v in per_query.items()}
    out.update(n_queries=int(len(n_q)), n_q0=int((n_q == 0).sum()))
    return out


def evaluate(queries, index, query_labels, index_labels, metrics: Sequence[str] = ("R@1", "mMP@5"), *,
             self_ids=None, k: Optional[int] = None, backend: str = "faiss", per_query: bool = False,
             progress: bool = False, **search_options):
    """Search once and compute ``metrics``.

    ``query_labels`` / ``index_labels``: one class (int) or a list of classes per item; a
    neighbour is relevant when it shares a class with the query. ``self_ids[q]``: position of
    query ``q`` in ``index`` (``-1``: not there), excluded by identity (:func:`exclude_self`);
    pass ``self_ids=np.arange(N)`` when queries and index are the same set (leave-one-out).
    ``k``: neighbours searched (default: the most any metric needs; ``mAP``, ``MAP@R`` and
    ``R-precision`` need up to the whole index / max ``n_q``), capped at the index size.

    Returns ``{metric: mean over queries with n_q > 0, "n_queries", "n_q0"}``, or with
    ``per_query=True`` ``({metric: [Q] values}, n_q [Q])``.
    """
    metrics = check_metrics(metrics)
    q_lab, i_lab = label_matrix(query_labels), label_matrix(index_labels)
    n_q = count_relevant(q_lab, i_lab, self_ids)
    n_index = len(i_lab) - (0 if self_ids is None else 1)
    if k is None:
        r_max = int(np.max(n_q, initial=0))
        k = max(_resolve_metric(m)[1](r_max, n_index) for m in metrics)
    k = max(k, 1)
    k_search = max(1, min(k, n_index))
    extra = 0 if self_ids is None else 1
    scores, ids = build_index(index, backend, **search_options).search(queries, k_search + extra,
                                                                        progress=progress)
    if self_ids is not None:
        scores, ids = exclude_self(scores, ids, self_ids, k_search)
    rel = relevance(q_lab, i_lab, ids)
    # ranks beyond the index size hold nothing relevant: pad so Recall@1000 works on a small index
    rel = np.pad(rel, ((0, 0), (0, k - k_search)))
    values = compute_metrics(rel, n_q, metrics)
    return (values, n_q) if per_query else summarize(values, n_q)
