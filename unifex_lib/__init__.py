"""unifex: universal image embeddings (foundation backbones, margin heads, UnED, GUIEC)."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """``unifex_lib.available_models`` / ``unifex_lib.load`` from :mod:`unifex_lib.hub`, imported on first use."""
    if name in ("available_models", "load"):
        from unifex_lib import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'unifex_lib' has no attribute {name!r}")
