"""Curation rules, label concatenation, the class-count file and the recipes."""
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from unifex_lib.data.annotations import read_annotations, read_class_counts
from unifex_lib.data.curation import (concatenate, curate, curate_source, load_recipe, source_rng, summarize,
                                      write_curated)

REPO = Path(__file__).resolve().parents[1]
SIZES = {"A": 1, "B": 2, "C": 3, "D": 5, "E": 8}  # class name -> images


def _source(name="s", sizes=SIZES, split="train") -> pd.DataFrame:
    rows = [{"path": f"{name}/{c}/{i}.jpg", "label": k, "domain": f"dom_{name}", "split": split, "source": name,
             "class_name": c} for k, (c, n) in enumerate(sizes.items()) for i in range(n)]
    return pd.DataFrame(rows)


def _sizes(table) -> dict:
    return dict(Counter(table["class_name"]))


def test_min_samples_drops_small_classes():
    assert _sizes(curate_source(_source())) == {"C": 3, "D": 5, "E": 8}  # default min_samples=3
    assert _sizes(curate_source(_source(), min_samples=5)) == {"D": 5, "E": 8}
    assert _sizes(curate_source(_source(), min_samples=1)) == SIZES


def test_max_samples_caps_each_class_with_a_seeded_sample():
    table = _source()
    capped = curate_source(table, max_samples=4, rng=np.random.default_rng(1))
    assert _sizes(capped) == {"C": 3, "D": 4, "E": 4}
    assert set(capped["path"]) <= set(table["path"])
    assert list(capped.index) == sorted(capped.index)  # original row order kept
    again = curate_source(table, max_samples=4, rng=np.random.default_rng(1))
    assert capped["path"].tolist() == again["path"].tolist()
    picks = {tuple(curate_source(table, max_samples=4, rng=np.random.default_rng(s))["path"]) for s in range(6)}
    assert len(picks) > 1  # the sample depends on the seed


def test_num_classes_subset_and_class_list():
    table = _source()
    subset = curate_source(table, num_classes=2, rng=np.random.default_rng(0))
    assert len(_sizes(subset)) == 2 and set(_sizes(subset)) <= {"C", "D", "E"}
    assert all(n == SIZES[c] for c, n in _sizes(subset).items())  # whole classes kept
    subsets = {frozenset(_sizes(curate_source(table, num_classes=2, rng=np.random.default_rng(s)))) for s in range(8)}
    assert len(subsets) > 1
    assert _sizes(curate_source(table, classes=["B", "D"], min_samples=1)) == {"B": 2, "D": 5}
    with pytest.raises(ValueError, match=r"num_classes=4 but only 3 classes remain after min_samples=3"):
        curate_source(table, num_classes=4)
    with pytest.raises(ValueError, match=r"class\(es\) \['Z'\] not in the source"):
        curate_source(table, classes=["Z"])


def test_splits_and_duplicate_paths():
    table = pd.concat([_source(), _source(split="test").assign(path=lambda t: "test/" + t["path"]),
                       _source().iloc[:4]], ignore_index=True)  # train rows 0-3 listed twice
    kept = curate_source(table, min_samples=1)
    assert len(kept) == sum(SIZES.values()) and kept["path"].is_unique and (kept["split"] == "train").all()
    assert len(curate_source(table, min_samples=1, splits=["train", "test"])) == 2 * sum(SIZES.values())


def test_concatenate_makes_labels_contiguous_and_unique_across_sources():
    a = curate_source(_source("a"))
    b = curate_source(_source("b", {"X": 4, "Y": 3}))
    b = pd.concat([b, a.iloc[:1].assign(source="b", label=0)])  # a path already in source a: kept once
    table = concatenate([a, b])
    assert sorted(table["label"].unique()) == list(range(5))
    pairs = table[["source", "class_name", "label"]].drop_duplicates()
    assert pairs.values.tolist() == [["a", "C", 0], ["a", "D", 1], ["a", "E", 2], ["b", "X", 3], ["b", "Y", 4]]
    assert table["path"].is_unique and (table["split"] == "train").all()


def test_count_file_read_back_by_label_equals_table_counts(tmp_path):
    table = concatenate([curate_source(_source("a")), curate_source(_source("b", {"X": 4, "Y": 3}))])
    table = table.sample(frac=1.0, random_state=0)  # row order must not matter
    train_csv, counts_csv = write_curated(table, tmp_path / "train.csv", tmp_path / "class_counts.csv")
    counts = read_class_counts(counts_csv, table["label"].nunique())
    assert counts == [3, 5, 8, 4, 3]
    assert counts == [Counter(table["label"])[c] for c in range(5)]
    assert len(read_annotations(train_csv)) == sum(counts)


def test_source_rng_is_per_source_and_seeded():
    a = source_rng(0, "gldv2").random(3)
    assert np.array_equal(a, source_rng(0, "gldv2").random(3))
    assert not np.array_equal(a, source_rng(1, "gldv2").random(3))
    assert not np.array_equal(a, source_rng(0, "shopee").random(3))


def test_demo_recipe_curates_the_demo_train_split(tiny_demo, tmp_path):
    recipe = load_recipe(REPO / "params/curation/demo.yaml")
    table = curate(recipe, tiny_demo)
    reference = pd.read_csv(tiny_demo / "train.csv")  # the demo generator's own train table
    assert set(table["path"]) == set(reference["path"])
    merged = table.merge(reference, on="path")
    assert merged.groupby("label_x")["label_y"].nunique().eq(1).all()  # same partition into classes
    assert merged.groupby("label_y")["label_x"].nunique().eq(1).all()
    assert table.equals(curate(recipe, tiny_demo))  # deterministic
    summary = summarize(table).set_index("domain")
    assert summary.loc["total", "images"] == 48 and summary.loc["total", "classes"] == 16
    assert summary.drop("total")["images"].sum() == 48


def test_recipes_load_and_errors_name_bad_values(tmp_path):
    m4d = load_recipe(REPO / "params/curation/m4d35k.yaml")
    assert m4d.keys == ["products_10k", "gldv2", "deep_fashion", "stanford_cars"]
    gldv2 = m4d.sources[1]
    assert (gldv2.num_classes, gldv2.min_samples, gldv2.max_samples) == (10000, 3, 100)
    assert m4d.sources[3].options == {"refined": True}
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\nsources:\n  gldv3: {}\n  sop: {min_sample: 3}\n  shopee: {max_samples: 0}\n")
    with pytest.raises(ValueError) as err:
        load_recipe(bad)
    message = str(err.value)
    assert "unknown dataset reader 'gldv3' (did you mean 'gldv2'?)" in message
    assert "source 'sop': unknown key(s) ['min_sample']" in message
    assert "source 'shopee': max_samples=0 must be a positive integer" in message
