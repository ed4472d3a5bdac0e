"""``ImageDataset``: annotation-table rows -> ``(image_tensor, label, index)``, skipping bad files.

A bad file (missing, zero-byte, truncated, not an image, decompression bomb; see
:mod:`unifex_lib.data.images`) makes ``__getitem__`` return ``None`` and is listed in
``bad_images.csv`` (when ``bad_images_file`` is given) and in ``dataset.bad_images()``.
Batch with :func:`collate_skip_bad`, which drops those ``None`` items, so an epoch over a
folder with bad files finishes; the returned indices say which rows a batch holds.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from .images import BadImageError, BadImageLog, load_image


class ImageDataset(Dataset):
    """Images ``root / paths[i]`` with integer ``labels[i]``, decoded by :func:`load_image`.

    Args:
        paths: image paths relative to ``root`` (or absolute).
        labels: one int per path.
        root: the data root.
        transform: PIL RGB image -> tensor (see :func:`unifex_lib.data.transforms.create_transform`).
        domains: optional domain name per path (kept as ``dataset.domains`` for samplers).
        strict: raise :class:`BadImageError` on a bad file instead of skipping it.
        bad_images_file: CSV that lists skipped files (``path,reason``), e.g. ``run_dir/"bad_images.csv"``.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], root: str | os.PathLike,
                 transform: Optional[Callable] = None, domains: Optional[Sequence[str]] = None, *,
                 strict: bool = False, bad_images_file: Optional[str | os.PathLike] = None):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        if domains is not None and len(domains) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(domains)} domains")
        self.paths = [str(p) for p in paths]
        self.labels = [int(label) for label in labels]
        self.domains = None if domains is None else [str(d) for d in domains]
        self.root = Path(root)
        self.transform = transform
        self.strict = strict
        self.bad_log = BadImageLog(bad_images_file) if bad_images_file is not None else None
        self._bad: dict[str, str] = {}

    @classmethod
    def from_table(cls, table: pd.DataFrame, root: str | os.PathLike, transform: Optional[Callable] = None,
                   **kwargs) -> "ImageDataset":
        """From an annotation table (``path``, ``label``, ``domain``)."""
        return cls(table["path"].tolist(), table["label"].tolist(), root, transform,
                   domains=table["domain"].tolist() if "domain" in table else None, **kwargs)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            image = load_image(self.root / path, strict=True)
        except BadImageError as err:
            if self.strict:
                raise
            self._record_bad(path, err.reason)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index], index

    def _record_bad(self, path: str, reason: str) -> None:
        if path in self._bad:
            return
        self._bad[path] = reason
        if self.bad_log is not None:
            self.bad_log.add(path, reason)

    def bad_images(self) -> list[dict]:
        """Files skipped so far (``{"path", "reason"}``), from every worker when a log file is set."""
        if self.bad_log is not None:
            return self.bad_log.read()
        return [{"path": p, "reason": r} for p, r in self._bad.items()]


def collate_skip_bad(batch: list):
    """``default_collate`` over the items that decoded; ``None`` when none of them did."""
    items = [item for item in batch if item is not None]
    if not items:
        return None
    return default_collate(items)


def image_folder_dataset(folder: str | os.PathLike, transform: Optional[Callable] = None,
                         **kwargs) -> ImageDataset:
    """Every file under ``folder`` (recursively, sorted), labelled by its parent folder name."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    paths = [p.relative_to(folder).as_posix() for p in files]
    parents = sorted({p.parent.name for p in files})
    label_of = {name: i for i, name in enumerate(parents)}
    return ImageDataset(paths, [label_of[p.parent.name] for p in files], folder, transform, **kwargs)
