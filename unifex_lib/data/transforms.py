"""Train/eval image transforms, chosen by name, and the one tensor preprocessing module.

:class:`Preprocess` is the geometry + normalisation of every deterministic transform. The
same module runs in the eager eval transform (PIL -> uint8 tensor -> ``Preprocess``) and inside
the exported TorchScript GUIEC model (uint8 ``[1,3,H,W]`` at native size), so export parity is
exact by construction.

Transforms (``create_transform(name, ...)``):

* ``center_crop`` (deterministic, the reference default): short-side resize to ``S`` (bicubic,
  antialiased) then a centred ``S x S`` crop.
* ``squash`` (deterministic): resize to ``S x S`` ignoring the aspect ratio.
* ``augment`` (random, training only): random resized crop (scale 0.35-1, aspect 3/4-4/3),
  horizontal flip (p=0.5), colour jitter (brightness/contrast/saturation 0.2, hue 0.02), then the
  same normalisation. With ``train=False`` it gives the ``center_crop`` transform.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

MODES = ("center_crop", "squash")
TRANSFORMS = ("center_crop", "squash", "augment")
_DETERMINISTIC = {"center_crop": True, "squash": True, "augment": False}


class Preprocess(nn.Module):
    """uint8 / float 0-255 ``[B,3,H,W]`` of any size -> float32 normalised ``[B,3,size,size]``.

    ``center_crop``: resize so the short side is ``size`` (long side ``int(size * long / short)``,
    as torchvision), bicubic with antialias, clamp to [0, 255], then crop ``size x size`` at offset
    ``round((H' - size) / 2), round((W' - size) / 2)``. ``squash``: bicubic resize to
    ``size x size``. Then ``y = (x / 255 - mean) / std`` per channel. An input already
    ``size x size`` is not resampled. TorchScript-compatible (``torch.jit.script``).
    """

    __constants__ = ["size", "mode"]

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], mode: str = "center_crop"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown preprocessing mode '{mode}'; choose one of {', '.join(MODES)}")
        if int(size) <= 0:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 channel values with std > 0, got mean={mean}, std={std}")
        self.size = int(size)
        self.mode = mode
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, 3, 1, 1), persistent=False)

    def _resized_hw(self, h: int, w: int) -> List[int]:
        if self.mode == "squash":
            return [self.size, self.size]
        if h <= w:
            return [self.size, int(self.size * w / h)]
        return [int(self.size * h / w), self.size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        h, w = x.shape[-2], x.shape[-1]
        out_hw = self._resized_hw(h, w)
        if out_hw[0] != h or out_hw[1] != w:
            # = F.interpolate(x, out_hw, mode="bicubic", align_corners=False, antialias=True), called
            # directly: scripted interpolate stores every mode's branch, and its lanczos op does not
            # exist in PyTorch 1.11 (the GUIEC scorer), which recompiles the saved code on load.
            x = torch._C._nn._upsample_bicubic2d_aa(x, out_hw, False, None)
            x = x.clamp(0.0, 255.0)
        if self.mode == "center_crop":
            top = int(round((out_hw[0] - self.size) / 2.0))
            left = int(round((out_hw[1] - self.size) / 2.0))
            x = x[:, :, top:top + self.size, left:left + self.size]
        return (x / 255.0 - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode}"


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor ``[3,H,W]``."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class PreprocessTransform:
    """Deterministic transform: PIL -> uint8 tensor -> :class:`Preprocess` -> ``[3,S,S]``."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess

    def __call__(self, image: Image.Image) -> torch.Tensor:
        with torch.no_grad():
            return self.preprocess(pil_to_tensor(image)[None])[0]

    def __repr__(self) -> str:
        return f"PreprocessTransform({self.preprocess.extra_repr()})"


class AugmentTransform:
    """Random resized crop + horizontal flip + colour jitter, then :class:`Preprocess` normalisation."""

    def __init__(self, preprocess: Preprocess):
        size = preprocess.size
        self.preprocess = preprocess
        self.augment = T.Compose([
            T.RandomResizedCrop(size, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3),
                                interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.RandomHorizontalFlip(p=0.5),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        with torch.no_grad():
            return self.preprocess(pil_to_tensor(self.augment(image.convert("RGB")))[None])[0]

    def __repr__(self) -> str:
        return f"AugmentTransform(size={self.preprocess.size})"


def is_deterministic(name: str) -> bool:
    """True when the transform maps an image to one fixed tensor (features can be cached)."""
    _check_name(name)
    return _DETERMINISTIC[name]


def _check_name(name: str) -> None:
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform '{name}'; choose one of {', '.join(TRANSFORMS)}")


def create_transform(name: str, data_config: Optional[dict] = None, *, size: Optional[int] = None,
                     mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                     train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Build the transform ``name`` (PIL RGB image -> float tensor ``[3,S,S]``).

    ``size`` / ``mean`` / ``std`` given explicitly win over ``data_config`` (a backbone's
    ``data_config``: ``input_size=(3,H,W)``, ``mean``, ``std``). ``augment`` is random only with
    ``train=True``; with ``train=False`` it is the ``center_crop`` eval transform.
    """
    _check_name(name)
    config = dict(data_config or {})
    size = size if size is not None else (config["input_size"][-1] if "input_size" in config else None)
    mean = mean if mean is not None else config.get("mean")
    std = std if std is not None else config.get("std")
    missing = [k for k, v in (("size", size), ("mean", mean), ("std", std)) if v is None]
    if missing:
        raise ValueError(f"create_transform('{name}'): no {', '.join(missing)}; pass them or a data_config "
                         "with input_size, mean and std")
    if name == "augment":
        return AugmentTransform(Preprocess(size, mean, std, "center_crop")) if train else \
            PreprocessTransform(Preprocess(size, mean, std, "center_crop"))
    return PreprocessTransform(Preprocess(size, mean, std, name))
