"""GUIEC export: TorchScript model with in-model preprocessing, parity check, local scorer, submission.zip.

The Google Universal Image Embedding Challenge (Kaggle, 2022; the task and reference system are
described in Ypsilantis et al., "Towards Universal Image Embeddings: A Large-Scale Dataset and
Challenge for Generic Image Representations", ICCV 2023, arXiv:2309.01858) scores a
``submission.zip`` holding ``saved_model.pt`` (TorchScript) at its root. The scorer opens every
image with PIL, converts it to RGB, feeds ``uint8 [1, 3, H, W]`` at the image's native size and
reads ``model(x)[0]`` (float32, at most 64 values) as the embedding. Queries are matched against
the index by Euclidean kNN with ``k = 5`` and scored with

    mMP@5 = 1/Q * sum_q 1/min(n_q, 5) * sum_{j <= min(n_q, 5)} rel_q(j)

where ``n_q`` is the number of relevant index images of query ``q`` and ``rel_q(j)`` is 1 when the
``j``-th prediction is relevant (a repeated prediction counts once, at its first rank).

The exported module is :class:`GUIECModel`: :class:`unifex_lib.data.transforms.Preprocess` (the
very module the eager eval transform runs, so geometry and normalisation match by construction),
then backbone, neck and L2 normalisation. Each part is scripted (``torch.jit.script``); a backbone
that does not script is traced at its fixed ``size x size`` input, which is safe because
preprocessing, the only size-dependent part, stays scripted. The scorer ran PyTorch 1.11: the
ops a saved model uses are listed by :func:`list_ops` (see docs/export.md).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from unifex_lib.data.annotations import read_split_file
from unifex_lib.data.transforms import MODES, Preprocess, create_transform, pil_to_tensor
from unifex_lib.retrieval import mmp_at_k

GUIEC_MAX_DIM = 64
MODEL_FILENAME = "saved_model.pt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
USAGES = ("Public", "Private")
# operators a TorchScript file saved by PyTorch >= 1.12 may name that the GUIEC scorer's PyTorch 1.11 lacks
# (known cases, not an exhaustive list): fused attention (2.0), the MHA / encoder fast paths (1.12) and the
# lanczos mode that F.interpolate's serialised source names in every mode (2.x)
OPS_NEWER_THAN_1_11 = ("aten::scaled_dot_product_attention", "aten::_native_multi_head_attention",
                       "aten::_transformer_encoder_layer_fwd", "aten::_upsample_lanczos2d_aa")


class ExportError(RuntimeError):
    """The exported model is unusable for GUIEC (too wide, fails to load, or differs from eager)."""


class GUIECModel(nn.Module):
    """uint8 / float 0-255 ``[B,3,H,W]`` (any H, W) -> L2-normalised float32 ``[B,D]``.

    ``y = normalize(neck(backbone(preprocess(x))))`` with ``normalize(v) = v / max(||v||_2, 1e-12)``.
    """

    def __init__(self, preprocess: nn.Module, backbone: nn.Module, neck: nn.Module):
        super().__init__()
        self.preprocess = preprocess
        self.backbone = backbone
        self.neck = neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        x = self.neck(self.backbone(x))
        return F.normalize(x.to(torch.float32), p=2.0, dim=1, eps=1e-12)


@contextlib.contextmanager
def _quiet_jit():
    """Silence torch's FutureWarning that TorchScript is deprecated (it stays the GUIEC format)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        yield


def load_exported(path: Union[str, Path]) -> torch.jit.ScriptModule:
    """``torch.jit.load`` an exported model onto the CPU, in eval mode."""
    with _quiet_jit():
        return torch.jit.load(str(path), map_location="cpu").eval()


def _compile(module: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    """``torch.jit.script(module)``, or ``torch.jit.trace(module, example)`` when scripting fails."""
    try:
        return torch.jit.script(module), "script"
    except Exception as script_error:  # scripting fails with many exception types (frontend, runtime)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return torch.jit.trace(module, example, check_trace=False), "trace"
        except Exception as trace_error:
            raise ExportError(f"{type(module).__name__} can be neither scripted ({script_error}) "
                              f"nor traced ({trace_error})") from trace_error


def embedding_dim_of(model: nn.Module) -> int:
    """The model's output width ``D`` (``model.embedding_dim``)."""
    dim = getattr(model, "embedding_dim", None)
    if not isinstance(dim, int):
        raise ExportError(f"{type(model).__name__} has no integer 'embedding_dim' (found {dim!r}); "
                          "export takes an EmbeddingModel with .backbone, .neck and .embedding_dim")
    return dim


def check_max_dim(dim: int, max_dim: int = GUIEC_MAX_DIM) -> None:
    """Refuse an embedding wider than the GUIEC limit."""
    if dim > max_dim:
        raise ExportError(f"embedding_dim={dim} exceeds the GUIEC limit max_dim={max_dim}: the scorer accepts "
                          f"at most {max_dim} values per image; train a model with embedding_dim <= {max_dim}")


def build_guiec_module(model: nn.Module, size: int, mean: Sequence[float], std: Sequence[float],
                       mode: str = "center_crop", max_dim: int = GUIEC_MAX_DIM,
                       check_sizes: Sequence[tuple[int, int, int]] = ((1, 45, 71), (2, 97, 38)),
                       atol: float = 1e-5) -> tuple[torch.jit.ScriptModule, dict]:
    """Script (or trace) ``model.backbone`` / ``model.neck`` and wrap them in a scripted :class:`GUIECModel`.

    The compiled module is checked against the eager one (same parts, not compiled) on random
    uint8 inputs of shapes ``check_sizes`` (``(B, H, W)``: a batch and sizes other than the
    trace example); a difference above ``atol`` raises :class:`ExportError`.
    Returns ``(scripted module, {"backbone": "script"|"trace", "neck": ..., "embedding_dim": D})``.
    """
    if mode not in MODES:
        raise ExportError(f"unknown export mode '{mode}'; choose one of {', '.join(MODES)}")
    dim = embedding_dim_of(model)
    check_max_dim(dim, max_dim)
    backbone = copy.deepcopy(model.backbone).float().cpu().eval()
    for module in backbone.modules():  # timm attention: script the explicit softmax branch, not fused
        if hasattr(module, "fused_attn"):  # SDPA (PyTorch >= 2.0, unknown to the 1.11 scorer)
            module.fused_attn = False
    neck = copy.deepcopy(model.neck).float().cpu().eval()
    preprocess = Preprocess(size, mean, std, mode)
    eager = GUIECModel(preprocess, backbone, neck).eval()
    with torch.no_grad(), _quiet_jit():
        example = torch.zeros(1, 3, size, size)
        scripted_backbone, backbone_how = _compile(backbone, example)
        scripted_neck, neck_how = _compile(neck, backbone(example))
        scripted = torch.jit.script(GUIECModel(torch.jit.script(preprocess), scripted_backbone, scripted_neck))
        scripted.eval()
        generator = torch.Generator().manual_seed(0)
        for b, h, w in check_sizes:
            x = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=generator)
            expected, got = eager(x), scripted(x)
            if got.shape != (b, dim) or got.dtype != torch.float32:
                raise ExportError(f"compiled model returns {got.dtype} {tuple(got.shape)} for input {(b, 3, h, w)}; "
                                  f"expected float32 {(b, dim)}")
            delta = (got - expected).abs().max().item()
            if delta > atol:
                raise ExportError(f"compiled model ({backbone_how}d backbone) differs from eager by {delta:.3g} "
                                  f"> {atol:g} on input {(b, 3, h, w)}")
    return scripted, {"backbone": backbone_how, "neck": neck_how, "embedding_dim": dim}


_VERIFY_CODE = """
import json, sys
import torch
model = torch.jit.load(sys.argv[1], map_location="cpu").eval()
outputs = []
for h, w in json.loads(sys.argv[2]):
    x = torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8)
    with torch.no_grad():
        y = model(x)
    outputs.append({"input": [1, 3, h, w], "shape": list(y.shape), "dtype": str(y.dtype),
                    "finite": bool(torch.isfinite(y).all()), "norm": float(y.norm())})
foreign = sorted(name for name in ("unifex_lib", "timm", "open_clip", "torchvision") if name in sys.modules)
print(json.dumps({"torch": torch.__version__, "outputs": outputs, "foreign_modules": foreign}))
"""


def verify_in_subprocess(path: Union[str, Path], embedding_dim: int,
                         sizes: Sequence[tuple[int, int]] = ((33, 47), (120, 19)), timeout: float = 300) -> dict:
    """Load ``path`` in a fresh ``python -I`` process that imports only torch and run uint8 inputs.

    Checks each output is float32 ``[1, embedding_dim]``, finite and of unit norm, and that no
    project module (unifex_lib, timm, open_clip, torchvision) was imported. Returns the child's report.
    """
    cmd = [sys.executable, "-I", "-c", _VERIFY_CODE, str(path), json.dumps([list(s) for s in sizes])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ExportError(f"{path} does not load/run in a torch-only Python process:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for out in report["outputs"]:
        ok = (out["shape"] == [1, embedding_dim] and out["dtype"] == "torch.float32" and out["finite"]
              and abs(out["norm"] - 1.0) < 1e-4)
        if not ok:
            raise ExportError(f"{path}: torch-only process got {out}; expected float32 [1, {embedding_dim}], "
                              "finite, unit norm")
    if report["foreign_modules"]:
        raise ExportError(f"{path}: loading imported {report['foreign_modules']}; the scorer has only torch")
    return report


def list_ops(path: Union[str, Path]) -> list[str]:
    """Sorted operators (``aten::*``, ``prim::*``) named in a saved TorchScript file's code.

    Read from the serialised source (``code/**/*.py``) rather than the loaded graph: an older
    PyTorch recompiles that source on load and must resolve every operator it names, even in
    branches that never run (such as the modes of ``F.interpolate`` other than the one used).
    """
    ops: set[str] = set()
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/code/" in name and name.endswith(".py"):
                text = archive.read(name).decode()
                ops.update(f"aten::{op}" for op in re.findall(r"(?<![\w.])torch\.(\w+)\(", text))
                ops.update(f"{ns}::{op}" for ns, op in re.findall(r"(?<![\w.])ops\.(\w+)\.(\w+)\(", text))
    return sorted(ops)


def export_guiec(model: nn.Module, path: Union[str, Path], size: int, mean: Sequence[float], std: Sequence[float],
                 mode: str = "center_crop", max_dim: int = GUIEC_MAX_DIM, verify: bool = True) -> dict:
    """Export ``model`` (EmbeddingModel) as a GUIEC TorchScript file at ``path``.

    Builds :func:`build_guiec_module`, saves it (atomically), and with ``verify`` reloads it in a
    torch-only subprocess (:func:`verify_in_subprocess`). Returns ``{"path", "backbone", "neck",
    "embedding_dim", "size", "mode", "file_bytes", "torch_version", "file_format_version", "ops",
    "ops_newer_than_1_11"}`` (operators named in the saved file, :func:`list_ops`).
    """
    scripted, info = build_guiec_module(model, size, mean, std, mode, max_dim)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _quiet_jit():
        scripted.save(str(tmp))
    os.replace(tmp, path)
    if verify:
        verify_in_subprocess(path, info["embedding_dim"])
    ops = list_ops(path)
    return {"path": str(path), **info, "size": size, "mode": mode, "file_bytes": path.stat().st_size,
            "torch_version": torch.__version__, "file_format_version": file_format_version(path), "ops": ops,
            "ops_newer_than_1_11": [op for op in ops if op in OPS_NEWER_THAN_1_11]}


def file_format_version(path: Union[str, Path]) -> int:
    """The TorchScript archive's file-format version (``<archive>/.data/version``, older: ``<archive>/version``).

    PyTorch refuses archives newer than its ``kMaxSupportedFileFormatVersion``; torch >= 1.12
    writes at least 10 (the ``gelu(approximate=...)`` bump of Feb 2022).
    """
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/.data/version") or
                 (n.count("/") == 1 and n.endswith("/version"))]
        return int(archive.read(sorted(names)[0]).decode().strip())


# ---------------------------------------------------------------------------------------------- parity


def parity_images(seed: int = 0) -> list[tuple[str, Image.Image]]:
    """Twelve named test images of odd sizes, aspect ratios 1:10 to 10:1 and PIL modes RGB/L/LA/RGBA/P/CMYK/I;16."""
    rng = np.random.default_rng(seed)
    specs = [("RGB", 37, 53), ("RGB", 64, 64), ("RGB", 301, 97), ("L", 31, 200), ("L", 129, 129),
             ("RGBA", 200, 31), ("RGBA", 77, 45), ("LA", 50, 91), ("P", 66, 23), ("CMYK", 41, 143),
             ("I;16", 90, 60), ("RGB", 9, 90)]
    images = []
    for mode, h, w in specs:
        yy, xx = np.mgrid[0:h, 0:w]
        smooth = 127.5 + 127.5 * np.sin(xx[..., None] / (3 + 5 * rng.random(4)) + yy[..., None] / (4 + rng.random(4)))
        array = np.clip(smooth + rng.normal(0, 25, smooth.shape), 0, 255).astype(np.uint8)
        if mode == "I;16":
            image = Image.fromarray(array[..., 0].astype(np.uint16) * 257)
        elif mode == "P":
            image = Image.fromarray(array[..., :3]).quantize(colors=32)
        else:
            bands = {"RGB": 3, "L": 1, "LA": 2, "RGBA": 4, "CMYK": 4}[mode]
            image = Image.fromarray(array[..., :bands].squeeze(-1) if bands == 1 else array[..., :bands], mode)
        images.append((f"{mode} {h}x{w}", image))
    return images


def scorer_tensor(image: Image.Image) -> torch.Tensor:
    """What the GUIEC scorer feeds the model: PIL ``convert("RGB")`` -> uint8 ``[1,3,H,W]``."""
    return pil_to_tensor(image.convert("RGB"))[None]


def parity_check(exported: Callable[[torch.Tensor], torch.Tensor], model: nn.Module,
                 transform: Callable[[Image.Image], torch.Tensor],
                 images: Optional[Iterable[tuple[str, Image.Image]]] = None,
                 tolerance: float = 1e-4, raise_on_fail: bool = True) -> pd.DataFrame:
    """Exported model (scorer path) vs eager pipeline (PIL -> ``transform`` -> ``model``) per image.

    Every source image (any PIL mode) is first converted by PIL to RGB, as the scorer does; the
    eager side gets that RGB image, the exported side its uint8 ``[1,3,H,W]`` tensor. Columns:
    ``image, mode, height, width, max_abs_diff = max_i |e_i - x_i|, cosine = <e, x> / (|e| |x|)``.
    Raises :class:`ExportError` when any ``max_abs_diff > tolerance`` (unless ``raise_on_fail=False``).
    """
    model = model.eval()
    device = next(model.parameters()).device
    rows = []
    with torch.no_grad():
        for name, image in (images if images is not None else parity_images()):
            rgb = image.convert("RGB")
            eager = model(transform(rgb)[None].to(device)).float().cpu()[0]
            got = exported(scorer_tensor(image)).float()[0]
            rows.append({"image": name, "mode": image.mode, "height": image.height, "width": image.width,
                         "max_abs_diff": (got - eager).abs().max().item(),
                         "cosine": F.cosine_similarity(got, eager, dim=0).item()})
    table = pd.DataFrame(rows)
    if raise_on_fail:
        assert_parity(table, tolerance)
    return table


def assert_parity(table: pd.DataFrame, tolerance: float = 1e-4) -> None:
    """Raise :class:`ExportError` naming the worst image when any ``max_abs_diff > tolerance``."""
    worst = table.loc[table["max_abs_diff"].idxmax()]
    if worst["max_abs_diff"] > tolerance:
        raise ExportError(f"parity check failed: max |delta| = {worst['max_abs_diff']:.3g} > tolerance "
                          f"{tolerance:g} on image '{worst['image']}' (cosine {worst['cosine']:.6f})\n"
                          f"{table.to_string(index=False)}")


# ------------------------------------------------------------------------------------- local scorer


def read_solution(path: Union[str, Path]) -> pd.DataFrame:
    """Read a GUIEC solution CSV ``id,<space-separated relevant index ids>,Usage`` (header row, any names).

    Returns columns ``id`` (str), ``relevant`` (list of str), ``Usage`` (str).
    """
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if table.shape[1] != 3:
        raise ValueError(f"{path}: a solution CSV has 3 columns (id, relevant index ids, Usage); "
                         f"found {list(table.columns)}")
    out = pd.DataFrame({"id": table.iloc[:, 0], "relevant": table.iloc[:, 1].str.split(),
                        "Usage": table.iloc[:, 2]})
    empty = out.loc[out["relevant"].map(len) == 0, "id"].tolist()
    if empty:
        raise ValueError(f"{path}: query id(s) {empty[:10]} have no relevant index image")
    return out


def write_solution(rows: Iterable[tuple[str, Sequence[str], str]], path: Union[str, Path]) -> Path:
    """Write a solution CSV from ``(query id, relevant index ids, Usage)`` rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([{"id": q, "expected": " ".join(rel), "Usage": usage} for q, rel, usage in rows],
                         columns=["id", "expected", "Usage"])
    table.to_csv(path, index=False)
    return path


def relevance_matrix(predictions: Mapping[str, Sequence[str]], solution: pd.DataFrame,
                     k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``rel [Q,k]`` and ``n_q [Q]`` for the queries of ``solution`` (:func:`read_solution`).

    ``rel[q, j-1] = 1`` when the ``j``-th prediction is relevant and not already predicted at a
    better rank (a repeated prediction counts once); missing predictions are 0.
    """
    rel = np.zeros((len(solution), k))
    for q, (query, relevant) in enumerate(zip(solution["id"], solution["relevant"])):
        seen: set = set()
        for j, pid in enumerate(list(predictions.get(query, ()))[:k]):
            rel[q, j] = pid in relevant and pid not in seen
            seen.add(pid)
    return rel, solution["relevant"].map(len).to_numpy()


def mean_precision_at_k(predictions: Mapping[str, Sequence[str]], solution: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """mMP@k (:func:`unifex_lib.retrieval.mmp_at_k` of :func:`relevance_matrix`), overall and per Usage.

    Returns rows ``Usage`` in (``all``, then each Usage value) with columns ``mMP@k, n_queries``.
    """
    scores = mmp_at_k(*relevance_matrix(predictions, solution, k), k=k)
    rows = [{"Usage": "all", f"mMP@{k}": float(scores.mean()), "n_queries": len(scores)}]
    for usage in sorted(solution["Usage"].unique()):
        mask = (solution["Usage"] == usage).to_numpy()
        rows.append({"Usage": usage, f"mMP@{k}": float(scores[mask].mean()), "n_queries": int(mask.sum())})
    return pd.DataFrame(rows)


def list_images(folder: Union[str, Path]) -> list[Path]:
    """Image files directly in ``folder``, sorted; the id of an image is its file stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        raise ValueError(f"{folder}: two image files share an id (file stem)")
    return files


def embed_folder(model: Callable[[torch.Tensor], torch.Tensor], folder: Union[str, Path], batched: bool = False,
                 batch_size: int = 32) -> tuple[list[str], torch.Tensor]:
    """Embed every image of ``folder`` the way the scorer does: PIL open -> RGB -> uint8 ``[1,3,H,W]``.

    ``batched=True`` stacks up to ``batch_size`` images *of the same size* per call (same results,
    fewer calls). Returns ``(ids, float32 [N, D])``.
    """
    files = list_images(folder)
    tensors = []
    for p in files:
        with Image.open(p) as image:
            tensors.append(scorer_tensor(image))
    out: list[Optional[torch.Tensor]] = [None] * len(files)
    with torch.no_grad():
        if not batched:
            for i, x in enumerate(tensors):
                out[i] = model(x)[0].float()
        else:
            by_shape: dict[tuple, list[int]] = {}
            for i, x in enumerate(tensors):
                by_shape.setdefault(tuple(x.shape), []).append(i)
            for indices in by_shape.values():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start:start + batch_size]
                    for i, y in zip(chunk, model(torch.cat([tensors[i] for i in chunk])).float()):
                        out[i] = y
    dim = out[0].shape[-1] if out else 0
    return [p.stem for p in files], torch.stack(out) if out else torch.zeros(0, dim)


def euclidean_knn(queries: torch.Tensor, index: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Indices ``[Q, min(k, N)]`` of the nearest index rows by Euclidean distance, nearest first."""
    distances = torch.cdist(queries.double(), index.double())
    return distances.topk(min(k, index.shape[0]), dim=1, largest=False).indices


def predict(model: Union[str, Path, Callable[[torch.Tensor], torch.Tensor]], query_dir: Union[str, Path],
            index_dir: Union[str, Path], k: int = 5, batched: bool = False) -> dict[str, list[str]]:
    """Run the scorer's kNN: ``{query id: [k index ids, nearest first]}``. ``model`` may be a saved file."""
    if isinstance(model, (str, Path)):
        model = load_exported(model)
    query_ids, queries = embed_folder(model, query_dir, batched)
    index_ids, index = embed_folder(model, index_dir, batched)
    neighbours = euclidean_knn(queries, index, k)
    return {q: [index_ids[j] for j in row] for q, row in zip(query_ids, neighbours.tolist())}


def local_score(model: Union[str, Path, Callable[[torch.Tensor], torch.Tensor]], fixture_dir: Union[str, Path],
                k: int = 5, batched: bool = False) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Score ``model`` on a GUIEC-style folder ``query/``, ``index/``, ``solution.csv``.

    Returns the :func:`mean_precision_at_k` table (overall and per Usage) and the predictions.
    """
    fixture_dir = Path(fixture_dir)
    solution = read_solution(fixture_dir / "solution.csv")
    predictions = predict(model, fixture_dir / "query", fixture_dir / "index", k, batched)
    missing = sorted(set(solution["id"]) - set(predictions))
    if missing:
        raise FileNotFoundError(f"{fixture_dir / 'query'}: no image for solution query id(s) {missing[:10]}")
    return mean_precision_at_k(predictions, solution, k), predictions


def build_guiec_fixture(data_root: Union[str, Path], out_dir: Union[str, Path], split: str = "test",
                        domains: Optional[Sequence[str]] = None, queries_per_class: int = 1) -> pd.DataFrame:
    """Turn UnED split files into a GUIEC-style folder: ``query/``, ``index/``, ``solution.csv``.

    For every domain (folder of ``info_files/``) and class of ``split``: the first
    ``queries_per_class`` images (sorted by path) become queries whose relevant set is the rest of
    the class (same domain), which go to the index. A class too small to leave one index image
    contributes only index images (distractors). Ids are the first 16 hex digits of
    ``sha1("<domain>/<path>")``; queries alternate Public / Private in id order. Multi-label
    ``class_id`` lists are relevant when they share a label. Returns the solution table.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    info = data_root / "info_files"
    available = sorted(p.name for p in info.iterdir() if p.is_dir()) if info.is_dir() else []
    domains = list(domains) if domains is not None else available
    unknown = [d for d in domains if d not in available]
    if unknown or not domains:
        raise FileNotFoundError(f"domain(s) {unknown or domains} not under {info}; found {available}")
    for sub in ("query", "index"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        (out_dir / sub).mkdir(parents=True)
    solution = []
    for domain in domains:
        items = sorted(read_split_file(info / domain / f"{split}.json"), key=lambda item: item["path"])
        labels = [set(c if isinstance(c, list) else [c]) for c in (item["class_id"] for item in items)]
        ids = [hashlib.sha1(f"{domain}/{item['path']}".encode()).hexdigest()[:16] for item in items]
        is_query = [False] * len(items)
        for label in sorted(set().union(*labels)):
            members = [i for i, ls in enumerate(labels) if label in ls and not is_query[i]]
            for i in members[:min(queries_per_class, len(members) - 1)]:
                is_query[i] = True
        for i, item in enumerate(items):
            source = data_root / "images" / item["path"]
            shutil.copyfile(source, out_dir / ("query" if is_query[i] else "index") / f"{ids[i]}{source.suffix}")
            if is_query[i]:
                relevant = sorted(ids[j] for j in range(len(items)) if not is_query[j] and labels[i] & labels[j])
                solution.append((ids[i], relevant))
    solution.sort()
    rows = [(q, rel, USAGES[n % 2]) for n, (q, rel) in enumerate(solution)]
    write_solution(rows, out_dir / "solution.csv")
    return read_solution(out_dir / "solution.csv")


# --------------------------------------------------------------------------------------- submission


def write_submission_zip(model_path: Union[str, Path], zip_path: Union[str, Path]) -> Path:
    """``submission.zip`` with the TorchScript file stored as ``saved_model.pt`` at its root."""
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(zip_path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.write(model_path, arcname=MODEL_FILENAME)
    os.replace(tmp, zip_path)
    return zip_path


def export_submission(model: nn.Module, out_dir: Union[str, Path], size: Optional[int] = None,
                      mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                      mode: str = "center_crop", max_dim: int = GUIEC_MAX_DIM, tolerance: float = 1e-4,
                      images: Optional[Iterable[tuple[str, Image.Image]]] = None) -> dict:
    """Export, verify, parity-check and zip: the whole GUIEC path for one model.

    ``size`` / ``mean`` / ``std`` default to ``model.data_config`` (``input_size[-1]``, ``mean``,
    ``std``). Writes ``out_dir/saved_model.pt``, ``out_dir/parity.csv`` and, only when parity holds
    within ``tolerance``, ``out_dir/submission.zip``. Returns the :func:`export_guiec` info plus
    ``parity`` (DataFrame), ``zip_path`` and ``zip_bytes``.
    """
    config = getattr(model, "data_config", None) or {}
    size = size if size is not None else config.get("input_size", (None,))[-1]
    mean = mean if mean is not None else config.get("mean")
    std = std if std is not None else config.get("std")
    if size is None or mean is None or std is None:
        raise ExportError(f"export needs size, mean and std (got {size}, {mean}, {std}); pass them or give the "
                          "model a data_config with input_size, mean and std")
    out_dir = Path(out_dir)
    check_max_dim(embedding_dim_of(model), max_dim)
    info = export_guiec(model, out_dir / MODEL_FILENAME, size, mean, std, mode, max_dim)
    exported = load_exported(info["path"])
    transform = create_transform(mode, size=size, mean=mean, std=std, train=False)
    parity = parity_check(exported, model, transform, images, tolerance, raise_on_fail=False)
    parity.to_csv(out_dir / "parity.csv", index=False)
    zip_path = out_dir / "submission.zip"
    if zip_path.exists():
        zip_path.unlink()
    assert_parity(parity, tolerance)  # no submission.zip for a model that differs from eager
    write_submission_zip(info["path"], zip_path)
    return {**info, "parity": parity, "zip_path": str(zip_path), "zip_bytes": zip_path.stat().st_size}


def export_summary(info: dict, model: nn.Module) -> pd.DataFrame:
    """One-column table of an :func:`export_submission` result: compile method, sizes, parameter counts, parity."""
    counts = model.param_counts()
    parity = info["parity"]
    rows = {"backbone compiled by": info["backbone"], "neck compiled by": info["neck"],
            "embedding dim": info["embedding_dim"], "input": f"{info['mode']} {info['size']}x{info['size']}",
            "parameters (total)": f"{counts['total']:,}", "parameters (trainable)": f"{counts['trainable']:,}",
            "saved_model.pt (MB)": round(info["file_bytes"] / 2 ** 20, 2),
            "submission.zip (MB)": round(info["zip_bytes"] / 2 ** 20, 2),
            "exported with torch": info["torch_version"], "file format version": info["file_format_version"],
            "ops newer than torch 1.11": ", ".join(info["ops_newer_than_1_11"]) or "none",
            "parity max |delta|": f"{parity['max_abs_diff'].max():.3g}",
            "parity min cosine": f"{parity['cosine'].min():.7f}"}
    return pd.DataFrame({"value": [str(v) for v in rows.values()]}, index=list(rows))
