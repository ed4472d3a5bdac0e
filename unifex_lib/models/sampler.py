"""P×K class-balanced batch sampler for the Triplet head (batch-hard mining needs positives in every
batch): "In Defense of the Triplet Loss for Person Re-Identification", arXiv:1703.07737."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class PKBatchSampler(Sampler[list]):
    """Batches of P classes × K samples (``P = batch_size // samples_per_class``).

    Each epoch visits the classes in a random order, P per batch; a class with fewer than K samples is
    sampled with replacement. ``len`` = ``len(labels) // batch_size`` batches per epoch. Under DDP give
    each rank its ``rank`` / ``num_replicas`` (different random streams). Call ``set_epoch`` each epoch.
    Use as ``DataLoader(dataset, batch_sampler=PKBatchSampler(labels, 64, 4))``.
    """

    def __init__(self, labels: Sequence[int], batch_size: int, samples_per_class: int = 4, seed: int = 0,
                 rank: int = 0, num_replicas: int = 1):
        labels = torch.as_tensor(list(labels), dtype=torch.long)
        if samples_per_class < 2:
            raise ValueError(f"samples_per_class={samples_per_class} must be >= 2 (positives for every anchor)")
        if batch_size < 2 * samples_per_class:
            raise ValueError(f"batch_size={batch_size} must hold at least 2 classes of samples_per_class="
                             f"{samples_per_class}")
        self.classes = labels.unique()
        self.p = batch_size // samples_per_class
        if len(self.classes) < self.p:
            raise ValueError(f"batch_size={batch_size} needs {self.p} classes per batch but the labels have "
                             f"only {len(self.classes)}")
        self.k, self.batch_size, self.seed, self.rank, self.num_replicas = samples_per_class, batch_size, seed, \
            rank, num_replicas
        self.by_class = [torch.nonzero(labels == c)[:, 0] for c in self.classes]
        self.num_batches = max(1, len(labels) // batch_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list]:
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch + 7919 * self.rank)
        order = torch.empty(0, dtype=torch.long)
        for _ in range(self.num_batches):
            if len(order) < self.p:
                order = torch.cat([order, torch.randperm(len(self.classes), generator=g)])
            chosen, order = order[:self.p], order[self.p:]
            batch = []
            for c in chosen.tolist():
                members = self.by_class[c]
                if len(members) >= self.k:
                    pick = members[torch.randperm(len(members), generator=g)[:self.k]]
                else:
                    pick = members[torch.randint(len(members), (self.k,), generator=g)]
                batch.extend(pick.tolist())
            yield batch
