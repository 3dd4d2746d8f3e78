"""Approximate vs exact search on a synthetic gallery with identities.

    python benchmarks/index_recall.py --vectors 100000

Gallery vectors are noisy copies of per-identity centres (dim 512, unit length), queries are
other noisy copies of the same centres, as text queries of a person are to that person's
images. Prints build time, queries/s and recall@10 against exact search for flat, IVF and HNSW.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from tpr_ray.index.faiss_index import fill_index, make_index, recall_at_k, set_search_effort  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--identities", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((args.identities, args.dim)))
    owners = rng.integers(0, args.identities, args.vectors)
    gallery = unit(centres[owners] + 0.9 * unit(rng.standard_normal((args.vectors, args.dim))))
    queries = unit(centres[rng.choice(owners, args.queries)] + 0.9 * unit(rng.standard_normal((args.queries, args.dim))))
    faiss.omp_set_num_threads(os.cpu_count() or 1)

    exact_ids = None
    print(f"{args.vectors:,} x {args.dim} gallery, {args.queries:,} queries, {os.cpu_count()} CPUs")
    print(f"{'index':<22} {'build s':>8} {'queries/s':>10} {'recall@' + str(args.k):>10}")
    for kind, efforts in [("flat", [{}]), ("ivf", [{"nprobe": p} for p in (16, 32, 64)]),
                          ("hnsw", [{"ef_search": e} for e in (64, 128, 256)])]:
        tick = time.perf_counter()
        index = make_index(kind, args.dim, args.vectors)
        fill_index(index, gallery)
        build = time.perf_counter() - tick
        for effort in efforts:
            set_search_effort(index, **effort)
            tick = time.perf_counter()
            _, ids = index.search(queries, args.k)
            qps = args.queries / (time.perf_counter() - tick)
            if kind == "flat":
                exact_ids = ids
            label = kind + "".join(f" {k}={v}" for k, v in effort.items())
            print(f"{label:<22} {build:>8.1f} {qps:>10.0f} {recall_at_k(exact_ids, ids):>10.4f}", flush=True)


if __name__ == "__main__":
    main()
