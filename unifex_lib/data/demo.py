"""A small, offline, *universal* retrieval dataset for demos and tests.

Four visually different domains, each class a distinct object drawn with per-image
variation (pose, scale, colour, background, noise):

* ``glyphs``   — a character in one DejaVu font (the fonts matplotlib ships);
* ``shapes``   — a random star-like polygon with its own fill style and hue;
* ``textures`` — a sum of two oriented sinusoidal gratings in a two-colour palette;
* ``products`` — a "package": box shape and colours, a band and a printed letter, on clutter.

The folder follows the UnED benchmark layout (Ypsilantis et al., "Towards Universal
Image Embeddings: A Large-Scale Dataset and Challenge for Generic Image Representations",
ICCV 2023, arXiv:2309.01858)::

    <out>/images/<domain>/<class>/<i>.png
    <out>/info_files/<domain>/{train,val,test}.json   # [{"path": "<domain>/<class>/<i>.png", "class_id": int}]
    <out>/annotations.csv                              # path,label,domain,split (path relative to <out>)
    <out>/train.csv, <out>/class_counts.csv            # the train split, labels 0..C-1, and its counts

Split-file paths are relative to ``<out>/images`` (the images root); class ids are local
to each domain. Train, val and test classes are disjoint (open-set, as in UnED).
Everything is a pure function of ``seed`` and the size arguments: the same call writes
byte-identical files.
"""
from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from unifex_lib.data.annotations import write_annotations, write_class_counts, write_split_file

DOMAINS = ("glyphs", "shapes", "textures", "products")
SPLITS = ("train", "val", "test")
_FONT_DIR = Path(__import__("matplotlib").get_data_path()) / "fonts" / "ttf"
_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono-Bold.ttf",
          "DejaVuSerif-BoldItalic.ttf")
_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrty23456789#%&@?$ΔΣΦΨΩλπ§¶※★♠♣♥♦"


@dataclass(frozen=True)
class DemoSpec:
    """Sizes of the demo set: classes per domain for each split and images per class."""
    train_classes: int = 24
    val_classes: int = 8
    test_classes: int = 12
    images_per_class: int = 8
    size: int = 64

    def split_of(self, class_index: int) -> str:
        if class_index < self.train_classes:
            return "train"
        return "val" if class_index < self.train_classes + self.val_classes else "test"

    @property
    def classes_per_domain(self) -> int:
        return self.train_classes + self.val_classes + self.test_classes


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _hsv(h: float, s: float, v: float) -> tuple:
    rgb = Image.new("HSV", (1, 1), (int(h * 255) % 256, int(s * 255), int(v * 255))).convert("RGB")
    return rgb.getpixel((0, 0))


def _class_specs(domain: str, n: int, seed: int) -> list[dict]:
    """One dict of class-defining attributes per class (distinct within the domain)."""
    rng = _rng(seed, DOMAINS.index(domain))
    if domain == "glyphs":
        pairs = [(c, f) for c in _CHARS for f in _FONTS]
        picks = rng.choice(len(pairs), size=n, replace=False)
        return [{"char": pairs[i][0], "font": pairs[i][1]} for i in picks]
    if domain == "shapes":
        return [{"radii": rng.uniform(0.35, 1.0, size=int(rng.integers(3, 9))).tolist(),
                 "hue": float(rng.uniform()), "style": int(rng.integers(3))} for _ in range(n)]
    if domain == "textures":
        return [{"freqs": rng.uniform(2.0, 9.0, size=2).tolist(), "angles": rng.uniform(0, np.pi, size=2).tolist(),
                 "hues": rng.uniform(size=2).tolist()} for _ in range(n)]
    return [{"aspect": float(rng.uniform(0.45, 0.9)), "hue": float(rng.uniform()), "band_hue": float(rng.uniform()),
             "band_pos": float(rng.uniform(0.2, 0.7)), "char": _CHARS[int(rng.integers(len(_CHARS)))]}
            for _ in range(n)]


def _draw_glyph(spec: dict, rng: np.random.Generator, canvas: int) -> Image.Image:
    bg = _hsv(rng.uniform(), rng.uniform(0, 0.4), rng.uniform(0.6, 1.0))
    fg = _hsv(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.0, 0.45))
    img = Image.new("RGB", (canvas, canvas), bg)
    font = ImageFont.truetype(str(_FONT_DIR / spec["font"]), int(canvas * rng.uniform(0.55, 0.8)))
    ImageDraw.Draw(img).text((canvas / 2, canvas / 2), spec["char"], fill=fg, font=font, anchor="mm")
    return img.rotate(rng.uniform(-25, 25), resample=Image.BICUBIC, fillcolor=bg,
                      translate=tuple(rng.uniform(-0.08, 0.08, 2) * canvas))


def _draw_shape(spec: dict, rng: np.random.Generator, canvas: int) -> Image.Image:
    bg = _hsv(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.2, 1.0))
    fill = _hsv(spec["hue"] + rng.uniform(-0.04, 0.04), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    radii = np.asarray(spec["radii"])
    k = len(radii)
    angles = np.arange(2 * k) * np.pi / k + rng.uniform(0, 2 * np.pi)
    r = np.empty(2 * k)
    r[0::2], r[1::2] = radii, 0.35 * radii.mean()
    r *= canvas * rng.uniform(0.3, 0.45)
    center = canvas / 2 + rng.uniform(-0.1, 0.1, 2) * canvas
    points = [tuple(center + ri * np.array([np.cos(a), np.sin(a)])) for ri, a in zip(r, angles)]
    img = Image.new("RGB", (canvas, canvas), bg)
    draw = ImageDraw.Draw(img)
    if spec["style"] == 0:
        draw.polygon(points, fill=fill)
    elif spec["style"] == 1:
        draw.polygon(points, outline=fill, width=max(2, canvas // 24))
    else:
        draw.polygon(points, fill=fill, outline=_hsv(spec["hue"] + 0.5, 1, 0.3), width=max(2, canvas // 24))
    return img


def _draw_texture(spec: dict, rng: np.random.Generator, canvas: int) -> Image.Image:
    yy, xx = np.mgrid[0:canvas, 0:canvas] / canvas
    rot = rng.uniform(-0.2, 0.2)
    wave = np.zeros((canvas, canvas))
    for f, a in zip(spec["freqs"], spec["angles"]):
        f *= rng.uniform(0.9, 1.1)
        wave += np.sin(2 * np.pi * f * (xx * np.cos(a + rot) + yy * np.sin(a + rot)) + rng.uniform(0, 2 * np.pi))
    t = (wave / 4 + 0.5)[..., None]
    c0, c1 = (np.array(_hsv(h + rng.uniform(-0.03, 0.03), 0.8, rng.uniform(0.5, 1.0)), float) for h in spec["hues"])
    return Image.fromarray(np.clip(c0 * t + c1 * (1 - t), 0, 255).astype(np.uint8))


def _draw_product(spec: dict, rng: np.random.Generator, canvas: int) -> Image.Image:
    img = Image.new("RGB", (canvas, canvas), _hsv(rng.uniform(), 0.2, rng.uniform(0.3, 0.9)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):  # background clutter
        x, y, r = rng.uniform(0, canvas, 3) * (1, 1, 0.25)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_hsv(rng.uniform(), 0.3, rng.uniform(0.3, 0.9)))
    h = canvas * rng.uniform(0.6, 0.8)
    w = h * spec["aspect"]
    box = Image.new("RGB", (int(w), int(h)), _hsv(spec["hue"], 0.85, 0.85))
    bd = ImageDraw.Draw(box)
    y0 = int(h * spec["band_pos"])
    bd.rectangle((0, y0, w, y0 + h * 0.18), fill=_hsv(spec["band_hue"], 0.9, 0.5))
    font = ImageFont.truetype(str(_FONT_DIR / "DejaVuSans-Bold.ttf"), int(w * 0.55))
    bd.text((w / 2, h * 0.3), spec["char"], fill=(250, 250, 250), font=font, anchor="mm")
    box = box.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, expand=True)
    mask = box.convert("L").point(lambda v: 255 if v > 0 else 0)
    x = int((canvas - box.size[0]) / 2 + rng.uniform(-0.1, 0.1) * canvas)
    y = int((canvas - box.size[1]) / 2 + rng.uniform(-0.1, 0.1) * canvas)
    img.paste(box, (x, y), mask)
    return img


_DRAW = {"glyphs": _draw_glyph, "shapes": _draw_shape, "textures": _draw_texture, "products": _draw_product}


def render(domain: str, spec: dict, rng: np.random.Generator, size: int) -> Image.Image:
    """Draw one view of a class at 2x, add blur/noise, downsample to ``size``."""
    img = _DRAW[domain](spec, rng, 2 * size)
    if rng.uniform() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    img = img.resize((size, size), Image.LANCZOS)
    noise = rng.normal(0, rng.uniform(0, 8), (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, float) + noise, 0, 255).astype(np.uint8))


def generate_demo(out_dir, seed: int = 0, train_classes: int = 24, val_classes: int = 8, test_classes: int = 12,
                  images_per_class: int = 8, size: int = 64, domains=DOMAINS) -> Path:
    """Write the demo dataset to ``out_dir`` (replacing an earlier one) and return the folder."""
    spec = DemoSpec(train_classes, val_classes, test_classes, images_per_class, size)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown demo domain(s) {unknown}; choose from {list(DOMAINS)}")
    for name, value, low in (("train_classes", train_classes, 1), ("val_classes", val_classes, 1),
                             ("test_classes", test_classes, 1), ("images_per_class", images_per_class, 2),
                             ("size", size, 16)):
        if value < low:
            raise ValueError(f"{name}={value} must be >= {low}")
    out = Path(out_dir)
    for sub in ("images", "info_files"):
        shutil.rmtree(out / sub, ignore_errors=True)
    rows, next_label = [], 0
    for domain in domains:
        items = {s: [] for s in SPLITS}
        for c, class_spec in enumerate(_class_specs(domain, spec.classes_per_domain, seed)):
            split = spec.split_of(c)
            for i in range(images_per_class):
                rel = f"{domain}/c{c:04d}/{i:03d}.png"
                path = out / "images" / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                render(domain, class_spec, _rng(seed, DOMAINS.index(domain), c, i), size).save(path, optimize=False)
                items[split].append({"path": rel, "class_id": c})
                rows.append({"path": f"images/{rel}", "label": next_label + c, "domain": domain, "split": split})
        next_label += spec.classes_per_domain
        for split, split_items in items.items():
            write_split_file(split_items, out / "info_files" / domain / f"{split}.json")
    table = pd.DataFrame(rows)
    write_annotations(table, out / "annotations.csv")
    train = table[table.split == "train"].copy()
    train["label"] = pd.factorize(train["label"], sort=True)[0]
    write_annotations(train, out / "train.csv")
    write_class_counts(train["label"], out / "class_counts.csv")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    for name, default in (("train-classes", 24), ("val-classes", 8), ("test-classes", 12),
                          ("images-per-class", 8), ("size", 64)):
        parser.add_argument(f"--{name}", type=int, default=default)
    a = parser.parse_args(argv)
    out = generate_demo(a.out, a.seed, a.train_classes, a.val_classes, a.test_classes, a.images_per_class, a.size)
    print(f"demo dataset written to {out}")


if __name__ == "__main__":
    main()
