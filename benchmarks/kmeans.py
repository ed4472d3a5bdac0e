"""faiss k-means time at the pseudo-class scale: 1 M x 64-d points into 10 k clusters on 2 cores.

Times :func:`unifex_lib.cluster.kmeans` (spherical faiss k-means, the pseudo-labelling step of
cluster discrimination) on random L2-normalised float32 points and prints the settings with the
figures. Usage::

    python benchmarks/kmeans.py                       # 1M x 64 -> 10k clusters, 20 iterations, 2 threads
    python benchmarks/kmeans.py --n 200000 --k 2000   # a reduced scale
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="points")
    parser.add_argument("--d", type=int, default=64, help="dimension")
    parser.add_argument("--k", type=int, default=10_000, help="clusters")
    parser.add_argument("--niter", type=int, default=20, help="Lloyd iterations")
    parser.add_argument("--threads", type=int, default=2, help="OpenMP threads of faiss")
    parser.add_argument("--max-points-per-centroid", type=int, default=256,
                        help="faiss trains on at most this many points per centroid (a seeded subsample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu", action="store_true", help="run on a GPU (needs faiss-gpu)")
    a = parser.parse_args(argv)

    import faiss

    from unifex_lib.cluster import kmeans

    faiss.omp_set_num_threads(a.threads)
    x = np.random.default_rng(a.seed).standard_normal((a.n, a.d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    train_points = min(a.n, a.k * a.max_points_per_centroid)
    print(f"faiss {faiss.__version__} | {platform.processor() or platform.machine()} | "
          f"{a.threads} OpenMP thread(s) of {os.cpu_count()} cores | {'GPU' if a.gpu else 'CPU'}")
    print(f"k-means: n={a.n:,} d={a.d} k={a.k:,} niter={a.niter} spherical=True seed={a.seed} "
          f"max_points_per_centroid={a.max_points_per_centroid} (trains on {train_points:,} points) "
          f"+ final assignment of all {a.n:,}")
    start = time.perf_counter()
    result = kmeans(x, a.k, niter=a.niter, seed=a.seed, max_points_per_centroid=a.max_points_per_centroid,
                    gpu=a.gpu)
    seconds = time.perf_counter() - start
    sizes = np.bincount(result.labels, minlength=a.k)
    print(f"time {seconds:.1f} s total, {seconds / a.niter:.2f} s per iteration (total / niter) "
          f"({2 * a.k * a.d * (train_points * a.niter + a.n) / seconds / 1e9:.0f} GFLOP/s in the distance "
          f"products 2 k d (n_train niter + n)); "
          f"cluster sizes min {sizes.min()} median {int(np.median(sizes))} max {sizes.max()}, "
          f"empty {int((sizes == 0).sum())}")


if __name__ == "__main__":
    main()
