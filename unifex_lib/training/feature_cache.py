"""Frozen-backbone feature cache: extract backbone features once, train neck and head on them.

With a frozen backbone (in eval mode) and a deterministic train transform, ``backbone(x_i)``
is the same in every epoch, so it is computed once into a memory-mapped float32 file
``<cache_dir>/<key>.f32`` of shape ``[N, F]`` (row ``i`` = item ``i`` of the dataset) with a JSON
side file ``<key>.json`` holding the shape and the file's SHA-256. The key is the SHA-256 of
(backbone ``model_id``, a fingerprint of the backbone's weights, the transform, the dataset's
content hash), so any change re-extracts. A cache whose side file is missing, unreadable, of
another shape or whose bytes do not match the recorded SHA-256 (a killed extraction, a
truncated copy) is rebuilt; the data file is written under a temporary name and renamed first,
the side file last.

Under DDP the ranks extract disjoint row blocks of one shared file (the cache folder must be on
a filesystem all ranks see); rank 0 checks and finalises it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from unifex_lib.data.dataset import collate_skip_bad

from unifex_lib.training.distributed import DistInfo, barrier

_CHUNK = 1 << 22


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def dataset_hash(paths: Sequence[str], root) -> str:
    """SHA-256 over every (relative path, file bytes) in order: the dataset's content hash."""
    h = hashlib.sha256()
    for rel in paths:
        h.update(str(rel).encode() + b"\0")
        with open(Path(root) / rel, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                h.update(block)
    return h.hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over the module's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(model_id: str, weights: str, transform: str, data_hash: str) -> str:
    """SHA-256 of the four things the cached features depend on."""
    return hashlib.sha256(json.dumps([model_id, weights, transform, data_hash]).encode()).hexdigest()[:32]


def _is_valid(data: Path, meta: Path, shape: tuple) -> bool:
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(info, dict) and tuple(info.get("shape", ())) == shape and data.is_file()
            and data.stat().st_size == shape[0] * shape[1] * 4 and _sha256_file(data) == info.get("sha256"))


@torch.no_grad()
def _extract_rows(backbone, dataset: Dataset, out: np.memmap, rows: range, batch_size: int,
                  device: torch.device, num_workers: int, desc: str) -> None:
    from tqdm.auto import tqdm
    loader = DataLoader(Subset(dataset, list(rows)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_skip_bad, generator=torch.Generator())
    for batch in tqdm(loader, desc=desc, leave=False, disable=not desc):
        if batch is not None:
            images, _, index = batch
            out[index.numpy()] = backbone(images.to(device)).float().cpu().numpy()


def cached_features(backbone, dataset: Dataset, key: str, cache_dir, batch_size: int = 256,
                    device: torch.device = torch.device("cpu"), num_workers: int = 0,
                    info: DistInfo | None = None) -> np.memmap:
    """Read-only ``[len(dataset), backbone.num_features]`` float32 memmap of backbone features.

    ``dataset`` is an :class:`~unifex_lib.data.dataset.ImageDataset` (items ``(image, label, index)``,
    ``None`` for a bad file, whose row stays NaN: see :func:`valid_rows`); ``backbone`` must be
    frozen and in eval mode. Extracts (overwriting a stale or corrupt file) only when no valid cache exists.
    """
    info = info or DistInfo(0, 1, 0, device)
    cache_dir = Path(cache_dir)
    data, meta = cache_dir / f"{key}.f32", cache_dir / f"{key}.json"
    shape = (len(dataset), int(backbone.num_features))
    rebuild = not _is_valid(data, meta, shape) if info.is_main else False
    tmp = data.with_name(data.name + ".tmp")
    if info.is_main and rebuild:
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta.unlink(missing_ok=True)
        out = np.memmap(tmp, dtype=np.float32, mode="w+", shape=shape)
        out.fill(np.nan)  # rows of bad images stay NaN
        out.flush()
        del out
    elif info.is_main:
        tmp.unlink(missing_ok=True)  # left by a killed extraction
    barrier(info)
    if tmp.exists():  # every rank fills its block of rows
        out = np.memmap(tmp, dtype=np.float32, mode="r+", shape=shape)
        block = -(-shape[0] // info.world_size)
        rows = range(min(shape[0], info.rank * block), min(shape[0], (info.rank + 1) * block))
        _extract_rows(backbone, dataset, out, rows, batch_size, info.device, num_workers,
                      "extracting features" if info.is_main else "")
        out.flush()
        del out
    barrier(info)
    if info.is_main and tmp.exists():
        os.replace(tmp, data)
        meta_tmp = meta.with_name(meta.name + ".tmp")
        meta_tmp.write_text(json.dumps({"key": key, "shape": list(shape), "dtype": "float32",
                                        "sha256": _sha256_file(data)}))
        os.replace(meta_tmp, meta)
    barrier(info)
    return np.memmap(data, dtype=np.float32, mode="r", shape=shape)


def valid_rows(features: np.ndarray) -> np.ndarray:
    """Indices of the rows whose image decoded (bad images leave NaN rows)."""
    return np.flatnonzero(~np.isnan(features[:, 0]))


class FeatureDataset(Dataset):
    """Items ``(features[rows[i]], labels[i], i)``; ``rows`` defaults to every row."""

    def __init__(self, features: np.ndarray, labels: Sequence[int], rows: Sequence[int] | None = None):
        self.features, self.labels = features, list(labels)
        self.rows = list(range(len(features))) if rows is None else [int(r) for r in rows]
        if len(self.rows) != len(self.labels):
            raise ValueError(f"{len(self.rows)} feature rows but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.features[self.rows[i]])), self.labels[i], i
