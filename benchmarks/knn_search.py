"""kNN search on UnED-sized synthetic embeddings: faiss exact vs faiss IVF vs annoy@300.

Synthetic clustered, L2-normalised 64-d embeddings with the UnED test proportions
(241,986 queries, 1,397,126 index items; ``--scale`` shrinks both, default 1/20; ``--full``
is scale 1). Prints, side by side, build and search time, recall@1 relative to exact search
(fraction of queries whose first neighbour is the exact one), the process's CPU time (all
threads: on a machine shared with other work, CPU time / threads estimates the wall time
on dedicated cores) and peak memory (RSS high-water mark, cumulative: each row includes
what came before it).

    python benchmarks/knn_search.py            # scaled down
    python benchmarks/knn_search.py --full     # full UnED size
    python benchmarks/knn_search.py --full --time-queries 24199   # full index, 1/10 of the queries timed
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from unifex_lib.retrieval import build_index

UNED_QUERIES, UNED_INDEX = 241_986, 1_397_126


def synthetic(n_queries: int, n_index: int, dim: int = 64, per_class: int = 10, noise: float = 0.5, seed: int = 0):
    """Index items and queries drawn around ``n_index / per_class`` random class centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n_index // per_class, 1), dim), dtype=np.float32)

    def draw(n):
        x = centres[rng.integers(0, len(centres), n)]
        x += noise * rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    return draw(n_queries), draw(n_index)


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full UnED size (241,986 x 1,397,126)")
    ap.add_argument("--scale", type=float, default=0.05, help="fraction of the UnED size (default 0.05)")
    ap.add_argument("--k", type=int, default=6, help="neighbours (5 for mMP@5 + the query itself)")
    ap.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    ap.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4 sqrt(N))")
    ap.add_argument("--nprobe", type=int, default=16, help="IVF cells visited per query")
    ap.add_argument("--n-trees", type=int, default=300, help="annoy trees")
    ap.add_argument("--time-queries", type=int, default=None,
                    help="search only the first N queries and scale the search time to all queries")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ivf", "annoy"], help="methods to leave out")
    args = ap.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(args.threads)
    scale = 1.0 if args.full else args.scale
    nq, nx = int(UNED_QUERIES * scale), int(UNED_INDEX * scale)
    t0 = time.perf_counter()
    queries, index = synthetic(nq, nx)
    print(f"{nq:,} queries x {nx:,} index items, 64-d, k={args.k}, {args.threads} faiss threads "
          f"(data {time.perf_counter() - t0:.1f} s, peak {peak_gb():.2f} GB)", flush=True)

    methods = [("faiss exact (flat IP)", dict(backend="faiss")),
               (f"faiss IVF (nprobe={args.nprobe})",
                dict(backend="faiss", faiss_index="ivf", nlist=args.nlist, nprobe=args.nprobe)),
               (f"annoy ({args.n_trees} trees)", dict(backend="annoy", n_trees=args.n_trees))]
    methods = [m for m in methods if not any(s in m[0].lower() for s in args.skip)]
    rows, exact = [], None
    for name, options in methods:
        t0, c0 = time.perf_counter(), time.process_time()
        searcher = build_index(index, **options)
        build, build_cpu = time.perf_counter() - t0, time.process_time() - c0
        sub = queries[:args.time_queries] if args.time_queries else queries
        t0, c0 = time.perf_counter(), time.process_time()
        _, ids = searcher.search(sub, args.k)
        scale_up = len(queries) / len(sub)
        search, search_cpu = (time.perf_counter() - t0) * scale_up, (time.process_time() - c0) * scale_up
        del searcher
        if exact is None:
            exact = ids[:, 0]
        recall = float((ids[:, 0] == exact[:len(sub)]).mean())
        rows.append((name, build, search, build_cpu + search_cpu, recall, peak_gb()))
        print(f"  done: {name}", flush=True)

    note = f" (search timed on the first {len(sub):,} queries, scaled to all)" if len(sub) < len(queries) else ""
    print(f"\n{nq:,} x {nx:,}{note}\n")
    print("| method | build (s) | search (s) | total (s) | CPU time (s) | recall@1 vs exact | peak memory (GB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, build, search, cpu, recall, peak in rows:
        print(f"| {name} | {build:.1f} | {search:.1f} | {build + search:.1f} | {cpu:.1f} | {recall:.4f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
