"""Typed parameter sets, YAML loading/merging and validation.

A parameter file is YAML with one mapping per section (``data``, ``model``, ``head``,
``train``, ``eval``, ``export``) plus top-level ``run_name`` / ``output_dir``; it may
name a ``base:`` file (relative to itself) whose values it overrides. Every field has
a *flat name* that is unique across sections (``head``, ``k``, ``lr``, ``data_root``,
...), so a notebook's ``parameters`` cell and ``papermill -p`` override by flat name::

    params = load_params("params/demo.yaml", head="CosFace", lr=1e-2)

All problems (unknown names, wrong types, impossible values, unknown head/backbone/
optimizer names) are collected and raised together as one :class:`ParamsError`
before any data is read.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ParamsError(ValueError):
    """One or more parameters are invalid; the message lists every problem (also in ``.problems``)."""

    def __init__(self, problems, title: str = "invalid parameters"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        message = self.problems[0] if isinstance(problems, str) else \
            f"{title}:\n  - " + "\n  - ".join(self.problems)
        super().__init__(message)


@dataclass
class DataParams:
    data_root: str = "outputs/demo/data"  # root that annotation/split paths are relative to
    annotations: str = "train.csv"  # training annotation table, relative to data_root or absolute
    class_counts: str = "class_counts.csv"  # label,num_samples file, relative to data_root or absolute
    eval_root: Optional[str] = None  # UnED root (info_files/, images/) for evaluation; None = data_root
    eval_domains: Optional[list] = None  # UnED domains to evaluate on; None = every folder in info_files/
    image_size: Optional[int] = None  # input side in pixels; None = the backbone's own
    train_transform: str = "center_crop"  # center_crop | squash | augment
    eval_transform: str = "center_crop"  # center_crop | squash
    sampling: str = "shuffle"  # shuffle | round_robin | proportional (domains per batch)
    num_workers: int = 0  # DataLoader workers


@dataclass
class ModelParams:
    backbone_type: str = "siglip"  # family in the backbone registry, or timm / open_clip
    backbone: Optional[str] = None  # model name; None = the family's default
    pretrained: Union[bool, str] = True  # library tag, True (family default), False, or a weights file
    feature: str = "pooled"  # pooled (before the text-aligned projection) | projected
    neck: str = "proj_layer"  # proj_layer | pooling
    embedding_dim: int = 64  # output dimension D
    dropout: float = 0.2  # proj_layer dropout p
    freeze: Union[bool, str] = True  # True | False | "last_n_blocks:N"


@dataclass
class HeadParams:
    head: str = "ArcFace"  # margin head / loss name (see unifex_lib.models.list_heads())
    k: int = 3  # sub-centres per class
    s: float = 30.0  # logit scale
    m: float = 0.5  # margin (radians for angular margins)
    m_min: float = 0.2  # DynM-ArcFace margin of the most frequent class
    m_max: float = 0.5  # DynM-ArcFace margin of the rarest class
    h: float = 0.333  # AdaFace norm-scaling concentration
    t_alpha: float = 0.01  # AdaFace norm running-statistics momentum
    dynamic_s: bool = True  # AdaCos: adapt s per batch
    sample_rate: float = 1.0  # PartialFC fraction of class centres per step (1 = full head)


@dataclass
class TrainParams:
    epochs: int = 10  # epoch-based training length
    iterations: Optional[int] = None  # iteration-based length; set to train by iterations
    batch_size: int = 128  # global batch size
    optimizer: str = "Adam"  # Adam | AdamW | SGD
    momentum: float = 0.9  # SGD momentum
    sam: bool = False  # Sharpness-Aware Minimisation on top of Adam/AdamW
    sam_rho: float = 0.05  # SAM neighbourhood size
    lr: float = 2e-2  # peak learning rate
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # cosine | constant
    schedule_step: str = "iteration"  # iteration | epoch
    eta_min: float = 1e-3  # cosine floor
    warmup: str = "linear"  # linear | exponential | none
    warmup_epochs: float = 1.0  # warmup length in epochs (ignored when warmup_iterations is set)
    warmup_iterations: Optional[int] = None  # warmup length in iterations
    samples_per_class: int = 4  # K of the P x K sampler (Triplet)
    grad_clip: Optional[float] = None  # max gradient norm; None = no clipping
    seed: int = 42
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on CUDA)
    channels_last: bool = False
    feature_cache: bool = True  # cache frozen-backbone features when the transform is deterministic
    checkpoint_every: int = 1  # epochs (iterations in iteration mode) between checkpoints
    keep_last: int = 2  # checkpoints kept besides the best
    best_metric: str = "mMP@5"  # metric that picks the best checkpoint
    resume: bool = False  # continue from the newest checkpoint of the run folder
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10  # iterations between log lines


@dataclass
class EvalParams:
    eval_split: str = "val"  # val | test: UnED split evaluated at checkpoints
    eval_mode: str = "merged"  # merged | separate | both
    metrics: list = field(default_factory=lambda: ["R@1", "mMP@5"])
    knn_backend: str = "faiss"  # faiss | torch | annoy
    eval_batch_size: int = 256


@dataclass
class ExportParams:
    export_resize: str = "center_crop"  # center_crop | squash (same geometry as the eval transform)
    max_dim: int = 64  # GUIEC limit on the embedding size
    parity_tolerance: float = 1e-4  # max |delta| between export and eager pipeline


@dataclass
class Params:
    run_name: str = "run"  # folder under output_dir (may be nested: "demo/zero_shot")
    output_dir: str = "outputs"
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    head: HeadParams = field(default_factory=HeadParams)
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)
    export: ExportParams = field(default_factory=ExportParams)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def data_path(self, name: str) -> Path:
        """A data file given relative to ``data_root`` (or absolute)."""
        p = Path(name)
        return p if p.is_absolute() else Path(self.data.data_root) / p

    @property
    def eval_root(self) -> Path:
        """The UnED-format root evaluated at checkpoints (``eval_root``, else ``data_root``)."""
        return Path(self.data.eval_root or self.data.data_root)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        """All parameters by flat name."""
        out = {"run_name": self.run_name, "output_dir": self.output_dir}
        for section in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, section)))
        return out


SECTIONS = ("data", "model", "head", "train", "eval", "export")
_TOP_LEVEL = ("run_name", "output_dir")
_SECTION_TYPES = {s: f.default_factory for s, f in ((f.name, f) for f in dataclasses.fields(Params))
                  if s in SECTIONS}
# flat name -> section ("" for top level)
FLAT_NAMES: dict[str, str] = {n: "" for n in _TOP_LEVEL}
for _section, _cls in _SECTION_TYPES.items():
    for _f in dataclasses.fields(_cls):
        assert _f.name not in FLAT_NAMES, f"flat name {_f.name!r} is not unique"
        FLAT_NAMES[_f.name] = _section
_HINTS = {s: typing.get_type_hints(c) for s, c in _SECTION_TYPES.items()}
_HINTS[""] = {"run_name": str, "output_dir": str}

OPTIMIZERS = ("Adam", "AdamW", "SGD")
SCHEDULERS = ("cosine", "constant")
WARMUPS = ("linear", "exponential", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
SAMPLINGS = ("shuffle", "round_robin", "proportional")
TRANSFORMS = ("center_crop", "squash", "augment")
EVAL_MODES = ("merged", "separate", "both")
KNN_BACKENDS = ("faiss", "torch", "annoy")


def closest(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    choices = [str(c) for c in choices]
    folded = [c for c in choices if c.lower() == name.lower()]
    match = folded or difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is list or origin is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a parameter file into flat names, following ``base:`` first."""
    if not path.is_file():
        raise ParamsError(f"parameter file not found: {path}")
    if path.resolve() in seen:
        raise ParamsError(f"parameter file {path} includes itself through 'base:'")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: a parameter file is a mapping of sections, found {type(raw).__name__}")
    flat: dict = {}
    base = raw.pop("base", None)
    if base is not None:
        flat.update(_read_yaml((path.parent / base), seen + (path.resolve(),)))
    problems = []
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{path}: section '{key}' must be a mapping")
                continue
            for name, v in value.items():
                if FLAT_NAMES.get(name) != key:
                    where = f" (it belongs to section '{FLAT_NAMES[name]}')" if name in FLAT_NAMES else \
                        closest(name, [n for n, s in FLAT_NAMES.items() if s == key])
                    problems.append(f"{path}: unknown parameter '{key}.{name}'{where}")
                else:
                    flat[name] = v
        elif key in FLAT_NAMES:
            flat[key] = value
        else:
            problems.append(f"{path}: unknown parameter '{key}'{closest(key, list(FLAT_NAMES) + list(SECTIONS))}")
    if problems:
        raise ParamsError(problems, "invalid parameter file")
    return flat


def _registry_names(kind: str) -> Optional[list]:
    """Names from the model registries (None if the registry cannot be imported)."""
    try:
        from unifex_lib import models
    except ImportError:
        return None
    return {"head": models.list_heads, "backbone_type": models.list_backbones,
            "neck": models.list_necks}[kind]()


def _check_values(p: Params) -> list[str]:
    problems = []

    def need(cond: bool, msg: str):
        if not cond:
            problems.append(msg)

    def choice(name: str, value, choices):
        if value not in choices:
            problems.append(f"{name}={value!r} is not valid{closest(str(value), choices)}; "
                            f"choose one of {', '.join(map(str, choices))}")

    d, mo, h, t, e, x = p.data, p.model, p.head, p.train, p.eval, p.export
    need(bool(p.run_name) and not Path(p.run_name).is_absolute() and ".." not in Path(p.run_name).parts,
         f"run_name={p.run_name!r} must be a non-empty relative folder name (sub-folders allowed, no '..')")
    need(d.image_size is None or d.image_size >= 8, f"image_size={d.image_size} must be >= 8 (or None)")
    choice("train_transform", d.train_transform, TRANSFORMS)
    choice("eval_transform", d.eval_transform, TRANSFORMS[:2])
    choice("sampling", d.sampling, SAMPLINGS)
    need(d.num_workers >= 0, f"num_workers={d.num_workers} must be >= 0")
    for kind, value in (("backbone_type", mo.backbone_type), ("neck", mo.neck), ("head", h.head)):
        names = _registry_names(kind)
        if names is not None:
            choice(kind, value, names)
    choice("feature", mo.feature, ("pooled", "projected"))
    need(mo.embedding_dim >= 1, f"embedding_dim={mo.embedding_dim} must be >= 1")
    need(0 <= mo.dropout < 1, f"dropout={mo.dropout} must be in [0, 1)")
    if isinstance(mo.freeze, str):
        n = mo.freeze.partition("last_n_blocks:")[2]
        need(mo.freeze.startswith("last_n_blocks:") and n.isdigit(),
             f"freeze={mo.freeze!r} must be true, false or 'last_n_blocks:N' (N a non-negative integer)")
    need(h.k >= 1, f"k={h.k} must be >= 1 (sub-centres per class)")
    need(h.s > 0, f"s={h.s} must be > 0 (logit scale)")
    need(0 <= h.m < math.pi / 2, f"m={h.m} must be in [0, pi/2) radians")
    need(0 <= h.m_min <= h.m_max < math.pi / 2, f"m_min={h.m_min}, m_max={h.m_max} need 0 <= m_min <= m_max < pi/2")
    need(h.h > 0, f"h={h.h} must be > 0")
    need(0 < h.t_alpha <= 1, f"t_alpha={h.t_alpha} must be in (0, 1]")
    need(0 < h.sample_rate <= 1, f"sample_rate={h.sample_rate} must be in (0, 1]")
    need(t.epochs >= 1, f"epochs={t.epochs} must be >= 1")
    need(t.iterations is None or t.iterations >= 1, f"iterations={t.iterations} must be >= 1 (or None)")
    need(t.batch_size >= 1, f"batch_size={t.batch_size} must be >= 1")
    choice("optimizer", t.optimizer, OPTIMIZERS)
    need(not t.sam or t.optimizer in ("Adam", "AdamW"), f"sam=True needs optimizer Adam or AdamW, not {t.optimizer}")
    need(t.sam_rho > 0, f"sam_rho={t.sam_rho} must be > 0")
    need(0 <= t.momentum < 1, f"momentum={t.momentum} must be in [0, 1)")
    need(t.lr > 0, f"lr={t.lr} must be > 0")
    need(t.weight_decay >= 0, f"weight_decay={t.weight_decay} must be >= 0")
    choice("scheduler", t.scheduler, SCHEDULERS)
    choice("schedule_step", t.schedule_step, ("iteration", "epoch"))
    need(0 <= t.eta_min <= t.lr, f"eta_min={t.eta_min} must be in [0, lr={t.lr}]")
    choice("warmup", t.warmup, WARMUPS)
    need(t.warmup_epochs >= 0, f"warmup_epochs={t.warmup_epochs} must be >= 0")
    need(t.warmup_iterations is None or t.warmup_iterations >= 0,
         f"warmup_iterations={t.warmup_iterations} must be >= 0 (or None)")
    need(t.samples_per_class >= 2, f"samples_per_class={t.samples_per_class} must be >= 2")
    need(t.grad_clip is None or t.grad_clip > 0, f"grad_clip={t.grad_clip} must be > 0 (or None)")
    choice("precision", t.precision, PRECISIONS)
    need(t.checkpoint_every >= 1, f"checkpoint_every={t.checkpoint_every} must be >= 1")
    need(t.keep_last >= 1, f"keep_last={t.keep_last} must be >= 1")
    need(t.log_every >= 1, f"log_every={t.log_every} must be >= 1")
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
         f"device={t.device!r} must be auto, cpu, cuda or cuda:N")
    choice("eval_split", e.eval_split, ("val", "test"))
    choice("eval_mode", e.eval_mode, EVAL_MODES)
    choice("knn_backend", e.knn_backend, KNN_BACKENDS)
    need(e.eval_batch_size >= 1, f"eval_batch_size={e.eval_batch_size} must be >= 1")
    choice("export_resize", x.export_resize, ("center_crop", "squash"))
    need(x.max_dim >= 1, f"max_dim={x.max_dim} must be >= 1")
    need(x.parity_tolerance > 0, f"parity_tolerance={x.parity_tolerance} must be > 0")
    return problems


def build_params(flat: dict) -> Params:
    """Validate flat names, types and values; return the :class:`Params` or raise one error."""
    problems = []
    sections: dict[str, dict] = {s: {} for s in ("",) + SECTIONS}
    for name, value in flat.items():
        section = FLAT_NAMES.get(name)
        if section is None:
            problems.append(f"unknown parameter '{name}'{closest(name, FLAT_NAMES)}")
            continue
        hint = _HINTS[section][name]
        if not _type_ok(value, hint):
            problems.append(f"{name}={value!r} has type {type(value).__name__}, expected {_type_name(hint)}")
            continue
        if hint is float or (typing.get_origin(hint) in (Union, types.UnionType) and float in typing.get_args(hint)
                             and isinstance(value, int) and not isinstance(value, bool)):
            value = float(value)
        sections[section][name] = value
    if problems:
        raise ParamsError(problems)
    params = Params(**sections[""], **{s: _SECTION_TYPES[s](**sections[s]) for s in SECTIONS})
    problems = _check_values(params)
    if problems:
        raise ParamsError(problems)
    return params


def load_params(params_file: Optional[str] = None, **overrides) -> Params:
    """Defaults <- ``params_file`` (and its ``base:`` chain) <- ``overrides`` (flat names), validated."""
    flat = _read_yaml(Path(params_file)) if params_file else {}
    flat.update(overrides)
    return build_params(flat)


_NOTEBOOK_IGNORED = {"In", "Out", "get_ipython", "exit", "quit", "open", "params_file"}


def from_notebook(namespace: dict, notebook_params: tuple = ()) -> Params:
    """Build :class:`Params` from a notebook's ``parameters`` cell (its ``globals()``).

    ``params_file`` names the base file; every other public, non-module, non-callable
    name must be a flat parameter name or one of ``notebook_params`` (names the notebook
    itself reads). A flat name set to ``None`` takes its value from the file, so a cell can
    list the names people sweep without restating the file. A misspelt name that papermill
    injected fails here with the closest valid name, since papermill itself only warns.
    """
    overrides, problems = {}, []
    for name, value in namespace.items():
        if name.startswith("_") or name in _NOTEBOOK_IGNORED or name in notebook_params:
            continue
        if isinstance(value, types.ModuleType) or callable(value):
            continue
        if name in FLAT_NAMES:
            if value is not None:
                overrides[name] = value
        else:
            problems.append(f"unknown parameter '{name}'{closest(name, list(FLAT_NAMES) + list(notebook_params))}")
    try:
        params = load_params(namespace.get("params_file"), **overrides)
    except ParamsError as err:  # report bad values together with unknown names
        raise ParamsError(problems + err.problems, "invalid notebook parameters") from None
    if problems:
        raise ParamsError(problems, "invalid notebook parameters")
    return params


def save_params(params: Params, path) -> Path:
    """Write the resolved parameters as YAML (sections), loadable by :func:`load_params`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = params.to_dict()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(d, sort_keys=False))
    tmp.replace(path)
    return path
