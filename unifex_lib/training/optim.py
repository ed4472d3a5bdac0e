"""Optimizers of the reference system: Adam, AdamW, SGD (momentum), and SAM over Adam/AdamW.

SAM: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
arXiv:2010.01412. Two forward/backward passes per step::

    e(w) = rho * g / ||g||_2          (g: gradient at w, norm over all parameters)
    w <- w + e(w);  g' = grad L(w + e(w));  w <- w - e(w);  base step with g'
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

OPTIMIZERS = ("Adam", "AdamW", "SGD")


class SAM(torch.optim.Optimizer):
    """SAM around a base optimizer class; ``step(closure)`` where ``closure`` re-runs forward/backward."""

    def __init__(self, params: Iterable, base: type, rho: float = 0.05, **kwargs):
        if rho <= 0:
            raise ValueError(f"SAM rho={rho} must be > 0")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self) -> None:
        """``w <- w + e(w)``, remembering ``e(w)``; then zero the gradients."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
            else torch.tensor(0.0)
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = p.grad * scale.to(p)
                p.add_(e)
                self.state[p]["e_w"] = e
        self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self) -> None:
        """``w <- w - e(w)``, then the base optimizer's step with the perturbed gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if "e_w" in self.state[p]:
                    p.sub_(self.state[p].pop("e_w"))
        self.base_optimizer.step()

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("SAM needs a closure that recomputes the loss and calls backward()")
        self.first_step()
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)


def create_optimizer(params: Iterable, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                     sam: bool = False, sam_rho: float = 0.05) -> torch.optim.Optimizer:
    """``Adam`` / ``AdamW`` / ``SGD`` (with ``momentum``), optionally wrapped in :class:`SAM`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")
    if sam and name == "SGD":
        raise ValueError("sam=True needs optimizer Adam or AdamW, not SGD")
    base = getattr(torch.optim, name)
    kwargs = dict(lr=lr, weight_decay=weight_decay, **({"momentum": momentum} if name == "SGD" else {}))
    return SAM(params, base, rho=sam_rho, **kwargs) if sam else base(params, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
