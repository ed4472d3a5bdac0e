"""A name -> factory registry, one per model family (backbones, necks, heads).

In the style of ``timm``'s model registry: a module-level :class:`Registry` is filled
by its ``register`` decorator; a duplicate name is an error and an unknown name raises
an error that lists every valid name.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, List


class Registry:
    """Factories by name (with optional aliases) for one kind of component."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: Dict[str, Callable] = {}

    def register(self, name: str, *aliases: str) -> Callable[[Callable], Callable]:
        """Decorator: ``@HEADS.register("ArcFace")`` registers the decorated factory."""
        def add(factory: Callable) -> Callable:
            for key in (name, *aliases):
                if key in self._factories:
                    raise ValueError(f"{self.kind} {key!r} is already registered")
                self._factories[key] = factory
            return factory
        return add

    def names(self) -> List[str]:
        """Sorted registered names (aliases included)."""
        return sorted(self._factories)

    def get(self, name: str) -> Callable:
        """The factory registered as ``name``; an unknown name lists the valid ones."""
        if name not in self._factories:
            match = difflib.get_close_matches(str(name), self._factories, n=1, cutoff=0.5)
            hint = f" (did you mean {match[0]!r}?)" if match else ""
            raise ValueError(f"unknown {self.kind} {name!r}{hint}; choose one of {', '.join(self.names())}")
        return self._factories[name]
