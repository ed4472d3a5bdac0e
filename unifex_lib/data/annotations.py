"""The annotation-table contract and the small files around it.

* Annotation table (CSV or parquet): ``path`` (relative to the data root), ``label``
  (int; contiguous ``0..C-1`` after curation), ``domain`` (str), ``split``
  (``train`` / ``val`` / ``query`` / ``index`` / ``test``).
* Class-count file (for DynM-ArcFace / CLAM): CSV ``label,num_samples``, read *by label*.
* UnED split file: ``info_files/<domain>/<split>.json``, a list of
  ``{"path": str, "class_id": int | list[int]}``, paths relative to the images root.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

ANNOTATION_COLUMNS = ("path", "label", "domain", "split")
SPLITS = ("train", "val", "query", "index", "test", "small_index")


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def validate_annotations(table: pd.DataFrame, source: str = "annotation table") -> pd.DataFrame:
    """Check the contract's columns and types; returns the table with ``label`` as int64."""
    missing = [c for c in ANNOTATION_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {missing}; an annotation table needs {list(ANNOTATION_COLUMNS)} "
            f"(found {list(table.columns)})"
        )
    if table["path"].isna().any():
        raise ValueError(f"{source}: {int(table['path'].isna().sum())} row(s) have no path")
    try:
        labels = pd.to_numeric(table["label"], errors="raise").astype("int64")
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: column 'label' must hold integers ({err})") from None
    bad_splits = sorted(set(table["split"].astype(str)) - set(SPLITS))
    if bad_splits:
        raise ValueError(f"{source}: unknown split value(s) {bad_splits}; valid: {list(SPLITS)}")
    table = table.copy()
    table["label"] = labels
    table["path"] = table["path"].astype(str)
    table["domain"] = table["domain"].astype(str)
    table["split"] = table["split"].astype(str)
    return table


def read_annotations(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate an annotation table (``.csv`` or ``.parquet``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation table not found: {path}")
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return validate_annotations(table, source=str(path))


def write_annotations(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate and write an annotation table atomically (format from the suffix)."""
    path = Path(path)
    table = validate_annotations(table, source=str(path))[list(ANNOTATION_COLUMNS) + [
        c for c in table.columns if c not in ANNOTATION_COLUMNS]]
    if path.suffix == ".parquet":
        _write_atomic(path, lambda p: table.to_parquet(p, index=False))
    else:
        _write_atomic(path, lambda p: table.to_csv(p, index=False))
    return path


def class_counts_from_labels(labels: Iterable[int]) -> pd.DataFrame:
    """``label,num_samples`` table sorted by label."""
    counts = pd.Series(list(labels), dtype="int64").value_counts().sort_index()
    return pd.DataFrame({"label": counts.index.astype("int64"), "num_samples": counts.values.astype("int64")})


def write_class_counts(labels: Iterable[int], path: str | os.PathLike) -> Path:
    """Write the class-count file (``label,num_samples``) of a training table's labels."""
    path = Path(path)
    table = class_counts_from_labels(labels)
    _write_atomic(path, lambda p: table.to_csv(p, index=False))
    return path


def read_class_counts(path: str | os.PathLike, num_classes: int) -> list[int]:
    """Read a class-count file *by label*: entry ``c`` of the result is ``n_c``.

    Row order in the file does not matter. A label outside ``0..num_classes-1``, a
    duplicate or missing label, or a non-positive count is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-count file not found: {path} (expected CSV 'label,num_samples')")
    table = pd.read_csv(path)
    if list(table.columns[:2]) != ["label", "num_samples"]:
        raise ValueError(f"{path}: expected columns 'label,num_samples', found {list(table.columns)}")
    labels = table["label"].astype("int64")
    if labels.duplicated().any():
        raise ValueError(f"{path}: duplicate label(s) {sorted(labels[labels.duplicated()].unique().tolist())[:10]}")
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise ValueError(f"{path}: label(s) {outside.tolist()[:10]} outside 0..{num_classes - 1}; "
                         "the count file does not fit this dataset")
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"{path}: no count for label(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                         f"of {num_classes} classes; the count file does not fit this dataset")
    if (table["num_samples"] <= 0).any():
        raise ValueError(f"{path}: num_samples must be positive")
    counts = [0] * num_classes
    for label, n in zip(labels.tolist(), table["num_samples"].astype("int64").tolist()):
        counts[label] = n
    return counts


def read_split_file(path: str | os.PathLike) -> list[dict]:
    """Read a UnED split file: a list of ``{"path", "class_id"}`` (class_id int or list of ints)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"UnED split file not found: {path} "
                                "(expected info_files/<domain>/<split>.json)")
    with open(path) as f:
        items = json.load(f)
    if not isinstance(items, list) or any(not isinstance(i, dict) or "path" not in i or "class_id" not in i
                                          for i in items):
        raise ValueError(f"{path}: a UnED split file is a JSON list of {{'path', 'class_id'}} objects")
    return items


def write_split_file(items: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write a UnED split file atomically."""
    path = Path(path)
    _write_atomic(path, lambda p: p.write_text(json.dumps(list(items))))
    return path
