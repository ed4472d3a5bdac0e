"""Run-folder plots: learning rate, loss and evaluation metrics against the epoch (PNG)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from unifex_lib.plots import save_figure


def plot_run(run_dir, best_metric: str = "mMP@5") -> list[Path]:
    """Write ``lr.png`` and ``loss.png`` (from history.csv) and ``metric.png`` (from eval.csv); return the paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    run_dir, written = Path(run_dir), []
    history = run_dir / "history.csv"
    if history.is_file():
        h = pd.read_csv(history)
        for column, ylabel in (("lr", "learning rate"), ("loss", "training loss")):
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(h["epoch"], h[column], lw=1, alpha=0.5 if column == "loss" else 1, label=column)
            if column == "loss" and len(h) > 10:
                ax.plot(h["epoch"], h[column].rolling(max(2, len(h) // 20), min_periods=1).mean(), lw=2,
                        label="running mean")
                ax.legend()
            ax.set(xlabel="epoch", ylabel=ylabel)
            ax.grid(alpha=0.3)
            written.append(save_figure(fig, run_dir / f"{column}.png"))
    evals = run_dir / "eval.csv"
    if evals.is_file():
        e = pd.read_csv(evals)
        e = e[e["domain"] == "mean"]
        metrics = [c for c in e.columns if "@" in c]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for (mode, metric) in ((m, c) for m in e["mode"].unique() for c in metrics):
            rows = e[e["mode"] == mode]
            ax.plot(rows["epoch"], rows[metric], marker="o", lw=2 if metric == best_metric else 1,
                    label=f"{metric} ({mode})")
        ax.set(xlabel="epoch", ylabel="mean over domains")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(save_figure(fig, run_dir / "metric.png"))
    return written
