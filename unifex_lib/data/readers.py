"""Readers of the source datasets, one function per source, in a registry ``key -> reader``.

Every reader turns one dataset, in the layout its publisher distributes, into the annotation
table (``path, label, domain, split``; paths relative to the data root) plus the columns
``source`` (the reader key) and ``class_name`` (the dataset's own class id, as a string)::

    table = read_source("products_10k", data_root)              # <data_root>/products-10k/...
    table = read_source("stanford_cars", data_root, refined=True)
    list_readers()                                               # every key

Labels are ``0..C-1`` over the source's classes in natural order of ``class_name``. A
missing root folder, file or column raises an error that names the path and the expected
layout (``describe_reader(key)``).

Training sources of M4D-35k (Florek et al., "Efficient and Discriminative Image Feature
Extraction for Universal Image Retrieval", arXiv:2409.13513) and the UnED benchmark
(Ypsilantis et al., "Towards Universal Image Embeddings", ICCV 2023, arXiv:2309.01858); zero-shot
retrieval benchmarks with their standard splits: CUB-200-2011 (classes 1-100 train, 101-200
test), Cars196 (first 98 / last 98 classes), Stanford Online Products (``Ebay_train`` 11,318 /
``Ebay_test`` 11,316 classes, Song et al., arXiv:1511.06452), In-Shop (train / query /
gallery -> ``index``) and iNaturalist-2018 with the Smooth-AP split files (Brown et al.,
arXiv:2007.12163).
"""
from __future__ import annotations

import difflib
import inspect
import json
import logging
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd

from .annotations import validate_annotations
from .images import load_image

log = logging.getLogger(__name__)

TABLE_COLUMNS = ("path", "label", "domain", "split", "source", "class_name")
STANFORD_CARS_COLOURS = ("black", "blue", "brown", "green", "grey", "orange", "red", "silver", "white", "yellow")
CROP_MARGIN = 0.02


class SourceLayoutError(ValueError):
    """A source dataset's files do not have the expected layout (e.g. a missing column)."""


@dataclass(frozen=True)
class ReaderInfo:
    key: str
    folder: str  # default root folder under the data root
    domain: str  # domain of every row, unless the reader sets its own (UnED)
    layout: str  # the expected native layout, quoted in errors
    fn: Callable


READERS: dict[str, ReaderInfo] = {}


def register_reader(key: str, folder: str, domain: str, layout: str):
    """Register ``fn(src: Source, **options) -> DataFrame(path, class_name, split[, domain])``."""
    def decorate(fn: Callable) -> Callable:
        if key in READERS:
            raise ValueError(f"reader '{key}' is registered twice")
        READERS[key] = ReaderInfo(key, folder, domain, layout, fn)
        return fn
    return decorate


def list_readers() -> list[str]:
    return sorted(READERS)


def get_reader(key: str) -> ReaderInfo:
    if key not in READERS:
        close = difflib.get_close_matches(key, READERS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown dataset reader '{key}'{hint}; choose one of {', '.join(list_readers())}")
    return READERS[key]


def reader_options(key: str) -> list[str]:
    """Names of the keyword options the reader ``key`` accepts."""
    return [n for n in inspect.signature(get_reader(key).fn).parameters if n != "src"]


def describe_reader(key: str) -> str:
    info = get_reader(key)
    return f"<data_root>/{info.folder}/: {info.layout}"


class Source:
    """A source's root folder plus checked access to its files (errors name path and layout)."""

    def __init__(self, key: str, root: Path, layout: str):
        self.key, self.root, self.layout = key, root, layout

    def expected(self) -> str:
        return f"expected layout of '{self.key}': {self.layout}"

    def file(self, rel: str) -> Path:
        path = self.root / rel
        if not path.is_file():
            raise FileNotFoundError(f"{self.key}: file not found: {path}; {self.expected()}")
        return path

    def dir(self, rel: str) -> Path:
        path = self.root / rel
        if not path.is_dir():
            raise FileNotFoundError(f"{self.key}: folder not found: {path}; {self.expected()}")
        return path

    def json(self, rel: str):
        with open(self.file(rel)) as f:
            return json.load(f)

    def require(self, table: pd.DataFrame, columns: Sequence[str], rel: str) -> pd.DataFrame:
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise SourceLayoutError(f"{self.key}: {self.root / rel} has no column(s) {missing} "
                                    f"(found {list(table.columns)}); {self.expected()}")
        return table

    def csv(self, rel: str, columns: Sequence[str], **kwargs) -> pd.DataFrame:
        return self.require(pd.read_csv(self.file(rel), **kwargs), columns, rel)


def _rows(paths, classes, split) -> pd.DataFrame:
    """The reader output: ``path`` (relative to the source root), ``class_name``, ``split``."""
    paths = pd.Series(list(paths), dtype="object").astype(str)
    return pd.DataFrame({"path": paths, "class_name": pd.Series(list(classes), dtype="object").astype(str).values,
                         "split": split})


def _natural_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def read_source(key: str, data_root, folder: Optional[str] = None, **options) -> pd.DataFrame:
    """Read source ``key`` under ``data_root`` (its folder defaults to the registered one).

    Returns the annotation table with columns ``path, label, domain, split, source, class_name``.
    """
    info = get_reader(key)
    unknown = sorted(set(options) - set(reader_options(key)))
    if unknown:
        raise ValueError(f"reader '{key}' has no option(s) {unknown}; valid: {reader_options(key)}")
    folder = info.folder if folder is None else folder
    root = Path(data_root) / folder
    if not root.is_dir():
        raise FileNotFoundError(f"{key}: root folder not found: {root}; expected layout: {describe_reader(key)}")
    rows = info.fn(Source(key, root, info.layout), **options)
    table = pd.DataFrame({
        "path": [posixpath.normpath(posixpath.join(Path(folder).as_posix(), p)) for p in rows["path"]],
        "label": 0,
        "domain": rows["domain"].values if "domain" in rows else info.domain,
        "split": rows["split"].values,
        "source": key,
        "class_name": rows["class_name"].values,
    })
    classes = sorted(table["class_name"].unique(), key=_natural_key)
    table["label"] = table["class_name"].map({c: i for i, c in enumerate(classes)}).astype("int64")
    return validate_annotations(table, source=f"reader '{key}'")[list(TABLE_COLUMNS)]


def crop_box(image, box: Sequence[float], margin: float = CROP_MARGIN):
    """Crop ``box = (x1, y1, x2, y2)`` widened by ``margin`` of its width/height on each side,
    clipped to the image: ``(max(x1 - m*w, 0), max(y1 - m*h, 0), min(x2 + m*w, W), min(y2 + m*h, H))``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dw, dh = (x2 - x1) * margin, (y2 - y1) * margin
    return image.crop((max(x1 - dw, 0), max(y1 - dh, 0), min(x2 + dw, image.width), min(y2 + dh, image.height)))


def _cached_crop(src: Source, image_rel: str, box: Sequence[float], crop_rel: str) -> Optional[str]:
    """Write the crop once (JPEG, quality 95) and return its path relative to the root; None if the
    source image is bad (logged)."""
    out = src.root / crop_rel
    if not out.is_file():
        image = load_image(src.root / image_rel)
        if image is None:
            return None
        out.parent.mkdir(parents=True, exist_ok=True)
        crop_box(image, box).save(out, quality=95)
    return crop_rel


def _csv_source(src: Source, rel: str, path_col: str, class_col: str, prefix: str = "") -> pd.DataFrame:
    """The common layout: one CSV with an image-path column and a class column; images ``<prefix><path>``."""
    t = src.csv(rel, [path_col, class_col])
    return _rows(prefix + t[path_col].astype(str), t[class_col], "train")


# --------------------------------------------------------------------------- M4D-35k sources

@register_reader("products_10k", "products-10k", "packaged_goods",
                 "train.csv (columns name, class); images train/<name>")
def read_products_10k(src: Source) -> pd.DataFrame:
    return _csv_source(src, "train.csv", "name", "class", "train/")


@register_reader("gldv2", "google_landmark_recognition_2021", "landmarks",
                 "train.csv (columns id, landmark_id); images train/<id[0]>/<id[1]>/<id[2]>/<id>.jpg; "
                 "optional class-subset CSV (column landmark_id)")
def read_gldv2(src: Source, class_subset: Optional[str] = None) -> pd.DataFrame:
    """``class_subset``: CSV (relative to the root) whose ``landmark_id`` column lists the classes to keep."""
    t = src.csv("train.csv", ["id", "landmark_id"], dtype={"id": str})
    if class_subset is not None:
        keep = src.csv(class_subset, ["landmark_id"])["landmark_id"]
        t = t[t["landmark_id"].isin(set(keep))]
    ids = t["id"]
    return _rows("train/" + ids.str[0] + "/" + ids.str[1] + "/" + ids.str[2] + "/" + ids + ".jpg",
                 t["landmark_id"], "train")


@register_reader("deep_fashion", "deepfashion", "apparel",
                 "deepfashion_train.json ({group: {item_id: [image paths relative to the root]}}); "
                 "label = the item folder path.split('/')[-2]")
def read_deep_fashion(src: Source, annotation_file: str = "deepfashion_train.json") -> pd.DataFrame:
    groups = src.json(annotation_file)
    paths = [p for items in groups.values() for ps in items.values() for p in ps]
    return _rows(paths, [p.split("/")[-2] for p in paths], "train")


@register_reader("stanford_cars", "stanford_cars", "cars",
                 "sc_train.csv (columns image, Label); images cars_train/cars_train/<image>; refined=True reads "
                 "sc_train_refined.csv (x1,y1,x2,y2,Class,image,Probability, Color) with class <Class>_<colour index>")
def read_stanford_cars(src: Source, refined: bool = False) -> pd.DataFrame:
    """Refined classes split each model class by colour: index in ``STANFORD_CARS_COLOURS``
    (0 black, 1 blue, 2 brown, 3 green, 4 grey, 5 orange, 6 red, 7 silver, 8 white, 9 yellow)."""
    images = "cars_train/cars_train/"
    if not refined:
        return _csv_source(src, "sc_train.csv", "image", "Label", images)
    rel = "sc_train_refined.csv"
    t = src.csv(rel, ["x1", "y1", "x2", "y2", "Class", "image", "Probability"])
    colour_col = next((c for c in t.columns if c.lower() in ("color", "colour")), None)
    if colour_col is None:
        src.require(t, ["Color"], rel)  # raises: names the missing colour column
    colours = t[colour_col].map(_colour_index)
    return _rows(images + t["image"].astype(str), t["Class"].astype(str) + "_" + colours.astype(str), "train")


def _colour_index(value) -> int:
    if isinstance(value, str) and not value.strip().isdigit():
        name = value.strip().lower().replace("gray", "grey")
        if name not in STANFORD_CARS_COLOURS:
            raise SourceLayoutError(f"stanford_cars: unknown colour '{value}'; valid: {list(STANFORD_CARS_COLOURS)}")
        return STANFORD_CARS_COLOURS.index(name)
    index = int(value)
    if not 0 <= index < len(STANFORD_CARS_COLOURS):
        raise SourceLayoutError(f"stanford_cars: colour index {index} outside 0..{len(STANFORD_CARS_COLOURS) - 1}")
    return index


@register_reader("met_art", "met_dataset", "artwork",
                 "ground_truth/MET_database.json (list of {id, path}); images MET/<path>")
def read_met_art(src: Source) -> pd.DataFrame:
    rel = "ground_truth/MET_database.json"
    t = src.require(pd.DataFrame(src.json(rel)), ["id", "path"], rel)
    return _rows("MET/" + t["path"].astype(str), t["id"], "train")


@register_reader("shopee", "shopee", "packaged_goods",
                 "train.csv (columns image, label_group); images train_images/<image>")
def read_shopee(src: Source) -> pd.DataFrame:
    return _csv_source(src, "train.csv", "image", "label_group", "train_images/")


@register_reader("hm", "hm_personalized_fashion", "apparel",
                 "articles.csv (columns article_id, product_code = class); "
                 "images images/<first 3 chars>/<article_id>.jpg (article_id zero-padded to 10 digits)")
def read_hm(src: Source) -> pd.DataFrame:
    """Articles without an image file (the competition ships a few) are left out."""
    t = src.csv("articles.csv", ["article_id", "product_code"], dtype={"article_id": str})
    ids = t["article_id"].str.zfill(10)
    paths = "images/" + ids.str[:3] + "/" + ids + ".jpg"
    exists = paths.map(lambda p: (src.root / p).is_file())
    if not exists.all():
        log.warning("hm: %d of %d articles have no image file; left out", int((~exists).sum()), len(t))
    return _rows(paths[exists], t["product_code"][exists], "train")


@register_reader("rp2k", "rp2k", "packaged_goods", "train.csv (columns img_path, img_id); images train/<img_path>")
def read_rp2k(src: Source) -> pd.DataFrame:
    return _csv_source(src, "train.csv", "img_path", "img_id", "train/")


@register_reader("sop", "stanford_online_products", "products",
                 "Ebay_train.txt / Ebay_test.txt (header 'image_id class_id super_class_id path', "
                 "space-separated); images <path>")
def read_sop(src: Source, splits: Sequence[str] = ("train", "test")) -> pd.DataFrame:
    """Standard split: ``Ebay_train`` (11,318 classes) -> train, ``Ebay_test`` (11,316) -> test."""
    parts = []
    for split in splits:
        rel = f"Ebay_{split}.txt"
        t = src.csv(rel, ["class_id", "path"], sep=r"\s+")
        parts.append(_rows(t["path"], t["class_id"], split))
    return pd.concat(parts, ignore_index=True)


@register_reader("fashion200k", "fashion200k", "apparel", "train.csv (columns img_path, img_id); images <img_path>")
def read_fashion200k(src: Source) -> pd.DataFrame:
    return _csv_source(src, "train.csv", "img_path", "img_id")


@register_reader("furniture180", "furniture_180", "furniture",
                 "furniture180_train.csv (columns img_path, label); images <img_path>")
def read_furniture180(src: Source) -> pd.DataFrame:
    return _csv_source(src, "furniture180_train.csv", "img_path", "label")


@register_reader("storefronts146", "storefronts_146", "storefronts",
                 "storefronts146_train.csv (columns img_path, label); images <img_path>")
def read_storefronts146(src: Source) -> pd.DataFrame:
    return _csv_source(src, "storefronts146_train.csv", "img_path", "label")


@register_reader("food_rec22", "fr22_train_v2", "food",
                 "annotations.json (COCO: images [{id, file_name}], annotations [{image_id, category_id, "
                 "bbox [x, y, w, h]}]); images images/<file_name>")
def read_food_rec22(src: Source, crop_dir: str = "crops") -> pd.DataFrame:
    """One crop per box (2 % margin), cached as ``<crop_dir>/<category_id>/<image stem>_<annotation id>.jpg``."""
    coco = src.json("annotations.json")
    src.dir("images")
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    paths, classes = [], []
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        name = files[ann["image_id"]]
        crop_rel = f"{crop_dir}/{ann['category_id']}/{Path(name).stem}_{ann.get('id', len(paths))}.jpg"
        path = _cached_crop(src, f"images/{name}", (x, y, x + w, y + h), crop_rel)
        if path is not None:
            paths.append(path)
            classes.append(ann["category_id"])
    return _rows(paths, classes, "train")


@register_reader("deep_fashion2", "deepfashion2", "apparel",
                 "<subset>/image/<id>.jpg and <subset>/annos/<id>.json ({source, pair_id, item1: {style, "
                 "bounding_box [x1, y1, x2, y2], ...}, item2: ...})")
def read_deep_fashion2(src: Source, subset: str = "train", crop_dir: str = "crops") -> pd.DataFrame:
    """Items with ``style > 0``, label ``<pair_id>_<style>``; an image with more than one item is
    cropped per item (2 % margin, cached under ``<crop_dir>/<subset>/<label>/``), else used whole."""
    src.dir(f"{subset}/image")
    paths, classes = [], []
    for anno in sorted(src.dir(f"{subset}/annos").glob("*.json")):
        ann = json.loads(anno.read_text())
        items = {k: v for k, v in ann.items() if k.startswith("item")}
        image_rel = f"{subset}/image/{anno.stem}.jpg"
        for key, item in sorted(items.items()):
            if int(item["style"]) <= 0:
                continue
            label = f"{ann['pair_id']}_{item['style']}"
            path = image_rel if len(items) == 1 else _cached_crop(
                src, image_rel, item["bounding_box"], f"{crop_dir}/{subset}/{label}/{anno.stem}_{key}.jpg")
            if path is not None:
                paths.append(path)
                classes.append(label)
    return _rows(paths, classes, "train")


@register_reader("food101", "food-101", "food",
                 "meta/train.json and meta/test.json ({class: [<class>/<name>]}); images images/<name>.jpg")
def read_food101(src: Source, splits: Sequence[str] = ("train", "test")) -> pd.DataFrame:
    parts = []
    for split in splits:
        meta = src.json(f"meta/{split}.json")
        names = [(c, n) for c, ns in meta.items() for n in ns]
        parts.append(_rows([f"images/{n}.jpg" for _, n in names], [c for c, _ in names], split))
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- UnED (and the demo data)

UNED_LAYOUT = ("info_files/<domain>/<split>.json (list of {path, class_id: int | [int]}, class ids local to the "
               "domain, splits train/val/test, index, small_index); images <images_dir>/<path>")


def _read_uned(src: Source, domains: Optional[Sequence[str]] = None, splits: Optional[Sequence[str]] = None,
               images_dir: str = "images") -> pd.DataFrame:
    """Class ``<domain>/<class_id>`` (the first id when ``class_id`` is a list)."""
    info = src.dir("info_files")
    domains = sorted(d.name for d in info.iterdir() if d.is_dir()) if domains is None else list(domains)
    parts = []
    for domain in domains:
        files = sorted(src.dir(f"info_files/{domain}").glob("*.json")) if splits is None else \
            [src.file(f"info_files/{domain}/{s}.json") for s in splits]
        for file in files:
            items = json.loads(file.read_text())
            ids = [i["class_id"][0] if isinstance(i["class_id"], list) else i["class_id"] for i in items]
            part = _rows([f"{images_dir}/{i['path']}" for i in items], [f"{domain}/{c}" for c in ids], file.stem)
            part["domain"] = domain
            parts.append(part)
    if not parts:
        raise FileNotFoundError(f"{src.key}: no split files under {info}; expected layout: {src.layout}")
    return pd.concat(parts, ignore_index=True)


register_reader("uned", "uned", "uned", UNED_LAYOUT)(_read_uned)
register_reader("demo", ".", "demo", UNED_LAYOUT + " (the demo data, unifex_lib.data.demo)")(_read_uned)


# --------------------------------------------------------------------------- zero-shot retrieval benchmarks

def _half_split(classes: pd.Series) -> pd.Series:
    """First half of the classes (natural order) -> train, the rest -> test."""
    ordered = sorted(classes.astype(str).unique(), key=_natural_key)
    train = set(ordered[:len(ordered) // 2])
    return classes.astype(str).map(lambda c: "train" if c in train else "test")


@register_reader("cub200", "CUB_200_2011", "birds",
                 "images.txt ('<id> <path>'), image_class_labels.txt ('<id> <class>'); images images/<path>")
def read_cub200(src: Source) -> pd.DataFrame:
    """Classes 1-100 train, 101-200 test."""
    images = src.csv("images.txt", ["id", "path"], sep=" ", names=["id", "path"])
    labels = src.csv("image_class_labels.txt", ["id", "class"], sep=" ", names=["id", "class"])
    t = images.merge(labels, on="id", validate="one_to_one")
    return _rows("images/" + t["path"], t["class"], _half_split(t["class"]).values)


@register_reader("cars196", "stanford_cars196", "cars",
                 "cars_annos.mat (struct 'annotations' with relative_im_path, class, ...); images car_ims/")
def read_cars196(src: Source) -> pd.DataFrame:
    """Classes 1-98 train, 99-196 test."""
    from scipy.io import loadmat

    rel = "cars_annos.mat"
    mat = loadmat(src.file(rel), squeeze_me=True)
    if "annotations" not in mat:
        raise SourceLayoutError(f"cars196: {src.root / rel} has no 'annotations' struct; {src.expected()}")
    ann = mat["annotations"]
    t = src.require(pd.DataFrame({n: ann[n].tolist() for n in ann.dtype.names}), ["relative_im_path", "class"], rel)
    return _rows(t["relative_im_path"], t["class"], _half_split(t["class"]).values)


@register_reader("inshop", "inshop", "apparel",
                 "list_eval_partition.txt (count line, header 'image_name item_id evaluation_status', "
                 "rows train/query/gallery); images <image_name> (img/...)")
def read_inshop(src: Source, partition_file: str = "list_eval_partition.txt") -> pd.DataFrame:
    """Splits train, query, gallery -> ``index``."""
    t = src.csv(partition_file, ["image_name", "item_id", "evaluation_status"], sep=r"\s+", skiprows=1)
    return _rows(t["image_name"], t["item_id"], t["evaluation_status"].replace({"gallery": "index"}).values)


@register_reader("inaturalist", "inaturalist", "natural_world",
                 "Inat_dataset_splits/Inaturalist_{train,test}_set1.txt (one image path per line, "
                 "<...>/<class>/<file>); images <path>")
def read_inaturalist(src: Source) -> pd.DataFrame:
    """Smooth-AP split files; class = the image's folder name."""
    parts = []
    for split in ("train", "test"):
        lines = src.file(f"Inat_dataset_splits/Inaturalist_{split}_set1.txt").read_text().split()
        parts.append(_rows(lines, [p.split("/")[-2] for p in lines], split))
    return pd.concat(parts, ignore_index=True)
