"""Multi-domain batch sampling, sharded across DDP ranks and resumable mid-epoch.

An epoch is a list of *global* batches, a pure function of ``(seed, epoch)``:

* ``shuffle``      one permutation of all samples cut into batches (domains mixed);
* ``round_robin``  each domain's permutation cut into batches, domains taken in turn
                   (d0, d1, ..., d0, d1, ...; a finished domain drops out);
* ``proportional`` the same per-domain batches in one random order, so a batch comes from
                   domain ``d`` with probability ``n_d / n`` (without replacement) — one domain per
                   batch as in the UnED baselines (Ypsilantis et al., arXiv:2309.01858).

Incomplete batches are dropped, so every epoch has the same number of steps and the position
in an epoch is ``step % steps_per_epoch``. Rank ``r`` of ``W`` takes the contiguous slice
``[r*B/W, (r+1)*B/W)`` of every global batch, like ``DistributedSampler`` takes its share of
one epoch order: the union over ranks of a step's batches is the one-process batch.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np

from unifex_lib.models import PKBatchSampler

SAMPLINGS = ("shuffle", "round_robin", "proportional")


def epoch_batches(domains: Sequence[str], batch_size: int, mode: str, seed: int, epoch: int) -> list[np.ndarray]:
    """The global batches (arrays of sample indices) of one epoch."""
    if mode not in SAMPLINGS:
        raise ValueError(f"unknown sampling '{mode}'; choose one of {', '.join(SAMPLINGS)}")
    rng = np.random.default_rng([seed, epoch])
    domains = np.asarray(domains)
    if mode == "shuffle":
        order = rng.permutation(len(domains))
        return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    per_domain = []
    for d in sorted(set(domains.tolist())):
        order = rng.permutation(np.flatnonzero(domains == d))
        per_domain.append([order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)])
    if mode == "proportional":
        flat = [b for batches in per_domain for b in batches]
        return [flat[i] for i in rng.permutation(len(flat))]
    rounds = max((len(b) for b in per_domain), default=0)
    return [batches[r] for r in range(rounds) for batches in per_domain if r < len(batches)]


class DomainBatchSampler:
    """``batch_sampler`` for a DataLoader: this rank's share of :func:`epoch_batches`.

    Call :meth:`set_epoch` (as with ``DistributedSampler``) before iterating; ``start`` skips
    the first batches of the epoch when a run resumes mid-epoch.
    """

    def __init__(self, domains: Sequence[str], batch_size: int, mode: str = "shuffle", seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
        self.domains, self.batch_size, self.mode, self.seed = list(domains), batch_size, mode, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self.steps_per_epoch = len(epoch_batches(self.domains, batch_size, mode, seed, 0))
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} is larger than the data allows with sampling='{mode}' "
                             f"({len(self.domains)} samples); no complete batch")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self) -> Iterator[list]:
        share = self.batch_size // self.world_size
        for batch in epoch_batches(self.domains, self.batch_size, self.mode, self.seed, self.epoch)[self.start:]:
            yield batch[self.rank * share:(self.rank + 1) * share].tolist()


class PKBatches:
    """P x K class-balanced batches (:class:`~unifex_lib.models.PKBatchSampler`, for the Triplet head),
    with the interface of :class:`DomainBatchSampler`: ``len(labels) // batch_size`` global steps per
    epoch, each rank drawing ``batch_size / world_size`` samples from its own stream, resumable by
    skipping the first ``start`` batches of the epoch's (seeded) order."""

    def __init__(self, labels: Sequence[int], batch_size: int, samples_per_class: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
        self.inner = PKBatchSampler(labels, batch_size // world_size, samples_per_class, seed, rank, world_size)
        self.steps_per_epoch = max(1, len(labels) // batch_size)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.start = start

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start

    def __iter__(self) -> Iterator[list]:
        return itertools.islice(iter(self.inner), self.start, self.steps_per_epoch)
