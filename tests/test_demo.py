"""The demo dataset: deterministic by seed, UnED layout, open-set class split."""
import hashlib
import json

import pandas as pd
import pytest
from PIL import Image

from unifex_lib.data.annotations import read_annotations, read_class_counts
from unifex_lib.data.demo import DOMAINS, generate_demo

SMALL = dict(train_classes=3, val_classes=2, test_classes=2, images_per_class=3, size=32)


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path):
    a = _digest(generate_demo(tmp_path / "a", seed=3, **SMALL))
    b = _digest(generate_demo(tmp_path / "b", seed=3, **SMALL))
    c = _digest(generate_demo(tmp_path / "c", seed=4, **SMALL))
    assert a == b
    n_images = len(DOMAINS) * 7 * 3
    assert sum(k.endswith(".png") for k in a) == n_images
    changed = sum(a[k] != c[k] for k in a if k.endswith(".png"))
    assert changed == n_images  # another seed draws every image anew


def test_uned_layout_and_open_set_split(tiny_demo):
    table = read_annotations(tiny_demo / "annotations.csv")
    assert set(table.domain) == set(DOMAINS)
    for domain in DOMAINS:
        classes = {}
        for split in ("train", "val", "test"):
            items = json.loads((tiny_demo / "info_files" / domain / f"{split}.json").read_text())
            assert all((tiny_demo / "images" / it["path"]).is_file() for it in items)
            classes[split] = {it["class_id"] for it in items}
        assert len(classes["train"]) == 4 and len(classes["val"]) == 2 and len(classes["test"]) == 3
        assert not classes["train"] & classes["test"]
        assert not classes["train"] & classes["val"]
        assert not classes["val"] & classes["test"]
    # global labels: one per (domain, class); images are real 32 px RGB files
    assert table.groupby("label").domain.nunique().max() == 1
    with Image.open(tiny_demo / table.path.iloc[0]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"


def test_train_table_and_class_counts(tiny_demo):
    train = read_annotations(tiny_demo / "train.csv")
    assert set(train.split) == {"train"}
    assert sorted(train.label.unique()) == list(range(4 * len(DOMAINS)))  # contiguous 0..C-1
    counts = read_class_counts(tiny_demo / "class_counts.csv", num_classes=16)
    assert counts == [3] * 16
    assert (pd.read_csv(tiny_demo / "class_counts.csv").num_samples.sum()) == len(train)


@pytest.mark.parametrize("bad, message", [(dict(domains=("glyphs", "cars")), "unknown demo domain"),
                                          (dict(images_per_class=1), "images_per_class=1")])
def test_bad_arguments_are_named(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        generate_demo(tmp_path, **{**SMALL, **bad})
