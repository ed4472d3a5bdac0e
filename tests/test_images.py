"""The one decoder (odd image kinds, bad files), the DataLoader over bad files, and Preprocess."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from unifex_lib.data.dataset import ImageDataset, collate_skip_bad, image_folder_dataset
from unifex_lib.data.images import BadImageError, load_image
from unifex_lib.data.transforms import Preprocess, create_transform, is_deterministic

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _png_header_only(path, width, height):
    """A PNG whose IHDR declares ``width x height`` (no pixel data): a decompression-bomb header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _half_red_half_blue(w=8, h=4):
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = RED
    a[:, w // 2:] = BLUE
    return a


def _write_odd(kind, path):
    """Write one odd image kind; return the expected RGB array (independently derived)."""
    if kind == "exif_rotated":  # orientation 6: display = stored image rotated 90 degrees clockwise
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(_half_red_half_blue()).save(path, "PNG", exif=exif)
        return np.rot90(_half_red_half_blue(), k=-1)
    if kind == "palette":
        a = _half_red_half_blue()
        Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path, "PNG")
        return a
    if kind == "palette_transparent":  # palette entry 0 transparent -> white
        img = Image.new("P", (4, 2))
        img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        img.putdata([0, 1, 0, 1, 1, 0, 1, 0])
        img.save(path, "PNG", transparency=0)
        idx = np.array([0, 1, 0, 1, 1, 0, 1, 0]).reshape(2, 4)
        return np.where(idx[..., None] == 0, np.array(WHITE), np.array(BLUE)).astype(np.uint8)
    if kind == "grayscale":
        g = np.arange(32, dtype=np.uint8).reshape(4, 8) * 8
        Image.fromarray(g, mode="L").save(path, "PNG")
        return np.repeat(g[..., None], 3, axis=2)
    if kind == "cmyk":  # pure cyan ink: RGB = 255 - C (K = 0)
        Image.new("CMYK", (4, 4), (255, 0, 0, 0)).save(path, "TIFF")
        return np.full((4, 4, 3), (0, 255, 255), np.uint8)
    if kind == "sixteen_bit":
        v = np.array([[0, 257, 32896, 65535]], np.uint16)
        Image.fromarray(v).save(path, "PNG")
        return np.repeat(np.array([[0, 1, 128, 255]], np.uint8)[..., None], 3, axis=2)
    if kind == "rgba":  # transparent red -> white, opaque blue, red at alpha 128 -> (255, 127, 127)
        a = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [255, 0, 0, 128]]], np.uint8)
        Image.fromarray(a, mode="RGBA").save(path, "PNG")
        return np.array([[WHITE, BLUE, (255, 127, 127)]], np.uint8)
    if kind == "gray_alpha":
        Image.fromarray(np.array([[[0, 255], [0, 0]]], np.uint8), mode="LA").save(path, "PNG")
        return np.array([[(0, 0, 0), WHITE]], np.uint8)
    raise AssertionError(kind)


ODD_KINDS = ["exif_rotated", "palette", "palette_transparent", "grayscale", "cmyk", "sixteen_bit", "rgba",
             "gray_alpha"]


@pytest.mark.parametrize("kind", ODD_KINDS)
def test_odd_images_decode_to_rgb(tmp_path, kind):
    path = tmp_path / f"{kind}.img"
    expected = _write_odd(kind, path)
    image = load_image(path, strict=True)
    assert image.mode == "RGB"
    got = np.asarray(image).astype(int)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1


def _write_bad(kind, path):
    if kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, "PNG")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "not_an_image":
        path.write_text("path,label\na.jpg,0\n")
    elif kind == "bomb":
        _png_header_only(path, 100_000, 100_000)
    return {"zero_byte": "zero-byte", "truncated": "cannot decode", "not_an_image": "not an image",
            "bomb": "decompression bomb", "missing": "not found"}[kind]


BAD_KINDS = ["zero_byte", "truncated", "not_an_image", "bomb", "missing"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_raise_when_strict_and_are_skipped_otherwise(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    reason = _write_bad(kind, path)
    with pytest.raises(BadImageError, match=reason):
        load_image(path, strict=True)
    assert load_image(path) is None


def test_decompression_bomb_limit_names_size_and_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)
    with pytest.raises(BadImageError, match=r"40x30 = 1200 pixels exceeds the limit of 1000 pixels"):
        load_image(path, strict=True, max_pixels=1000)
    _png_header_only(path, 12_000, 10_000)  # 1.2e8 pixels: over PIL's default 89.5M, under its 2x error level
    with pytest.raises(BadImageError, match="decompression bomb: 12000x10000"):
        load_image(path, strict=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_over_folder_with_bad_files_finishes_and_reports(tmp_path, num_workers):
    folder = tmp_path / "images"
    for c in range(2):
        for i in range(3):
            (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20 + i, 16), (40 * i, 100, 50 * c)).save(folder / f"class{c}" / f"{i}.png")
    bad = {}
    for kind in ("zero_byte", "truncated", "not_an_image", "bomb"):
        bad[f"class1/{kind}.png"] = _write_bad(kind, folder / "class1" / f"{kind}.png")
    transform = create_transform("center_crop", size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    log = tmp_path / "run" / "bad_images.csv"
    dataset = image_folder_dataset(folder, transform, bad_images_file=log)
    loader = DataLoader(dataset, batch_size=4, num_workers=num_workers, collate_fn=collate_skip_bad)
    seen = []
    for batch in loader:
        if batch is None:
            continue
        images, labels, index = batch
        assert images.shape[1:] == (3, 16, 16)
        seen += index.tolist()
    good = [i for i, p in enumerate(dataset.paths) if p not in bad]
    assert sorted(seen) == good
    reported = {row["path"]: row["reason"] for row in dataset.bad_images()}
    assert set(reported) == set(bad)
    assert all(bad[p] in reported[p] for p in bad)
    with pytest.raises(BadImageError):
        ImageDataset(dataset.paths, dataset.labels, folder, transform, strict=True)[dataset.paths.index(
            "class1/zero_byte.png")]


# ----------------------------------------------------------------------------------------- transforms

def _reference_preprocess(x, size, mean, std, mode):
    """Second implementation with torchvision.transforms.v2 (float input)."""
    from torchvision.transforms.v2 import functional as TF
    bicubic = TF.InterpolationMode.BICUBIC
    if mode == "squash":
        y = TF.resize(x, [size, size], interpolation=bicubic, antialias=True).clamp(0, 255)
    else:
        y = TF.center_crop(TF.resize(x, size, interpolation=bicubic, antialias=True).clamp(0, 255), [size, size])
    return TF.normalize(y / 255.0, mean, std)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("mode", ["center_crop", "squash"])
@pytest.mark.parametrize("hw", [(50, 70), (71, 40), (45, 32), (32, 32)])  # (45, 32): crop offset 6.5
def test_preprocess_matches_torchvision_and_scripts(mode, hw):
    mean, std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)
    x = torch.randint(0, 256, (2, 3, *hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    module = Preprocess(32, mean, std, mode)
    eager = module(x)
    assert eager.shape == (2, 3, 32, 32) and eager.dtype == torch.float32
    torch.testing.assert_close(eager, _reference_preprocess(x.float(), 32, mean, std, mode), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.jit.script(module)(x), eager, atol=0, rtol=0)
    torch.testing.assert_close(module(x.float()), eager, atol=0, rtol=0)


def test_create_transform_uses_preprocess_exactly_and_augment_is_random():
    config = dict(input_size=(3, 24, 24), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]
    for name in ("center_crop", "squash"):
        t = create_transform(name, config)
        torch.testing.assert_close(t(image), Preprocess(24, config["mean"], config["std"], name)(x)[0],
                                   atol=0, rtol=0)
        assert is_deterministic(name)
    assert create_transform("center_crop", config, size=16)(image).shape == (3, 16, 16)
    augment = create_transform("augment", config, train=True)
    torch.manual_seed(0)
    a, b = augment(image), augment(image)
    assert a.shape == (3, 24, 24) and not torch.equal(a, b) and not is_deterministic("augment")
    torch.testing.assert_close(create_transform("augment", config, train=False)(image),
                               create_transform("center_crop", config)(image))


@pytest.mark.parametrize("call, message", [
    (lambda: create_transform("centre_crop", size=8, mean=(0,) * 3, std=(1,) * 3), "choose one of center_crop"),
    (lambda: create_transform("squash", size=8), "no mean, std"),
    (lambda: Preprocess(8, (0,) * 3, (1,) * 3, mode="crop"), "choose one of center_crop, squash"),
    (lambda: is_deterministic("flip"), "unknown transform 'flip'"),
])
def test_transform_errors_name_the_choices(call, message):
    with pytest.raises(ValueError, match=message):
        call()
