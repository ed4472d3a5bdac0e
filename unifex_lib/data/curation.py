"""Curation of a multi-domain training set from source datasets (M4D-35k style).

Per source, in this order (Florek et al., "Efficient and Discriminative Image Feature
Extraction for Universal Image Retrieval", arXiv:2409.13513, the M4D-35k recipe):

1. keep the rows of the chosen ``splits`` (default ``train``); drop repeated paths (first kept);
2. keep only the classes in ``classes`` (a list of the source's class names), when given;
3. drop classes with fewer than ``min_samples`` images (default 3);
4. cap each class at ``max_samples`` images (a seeded random sample);
5. keep a seeded random subset of ``num_classes`` classes, when given.

Sources are then concatenated with labels made contiguous and globally unique
(``0..C-1`` in source order, then the source's own label order), paths repeated across
sources are dropped, and the train CSV and the class-count file (``label,num_samples``)
are written. Randomness of source ``key`` comes from ``numpy.random.default_rng([seed,
crc32(key)])`` only, so adding a source never changes another's sample.

A recipe (``params/curation/*.yaml``)::

    seed: 0
    sources:
      gldv2: {num_classes: 10000, min_samples: 3, max_samples: 100}
      stanford_cars: {refined: true}        # other keys are reader options
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import yaml

from .annotations import write_annotations, write_class_counts
from .readers import read_source, reader_options

CURATION_KEYS = ("min_samples", "max_samples", "num_classes", "classes", "splits", "folder")


@dataclass
class SourceSpec:
    """One source of a recipe: reader key, curation rules and the reader's own options."""
    key: str
    min_samples: int = 3
    max_samples: Optional[int] = None
    num_classes: Optional[int] = None
    classes: Optional[list] = None
    splits: Sequence[str] = ("train",)
    folder: Optional[str] = None
    options: dict = field(default_factory=dict)


@dataclass
class Recipe:
    seed: int = 0
    sources: list = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.sources]


def _check_spec(spec: SourceSpec) -> list[str]:
    problems = []
    try:
        valid = reader_options(spec.key)
    except ValueError as err:
        return [str(err)]
    unknown = sorted(set(spec.options) - set(valid))
    if unknown:
        problems.append(f"source '{spec.key}': unknown key(s) {unknown}; curation keys: {list(CURATION_KEYS)}, "
                        f"reader options: {valid}")
    for name in ("min_samples", "max_samples", "num_classes"):
        value = getattr(spec, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"source '{spec.key}': {name}={value!r} must be a positive integer or null")
    if spec.max_samples is not None and spec.max_samples < spec.min_samples:
        problems.append(f"source '{spec.key}': max_samples={spec.max_samples} < min_samples={spec.min_samples}")
    return problems


def load_recipe(path) -> Recipe:
    """Read and validate a curation recipe (all problems reported at once, before any data is read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"curation recipe not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - {"seed", "sources"})
    if unknown or not isinstance(raw.get("sources"), dict) or not raw["sources"]:
        raise ValueError(f"{path}: a recipe has 'seed' and a non-empty mapping 'sources: {{reader key: "
                         f"{{rules and options}}}}'" + (f"; unknown top-level key(s) {unknown}" if unknown else ""))
    sources, problems = [], []
    for key, entry in raw["sources"].items():
        entry = dict(entry or {})
        rules = {k: entry.pop(k) for k in CURATION_KEYS if k in entry}
        spec = SourceSpec(key=key, options=entry, **rules)
        problems += _check_spec(spec)
        sources.append(spec)
    if problems:
        raise ValueError(f"invalid curation recipe {path}:\n  - " + "\n  - ".join(problems))
    return Recipe(seed=int(raw.get("seed", 0)), sources=sources)


def source_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def curate_source(table: pd.DataFrame, min_samples: int = 3, max_samples: Optional[int] = None,
                  num_classes: Optional[int] = None, classes: Optional[Sequence] = None,
                  splits: Optional[Sequence[str]] = ("train",), rng: Optional[np.random.Generator] = None
                  ) -> pd.DataFrame:
    """Apply the per-source rules (module docstring, steps 1-5) to one reader's table.

    Returns the kept rows in their original order; labels are left as the reader gave them.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    name = table["source"].iloc[0] if "source" in table and len(table) else "source"
    if splits is not None:
        table = table[table["split"].isin(list(splits))]
    table = table.drop_duplicates("path")
    if classes is not None:
        wanted = {str(c) for c in classes}
        unknown = sorted(wanted - set(table["class_name"]))
        if unknown:
            raise ValueError(f"{name}: class(es) {unknown[:10]} not in the source "
                             f"(e.g. {sorted(table['class_name'].unique())[:5]})")
        table = table[table["class_name"].isin(wanted)]
    sizes = table.groupby("label")["path"].transform("size")
    table = table[sizes >= min_samples]
    if max_samples is not None:
        order = table.assign(_key=rng.random(len(table))).sort_values(["label", "_key"], kind="stable")
        table = table.loc[order.groupby("label").head(max_samples).index].sort_index()
    if num_classes is not None:
        available = np.sort(table["label"].unique())
        if num_classes > len(available):
            raise ValueError(f"{name}: num_classes={num_classes} but only {len(available)} classes remain "
                             f"after min_samples={min_samples}")
        keep = rng.choice(available, size=num_classes, replace=False)
        table = table[table["label"].isin(keep)]
    return table


def concatenate(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Stack curated source tables; labels become ``0..C-1``, unique across sources (source order,
    then each source's label order); a path repeated across sources is kept once (first source)."""
    table = pd.concat([t.assign(_source_index=i) for i, t in enumerate(tables)], ignore_index=True)
    table = table.drop_duplicates("path")
    key = table["_source_index"].astype("int64") * (int(table["label"].max()) + 1) + table["label"]
    table = table.assign(label=pd.factorize(key, sort=True)[0].astype("int64"), split="train")
    return table.drop(columns="_source_index").reset_index(drop=True)


def curate(recipe: Recipe, data_root) -> pd.DataFrame:
    """Read every source of ``recipe`` under ``data_root``, curate and concatenate them."""
    tables = []
    for spec in recipe.sources:
        raw = read_source(spec.key, data_root, folder=spec.folder, **spec.options)
        table = curate_source(raw, spec.min_samples, spec.max_samples, spec.num_classes, spec.classes, spec.splits,
                              rng=source_rng(recipe.seed, spec.key))
        if table.empty:
            raise ValueError(f"source '{spec.key}': no images left of {len(raw)} (splits={list(spec.splits)}, "
                             f"min_samples={spec.min_samples}); found splits {sorted(raw['split'].unique())}")
        tables.append(table)
    return concatenate(tables)


def write_curated(table: pd.DataFrame, train_csv, class_counts_csv) -> tuple[Path, Path]:
    """Write the train CSV (annotation table) and its class-count file (``label,num_samples``)."""
    return write_annotations(table, train_csv), write_class_counts(table["label"], class_counts_csv)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Classes and images per (domain, source), with a ``total`` row."""
    rows = table.groupby(["domain", "source"], sort=False).agg(classes=("label", "nunique"),
                                                                images=("path", "size")).reset_index()
    total = pd.DataFrame([{"domain": "total", "source": "all", "classes": table["label"].nunique(),
                           "images": len(table)}])
    return pd.concat([rows, total], ignore_index=True)


def plot_class_sizes(table: pd.DataFrame, path=None):
    """Class-size distributions: a histogram of images per class for each domain (left) and
    rank-size curves, classes sorted by size, for each source on log-log axes (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hist, rank) = plt.subplots(1, 2, figsize=(11, 4))
    sizes = table.groupby(["domain", "source", "label"]).size().rename("images").reset_index()
    bins = np.arange(1, sizes["images"].max() + 2) - 0.5
    for domain, group in sizes.groupby("domain"):
        hist.hist(group["images"], bins=bins if len(bins) <= 60 else 50, histtype="step", label=domain)
    hist.set(xlabel="images per class", ylabel="classes", title="class sizes per domain")
    hist.legend(fontsize=8)
    for source, group in sizes.groupby("source"):
        values = np.sort(group["images"].to_numpy())[::-1]
        rank.plot(np.arange(1, len(values) + 1), values, label=source)
    rank.set(xscale="log", yscale="log", xlabel="class rank", ylabel="images", title="rank-size per source")
    rank.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def ensure_demo_data(data_root, seed: int = 0, **sizes) -> Path:
    """Generate the demo data (UnED format) into ``data_root`` unless its split files exist."""
    from .demo import generate_demo

    root = Path(data_root)
    if (root / "info_files").is_dir():
        return root
    return generate_demo(root, seed=seed, **sizes)
