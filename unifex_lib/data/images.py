"""The one image decoder used everywhere (training, evaluation, export checks, crop caching).

:func:`load_image` returns an RGB ``PIL.Image``:

* EXIF orientation applied (``ImageOps.exif_transpose``);
* palette (``P``/``PA``), grayscale (``1``/``L``/``LA``), ``CMYK``, ``YCbCr``, 16-bit
  (``I;16*`` and ``I``, scaled ``v8 = round(v16 / 257)``) converted to RGB;
* alpha (``RGBA``/``LA``/``PA``/palette with transparency) composited over white:
  ``rgb = a/255 * rgb + (1 - a/255) * 255`` (transparent pixels carry arbitrary colours);
* images with more than ``max_pixels`` pixels (default ``PIL.Image.MAX_IMAGE_PIXELS``) are
  rejected as decompression bombs before any pixel is decoded;
* missing, zero-byte, truncated and non-image files are bad: ``strict=True`` raises
  :class:`BadImageError`, otherwise ``None`` is returned and the caller skips the item and lists it
  (see :class:`BadImageLog`, the run's ``bad_images.csv``).
"""
from __future__ import annotations

import csv
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

BAD_IMAGES_COLUMNS = ("path", "reason")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImageError(ValueError):
    """A file that cannot be decoded into an RGB image; ``path`` and ``reason`` say why."""

    def __init__(self, path, reason: str):
        super().__init__(f"bad image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _decode(path: Path, max_pixels: int) -> Image.Image:
    if not path.is_file():
        raise BadImageError(path, "file not found")
    if path.stat().st_size == 0:
        raise BadImageError(path, "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise BadImageError(path, f"decompression bomb: {width}x{height} = {width * height} pixels "
                                              f"exceeds the limit of {max_pixels} pixels")
                image.load()
                return _to_rgb(ImageOps.exif_transpose(image))
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image (unidentified format)") from None
    except Exception as err:  # any decoder failure (OSError, SyntaxError, struct.error in EXIF, ...)
        raise BadImageError(path, f"cannot decode ({type(err).__name__}: {err})") from None


def load_image(path: str | os.PathLike, strict: bool = False,
               max_pixels: Optional[int] = None) -> Optional[Image.Image]:
    """Decode ``path`` into an RGB ``PIL.Image`` (see the module docstring for the rules).

    A bad file raises :class:`BadImageError` with ``strict=True``; otherwise it is logged as a
    warning and ``None`` is returned. ``max_pixels`` defaults to ``PIL.Image.MAX_IMAGE_PIXELS``.
    """
    limit = int(max_pixels if max_pixels is not None else (Image.MAX_IMAGE_PIXELS or 2 ** 62))
    try:
        return _decode(Path(path), limit)
    except BadImageError as err:
        if strict:
            raise
        log.warning("skipping %s", err)
        return None


class BadImageLog:
    """Append-only ``bad_images.csv`` (``path,reason``) shared by DataLoader worker processes.

    The header is written when the log is created (in the main process); each bad item is one
    ``O_APPEND`` write, so workers never interleave rows. :meth:`read` drops repeats (the same
    file is met again every epoch).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file() or self.path.stat().st_size == 0:
            self.path.write_text(",".join(BAD_IMAGES_COLUMNS) + "\n")

    def add(self, path: str, reason: str) -> None:
        row = io.StringIO()
        csv.writer(row).writerow([path, reason])
        with open(self.path, "a") as f:
            f.write(row.getvalue())

    def read(self) -> list[dict]:
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        seen, unique = set(), []
        for row in rows:
            if row["path"] not in seen:
                seen.add(row["path"])
                unique.append(row)
        return unique
