"""IVF-PQ built shard by shard on Ray vs an exact flat index, on a synthetic gallery table.

    python benchmarks/index_scale.py --vectors 1000000 --dim 512 --out /tmp/index_scale

Synthetic unit vectors (noisy copies of identity centres, as images of one person are) are
written as a real gallery table with the project's shard writer; then ``build_index(kind=
"ivfpq")`` builds the index on a local Ray cluster. Prints build time, peak RSS of the driver
and of each part task, index size on disk, search latency and queries/s of a fresh process
that memory-maps the index, recall@10 against exact search, the flat index side by side
(where it fits in memory), and a linear extrapolation to 100M vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from tpr_ray import tables  # noqa: E402

SEARCH = """
import json, resource, sys, time
import numpy as np
from tpr_ray.index.faiss_index import load_index
tick = time.perf_counter()
index, ids, info = load_index(sys.argv[1])
load = time.perf_counter() - tick
queries = np.load(sys.argv[2])
index.search(queries[:10], 10)
tick = time.perf_counter()
for q in queries:
    index.search(q[None], 10)
latency = (time.perf_counter() - tick) / len(queries)
tick = time.perf_counter()
_, found = index.search(queries, 10)
qps = len(queries) / (time.perf_counter() - tick)
np.save(sys.argv[3], found)
print(json.dumps({"load_s": load, "latency_ms": 1000 * latency, "qps": qps,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_table(out: str, vectors: int, dim: int, rows_per_shard: int, seed: int) -> str:
    table_dir = os.path.join(out, "gallery")
    if os.path.exists(tables.sidecar_uri(table_dir)):
        return table_dir
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(vectors // 10, 1), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for shard, start in enumerate(range(0, vectors, rows_per_shard)):
        n = min(rows_per_shard, vectors - start)
        x = centres[rng.integers(0, len(centres), n)] + 0.9 * rng.standard_normal((n, dim)).astype(np.float32) / dim ** .5
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = np.arange(start, start + n)
        tables.write_parquet(os.path.join(table_dir, tables.shard_name(shard)), pa.table({
            "image_id": pa.array([f"img{i}" for i in ids]), "person_id": pa.array(ids // 10),
            "image_uri": pa.array([f"s3://bench/img{i}.jpg" for i in ids]), "embedding": tables.embedding_array(x)}))
    tables.write_sidecar(table_dir, {"kind": "gallery", "complete": True, "dim": dim, "rows": vectors})
    return table_dir


def disk_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def search_in_fresh_process(index_dir: str, queries_file: str, found_file: str) -> dict:
    result = subprocess.run([sys.executable, "-c", SEARCH, index_dir, queries_file, found_file], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rows-per-shard", type=int, default=100_000)
    parser.add_argument("--memory-budget", default="256M")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--flat-up-to", type=int, default=2_000_000, help="Build the flat index up to this size.")
    parser.add_argument("--out", default="/tmp/index_scale")
    args = parser.parse_args()

    import ray

    from tpr_ray.index.faiss_index import build_index, near_queries, recall_at_k

    tick = time.perf_counter()
    gallery = write_table(os.path.join(args.out, f"{args.vectors}x{args.dim}"), args.vectors, args.dim,
                          args.rows_per_shard, seed=0)
    print(f"table {gallery}: {time.perf_counter() - tick:.0f}s, {disk_bytes(gallery) / 2**30:.2f} GiB", flush=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    rows = []
    out = os.path.join(args.out, f"idx-ivfpq-{args.vectors}x{args.dim}")
    tick = time.perf_counter()
    info = build_index(gallery, out, kind="ivfpq", memory_budget=args.memory_budget, overwrite=True,
                       rows_per_part=args.rows_per_shard * 2)
    build_s = time.perf_counter() - tick
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    task_rss = max((t["peak_rss_bytes"] for t in info["part_tasks"]), default=0)
    # Queries near gallery vectors, drawn from the first shard; exact answers by a streaming flat pass.
    first = tables.read_columns(tables.list_shards(gallery)[0], ["embedding"]).column("embedding")
    queries = near_queries(tables.fixed_size_embeddings(first, gallery).flatten().to_numpy().reshape(-1, args.dim),
                           args.queries, seed=1)
    queries_file = os.path.join(args.out, "queries.npy")
    np.save(queries_file, queries)
    exact = exact_top10(gallery, queries, args.dim)
    search = search_in_fresh_process(out, queries_file, os.path.join(args.out, "found.npy"))
    recall = recall_at_k(exact, np.load(os.path.join(args.out, "found.npy")))
    rows.append(("ivfpq " + info["factory"] + f" nprobe={info['nprobe']}", build_s, driver_rss, task_rss,
                 disk_bytes(os.path.join(out, "builds", info["build"])), search, recall))
    if args.vectors <= args.flat_up_to:
        flat_out = os.path.join(args.out, f"idx-flat-{args.vectors}x{args.dim}")
        tick = time.perf_counter()
        build_index(gallery, flat_out, kind="flat", overwrite=True)
        flat_s = time.perf_counter() - tick
        search = search_in_fresh_process(flat_out, queries_file, os.path.join(args.out, "found.npy"))
        rows.append(("flat (exact, in memory)", flat_s, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 0,
                     disk_bytes(flat_out), search, recall_at_k(exact, np.load(os.path.join(args.out, "found.npy")))))

    gib = 2 ** 30
    print(f"\n{args.vectors:,} x {args.dim} vectors, {os.cpu_count()} CPUs, budget {args.memory_budget}; "
          f"build recall@10 recorded in index.json: {info['recall_at_10_vs_exact']:.4f}\n")
    print("| index | build s | driver peak RSS GiB | task peak RSS GiB | size on disk GiB | search RSS GiB | "
          "latency ms | queries/s | recall@10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, seconds, driver, task, size, s, r in rows:
        print(f"| {name} | {seconds:.0f} | {driver / gib:.2f} | {task / gib:.2f} | {size / gib:.3f} | "
              f"{s['peak_rss_bytes'] / gib:.2f} | {s['latency_ms']:.2f} | {s['qps']:.0f} | {r:.4f} |")
    scale = 100_000_000 / args.vectors
    print(f"\nextrapolated to 100M x {args.dim} (linear in N for add and size; training grows with nlist): "
          f"index {rows[0][4] * scale / gib:.1f} GiB on disk; adding {info['add_seconds'] * scale / 3600:.1f} h wall "
          f"on this machine's {os.cpu_count()} cores (parts run in parallel: x {os.cpu_count()} / the cluster's cores); "
          f"flat would need {100_000_000 * args.dim * 4 / gib:.0f} GiB in memory")


def exact_top10(gallery: str, queries: np.ndarray, dim: int) -> np.ndarray:
    import faiss

    from tpr_ray.index.build import merge_top_k, read_vectors

    best, start = None, 0
    for uri, rows in zip(tables.list_shards(gallery), tables.shard_row_counts(tables.list_shards(gallery))):
        scores, ids = faiss.knn(queries, read_vectors(uri, rows, dim), 10, metric=faiss.METRIC_INNER_PRODUCT)
        best = merge_top_k(best, (scores, ids + start), 10)
        start += rows
    return best[1]


if __name__ == "__main__":
    main()
