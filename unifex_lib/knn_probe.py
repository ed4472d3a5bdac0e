"""k-NN classification probe: how well an embedder separates the classes of a labelled folder pair.

Weighted k-NN voting as in Wu et al., "Unsupervised Feature Learning via Non-Parametric
Instance-level Discrimination" (CVPR 2018, arXiv:1805.01978) and the DINO evaluation (Caron et al.,
"Emerging Properties in Self-Supervised Vision Transformers", arXiv:2104.14294): each validation
image ``q`` takes its ``k`` nearest training images by cosine similarity ``s_j`` (L2-normalised
embeddings, inner product) and scores every class ``c`` as

    score_c(q) = sum_{j <= k} exp(s_j / T) * 1[y_j = c]

predicting the classes of largest score (ties: smaller class index first). top-1 / top-5
accuracy are the fractions of validation images whose class is the best / among the 5 best.

Folders are in ImageFolder layout, ``<dir>/<class name>/<image>``; classes are matched by folder
name, and every validation class must also be a training class.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch


def image_folder_items(folder: Union[str, os.PathLike]) -> tuple[list[dict], list[str]]:
    """``([{"path", "class_id"}], class names)`` of an ImageFolder tree, via
    :func:`unifex_lib.data.dataset.image_folder_dataset` (files sorted, class ids by sorted name)."""
    from unifex_lib.data.dataset import image_folder_dataset

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"image folder not found: {folder} (expected <dir>/<class>/<image>)")
    dataset = image_folder_dataset(folder)
    if not len(dataset):
        raise ValueError(f"{folder} holds no <class>/<image> files (ImageFolder layout)")
    classes = sorted({Path(p).parent.name for p in dataset.paths})
    return [{"path": p, "class_id": c} for p, c in zip(dataset.paths, dataset.labels)], classes


def knn_predict(train_embeddings, train_labels, query_embeddings, num_classes: int, k: int = 20,
                temperature: float = 0.07, backend: str = "faiss") -> np.ndarray:
    """Class scores ``[Q, num_classes]`` of the weighted vote ``sum_j exp(s_j / T) 1[y_j = c]``."""
    from unifex_lib.retrieval import knn_search

    if k < 1 or temperature <= 0:
        raise ValueError(f"k={k} must be >= 1 and temperature={temperature} > 0")
    train_labels = np.asarray(train_labels, dtype=np.int64)
    k = min(k, len(train_labels))
    scores, ids = knn_search(query_embeddings, train_embeddings, k, backend=backend)
    votes = np.zeros((len(ids), num_classes), dtype=np.float64)
    found = ids >= 0
    weights = np.exp(scores.astype(np.float64) / temperature)
    np.add.at(votes, (np.nonzero(found)[0], train_labels[ids[found]]), weights[found])
    return votes


def knn_accuracy(model: torch.nn.Module, train_dir, val_dir, *, k: int = 20, temperature: float = 0.07,
                 transform: Optional[Callable] = None, batch_size: int = 256, device: str = "cpu",
                 backend: str = "faiss") -> dict:
    """k-NN top-1 / top-5 accuracy of ``model`` (images -> embeddings) on ImageFolder train/val folders.

    ``transform``: PIL image -> tensor (default: ``center_crop`` of ``model.data_config``; give
    ``(model, transform)`` from :func:`unifex_lib.load` for any hub model, with ``batch_size=1``
    for an exported ``.pt`` that takes native-size images). Returns ``{"top1", "top5", "k",
    "temperature", "n_train", "n_val", "num_classes"}``.
    """
    from unifex_lib.uned import default_transform, extract_embeddings

    train_items, classes = image_folder_items(train_dir)
    val_items, val_classes = image_folder_items(val_dir)
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise ValueError(f"validation class(es) {unknown[:10]} of {val_dir} have no training folder in {train_dir}")
    to_train_id = np.array([classes.index(c) for c in val_classes])
    val_labels = to_train_id[[it["class_id"] for it in val_items]]
    transform = transform if transform is not None else default_transform(model)
    embed = {name: extract_embeddings(model, items, root, transform, batch_size=batch_size, device=device,
                                      desc=f"knn {name}")
             for name, items, root in (("train", train_items, train_dir), ("val", val_items, val_dir))}
    votes = knn_predict(embed["train"], [it["class_id"] for it in train_items], embed["val"], len(classes),
                        k, temperature, backend)
    ranked = np.argsort(-votes, axis=1, kind="stable")
    return {"top1": float(np.mean(ranked[:, 0] == val_labels)),
            "top5": float(np.mean((ranked[:, :5] == val_labels[:, None]).any(axis=1))),
            "k": min(k, len(train_items)), "temperature": temperature, "n_train": len(train_items),
            "n_val": len(val_items), "num_classes": len(classes)}
