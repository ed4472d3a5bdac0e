"""Frozen-backbone feature cache: a 10-epoch linear probe on the demo data, uncached vs cached.

Prints (and writes to ``<out>/feature_cache.csv``):

* uncached time / cached time            (goal >= 8x)
* cached total / one extraction pass     (goal <= 1.2x)
* the metrics of both runs side by side  (equal within 1e-4)

Times are wall-clock seconds of ``train(params)`` without the evaluation and the plots at the
checkpoint (the same in both runs, timed apart as ``report_s``); the extraction pass is the cached
run's call of ``cached_features`` on a cold cache. Run it with ``OMP_NUM_THREADS=1`` on a shared
machine (oversubscribed OpenMP threads make the many small ops of neck training erratic). Usage (from the repo root)::

    HF_HUB_OFFLINE=1 python benchmarks/feature_cache.py [--params-file params/demo.yaml] [--epochs 10] [--image-size N]
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

import unifex_lib.train as train_module
from unifex_lib.data.demo import generate_demo
from unifex_lib.params import load_params


class Stopwatch:
    """Wraps a function of ``unifex_lib.train`` and adds up the seconds spent in it."""

    def __init__(self, name: str):
        self.name, self.seconds, self.original = name, 0.0, getattr(train_module, name)
        setattr(train_module, name, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def restore(self) -> None:
        setattr(train_module, self.name, self.original)


def timed_run(params) -> dict:
    watches = [Stopwatch("evaluate"), Stopwatch("plot_run"), Stopwatch("cached_features")]
    start = time.perf_counter()
    try:
        result = train_module.train(params)
    finally:
        for w in watches:
            w.restore()
    total = time.perf_counter() - start
    report = watches[0].seconds + watches[1].seconds
    return {"train_s": total - report, "report_s": report, "extraction_s": watches[2].seconds,
            **result["final_metrics"]}


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-file", default="params/demo.yaml")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="outputs/bench_feature_cache")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int, default=None, help="input side (default: the params file's)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # a cold feature cache
    base = load_params(args.params_file)
    data_root = Path(base.data.data_root)
    if not (data_root / "train.csv").is_file():
        data_root = generate_demo(out / "data", seed=0)
    rows = {}
    for cached in (False, True):
        params = load_params(args.params_file, data_root=str(data_root), output_dir=str(out),
                             run_name=f"probe_{'cached' if cached else 'uncached'}", freeze=True,
                             feature_cache=cached, epochs=args.epochs, checkpoint_every=args.epochs,
                             device=args.device, **({"image_size": args.image_size} if args.image_size else {}))
        torch.manual_seed(0)
        rows["cached" if cached else "uncached"] = timed_run(params)
    table = pd.DataFrame(rows).T
    table.to_csv(out / "feature_cache.csv")
    c, u = rows["cached"], rows["uncached"]
    metrics = [m for m in ("R@1", "mMP@5") if m in c]
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"\nuncached / cached time: {u['train_s'] / c['train_s']:.1f}x (goal >= 8x)")
    print(f"cached total / one extraction pass: {c['train_s'] / c['extraction_s']:.2f}x (goal <= 1.2x)")
    print("max |metric difference|: " + ", ".join(f"{m} {abs(c[m] - u[m]):.2e}" for m in metrics))
    return table


if __name__ == "__main__":
    main()
