"""The closing table of ``make demo``: zero-shot baseline vs trained model, per domain.

Reads ``<demo>/zero_shot/zero_shot_test.csv`` (notebooks/zero_shot.ipynb) and
``<demo>/uned/uned_test.csv`` (notebooks/evaluate_uned.ipynb, the trained run's best
checkpoint), keeps the merged-index protocol, and writes ``<demo>/results.csv``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

METRICS = ("R@1", "mMP@5")


def _read(path: Path, producer: str) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run {producer} first (make demo runs every notebook in order)")
    return pd.read_csv(path)


def demo_results(demo_dir, mode: str = "merged") -> pd.DataFrame:
    """Per-domain R@1 / mMP@5 of the zero-shot baseline and the trained model (best checkpoint)."""
    demo_dir = Path(demo_dir)
    zero = _read(demo_dir / "zero_shot" / "zero_shot_test.csv", "notebooks/zero_shot.ipynb")
    trained = _read(demo_dir / "uned" / "uned_test.csv", "notebooks/evaluate_uned.ipynb")
    zero = zero[(zero["mode"] == mode) & (zero["model"] == zero["model"].iloc[0])]
    trained = trained[(trained["mode"] == mode) & (trained["model"] == trained["model"].iloc[0])]
    table = pd.concat({"zero-shot": zero.set_index("domain")[list(METRICS)],
                       "trained": trained.set_index("domain")[list(METRICS)]}, axis=1)
    return table.loc[[d for d in table.index if d != "mean"] + ["mean"]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir", nargs="?", default="outputs/demo")
    parser.add_argument("--mode", default="merged", choices=("merged", "separate"))
    args = parser.parse_args(argv)
    table = demo_results(args.demo_dir, args.mode)
    table.to_csv(Path(args.demo_dir) / "results.csv")
    print(f"\nUnED-style test metrics on the demo data ({args.mode} index; held-out classes)\n")
    print(table.round(3).to_string())
    gain = table.loc["mean", ("trained", "mMP@5")] - table.loc["mean", ("zero-shot", "mMP@5")]
    print(f"\nmean mMP@5: trained - zero-shot = {gain:+.3f}; table written to {Path(args.demo_dir) / 'results.csv'}")


if __name__ == "__main__":
    main()
