"""Figure helpers shared by the notebooks' plotting functions."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, path, dpi: int = 100) -> Path:
    """Lay out ``fig``, write it as PNG to ``path`` (creating folders) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
