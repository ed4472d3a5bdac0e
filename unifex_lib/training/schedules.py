"""Learning-rate schedule: warmup (linear or exponential) times cosine (per iteration or per epoch).

The schedule is a pure function of the step (number of optimizer steps done), so a resumed
run recomputes it instead of restoring a scheduler object::

    lr(t) = w(t) * c(t)

* cosine, per iteration: ``c(t) = eta_min + (lr - eta_min) * (1 + cos(pi * t / T)) / 2`` with
  ``T`` the total number of steps (SGDR, Loshchilov & Hutter, "SGDR: Stochastic Gradient
  Descent with Warm Restarts", arXiv:1608.03983, without restarts);
  per epoch: the same with ``t -> floor(t / S)`` and ``T -> E`` (``S`` steps per epoch, ``E`` epochs);
  constant: ``c(t) = lr``.
* warmup over ``W`` steps (always stepped per iteration), as in Ma & Yarats, "On the Adequacy
  of Untuned Warmup for Adaptive Optimization", arXiv:1910.04209 (the ``pytorch_warmup`` package):
  linear ``w(t) = min(1, (t + 1) / W)``; exponential ``w(t) = 1 - exp(-(t + 1) / tau)`` with the
  paper's pairing ``tau = W / 2`` (its untuned rules: linear over ``2 / (1 - beta2)`` steps ~
  exponential with ``tau = 1 / (1 - beta2)``); none ``w(t) = 1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Schedule:
    """``lr_at(step)`` of a run; build it with :func:`create_schedule`."""
    lr: float
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int = 0
    warmup: str = "linear"  # linear | exponential | none
    scheduler: str = "cosine"  # cosine | constant
    schedule_step: str = "iteration"  # iteration | epoch
    eta_min: float = 0.0

    def warmup_factor(self, step: int) -> float:
        if self.warmup == "none" or self.warmup_steps == 0:
            return 1.0
        if self.warmup == "linear":
            return min(1.0, (step + 1) / self.warmup_steps)
        return 1.0 - math.exp(-(step + 1) / (self.warmup_steps / 2))

    def cosine(self, step: int) -> float:
        if self.scheduler == "constant":
            return self.lr
        if self.schedule_step == "epoch":
            t, total = step // self.steps_per_epoch, max(1, math.ceil(self.total_steps / self.steps_per_epoch))
        else:
            t, total = step, self.total_steps
        return self.eta_min + (self.lr - self.eta_min) * (1 + math.cos(math.pi * min(t, total) / total)) / 2

    def lr_at(self, step: int) -> float:
        """Learning rate for the optimizer step that follows ``step`` completed steps."""
        return self.warmup_factor(step) * self.cosine(step)


def create_schedule(train_params, steps_per_epoch: int, total_steps: int) -> Schedule:
    """The run's :class:`Schedule` from :class:`~unifex_lib.params.TrainParams`.

    The warmup length is ``warmup_iterations`` when set, else ``round(warmup_epochs * steps_per_epoch)``.
    """
    t = train_params
    warmup_steps: Optional[int] = t.warmup_iterations
    if warmup_steps is None:
        warmup_steps = round(t.warmup_epochs * steps_per_epoch)
    return Schedule(lr=t.lr, total_steps=total_steps, steps_per_epoch=steps_per_epoch, warmup_steps=warmup_steps,
                    warmup=t.warmup, scheduler=t.scheduler, schedule_step=t.schedule_step, eta_min=t.eta_min)
