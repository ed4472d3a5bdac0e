"""The UnED benchmark protocol: split files, embedding extraction, merged / separate evaluation.

Ypsilantis et al., "Towards Universal Image Embeddings: A Large-Scale Dataset and Challenge
for Generic Image Representations", ICCV 2023, arXiv:2309.01858; rules as in the official
code (github.com/nikosips/Universal-Image-Embeddings, ``dataset_infos.py`` / ``knn_utils.py``).

Data layout: ``<data_root>/info_files/<domain>/<split>.json`` (a list of ``{"path",
"class_id": int | [int]}``), image paths relative to ``<data_root>/images``.

* Queries and index per domain (:func:`query_index_splits`): split ``test`` queries search
  ``test`` itself (leave-one-out) for cars, sop, inat, food2k, rp2k and the ``index`` split for
  inshop, met, gldv2; split ``val`` queries search ``val``, except met which searches
  ``small_index``. Any other domain (the demo data) searches the split itself, leave-one-out.
* ``merged`` mode (the benchmark's standard): all domains' index sets are concatenated and
  every query searches the whole merged index; a neighbour is relevant only if it is of the
  query's domain *and* shares a class id. ``separate`` mode: each domain searches its own index.
* Similarity is the dot product of L2-normalised embeddings, exact search by default.
* ``n_q`` = index items of the query's domain whose class matches (for a list of classes,
  summed over them), minus 1 when the query itself is in the index. The query is excluded
  by identity (its position in the split), see :func:`unifex_lib.retrieval.exclude_self`.
* Metrics per domain (``R@1``, ``mMP@5``, ... as :mod:`unifex_lib.retrieval`), means over the
  domain's queries with ``n_q > 0``; queries with ``n_q = 0`` are counted in ``n_q0``. The
  headline is the unweighted mean over domains (row ``domain = "mean"``).

Where this differs from the official code: it drops rank 1 instead of the query by identity
(the same results unless a duplicate or a tie outranks the query itself), and a query with
``n_q = 0`` would count as an R@1 miss and divide by zero in mMP@5 there (it assumes the UnED splits
have none; the demo data and custom splits can have them).
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from unifex_lib.data.annotations import read_split_file
from unifex_lib.retrieval import check_metrics, evaluate, label_matrix, summarize
from unifex_lib.plots import save_figure

UNED_DOMAINS = ("cars", "sop", "inshop", "inat", "met", "gldv2", "food2k", "rp2k")
SPLITS = ("test", "val")
MODES = ("merged", "separate", "both")
# (domain, query split) -> index split; everything not listed searches the query split itself
_INDEX_SPLIT = {("inshop", "test"): "index", ("met", "test"): "index", ("gldv2", "test"): "index",
                ("met", "val"): "small_index"}
_CLASS_BITS = 40  # merged labels: domain number * 2**40 + class id


def query_index_splits(domain: str, split: str = "test") -> tuple[str, str]:
    """``(query split, index split)`` of ``domain`` for the ``test`` or ``val`` protocol."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; choose one of {', '.join(SPLITS)}")
    return split, _INDEX_SPLIT.get((domain, split), split)


def list_domains(data_root, split: str = "test") -> list[str]:
    """Domains under ``<data_root>/info_files`` having the files ``split`` needs (UnED order first)."""
    info = Path(data_root) / "info_files"
    if not info.is_dir():
        raise FileNotFoundError(f"no info_files/ folder in {data_root} (expected info_files/<domain>/<split>.json)")
    found = [d.name for d in info.iterdir() if d.is_dir()
             and all((d / f"{s}.json").is_file() for s in query_index_splits(d.name, split))]
    return sorted(found, key=lambda d: (UNED_DOMAINS.index(d) if d in UNED_DOMAINS else len(UNED_DOMAINS), d))


def split_file(data_root, domain: str, split: str) -> Path:
    return Path(data_root) / "info_files" / domain / f"{split}.json"


def load_split(data_root, domain: str, split: str) -> list[dict]:
    """The items ``[{"path", "class_id"}]`` of ``info_files/<domain>/<split>.json``, in file order."""
    return read_split_file(split_file(data_root, domain, split))


# ----------------------------------------------------------------------------- embeddings
def model_fingerprint(model: torch.nn.Module) -> str:
    """sha1 of the model's class name and state dict (names, shapes, values): the cache key of a model."""
    h = hashlib.sha1(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_transform(model: torch.nn.Module, name: str = "center_crop") -> Callable:
    """The deterministic eval transform from ``model.data_config`` (size, mean, std)."""
    from unifex_lib.data.transforms import create_transform

    config = getattr(model, "data_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no data_config; pass transform= explicitly "
                         "(e.g. unifex_lib.data.transforms.pil_to_tensor for an exported GUIEC model)")
    return create_transform(name, config, train=False)


@torch.no_grad()
def extract_embeddings(model: torch.nn.Module, items: Sequence[dict], images_root, transform: Callable, *,
                       batch_size: int = 256, device: str = "cpu", num_workers: int = 0,
                       cache_path=None, desc: str = "embeddings") -> np.ndarray:
    """L2-normalised float32 ``[N, D]`` embeddings of ``items`` (split-file entries), in file order.

    With ``cache_path`` (a ``.npy`` file) the array is read from there if present, else
    computed and written. An image that cannot be decoded is listed in a warning and gets a
    zero embedding (it is then never anyone's neighbour by a positive score).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from unifex_lib.data.dataset import ImageDataset, collate_skip_bad

    if cache_path is not None and Path(cache_path).is_file():
        return np.load(cache_path)
    dataset = ImageDataset([it["path"] for it in items], [0] * len(items), images_root, transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip_bad)
    was_training = model.training
    model.eval().to(device)
    out: Optional[np.ndarray] = None
    seen = np.zeros(len(items), dtype=bool)
    try:
        for batch in tqdm(loader, desc=desc, unit="batch"):
            if batch is None:  # no image of this batch decoded
                continue
            images, _, idx = batch
            emb = model(images.to(device)).float()
            emb = torch.nn.functional.normalize(emb, dim=1).cpu().numpy()
            if out is None:
                out = np.zeros((len(items), emb.shape[1]), dtype=np.float32)
            out[idx.numpy()] = emb
            seen[idx.numpy()] = True
    finally:
        model.train(was_training)
    if out is None:
        raise ValueError(f"{desc}: none of the {len(items)} images could be read from {images_root}")
    if not seen.all():
        bad = [items[i]["path"] for i in np.flatnonzero(~seen)]
        warnings.warn(f"{desc}: {len(bad)} unreadable image(s) got a zero embedding: {bad[:10]}")
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cache_path).with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(cache_path)
    return out


def _cache_path(cache_dir, model_key: str, data_root, domain: str, split: str, transform) -> Optional[Path]:
    """``<cache_dir>/<model key>/<domain>_<split>_<sha1(split file, transform)>.npy``."""
    if cache_dir is None:
        return None
    h = hashlib.sha1(split_file(data_root, domain, split).read_bytes())
    h.update(repr(transform).encode())
    return Path(cache_dir) / re.sub(r"[^\w.-]", "_", model_key)[:120] / f"{domain}_{split}_{h.hexdigest()[:16]}.npy"


# ----------------------------------------------------------------------------- evaluation
def _merged_labels(class_ids: Sequence, domain_number: int) -> np.ndarray:
    """``[N, L]`` labels ``domain_number * 2**40 + class_id`` (-1 padded) so classes never match across domains."""
    lab = label_matrix(class_ids)
    if (lab >= 2 ** _CLASS_BITS).any():
        raise ValueError(f"class ids must be < 2**{_CLASS_BITS}")
    return np.where(lab >= 0, lab + (domain_number << _CLASS_BITS), -1)


def _pad_cat(mats: Sequence[np.ndarray]) -> np.ndarray:
    width = max(m.shape[1] for m in mats)
    return np.concatenate([np.pad(m, ((0, 0), (0, width - m.shape[1])), constant_values=-1) for m in mats])


def evaluate_embeddings(embeddings: dict, labels: dict, domains: Sequence[str], split: str = "test",
                        mode: str = "merged", metrics: Sequence[str] = ("R@1", "mMP@5"), **knn_options) -> pd.DataFrame:
    """The UnED tables from embeddings already extracted.

    ``embeddings[(domain, split_name)]``: ``[N, D]``; ``labels[(domain, split_name)]``: the
    items' class ids (int or list). Returns one row per domain and a ``mean`` row per mode,
    columns ``mode, domain, <metrics>, n_queries, n_index, n_q0``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not valid; choose one of {', '.join(MODES)}")
    metrics = check_metrics(metrics)
    modes = ("merged", "separate") if mode == "both" else (mode,)
    splits = {d: query_index_splits(d, split) for d in domains}
    lab = {d: (_merged_labels(labels[(d, q)], n), _merged_labels(labels[(d, i)], n))
           for n, (d, (q, i)) in enumerate(splits.items())}
    columns = ["mode", "domain", *metrics, "n_queries", "n_index", "n_q0"]
    tables = []
    for m in modes:
        rows = []
        for group in ([list(domains)] if m == "merged" else [[d] for d in domains]):
            index_offsets = np.cumsum([0] + [len(lab[d][1]) for d in group])
            self_ids = np.concatenate([
                (np.arange(len(lab[d][0])) + off) if splits[d][0] == splits[d][1] else np.full(len(lab[d][0]), -1)
                for d, off in zip(group, index_offsets)])
            values, n_q = evaluate(
                np.concatenate([embeddings[(d, splits[d][0])] for d in group]),
                np.concatenate([embeddings[(d, splits[d][1])] for d in group]),
                _pad_cat([lab[d][0] for d in group]), _pad_cat([lab[d][1] for d in group]), metrics,
                self_ids=self_ids, per_query=True, **knn_options)
            starts = np.cumsum([0] + [len(lab[d][0]) for d in group])
            for d, s, e in zip(group, starts[:-1], starts[1:]):
                row = summarize({k: v[s:e] for k, v in values.items()}, n_q[s:e])
                rows.append(dict(mode=m, domain=d, **row, n_index=int(index_offsets[-1])))
        table = pd.DataFrame(rows, columns=columns)
        mean = dict(mode=m, domain="mean", **table[metrics].mean().to_dict(), n_queries=table["n_queries"].sum(),
                    n_index=table["n_index"].max() if m == "merged" else table["n_index"].sum(),
                    n_q0=table["n_q0"].sum())
        tables.append(pd.concat([table, pd.DataFrame([mean], columns=columns)], ignore_index=True))
    return pd.concat(tables, ignore_index=True)


def evaluate_uned(model: torch.nn.Module, data_root, domains: Optional[Sequence[str]] = None, split: str = "test",
                  mode: str = "merged", transform: Optional[Callable] = None, batch_size: int = 256,
                  cache_dir=None, device: str = "cpu", *, metrics: Sequence[str] = ("R@1", "mMP@5"),
                  images_root=None, model_id: Optional[str] = None, backend: str = "faiss",
                  knn_device: Optional[str] = None, num_workers: int = 0, **knn_options) -> pd.DataFrame:
    """Extract (or read cached) embeddings of every split the protocol needs, then evaluate.

    ``domains``: default every domain folder having the split's files. ``transform``: PIL image
    -> tensor (default: the ``center_crop`` transform of ``model.data_config``). ``cache_dir``:
    embeddings cached as ``.npy`` keyed by ``model_id`` (default: a fingerprint of the
    weights), the split file's content and the transform. ``knn_device``: where faiss / torch
    search (default: ``device`` when it is a GPU and the backend can use it, else ``cpu``).
    Returns the table of :func:`evaluate_embeddings`.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not valid; choose one of {', '.join(MODES)}")
    metrics = check_metrics(metrics)
    domains = list(domains) if domains is not None else list_domains(data_root, split)
    if not domains:
        raise ValueError(f"no domain in {Path(data_root) / 'info_files'} has the files of split {split!r}")
    images_root = Path(images_root) if images_root is not None else Path(data_root) / "images"
    transform = transform if transform is not None else default_transform(model)
    model_key = model_id or (model_fingerprint(model) if cache_dir is not None else "")
    if knn_device is None:
        import faiss

        gpu_ok = backend == "torch" or (backend == "faiss" and hasattr(faiss, "StandardGpuResources"))
        knn_device = device if device.startswith("cuda") and gpu_ok else "cpu"
    embeddings, labels = {}, {}
    for d in domains:
        for s in dict.fromkeys(query_index_splits(d, split)):
            items = load_split(data_root, d, s)
            labels[(d, s)] = [it["class_id"] for it in items]
            embeddings[(d, s)] = extract_embeddings(
                model, items, images_root, transform, batch_size=batch_size, device=device,
                num_workers=num_workers, cache_path=_cache_path(cache_dir, model_key, data_root, d, s, transform),
                desc=f"{d}/{s}")
    return evaluate_embeddings(embeddings, labels, domains, split, mode, metrics, backend=backend,
                               device=knn_device, **knn_options)


# ----------------------------------------------------------------------------- notebooks: zero-shot, runs, plots
def config_name(config: dict) -> str:
    """A backbone config's display name: ``config["name"]`` or ``type:backbone:neck``."""
    return config.get("name") or ":".join(str(config.get(k)) for k in ("backbone_type", "backbone", "neck"))


def zero_shot(backbones: Sequence[dict], params, out_dir, *, split: str = "test", mode: str = "both",
              cache_dir=None, device: str = "cpu") -> pd.DataFrame:
    """Evaluate each backbone config (``backbone_type``, ``backbone``, ``pretrained``, ``neck``, ...
    overriding ``params``' model section; optional ``name``) on the UnED domains of ``params``.

    Each config's table is saved as ``<out_dir>/backbones/<name>_<split>_<mode>.csv`` and read
    back on a later call instead of being recomputed, so a re-run only evaluates new configs. All
    configs are validated (as parameters) before any is evaluated. Returns the tables
    concatenated with a ``model`` column first.
    """
    from unifex_lib.models import create_model
    from unifex_lib.params import build_params

    resolved = []
    for config in backbones:
        overrides = {k: v for k, v in config.items() if k != "name"}
        resolved.append((config_name(config), build_params({**params.flat(), **overrides})))
    tables = []
    for name, p in resolved:
        path = Path(out_dir) / "backbones" / (re.sub(r"[^\w.-]", "_", name) + f"_{split}_{mode}.csv")
        if path.is_file():
            table = pd.read_csv(path)
        else:
            torch.manual_seed(p.train.seed)  # a random-init backbone = the one a training run with this seed starts from
            model = create_model(p.model, image_size=p.data.image_size)
            table = evaluate_uned(model, p.eval_root, p.data.eval_domains, split, mode,
                                  default_transform(model, p.data.eval_transform), p.eval.eval_batch_size,
                                  cache_dir, device, metrics=p.eval.metrics, backend=p.eval.knn_backend,
                                  num_workers=p.data.num_workers)
            table.insert(0, "model", name)
            path.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(path, index=False)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def evaluate_run(run_dir, checkpoints: str = "best", exported: Optional[str] = None, *, split: str = "test",
                 mode: str = "both", cache_dir=None, device: str = "cpu") -> pd.DataFrame:
    """UnED tables of a trained run's checkpoints (``best``, ``last`` or ``all``) and/or an
    exported TorchScript GUIEC model (``exported``: path of the ``.pt``; it takes uint8 images
    at native size, so it runs with batch size 1). Returns the tables with ``model``, ``step``
    and ``epoch`` columns first (step / epoch empty for the exported model).
    """
    from unifex_lib.data.transforms import pil_to_tensor
    from unifex_lib.train import load_checkpoint_model
    from unifex_lib.training.checkpoint import list_checkpoints, resolve_checkpoint

    choices = ("best", "last", "all", "none")
    if checkpoints not in choices:
        raise ValueError(f"checkpoints={checkpoints!r} is not valid; choose one of {', '.join(choices)}")
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    paths = {"best": lambda: [resolve_checkpoint(run_dir)], "last": lambda: list_checkpoints(ckpt_dir)[-1:],
             "all": lambda: list_checkpoints(ckpt_dir), "none": lambda: []}[checkpoints]()
    tables = []
    for path in paths:
        model, p = load_checkpoint_model(path, device=device)
        table = evaluate_uned(model, p.eval_root, p.data.eval_domains, split, mode,
                              default_transform(model, p.data.eval_transform), p.eval.eval_batch_size, cache_dir,
                              device, metrics=p.eval.metrics, backend=p.eval.knn_backend)
        state = json.loads(Path(path).read_text())
        steps_per_epoch = state.get("steps_per_epoch") or 1
        tables.append(table.assign(model=Path(path).stem, step=state["step"], epoch=state["step"] / steps_per_epoch))
    if exported:
        from unifex_lib.params import load_params

        p = load_params(str(run_dir / "params.yaml"))
        model = torch.jit.load(exported, map_location=device)
        table = evaluate_uned(model, p.eval_root, p.data.eval_domains, split, mode, pil_to_tensor, 1,
                              cache_dir, device, metrics=p.eval.metrics, backend=p.eval.knn_backend)
        tables.append(table.assign(model=f"exported:{Path(exported).name}", step=None, epoch=None))
    if not tables:
        raise ValueError("nothing to evaluate: checkpoints='none' and no exported model")
    table = pd.concat(tables, ignore_index=True)
    return table[["model", "step", "epoch"] + [c for c in table.columns if c not in ("model", "step", "epoch")]]


def plot_bars(table: pd.DataFrame, metric: str, path, by: str = "model", mode: Optional[str] = None,
              title: Optional[str] = None) -> Path:
    """Grouped bar chart of ``metric`` per domain (bars grouped by domain, one colour per ``by`` value), PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = table if mode is None else table[table["mode"] == mode]
    if metric not in rows:
        raise ValueError(f"metric {metric!r} not in the table; columns: {', '.join(map(str, table.columns))}")
    wide = rows.pivot_table(index="domain", columns=by, values=metric, sort=False)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(wide) * max(1, len(wide.columns) / 3), 3.8))
    wide.plot.bar(ax=ax, rot=0, width=0.8)
    ax.set(ylabel=metric, xlabel="", ylim=(0, 1), title=title or f"{metric}" + (f" ({mode})" if mode else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    return save_figure(fig, path)
