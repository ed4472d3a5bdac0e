"""Every reader on a tiny fixture written in its source's native layout, and its error cases."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from unifex_lib.data.readers import SourceLayoutError, crop_box, list_readers, read_source

CLASSES = {1: 3, 2: 2, 3: 1, 10: 4}  # class id -> images: 10 images, 4 classes
ITEMS = [(c, i) for c, n in CLASSES.items() for i in range(n)]


def _image(path: Path, size=(24, 16)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(int(v) for v in np.random.default_rng(len(str(path))).integers(0, 255, 3))).save(
        path, "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return str(path)


def _csv(path: Path, rows: list[dict], **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False, **kwargs)
    return path


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


# (annotation file, path column, class column, image path template) of the plain "one CSV" layouts
CSV_LAYOUTS = {
    "products_10k": ("train.csv", "name", "class", "train/{}"),
    "shopee": ("train.csv", "image", "label_group", "train_images/{}"),
    "rp2k": ("train.csv", "img_path", "img_id", "train/{}"),
    "fashion200k": ("train.csv", "img_path", "img_id", "{}"),
    "furniture180": ("furniture180_train.csv", "img_path", "label", "{}"),
    "storefronts146": ("storefronts146_train.csv", "img_path", "label", "{}"),
    "stanford_cars": ("sc_train.csv", "image", "Label", "cars_train/cars_train/{}"),
}


def _write_csv_layout(key):
    def write(root):
        file, path_col, class_col, template = CSV_LAYOUTS[key]
        names = [f"d{c}/{c}_{i}.jpg" for c, i in ITEMS]
        for name in names:
            _image(root / template.format(name))
        return _csv(root / file, [{path_col: n, class_col: c} for n, (c, _) in zip(names, ITEMS)]), len(ITEMS), 4
    return write


def _write_gldv2(root):
    ids = [f"{c:x}{i}{c}f00ba4" for c, i in ITEMS]
    for id_ in ids:
        _image(root / "train" / id_[0] / id_[1] / id_[2] / f"{id_}.jpg")
    return _csv(root / "train.csv", [{"id": i, "landmark_id": c} for i, (c, _) in zip(ids, ITEMS)]), 10, 4


def _write_hm(root):  # article ids lose their leading zero in the CSV, as pandas would write them
    ids = [100000000 + 100 * c + i for c, i in ITEMS]
    for a in ids:
        _image(root / "images" / f"0{a}"[:3] / f"0{a}.jpg")
    rows = [{"article_id": a, "product_code": c} for a, (c, _) in zip(ids, ITEMS)]
    return _csv(root / "articles.csv", rows + [{"article_id": 999, "product_code": 77}]), 10, 4  # no image: left out


def _write_deep_fashion(root):
    groups = {"TOPS": {}, "DRESSES": {}}
    for c, i in ITEMS:
        path = f"img/{'TOPS' if c < 3 else 'DRESSES'}/id_{c:08d}/{i}.jpg"
        _image(root / path)
        groups["TOPS" if c < 3 else "DRESSES"].setdefault(f"id_{c:08d}", []).append(path)
    return _json(root / "deepfashion_train.json", groups), 10, 4


def _write_met_art(root):
    rows = [{"id": c, "path": f"{c}/{i}.jpg"} for c, i in ITEMS]
    for r in rows:
        _image(root / "MET" / r["path"])
    return _json(root / "ground_truth" / "MET_database.json", rows), 10, 4


def _write_sop(root):  # classes 1, 2 in Ebay_train; 3, 10 in Ebay_test
    for split, keep in (("train", lambda c: c < 3), ("test", lambda c: c >= 3)):
        rows = [f"{n} {c} 1 bicycle_final/{c}_{i}.JPG" for n, (c, i) in enumerate(ITEMS) if keep(c)]
        for row in rows:
            _image(root / row.split()[-1])
        (root / f"Ebay_{split}.txt").write_text("image_id class_id super_class_id path\n" + "\n".join(rows) + "\n")
    return root / "Ebay_train.txt", 10, 4


def _write_food101(root):
    meta = {"train": {"apple_pie": [], "ramen": []}, "test": {"apple_pie": [], "ramen": []}}
    for n, (c, i) in enumerate(ITEMS):
        name = ("apple_pie" if c < 3 else "ramen") + f"/{c}{i}"
        meta["train" if n % 2 else "test"][name.split("/")[0]].append(name)
        _image(root / "images" / f"{name}.jpg")
    _json(root / "meta" / "test.json", meta["test"])
    return _json(root / "meta" / "train.json", meta["train"]), 10, 2


def _write_food_rec22(root):  # two boxes per image (one per item pair), COCO [x, y, w, h]
    images, anns = [], []
    for n, (c, i) in enumerate(ITEMS):
        if n % 2 == 0:
            images.append({"id": n, "file_name": f"{n:06d}.jpg"})
            _image(root / "images" / f"{n:06d}.jpg", size=(40, 30))
        anns.append({"id": 100 + n, "image_id": images[-1]["id"], "category_id": c,
                     "bbox": [2 + 20 * (n % 2), 5, 15, 20]})
    return _json(root / "annotations.json", {"images": images, "annotations": anns, "categories": []}), 10, 4


def _write_deep_fashion2(root):  # (pair_id, item styles) per image; style 0 items are not labelled
    images = {"000001": (1, [1, 2]), "000002": (1, [1]), "000003": (2, [1, 0]), "000004": (2, [0])}
    for stem, (pair_id, styles) in images.items():
        _image(root / "train" / "image" / f"{stem}.jpg", size=(40, 30))
        items = {f"item{k + 1}": {"style": style, "bounding_box": [2 + 20 * k, 5, 18 + 20 * k, 25],
                                  "category_name": "dress"} for k, style in enumerate(styles)}
        _json(root / "train" / "annos" / f"{stem}.json", {"source": "shop", "pair_id": pair_id, **items})
    return root / "train" / "annos", 4, 3  # labels 1_1 (twice), 1_2, 2_1


def _write_uned(root):  # two domains; one item with a list of class ids
    for d, domain in enumerate(("cars", "met")):
        for split, keep in (("train", lambda c: c < 3), ("test", lambda c: c >= 3)):
            items = [{"path": f"{domain}/{c}/{i}.jpg", "class_id": [c, 99] if (c, i) == (10, 0) else c}
                     for c, i in ITEMS if keep(c)]
            for item in items:
                _image(root / "images" / item["path"])
            _json(root / "info_files" / domain / f"{split}.json", items)
    return root / "info_files", 20, 8


def _write_cub200(root):
    (root / "images.txt").write_text("".join(f"{n + 1} {c:03d}.Bird/{c}_{i}.jpg\n" for n, (c, i) in enumerate(ITEMS)))
    (root / "image_class_labels.txt").write_text("".join(f"{n + 1} {c}\n" for n, (c, _) in enumerate(ITEMS)))
    for c, i in ITEMS:
        _image(root / "images" / f"{c:03d}.Bird" / f"{c}_{i}.jpg")
    return root / "images.txt", 10, 4


def _write_cars196(root):
    from scipy.io import savemat
    ann = np.zeros(len(ITEMS), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")])
    for n, (c, i) in enumerate(ITEMS):
        ann[n] = (f"car_ims/{n + 1:06d}.jpg", c, i % 2)
        _image(root / f"car_ims/{n + 1:06d}.jpg")
    savemat(root / "cars_annos.mat", {"annotations": ann})
    return root / "cars_annos.mat", 10, 4


def _write_inshop(root):
    status = {1: "train", 2: "train", 3: "query", 10: "gallery"}
    rows = [f"img/WOMEN/Dresses/id_{c:08d}/{i:02d}_front.jpg id_{c:08d} {status[c]}" for c, i in ITEMS]
    for row in rows:
        _image(root / row.split()[0])
    (root / "list_eval_partition.txt").write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n"
                                                  + "\n".join(rows) + "\n")
    return root / "list_eval_partition.txt", 10, 4


def _write_inaturalist(root):
    for split, keep in (("train", lambda c: c < 3), ("test", lambda c: c >= 3)):
        lines = [f"train_val2018/Aves/{c}/{i}.jpg" for c, i in ITEMS if keep(c)]
        for line in lines:
            _image(root / line)
        (root / "Inat_dataset_splits").mkdir(exist_ok=True)
        (root / "Inat_dataset_splits" / f"Inaturalist_{split}_set1.txt").write_text("\n".join(lines) + "\n")
    return root / "Inat_dataset_splits" / "Inaturalist_train_set1.txt", 10, 4


FIXTURES = {key: _write_csv_layout(key) for key in CSV_LAYOUTS} | {
    "gldv2": _write_gldv2, "hm": _write_hm, "deep_fashion": _write_deep_fashion, "met_art": _write_met_art,
    "sop": _write_sop, "food101": _write_food101, "food_rec22": _write_food_rec22,
    "deep_fashion2": _write_deep_fashion2, "uned": _write_uned, "cub200": _write_cub200,
    "cars196": _write_cars196, "inshop": _write_inshop, "inaturalist": _write_inaturalist,
}
FOLDERS = {"products_10k": "products-10k", "gldv2": "google_landmark_recognition_2021", "deep_fashion": "deepfashion",
           "met_art": "met_dataset", "hm": "hm_personalized_fashion", "sop": "stanford_online_products",
           "food_rec22": "fr22_train_v2", "deep_fashion2": "deepfashion2", "food101": "food-101",
           "furniture180": "furniture_180", "storefronts146": "storefronts_146", "cub200": "CUB_200_2011",
           "cars196": "stanford_cars196"}


def _write(key, data_root: Path):
    root = data_root / FOLDERS.get(key, key)
    root.mkdir(parents=True)
    return FIXTURES[key](root)


def _check_table(table, data_root, rows, classes):
    assert len(table) == rows
    assert table["label"].nunique() == classes == table["class_name"].nunique()
    assert sorted(table["label"].unique()) == list(range(classes))
    assert (table.groupby("class_name")["label"].nunique() == 1).all()  # one label per class name
    assert all((data_root / p).is_file() for p in table["path"])


def test_every_registered_reader_has_a_fixture():
    assert set(list_readers()) == set(FIXTURES) | {"demo"}


@pytest.mark.parametrize("key", sorted(FIXTURES))
def test_reader_on_native_layout(tmp_path, key):
    _, rows, classes = _write(key, tmp_path)
    table = read_source(key, tmp_path)
    _check_table(table, tmp_path, rows, classes)
    assert (table["source"] == key).all()


@pytest.mark.parametrize("key, splits", [
    ("sop", {"train": 5, "test": 5}), ("cub200", {"train": 5, "test": 5}), ("cars196", {"train": 5, "test": 5}),
    ("inaturalist", {"train": 5, "test": 5}), ("inshop", {"train": 5, "query": 1, "index": 4}),
    ("uned", {"train": 10, "test": 10}), ("food101", {"train": 5, "test": 5}),
])
def test_standard_splits(tmp_path, key, splits):
    _write(key, tmp_path)
    table = read_source(key, tmp_path)
    assert table["split"].value_counts().to_dict() == splits
    if key in ("sop", "cub200", "cars196", "inaturalist"):  # open-set: train and test classes are disjoint
        train, test = (set(table[table.split == s].class_name) for s in ("train", "test"))
        assert not train & test


def test_demo_data_through_the_demo_reader(tiny_demo):
    table = read_source("demo", tiny_demo)
    _check_table(table, tiny_demo, 4 * 9 * 3, 4 * 9)
    reference = pd.read_csv(tiny_demo / "annotations.csv").set_index("path")
    assert (table.set_index("path")["split"] == reference.loc[table["path"], "split"]).all()


def test_uned_list_class_id_takes_the_first(tmp_path):
    _write("uned", tmp_path)
    table = read_source("uned", tmp_path).set_index("path")
    assert table.loc["uned/images/cars/10/0.jpg", "class_name"] == "cars/10"


def test_crops_have_a_two_percent_margin_and_are_cached(tmp_path):
    _write("food_rec22", tmp_path)
    table = read_source("food_rec22", tmp_path)
    first = tmp_path / table["path"][0]  # box x 2..17, y 5..25, margin 0.3 / 0.4 px -> (1.7, 4.6, 17.3, 25.4)
    assert Image.open(first).size == (15, 20)  # PIL rounds the box to (2, 5, 17, 25)
    mtime = first.stat().st_mtime_ns
    read_source("food_rec22", tmp_path)
    assert first.stat().st_mtime_ns == mtime
    _write("deep_fashion2", tmp_path)
    paths = read_source("deep_fashion2", tmp_path)["path"].tolist()
    assert [p for p in paths if "/image/" in p] == ["deepfashion2/train/image/000002.jpg"]  # single item: whole
    assert len(paths) == 4 and all(Image.open(tmp_path / p).size == (16, 20) for p in paths if "crops" in p)
    image = Image.new("RGB", (200, 100))  # 2 % of 100 x 50 is 2 x 1 px on each side, clipped at the border
    assert crop_box(image, (50, 20, 150, 70)).size == (104, 52)
    assert crop_box(image, (0, 0, 200, 100)).size == (200, 100)


def test_reader_options(tmp_path):
    root = tmp_path / "stanford_cars"
    rows = [{"x1": 0, "y1": 0, "x2": 5, "y2": 5, "Class": c, "image": f"{c}_{i}.jpg", "Probability": 0.9,
             "Color": ("black", "Red", 7)[i % 3]} for c, i in ITEMS]
    for r in rows:
        _image(root / "cars_train" / "cars_train" / r["image"])
    _csv(root / "sc_train_refined.csv", rows)
    refined = read_source("stanford_cars", tmp_path, refined=True)
    assert sorted(refined["class_name"].unique()) == ["10_0", "10_6", "10_7", "1_0", "1_6", "1_7", "2_0", "2_6",
                                                      "3_0"]
    _write("gldv2", tmp_path)
    _csv(tmp_path / "google_landmark_recognition_2021" / "subset.csv", [{"landmark_id": 2}, {"landmark_id": 10}])
    assert len(read_source("gldv2", tmp_path, class_subset="subset.csv")) == 6
    _write("sop", tmp_path)
    assert read_source("sop", tmp_path, splits=["test"])["split"].eq("test").all()


# ----------------------------------------------------------------------------------------- error cases

def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"products-10k.*expected layout.*train.csv \(columns name, class\)"):
        read_source("products_10k", tmp_path)


@pytest.mark.parametrize("key", sorted(FIXTURES))
def test_missing_annotation_file_names_path_and_layout(tmp_path, key):
    main, _, _ = _write(key, tmp_path)
    if main.is_dir():
        shutil.rmtree(main)
    else:
        main.unlink()
    with pytest.raises(FileNotFoundError, match="expected layout") as err:
        read_source(key, tmp_path)
    assert str(main) in str(err.value)


MISSING_COLUMN = {key: (spec[0], spec[2]) for key, spec in CSV_LAYOUTS.items()} | {
    "gldv2": ("train.csv", "landmark_id"), "hm": ("articles.csv", "product_code")}


@pytest.mark.parametrize("key", sorted(MISSING_COLUMN))
def test_missing_column_names_column_path_and_layout(tmp_path, key):
    _write(key, tmp_path)
    file, column = MISSING_COLUMN[key]
    path = tmp_path / FOLDERS.get(key, key) / file
    pd.read_csv(path).drop(columns=column).to_csv(path, index=False)
    with pytest.raises(SourceLayoutError, match=rf"{path}.*no column\(s\) \['{column}'\].*expected layout"):
        read_source(key, tmp_path)


@pytest.mark.parametrize("key, options, message", [
    ("product_10k", {}, r"did you mean 'products_10k'.*choose one of"),
    ("sop", {"split": "train"}, r"no option\(s\) \['split'\]; valid: \['splits'\]"),
])
def test_unknown_reader_or_option(tmp_path, key, options, message):
    with pytest.raises(ValueError, match=message):
        read_source(key, tmp_path, **options)
