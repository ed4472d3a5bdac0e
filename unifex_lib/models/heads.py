"""Training heads: margin-based softmax heads (logits for cross-entropy) and a triplet loss.

Papers:
- ArcFace: "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", arXiv:1801.07698;
  sub-centres: "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web Faces" (ECCV 2020).
- DynM-ArcFace: "Dynamic Margins" of the Google Landmark Recognition 2020 3rd place solution, arXiv:2010.05350;
  with k > 1 sub-centres it is CLAM, the class-distribution-aware angular margin of the universal-embedding
  reference system.
- AdaCos: "AdaCos: Adaptively Scaling Cosine Logits for Effectively Learning Deep Face Representations",
  arXiv:1905.00292.
- LiArcFace: "Airface: Lightweight and Efficient Model for Face Recognition", arXiv:1907.12256.
- CurricularFace: "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face Recognition", arXiv:2004.00288.
- AdaFace: "AdaFace: Quality Adaptive Margin for Face Recognition", arXiv:2204.00964.
- CosFace: "CosFace: Large Margin Cosine Loss for Deep Face Recognition", arXiv:1801.09414.
- Triplet with batch-hard mining: "In Defense of the Triplet Loss for Person Re-Identification", arXiv:1703.07737.

Layout. A margin head is a :class:`MarginHead` (owns the class centres ``W`` of shape ``(C·k, d)``,
xavier-uniform, normalises, computes ``cos θ = normalize(x)·normalize(W)ᵀ``, takes the max over the
``k`` sub-centres of each class, clamps to ``[-1, 1]`` and builds the target mask) around a *margin*
module (:class:`Margin` subclasses below) that turns ``cos θ`` into logits. :class:`~.partial_fc.PartialFC`
takes the same margin modules. All margin maths runs in float32 (float64 inputs stay float64) with
autocast disabled; gradients stay finite at ``cos θ = ±1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .registry import Registry

HEADS = Registry("head")

_SIN_EPS = 1e-12  # floor of 1 - cos² under the square root: finite d sin θ / d cos θ at cos θ = ±1
_ACOS_EPS = 1e-7  # acos input kept in [-1 + eps, 1 - eps]: finite d θ / d cos θ at cos θ = ±1


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """``x`` concatenated over DDP ranks (no gradient); ``x`` itself in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@dataclass
class MarginContext:
    """What a margin needs besides ``cos θ`` ``[B, C']``.

    mask: bool ``[B, C']``, True at the target class (a row may have none: the positive lives on
        another PartialFC shard). labels: ``[B]`` original class ids. target_cos: ``[B]`` cos θ_y of
        every sample (detached; global over PartialFC shards). norms: ``[B]`` ‖x‖ before
        normalisation (detached). gather: concatenates a per-sample statistic over the whole
        (data-parallel) batch. class_sum: sums a per-sample sum over class shards.
    """

    mask: torch.Tensor
    labels: torch.Tensor
    target_cos: torch.Tensor
    norms: torch.Tensor
    gather: Callable[[torch.Tensor], torch.Tensor] = gather_batch
    class_sum: Callable[[torch.Tensor], torch.Tensor] = _identity


def margin_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64."""
    return torch.promote_types(x.dtype, torch.float32)


def cosine(embeddings: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """``cos θ`` ``[B, C]`` = max over the k sub-centres of normalize(x)·normalize(W)ᵀ, clamped to [-1, 1].

    ``weight`` is ``(C·k, d)``, class-major (rows ``c·k .. c·k + k - 1`` are class ``c``).
    """
    dtype = margin_dtype(embeddings)
    cos = F.normalize(embeddings.to(dtype), dim=1) @ F.normalize(weight.to(dtype), dim=1).t()
    if k > 1:
        cos = cos.view(cos.shape[0], -1, k).amax(dim=2)
    return cos.clamp(-1.0, 1.0)


def angle(cos: torch.Tensor) -> torch.Tensor:
    """θ = acos(cos θ) with the input kept off ±1 so the gradient stays finite."""
    return torch.acos(cos.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))


def arc_target(cos: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """ArcFace target logit (before the scale s), elementwise; ``m`` broadcasts (radians).

    cos(θ + m) = cos θ·cos m − sin θ·sin m  if cos θ > cos(π − m),  else  cos θ − m·sin m.
    """
    sin = torch.sqrt((1.0 - cos * cos).clamp_min(_SIN_EPS))
    cos_theta_m = cos * torch.cos(m) - sin * torch.sin(m)
    return torch.where(cos > torch.cos(math.pi - m), cos_theta_m, cos - m * torch.sin(m))


class Margin(nn.Module):
    """Base of the margin functions: ``forward(cos [B, C'], ctx) -> logits [B, C']``.

    Subclasses override :meth:`forward`; ``s`` is the logit scale.
    """

    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, cos: torch.Tensor, ctx: MarginContext) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class ArcFace(Margin):
    """ArcFace (arXiv:1801.07698), sub-centre ArcFace when the head has k > 1.

    logits = s·(cos(θ_y + m) on the target [cos θ − m·sin m when cos θ ≤ cos(π − m)], cos θ elsewhere).
    Args: s logit scale (default 30), m additive angular margin in radians (default 0.5).
    """

    def __init__(self, s: float = 30.0, m: float = 0.5):
        super().__init__(s)
        self.m = m

    def margins(self, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Margin of each sample's class, ``[B, 1]`` radians."""
        return torch.full((labels.shape[0], 1), self.m, dtype=dtype, device=labels.device)

    def forward(self, cos: torch.Tensor, ctx: MarginContext) -> torch.Tensor:
        target = arc_target(cos, self.margins(ctx.labels, cos.dtype))
        return self.s * torch.where(ctx.mask, target, cos)


def dynamic_margins(class_counts: Sequence[int], m_min: float, m_max: float) -> torch.Tensor:
    """DynM per-class margins ``[C]``: m_c = m_min + ½(m_max − m_min)(1 + cos(π·n′_c)).

    n′_c = (n_c − min n)/(max n − min n); the rarest class gets m_max, the most frequent m_min.
    When every class has the same count, n′ = 0 and every class gets m_max.
    """
    n = torch.as_tensor(list(class_counts), dtype=torch.float64)
    spread = n.max() - n.min()
    n_prime = (n - n.min()) / spread if spread > 0 else torch.zeros_like(n)
    return m_min + 0.5 * (m_max - m_min) * (1.0 + torch.cos(math.pi * n_prime))


class DynMArcFace(ArcFace):
    """DynM-ArcFace; CLAM with k > 1 sub-centres. ArcFace with a per-class margin m_c.

    m_c = m_min + ½(m_max − m_min)(1 + cos(π·n′_c)), n′_c = (n_c − min n)/(max n − min n), n_c = training
    images of class c (``class_counts[c]``, by label). Threshold cos(π − m_c) and fallback cos θ − m_c·sin m_c
    per class. Args: s (30), m_min (0.2, most frequent class), m_max (0.5, rarest class), radians.
    """

    def __init__(self, class_counts: Sequence[int], s: float = 30.0, m_min: float = 0.2, m_max: float = 0.5):
        super().__init__(s, m_max)
        self.register_buffer("class_margins", dynamic_margins(class_counts, m_min, m_max).float())

    def margins(self, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.class_margins.to(dtype)[labels].unsqueeze(1)


class CosFace(Margin):
    """CosFace (arXiv:1801.09414): logits = s·(cos θ − m on the target, cos θ elsewhere). Defaults s=30, m=0.5."""

    def __init__(self, s: float = 30.0, m: float = 0.5):
        super().__init__(s)
        self.m = m

    def forward(self, cos: torch.Tensor, ctx: MarginContext) -> torch.Tensor:
        return self.s * torch.where(ctx.mask, cos - self.m, cos)


class LiArcFace(Margin):
    """LiArcFace (arXiv:1907.12256): logits = s·(π − 2(θ + m·[j = y]))/π. Defaults s=30, m=0.5 rad."""

    def __init__(self, s: float = 30.0, m: float = 0.5):
        super().__init__(s)
        self.m = m

    def forward(self, cos: torch.Tensor, ctx: MarginContext) -> torch.Tensor:
        theta = angle(cos) + self.m * ctx.mask.to(cos.dtype)
        return self.s * (math.pi - 2.0 * theta) / math.pi


class AdaCos(Margin):
    """AdaCos (arXiv:1905.00292): logits = s·cos θ, no margin.

    s starts at √2·ln(C − 1). With ``dynamic_s``, each training batch first updates s without gradient:
    B_avg = Σ_{j≠y} exp(s·cos θ_j)/B, θ_med = median target angle, s ← ln(B_avg)/cos(min(π/4, θ_med)).
    """

    def __init__(self, num_classes: int, dynamic_s: bool = True):
        if num_classes < 2:
            raise ValueError(f"AdaCos needs num_classes >= 2, got {num_classes}")
        super().__init__(math.sqrt(2.0) * math.log(num_classes - 1))
        self.dynamic_s = dynamic_s
        self.register_buffer("scale", torch.tensor(self.s, dtype=torch.float64))

    def forward(self, cos: torch.Tensor, ctx: MarginContext) -> torch.Tensor:
        if self.dynamic_s and self.training:
            with torch.no_grad():
                s = self.scale.to(cos.dtype)
                non_target = torch.where(ctx.mask, torch.zeros_like(cos), torch.exp(s * cos)).sum(dim=1)
                b_avg = ctx.gather(ctx.class_sum(non_target)).mean()
                theta_med = torch.median(ctx.gather(angle(ctx.target_cos)))
                theta_med = theta_med.clamp(max=math.pi / 4)
                self.scale.copy_(torch.log(b_avg) / torch.cos(theta_med))
        return self.scale.to(cos.dtype) * cos


class CurricularFace(ArcFace):
    """CurricularFace (arXiv:2004.00288).

    Target as ArcFace; t ← 0.01·mean(cos θ_y) + 0.99·t (buffer starting at 0, updated without gradient in
    training, identical on every DDP rank because the mean runs over the gathered batch); every non-target
    with cos θ_j > cos(θ_y + m) becomes cos θ_j·(t + cos θ_j). logits = s·(...). Defaults s=30, m=0.5 rad.
    """

    def __init__(self, s: float = 30.0, m: float = 0.5, momentum: float = 0.01):
        super().__init__(s, m)
        self.momentum = momentum
        self.register_buffer("t", torch.zeros(()))

    def forward(self, cos: torch.Tensor, ctx: MarginContext) -> torch.Tensor:
        m = self.margins(ctx.labels, cos.dtype)
        if self.training:
            with torch.no_grad():
                mean_target = ctx.gather(ctx.target_cos).mean()
                self.t.copy_(self.momentum * mean_target + (1.0 - self.momentum) * self.t)
        y = ctx.target_cos.unsqueeze(1).to(cos.dtype)
        y_sin = torch.sqrt((1.0 - y * y).clamp_min(_SIN_EPS))
        hard = cos > y * torch.cos(m) - y_sin * torch.sin(m)  # cos θ_j > cos(θ_y + m)
        t = self.t.to(cos.dtype)
        others = torch.where(hard, cos * (t + cos), cos)
        return self.s * torch.where(ctx.mask, arc_target(cos, m), others)


class AdaFace(Margin):
    """AdaFace (arXiv:2204.00964).

    ‖x‖ clipped to [0.001, 100] and detached; running mean μ / std σ of the norms with momentum t_alpha
    (buffers start at 20 and 100; updated in training); ẑ = clip(h·(‖x‖ − μ)/(σ + 1e-3), −1, 1);
    on the target θ′ = clip(θ − m·ẑ, ε, π − ε) (ε = 1e-3) and logit s·(cos θ′ − (m + m·ẑ)); s·cos θ elsewhere.
    Defaults s=30, m=0.5 rad, h=0.333, t_alpha=0.01.
    """

    eps = 1e-3

    def __init__(self, s: float = 30.0, m: float = 0.5, h: float = 0.333, t_alpha: float = 0.01):
        super().__init__(s)
        self.m, self.h, self.t_alpha = m, h, t_alpha
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def forward(self, cos: torch.Tensor, ctx: MarginContext) -> torch.Tensor:
        norms = ctx.norms.detach().clamp(0.001, 100.0).to(cos.dtype)
        if self.training:
            with torch.no_grad():
                all_norms = ctx.gather(norms)
                if all_norms.numel() > 1:
                    a = self.t_alpha
                    self.batch_mean.copy_(a * all_norms.mean() + (1 - a) * self.batch_mean)
                    self.batch_std.copy_(a * all_norms.std() + (1 - a) * self.batch_std)
        mu, sigma = self.batch_mean.to(cos.dtype), self.batch_std.to(cos.dtype)
        z = (self.h * (norms - mu) / (sigma + self.eps)).clamp(-1.0, 1.0).unsqueeze(1)
        theta = (angle(cos) - self.m * z).clamp(self.eps, math.pi - self.eps)
        target = torch.cos(theta) - (self.m + self.m * z)
        return self.s * torch.where(ctx.mask, target, cos)


class MarginHead(nn.Module):
    """A margin-softmax head: class centres ``W`` ``(C·k, d)`` (xavier-uniform) and a :class:`Margin`.

    forward(embeddings ``[B, d]``, labels ``[B]`` int64) -> logits ``[B, C]`` (float32, or float64 for
    float64 inputs) computed with autocast disabled; ``loss`` = mean cross-entropy of those logits.
    """

    def __init__(self, margin: Margin, num_classes: int, embedding_dim: int, k: int = 1):
        super().__init__()
        if k < 1:
            raise ValueError(f"k={k} must be >= 1 (sub-centres per class)")
        self.margin, self.num_classes, self.embedding_dim, self.k = margin, num_classes, embedding_dim, k
        self.weight = nn.Parameter(torch.empty(num_classes * k, embedding_dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embeddings.device.type, enabled=False):
            cos = cosine(embeddings, self.weight, self.k)
            mask = F.one_hot(labels, self.num_classes).bool()
            ctx = MarginContext(mask=mask, labels=labels, target_cos=cos.detach().gather(1, labels[:, None])[:, 0],
                                norms=embeddings.detach().to(cos.dtype).norm(dim=1))
            return self.margin(cos, ctx)

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(embeddings, labels), labels)


def hardest_triplets(embeddings: torch.Tensor, labels: torch.Tensor):
    """Batch-hard mining: for each anchor with a positive and a negative in the batch, the distance to its
    farthest positive and its nearest negative (Euclidean on L2-normalised embeddings). Returns (d_ap, d_an)."""
    x = F.normalize(embeddings.to(margin_dtype(embeddings)), dim=1)
    dist_sq = (2.0 - 2.0 * x @ x.t()).clamp_min(0.0)
    distance = torch.sqrt(dist_sq + _SIN_EPS)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    valid = positive.any(dim=1) & negative.any(dim=1)
    d_ap = torch.where(positive, distance, torch.zeros_like(distance)).amax(dim=1)
    d_an = torch.where(negative, distance, torch.full_like(distance, float("inf"))).amin(dim=1)
    return d_ap[valid], d_an[valid]


class TripletHead(nn.Module):
    """Triplet margin loss with batch-hard mining (arXiv:1703.07737); no class centres, no logits.

    loss = mean over anchors of max(0, max_p d(a, p) − min_n d(a, n) + m), d Euclidean on L2-normalised
    embeddings; anchors without a positive or a negative in the batch are skipped (use the P×K
    :class:`~.sampler.PKBatchSampler`). Default m = 0.5. ``forward`` returns the loss.
    """

    def __init__(self, m: float = 0.5):
        super().__init__()
        self.m = m

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embeddings.device.type, enabled=False):
            d_ap, d_an = hardest_triplets(embeddings, labels)
            if d_ap.numel() == 0:
                raise ValueError("no anchor in the batch has both a positive and a negative; "
                                 "sample P x K batches (PKBatchSampler) for the Triplet head")
            return F.relu(d_ap - d_an + self.m).mean()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels)


@HEADS.register("ArcFace")
def _arcface(o: dict) -> Margin:
    return ArcFace(s=o["s"], m=o["m"])


@HEADS.register("DynM-ArcFace", "CLAM")
def _dynm_arcface(o: dict) -> Margin:
    counts = o["class_counts"]
    if counts is None:
        raise ValueError("DynM-ArcFace/CLAM needs class_counts (training images per class, by label); "
                         "read them with unifex_lib.data.annotations.read_class_counts(path, num_classes)")
    if len(counts) != o["num_classes"]:
        raise ValueError(f"class_counts has {len(counts)} entries but num_classes={o['num_classes']}; "
                         "the count file does not fit the dataset")
    if min(counts) <= 0:
        raise ValueError(f"class_counts must be positive, found {min(counts)}")
    return DynMArcFace(counts, s=o["s"], m_min=o["m_min"], m_max=o["m_max"])


@HEADS.register("AdaCos")
def _adacos(o: dict) -> Margin:
    return AdaCos(o["num_classes"], dynamic_s=o["dynamic_s"])


@HEADS.register("LiArcFace")
def _liarcface(o: dict) -> Margin:
    return LiArcFace(s=o["s"], m=o["m"])


@HEADS.register("CurricularFace")
def _curricularface(o: dict) -> Margin:
    return CurricularFace(s=o["s"], m=o["m"])


@HEADS.register("AdaFace")
def _adaface(o: dict) -> Margin:
    return AdaFace(s=o["s"], m=o["m"], h=o["h"], t_alpha=o["t_alpha"])


@HEADS.register("CosFace")
def _cosface(o: dict) -> Margin:
    return CosFace(s=o["s"], m=o["m"])


@HEADS.register("Triplet")
def _triplet(o: dict) -> nn.Module:
    return TripletHead(m=o["m"])


def create_head(name: str, num_classes: int, embedding_dim: int, *, k: int = 1, s: float = 30.0,
                m: float = 0.5, m_min: float = 0.2, m_max: float = 0.5, h: float = 0.333,
                t_alpha: float = 0.01, dynamic_s: bool = True, class_counts: Optional[list] = None,
                sample_rate: float = 1.0) -> nn.Module:
    """Build a registered head (``list_heads()``).

    Margin heads return a :class:`MarginHead` (``forward`` -> logits, ``loss``), or with
    ``sample_rate < 1`` a :class:`~.partial_fc.PartialFC` around the same margin. ``Triplet`` returns a
    :class:`TripletHead` (``loss`` only). Margins are in radians.
    """
    options = dict(num_classes=num_classes, s=s, m=m, m_min=m_min, m_max=m_max, h=h, t_alpha=t_alpha,
                   dynamic_s=dynamic_s, class_counts=class_counts)
    built = HEADS.get(name)(options)
    if not isinstance(built, Margin):
        if sample_rate != 1.0:
            raise ValueError(f"sample_rate={sample_rate} (PartialFC) needs a margin head, not {name!r}")
        return built
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate={sample_rate} must be in (0, 1]")
    if sample_rate < 1.0:
        from .partial_fc import PartialFC
        return PartialFC(built, num_classes, embedding_dim, k=k, sample_rate=sample_rate)
    return MarginHead(built, num_classes, embedding_dim, k=k)


def list_heads() -> list[str]:
    return HEADS.names()
