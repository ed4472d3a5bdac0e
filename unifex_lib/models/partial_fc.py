"""PartialFC: margin softmax over a random subset of class centres, sharded across DDP ranks.

Paper: "Partial FC: Training 10 Million Identities on a Single Machine", arXiv:2010.05222 (as used by
UNICOM, "Unicom: Universal and Compact Representation Learning for Image Retrieval", arXiv:2304.05884).

Each rank owns a contiguous shard of the C classes (``C·k`` centre rows). Per training step every rank
gathers the embeddings and labels of the whole batch, keeps every class of its shard that is a positive
in the batch plus a random subset of the others (``ceil(sample_rate · shard size)`` classes in all),
computes ``cos θ`` and applies the margin function (any :class:`~.heads.Margin`), and the cross-entropy
is computed with a distributed softmax (max and sum of exponentials all-reduced over ranks). With one
process it is the same code without communication; with ``sample_rate = 1`` it equals the full head.
Caller tensors are never modified.

Under DDP every rank gets the gradient of the *global* loss for its own embeddings; the backbone's
DDP gradient averaging then divides it by the world size (as in insightface's partial_fc_v2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .heads import Margin, MarginContext, cosine


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """Concatenate ``x`` over ranks; backward sums the incoming gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def _all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce (SUM by default) of a detached copy; the input itself without DDP."""
    if _world()[1] == 1:
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=op or dist.ReduceOp.SUM)
    return out


class _DistCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy whose classes are split over ranks.

    forward(logits ``[B, S_local]``, target ``[B]`` (column on this rank, or −1)): loss_i = log Σ_ranks Σ_j
    exp(z_ij − max_i) + max_i − z_iy, all-reduced so every rank returns the same value. backward: the exact
    gradient for this rank's logits, (softmax − onehot)/B.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        row_max = _all_reduce(logits.detach().amax(dim=1), dist.ReduceOp.MAX if _world()[1] > 1 else None)
        exp = torch.exp(logits.detach() - row_max[:, None])
        prob = exp / _all_reduce(exp.sum(dim=1))[:, None]
        has = target >= 0
        target_prob = torch.where(has, prob.gather(1, target.clamp_min(0)[:, None])[:, 0], torch.zeros_like(row_max))
        target_prob = _all_reduce(target_prob)
        ctx.save_for_backward(prob, target)
        return -torch.log(target_prob.clamp_min(torch.finfo(prob.dtype).tiny)).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        prob, target = ctx.saved_tensors
        has = target >= 0
        onehot = torch.zeros_like(prob)
        onehot[has, target[has]] = 1.0
        return (prob - onehot) * (grad / prob.shape[0]), None


class PartialFC(nn.Module):
    """PartialFC around a margin function.

    Args: margin (a :class:`~.heads.Margin`, e.g. ``ArcFace(s=30, m=0.5)``), num_classes C, embedding_dim d,
    k sub-centres, sample_rate in (0, 1] (fraction of each shard's classes used per training step; every
    positive class is always kept; evaluation uses all of them).
    ``forward(embeddings [B, d], labels [B])`` -> logits ``[B·world, S]`` over this rank's sampled classes;
    ``loss`` -> the global mean cross-entropy. The shard's centres are ``weight`` ``(C_local·k, d)``.
    """

    def __init__(self, margin: Margin, num_classes: int, embedding_dim: int, k: int = 1,
                 sample_rate: float = 1.0, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate={sample_rate} must be in (0, 1]")
        default_rank, default_world = _world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if num_classes < self.world_size:
            raise ValueError(f"num_classes={num_classes} < world size {self.world_size}")
        base, extra = divmod(num_classes, self.world_size)
        self.num_local = base + (self.rank < extra)
        self.class_start = self.rank * base + min(self.rank, extra)
        self.margin, self.num_classes, self.embedding_dim, self.k = margin, num_classes, embedding_dim, k
        self.sample_rate = sample_rate
        self.num_sample = max(1, math.ceil(sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.empty(self.num_local * k, embedding_dim))
        nn.init.xavier_uniform_(self.weight)

    def sample(self, local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted indices of the shard classes used this step, column of each label or −1).

        Every class with a positive in ``local_labels`` (−1 = not on this shard) is kept; the rest is
        filled with random classes up to ``num_sample``. All classes outside training or at sample_rate 1.
        """
        device = local_labels.device
        present = local_labels >= 0
        if self.training and self.num_sample < self.num_local:
            score = torch.rand(self.num_local, device=device)
            score[local_labels[present]] = 2.0  # positives first
            n = max(self.num_sample, int((score == 2.0).sum()))
            index = torch.topk(score, n).indices.sort().values
        else:
            index = torch.arange(self.num_local, device=device)
        column = torch.full((self.num_local,), -1, dtype=torch.long, device=device)
        column[index] = torch.arange(len(index), device=device)
        target = torch.where(present, column[local_labels.clamp_min(0)], torch.full_like(local_labels, -1))
        return index, target

    def _logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        world = _world()[1]
        if world != self.world_size:
            raise RuntimeError(f"PartialFC was built for world size {self.world_size} but runs under {world}; "
                               "create it after torch.distributed.init_process_group")
        if world > 1:
            embeddings = _AllGather.apply(embeddings)
            parts = [torch.empty_like(labels) for _ in range(world)]
            dist.all_gather(parts, labels.contiguous())
            labels = torch.cat(parts)
        on_shard = (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        local_labels = torch.where(on_shard, labels - self.class_start, torch.full_like(labels, -1))
        index, target = self.sample(local_labels)
        weight = self.weight.view(self.num_local, self.k, -1)[index].reshape(-1, self.embedding_dim)
        with torch.autocast(embeddings.device.type, enabled=False):
            cos = cosine(embeddings, weight, self.k)
            has = target >= 0
            target_cos = torch.where(has, cos.detach().gather(1, target.clamp_min(0)[:, None])[:, 0],
                                     torch.zeros_like(cos[:, 0]))
            ctx = MarginContext(mask=F.one_hot(target + 1, len(index) + 1)[:, 1:].bool(), labels=labels,
                                target_cos=_all_reduce(target_cos), norms=embeddings.detach().to(cos.dtype).norm(dim=1),
                                gather=lambda x: x, class_sum=_all_reduce)
            return self.margin(cos, ctx), target

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._logits(embeddings, labels)[0]

    def full_weight(self) -> torch.Tensor:
        """All class centres ``(C·k, d)`` in class order, gathered from every shard (under DDP a collective:
        call it on every rank), e.g. to checkpoint the head from rank 0."""
        rank, world = _world()
        if world == 1:
            return self.weight.detach().clone()
        rows = (self.num_classes // world + 1) * self.k
        padded = torch.zeros(rows, self.embedding_dim, dtype=self.weight.dtype, device=self.weight.device)
        padded[:len(self.weight)] = self.weight.detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        base, extra = divmod(self.num_classes, world)
        return torch.cat([part[:(base + (r < extra)) * self.k] for r, part in enumerate(parts)])

    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Copy this shard's rows out of all class centres ``(C·k, d)`` (the inverse of :meth:`full_weight`)."""
        if weight.shape != (self.num_classes * self.k, self.embedding_dim):
            raise ValueError(f"expected class centres of shape {(self.num_classes * self.k, self.embedding_dim)}, "
                             f"got {tuple(weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(weight[self.class_start * self.k:(self.class_start + self.num_local) * self.k])

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, target = self._logits(embeddings, labels)
        return _DistCrossEntropy.apply(logits, target)
