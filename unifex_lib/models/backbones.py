"""Backbones: a registry of foundation-model families over ``timm`` and ``open_clip``.

Families (``type``) and their defaults (model name, pretrained tag), all names of the libraries' own
registries (timm 1.0 / open_clip 3.x):

==============  =========  ==========================================================
type            library    default
==============  =========  ==========================================================
clip            open_clip  ViT-H-14, laion2b_s32b_b79k
clip_convnext   open_clip  convnext_base_w, laion2b_s13b_b82k_augreg
clipav2         open_clip  ViT-H-14-CLIPA, datacomp1b
eva02           timm       eva02_large_patch14_clip_224, merged2b (EVA-02 CLIP vision tower)
meta-clip       open_clip  ViT-H-14-quickgelu, metaclip_fullcc
siglip          timm       vit_so400m_patch14_siglip_384, webli
dinov2          timm       vit_large_patch14_dinov2, lvd142m
sam             timm       samvit_base_patch16, sa1b (SAM ViT-B image encoder)
timm            timm       any timm model name (no default)
open_clip       open_clip  any open_clip model name (no default)
==============  =========  ==========================================================

Papers: CLIP arXiv:2103.00020; OpenCLIP/LAION-5B arXiv:2210.08402 (ConvNeXt CLIP); CLIPA-v2
arXiv:2306.15658; EVA-02 arXiv:2303.11331; MetaCLIP arXiv:2309.16671; SigLIP arXiv:2303.15343;
DINOv2 arXiv:2304.07193; Segment Anything arXiv:2304.02643.

Image size, mean/std, interpolation and crop come from the library's own config (timm's
``pretrained_cfg`` via ``resolve_data_config``; open_clip's ``preprocess_cfg`` of the weights tag);
an explicit ``image_size`` wins. ``feature="pooled"`` is the pooled token before the text-aligned
projection (the reference system's choice), ``"projected"`` the projected embedding; SigLIP's
feature is timm's attention-pool output (it has no further projection); SAM's neck is dropped and its
last-block features average-pooled.
"""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from .registry import Registry

BACKBONES = Registry("backbone type")
FEATURES = ("pooled", "projected")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


@dataclass(frozen=True)
class Family:
    """A backbone family: library, default model name and pretrained tag, optional fix-up of the model."""

    library: str  # "timm" | "open_clip"
    name: Optional[str] = None
    tag: Optional[str] = None
    adapt: Optional[Callable[[nn.Module], nn.Module]] = None


def _drop_sam_neck(model: nn.Module) -> nn.Module:
    """SAM image encoder: drop the conv neck, average-pool the last block's features (width embed_dim)."""
    model.neck = nn.Identity()
    model.num_features = model.embed_dim
    model.reset_classifier(0, "avg")
    return model


for _type, _family in {
    "clip": Family("open_clip", "ViT-H-14", "laion2b_s32b_b79k"),
    "clip_convnext": Family("open_clip", "convnext_base_w", "laion2b_s13b_b82k_augreg"),
    "clipav2": Family("open_clip", "ViT-H-14-CLIPA", "datacomp1b"),
    "eva02": Family("timm", "eva02_large_patch14_clip_224", "merged2b"),
    "meta-clip": Family("open_clip", "ViT-H-14-quickgelu", "metaclip_fullcc"),
    "siglip": Family("timm", "vit_so400m_patch14_siglip_384", "webli"),
    "dinov2": Family("timm", "vit_large_patch14_dinov2", "lvd142m"),
    "sam": Family("timm", "samvit_base_patch16", "sa1b", adapt=_drop_sam_neck),
    "timm": Family("timm"),
    "open_clip": Family("open_clip"),
}.items():
    BACKBONES.register(_type)(_family)


def list_backbones() -> list[str]:
    """Backbone types (families plus the generic ``timm`` / ``open_clip``)."""
    return BACKBONES.names()


def default_backbone(type: str) -> tuple[Optional[str], Optional[str]]:
    """(default model name, default pretrained tag) of a family."""
    family = BACKBONES.get(type)
    return family.name, family.tag


# ---------------------------------------------------------------------------------------------- weights


def _offline() -> bool:
    """HF_HUB_OFFLINE is set, or huggingface.co cannot be reached within 3 s."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return False
    except OSError:
        return True


def _hf_cached(repo_id: str, filenames) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames if f)


def _require_weights(cached: bool, what: str, example: str) -> None:
    """Fail fast (before any download retry loop) when weights are neither cached nor downloadable."""
    if cached or not _offline():
        return
    raise RuntimeError(
        f"pretrained weights for {what} are not in the local cache and this machine is offline "
        "(HF_HUB_OFFLINE=1 or no network). Supply them either by (1) running once on a machine with "
        f"internet `{example}` and copying its Hugging Face cache (~/.cache/huggingface, or $HF_HOME) here, "
        "or (2) passing pretrained=<path to a local weights file> (or model.pretrained in the params file), "
        "or use pretrained=False for random init.")


def _weights_file(pretrained: Union[bool, str]) -> Optional[Path]:
    """The local weights file named by ``pretrained``, None for a tag/bool; a missing file is an error."""
    if not isinstance(pretrained, str):
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if os.sep in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"pretrained weights file not found: {pretrained}")
    return None


def _file_id(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"file-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------- timm


def _timm_model(family: Family, name: str, pretrained: Union[bool, str], feature: str,
                image_size: Optional[int], model_kwargs: dict) -> tuple[nn.Module, dict, str]:
    import timm
    from timm.data import resolve_data_config

    file = _weights_file(pretrained)
    tag = family.tag if pretrained is True and family.name == name else (
        pretrained if isinstance(pretrained, str) and file is None else None)
    full_name = f"{name}.{tag}" if tag else name
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models() for valid names")
    kwargs = dict(model_kwargs)
    if file is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(file))
    elif pretrained is not False:
        valid = [n for n in timm.list_pretrained(name + "*") if n.partition(".")[0] == name]
        if (tag and full_name not in valid) or not valid:
            raise ValueError(f"unknown timm pretrained tag {full_name!r}; choose one of {', '.join(valid) or '(none)'}")
        cfg = timm.models.get_pretrained_cfg(full_name)
        files = (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin",
                 "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
        cached = bool(cfg.hf_hub_id) and _hf_cached(cfg.hf_hub_id, files)
        if not cached and cfg.url:
            cached = (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)).is_file()
        _require_weights(cached, f"timm model '{full_name}'",
                         f"python -c \"import timm; timm.create_model('{full_name}', pretrained=True)\"")
    if feature == "pooled":
        kwargs["num_classes"] = 0
    if image_size is not None:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(full_name, pretrained=pretrained is not False, **kwargs)
    except TypeError as e:  # convolutional nets take any input size and have no img_size argument
        if "img_size" not in str(e):
            raise
        kwargs.pop("img_size")
        model = timm.create_model(full_name, pretrained=pretrained is not False, **kwargs)
    if family.adapt is not None:
        model = family.adapt(model)
    if feature == "projected" and model.num_classes == 0:
        raise ValueError(f"timm model {name!r} has no projection head; use feature='pooled'")
    num_features = model.num_features if feature == "pooled" else model.num_classes
    cfg = resolve_data_config({}, model=model)
    data_config = dict(input_size=tuple(cfg["input_size"]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                       interpolation=cfg["interpolation"], crop_pct=float(cfg["crop_pct"]),
                       crop_mode=cfg.get("crop_mode", "center"))
    weights = _file_id(file) if file is not None else (model.pretrained_cfg.get("tag") or tag or "default")
    return model, dict(data_config, num_features=num_features), \
        f"timm:{name}:{weights if pretrained is not False else 'random-init'}"


# ---------------------------------------------------------------------------------------------- open_clip


def _open_clip_model(family: Family, name: str, pretrained: Union[bool, str], feature: str,
                     image_size: Optional[int], model_kwargs: dict) -> tuple[nn.Module, dict, str]:
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models() for valid names")
    file = _weights_file(pretrained)
    tag = family.tag if pretrained is True and family.name == name else (
        pretrained if isinstance(pretrained, str) and file is None else None)
    if pretrained is True and tag is None:
        raise ValueError(f"pretrained=True has no default tag for open_clip model {name!r}; name one of "
                         f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or '(none)'}")
    force_preprocess = {}
    if tag is not None:
        cfg = open_clip.get_pretrained_cfg(name, tag)
        if not cfg:
            raise ValueError(f"unknown open_clip pretrained tag {tag!r} for {name!r}; choose one of "
                             f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or '(none)'}")
        repo, _, filename = cfg.get("hf_hub", "").rpartition("/")  # 'org/repo/' or 'org/repo/file'
        files = (filename or "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
        cached = bool(repo) and _hf_cached(repo, files)
        if not cached and cfg.get("url"):
            cached = (Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])).is_file()
        _require_weights(cached, f"open_clip model '{name}' tag '{tag}'",
                         f"python -c \"import open_clip; open_clip.create_model('{name}', pretrained='{tag}')\"")
    elif family.name == name and family.tag:
        # a local copy of the family's default weights (or its random init) keeps that tag's preprocessing
        cfg = open_clip.get_pretrained_cfg(name, family.tag)
        force_preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    clip = open_clip.create_model(name, pretrained=str(file) if file is not None else tag,
                                  force_image_size=image_size, force_preprocess_cfg=force_preprocess,
                                  pretrained_text=False, **model_kwargs)
    visual = clip.visual
    del clip
    if feature == "projected":
        num_features = visual.output_dim
    elif getattr(visual, "proj", None) is not None and isinstance(visual.proj, nn.Parameter):
        num_features = visual.proj.shape[0]  # VisionTransformer: pooled token before `@ proj`
        visual.proj = None
    elif hasattr(visual, "trunk") and isinstance(getattr(visual, "head", None), nn.Sequential):
        pool = [m for key, m in visual.head.named_children() if key == "pool"]  # TimmModel: keep attn pool
        num_features = pool[0].out_features if pool else visual.trunk.num_features
        visual.head = nn.Sequential(*pool)
    else:
        raise ValueError(f"feature='pooled' is not supported for open_clip model {name!r} "
                         f"({type(visual).__name__}); use feature='projected'")
    pp = visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], (tuple, list)) else (pp["size"], pp["size"])
    data_config = dict(input_size=(3, *size), mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                       interpolation=pp.get("interpolation", "bicubic"), crop_pct=1.0,
                       crop_mode="squash" if pp.get("resize_mode") == "squash" else "center")
    weights = _file_id(file) if file is not None else (tag or "random-init")
    return visual, dict(data_config, num_features=num_features), f"open_clip:{name}:{weights}"


_LIBRARIES = {"timm": _timm_model, "open_clip": _open_clip_model}


# ---------------------------------------------------------------------------------------------- freezing


def block_list(model: nn.Module) -> list[nn.Module]:
    """The model's sequence of residual blocks / stages, in forward order."""
    for path in ("blocks", "transformer.resblocks", "trunk.blocks", "trunk.stages", "stages",
                 "trunk.layers", "layers"):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module):
            return list(module)
    for root in (model, getattr(model, "trunk", None)):
        layers = [getattr(root, f"layer{i}") for i in range(1, 9) if hasattr(root, f"layer{i}")]
        if layers:
            return layers
    raise ValueError(f"freeze='last_n_blocks:N' is not supported for {type(model).__name__}: "
                     "no block list found; use freeze=true or false")


def apply_freeze(model: nn.Module, freeze: Union[bool, str]) -> None:
    """``True``: nothing trains; ``False``: everything; ``"last_n_blocks:N"``: the last N blocks and every
    parameter registered after them (final norm, pooling, projection) train, the rest is frozen."""
    if isinstance(freeze, bool):
        model.requires_grad_(not freeze)
        return
    n = freeze.partition("last_n_blocks:")[2] if isinstance(freeze, str) else ""
    if not (isinstance(freeze, str) and freeze.startswith("last_n_blocks:") and n.isdigit()):
        raise ValueError(f"freeze={freeze!r} must be true, false or 'last_n_blocks:N' (N >= 0)")
    n = int(n)
    model.requires_grad_(False)
    if n == 0:
        return
    blocks = block_list(model)
    if n > len(blocks):
        raise ValueError(f"freeze={freeze!r}: the model has only {len(blocks)} blocks")
    first = next(iter(blocks[-n].parameters()))
    trainable = False
    for p in model.parameters():
        trainable = trainable or p is first
        p.requires_grad_(trainable)


# ---------------------------------------------------------------------------------------------- module


class Backbone(nn.Module):
    """A feature extractor: ``forward(x [B,3,H,W] normalised) -> [B, num_features]``.

    Attributes: ``num_features``, ``data_config`` (input_size, mean, std, interpolation, crop_pct,
    crop_mode), ``model_id`` (library:name:weights, a cache key; ``random-init`` weights are not a stable
    key), ``fully_frozen`` (then the wrapped model stays in eval mode).
    """

    def __init__(self, model: nn.Module, num_features: int, data_config: dict, model_id: str,
                 freeze: Union[bool, str] = True):
        super().__init__()
        self.model = model
        self.num_features = int(num_features)
        self.data_config = data_config
        self.model_id = model_id
        apply_freeze(self.model, freeze)
        self.fully_frozen = not any(p.requires_grad for p in self.model.parameters())
        self.train(False)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if self.fully_frozen:
            self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def param_counts(self) -> dict:
        return param_counts(self)


def param_counts(module: nn.Module) -> dict:
    """{"total": parameters, "trainable": parameters with requires_grad}."""
    params = list(module.parameters())
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


def create_backbone(type: str, name: Optional[str] = None, pretrained: Union[bool, str] = False,
                    feature: str = "pooled", image_size: Optional[int] = None,
                    freeze: Union[bool, str] = True, **model_kwargs) -> Backbone:
    """Build a backbone of family ``type`` (``list_backbones()``).

    name: model name in the family's library (None = the family default). pretrained: a library tag,
    True (the family's default tag; for generic ``timm`` the model's default tag), False (random init) or a
    local weights file loaded through the library's own loader (timm ``pretrained_cfg_overlay=dict(file=...)``,
    open_clip ``create_model(name, pretrained=<file>)``: a full CLIP checkpoint). feature: pooled | projected.
    image_size: input side (None = the weights' own). freeze: True | False | "last_n_blocks:N".
    model_kwargs go to ``timm.create_model`` / ``open_clip.create_model``.
    """
    family = BACKBONES.get(type)
    if feature not in FEATURES:
        raise ValueError(f"unknown feature {feature!r}; choose one of {', '.join(FEATURES)}")
    name = name or family.name
    if name is None:
        raise ValueError(f"backbone type {type!r} needs a model name (no family default)")
    model, info, model_id = _LIBRARIES[family.library](family, name, pretrained, feature, image_size, model_kwargs)
    if image_size is not None:
        info["input_size"] = (3, image_size, image_size)
    num_features = info.pop("num_features")
    suffix = f":{feature}" + (f":{image_size}px" if image_size is not None else "")
    return Backbone(model, num_features, info, model_id + suffix, freeze)
