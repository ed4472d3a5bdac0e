"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint ``<name>`` in a run's ``checkpoints/`` folder is three files:

* ``<name>.safetensors``        weights (``model.*`` = the unwrapped EmbeddingModel, ``head.*``);
* ``<name>.state.safetensors``  the tensors of the trainer state (optimizer moments, RNG states);
* ``<name>.json``               the trainer state (epoch, step, sampler position, optimizer and
                                scaler structure, RNG states, best so far) with tensors replaced
                                by ``{"__tensor__": key}`` references into the file above.

Each file is written to a temporary name and renamed (``os.replace``), the JSON last: a
checkpoint exists only once its JSON does, so a kill during saving leaves the previous
checkpoints intact and no partial one that could be loaded. Loading reads safetensors and
JSON only: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_SUFFIXES = (".safetensors", ".state.safetensors", ".json")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def encode_state(obj: Any, tensors: dict, prefix: str = "s") -> Any:
    """JSON-able copy of ``obj``; tensors/arrays go to ``tensors`` under fresh keys.

    Tuples, non-string dict keys, numpy arrays and tensors are tagged so that
    :func:`decode_state` restores them exactly (optimizer states have int keys, RNG states tuples).
    """
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": encode_state(torch.from_numpy(obj.copy()), tensors, prefix)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, prefix) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode_state(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[encode_state(k, tensors, prefix), encode_state(v, tensors, prefix)]
                              for k, v in obj.items()]}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint state; use tensors, numbers, "
                    "strings, lists, tuples and dicts")


def decode_state(obj: Any, tensors: dict) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return decode_state(obj["__ndarray__"], tensors).numpy()
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode_state(k, tensors): decode_state(v, tensors) for k, v in obj["__items__"]}
    return {k: decode_state(v, tensors) for k, v in obj.items()}


def rng_states() -> dict:
    """Python, numpy, torch (and CUDA) generator states of this process."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(ckpt_dir, name: str, weights: dict, state: dict, keep_last: int,
                    keep: Iterable[str] = ()) -> Path:
    """Write checkpoint ``name`` atomically, then delete all but the newest ``keep_last`` and ``keep``.

    ``weights``: name -> tensor; ``state``: JSON-able trainer state with tensors anywhere inside;
    it must hold an int ``"step"`` (checkpoints are ordered by it). Returns the JSON path.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    tensors: dict = {}
    encoded = encode_state(state, tensors)
    _atomic(ckpt_dir / f"{name}.safetensors", lambda p: save_file(weights, str(p)))
    _atomic(ckpt_dir / f"{name}.state.safetensors", lambda p: save_file(tensors, str(p)))
    _atomic(ckpt_dir / f"{name}.json", lambda p: p.write_text(json.dumps({"name": name, **encoded}, indent=1)))
    keep = set(keep) | {name}
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        if old.stem not in keep:
            delete_checkpoint(old)
    return ckpt_dir / f"{name}.json"


def delete_checkpoint(json_path) -> None:
    """Remove a checkpoint, its JSON first (so a half-deleted one is never loaded)."""
    json_path = Path(json_path)
    for suffix in (".json", ".safetensors", ".state.safetensors"):
        json_path.with_name(json_path.stem + suffix).unlink(missing_ok=True)


def _read_json(path: Path) -> Optional[dict]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    complete = isinstance(state, dict) and isinstance(state.get("step"), int) and all(
        path.with_name(path.stem + s).is_file() for s in _SUFFIXES[:2])
    return state if complete else None


def list_checkpoints(ckpt_dir) -> list[Path]:
    """Complete checkpoints of ``ckpt_dir`` (their JSON paths), oldest step first."""
    found = []
    for path in Path(ckpt_dir).glob("*.json"):
        state = _read_json(path)
        if state is not None:
            found.append((state["step"], path.stem, path))
    return [p for _, _, p in sorted(found)]


def latest_checkpoint(ckpt_dir) -> Optional[Path]:
    """The newest complete checkpoint of ``ckpt_dir``, or None."""
    found = list_checkpoints(ckpt_dir) if Path(ckpt_dir).is_dir() else []
    return found[-1] if found else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint's JSON path from a run folder, a checkpoints folder or any file of a checkpoint.

    A run or checkpoints folder resolves to its best checkpoint when the newest one names one,
    else to the newest.
    """
    path = Path(path)
    if path.is_dir():
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        newest = latest_checkpoint(ckpt_dir)
        if newest is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
        best = (json.loads(newest.read_text()).get("best") or {}).get("name")
        return ckpt_dir / f"{best}.json" if best and (ckpt_dir / f"{best}.json").is_file() else newest
    stem = path.name
    for suffix in (".state.safetensors", ".safetensors", ".json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    json_path = path.with_name(stem + ".json")
    if _read_json(json_path) is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (expected {json_path} with its "
                                f"{stem}.safetensors and {stem}.state.safetensors)")
    return json_path


def load_weights(path) -> dict:
    """The weights of a checkpoint (see :func:`resolve_checkpoint` for ``path``)."""
    json_path = resolve_checkpoint(path)
    return load_file(str(json_path.with_name(json_path.stem + ".safetensors")))


def load_checkpoint(path) -> tuple[dict, dict]:
    """``(weights, state)`` of a checkpoint (see :func:`resolve_checkpoint` for ``path``)."""
    json_path = resolve_checkpoint(path)
    weights = load_weights(json_path)
    tensors = load_file(str(json_path.with_name(json_path.stem + ".state.safetensors")))
    return weights, decode_state(json.loads(json_path.read_text()), tensors)


def prefixed(state_dict: dict, prefix: str) -> dict:
    """``{prefix + "." + k: v}``."""
    return {f"{prefix}.{k}": v for k, v in state_dict.items()}


def unprefixed(weights: dict, prefix: str) -> dict:
    """The entries of ``weights`` under ``prefix + "."``, with the prefix removed."""
    start = prefix + "."
    return {k[len(start):]: v for k, v in weights.items() if k.startswith(start)}
