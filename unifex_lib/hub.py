"""A model hub: named embedders, listed by :func:`available_models` and built by :func:`load`.

In the style of ``timm.list_models`` / ``timm.create_model`` and
``open_clip.create_model_and_transforms``: a name gives back the model *and* the transform it
was trained or exported with, ready for ``model(transform(pil_image).unsqueeze(0))``.

Names (:func:`available_models`):

* ``zero-shot/<family>``: the default backbone of each registered family
  (:func:`unifex_lib.models.list_backbones`) with the weight-free ``pooling`` neck down to
  ``embedding_dim`` (64), i.e. the zero-shot baseline; transform: the backbone's ``center_crop``;
* ``<run>``: a training run folder under the models directory (``params.yaml`` and a complete
  checkpoint in ``checkpoints/``), loaded with :func:`unifex_lib.train.load_checkpoint_model` (the
  best checkpoint); transform: the run's ``eval_transform`` at its input size;
* ``<path>.pt``: a TorchScript GUIEC export (:mod:`unifex_lib.export`) under the models
  directory; it resizes and normalises inside, so its transform only converts the PIL image to
  uint8 ``[3, H, W]`` at native size.

Run and export names are paths relative to the models directory: the ``models_dir`` argument,
else the ``UNIFEX_MODELS_DIR`` environment variable, else ``outputs`` (where runs are written).
:func:`load` also takes a run folder, a checkpoint file or a ``.pt`` file by its own path.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

if TYPE_CHECKING:
    import torch

ZERO_SHOT = "zero-shot/"
DEFAULT_MODELS_DIR = "outputs"


def resolve_models_dir(path: Union[str, os.PathLike, None] = None) -> Path:
    """``path``, else ``$UNIFEX_MODELS_DIR``, else ``outputs``."""
    return Path(path if path is not None else os.environ.get("UNIFEX_MODELS_DIR", DEFAULT_MODELS_DIR))


def _zero_shot_families() -> list[str]:
    """Backbone types that name a default model (the generic ``timm`` / ``open_clip`` types do not)."""
    from unifex_lib.models.backbones import default_backbone, list_backbones

    return [f for f in list_backbones() if default_backbone(f)[0] is not None]


def _is_run(folder: Path) -> bool:
    from unifex_lib.training.checkpoint import latest_checkpoint

    return (folder / "params.yaml").is_file() and latest_checkpoint(folder / "checkpoints") is not None


def _found(root: Path) -> list[str]:
    """Run folders and ``.pt`` exports under ``root``, as paths relative to it (sorted)."""
    if not root.is_dir():
        return []
    names = [p.parent.relative_to(root).as_posix() for p in root.rglob("params.yaml") if _is_run(p.parent)]
    names += [p.relative_to(root).as_posix() for p in root.rglob("*.pt") if p.is_file()]
    return sorted(set(names) - {"."})


def available_models(pattern: str = "*", models_dir: Union[str, os.PathLike, None] = None) -> list[str]:
    """Names :func:`load` accepts: ``zero-shot/<family>`` for every backbone family, then the run
    folders and ``.pt`` exports under the models directory; filtered by the glob ``pattern``."""
    names = [ZERO_SHOT + f for f in _zero_shot_families()] + _found(resolve_models_dir(models_dir))
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def _resolve(name: Union[str, os.PathLike], root: Path) -> Optional[Path]:
    """A run folder, checkpoint or ``.pt`` file that ``name`` points to (as a path or under ``root``)."""
    for path in (Path(name), root / name):
        if path.suffix == ".pt" and path.is_file():
            return path
        if path.is_dir() and _is_run(path):
            return path
        if path.is_file() and path.name.endswith((".json", ".safetensors")):
            return path
    return None


def load(name: Union[str, os.PathLike], *, models_dir: Union[str, os.PathLike, None] = None,
         device: str = "cpu", pretrained: Union[bool, str] = True, backbone: Optional[str] = None,
         embedding_dim: int = 64, image_size: Optional[int] = None) -> tuple[torch.nn.Module, Callable]:
    """``(model, transform)`` for a name of :func:`available_models`, a run folder, a checkpoint or a ``.pt``.

    ``model`` is in eval mode on ``device``; ``model(transform(pil_image).unsqueeze(0))`` gives the
    ``[1, D]`` embedding. ``pretrained``, ``backbone`` (another model name of the family),
    ``embedding_dim`` and ``image_size`` apply to ``zero-shot/<family>`` names only
    (``pretrained=False``: random init, for tests and baselines without weights). An unknown name
    raises ``ValueError`` listing the available ones.
    """
    from unifex_lib.data.transforms import create_transform, pil_to_tensor

    root = resolve_models_dir(models_dir)
    name_str = str(name)
    if name_str.startswith(ZERO_SHOT) and name_str[len(ZERO_SHOT):] in _zero_shot_families():
        from unifex_lib.models import create_model
        from unifex_lib.params import ModelParams

        model = create_model(ModelParams(backbone_type=name_str[len(ZERO_SHOT):], backbone=backbone,
                                         pretrained=pretrained, neck="pooling", embedding_dim=embedding_dim),
                             image_size=image_size)
        return model.eval().to(device), create_transform("center_crop", model.data_config, train=False)
    path = _resolve(name, root)
    if path is None:
        from unifex_lib.params import closest

        names = available_models(models_dir=root)
        raise ValueError(f"unknown model {name_str!r}{closest(name_str, names)}: not a zero-shot family, run "
                         f"folder, checkpoint or .pt file (models directory {root}); available: {', '.join(names)}")
    if path.suffix == ".pt":
        import torch

        return torch.jit.load(str(path), map_location=device).eval(), pil_to_tensor
    from unifex_lib.train import load_checkpoint_model

    model, params = load_checkpoint_model(path)
    transform = create_transform(params.data.eval_transform, model.data_config, train=False)
    return model.eval().to(device), transform
