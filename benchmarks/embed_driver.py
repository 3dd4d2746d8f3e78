"""The embedding driver at scale: peak memory and commit throughput, with a stub model.

    python benchmarks/embed_driver.py                       # 1M and 10M inputs
    python benchmarks/embed_driver.py --rows 100000 --dim 64

What the driver of `tpr-ray embed` does, without Ray and without images: hold the input
listing (a synthetic bare-gallery table: ``image_id``, null ``person_id``, ``image_uri``),
compute the resume fingerprint, plan the shards, open the job (sidecar, lease-free) and
commit every shard as the results come back from the pipeline (batches of ``--batch``
rows of random unit ``--dim`` embeddings, in shard order, as a stub model would send them).
Each size runs in a fresh process so its peak resident memory (VmHWM) is its own. Reports:
peak memory after building the listing, after the fingerprint, and at the end; fingerprint
rows/s; commit rows/s (``ShardCommitter.add`` including the Parquet writes to local disk).
The extrapolation to 100M assumes memory and time linear in rows, as the fits show.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def one_size(rows: int, dim: int, batch: int, rows_per_shard: int, out: str) -> dict:
    import numpy as np
    import pyarrow as pa

    from tpr_ray.commit import open_job
    from tpr_ray.embed import plan_fingerprint, plan_shards

    start_rss = vm_hwm()
    ids = pa.array([f"cam{i % 8}/{i:09d}.jpg" for i in range(rows)], pa.string())
    listing = pa.table({"image_id": ids, "person_id": pa.nulls(rows, pa.int64()),
                        "image_uri": pa.compute.binary_join_element_wise("s3://bucket/crops/", ids, "")})
    listing_rss = vm_hwm()

    tick = time.perf_counter()
    fingerprint = plan_fingerprint(listing, {"rows_per_shard": rows_per_shard})
    fingerprint_s = time.perf_counter() - tick
    fingerprint_rss = vm_hwm()

    plan = plan_shards(rows, rows_per_shard)
    header = {"method": "stub", "model": "stub", "checkpoint": "stub", "dim": dim, "fingerprint": fingerprint}
    committer = open_job(out, "gallery", listing, plan, header)
    rng = np.random.default_rng(0)
    unit = rng.normal(size=(batch, dim)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    no_reject = np.array([""] * batch, dtype=object)
    tick, cpu = time.perf_counter(), time.process_time()
    for first in range(0, rows, batch):
        row = np.arange(first, min(first + batch, rows), dtype=np.int64)
        committer.add({"row": row, "shard": row // rows_per_shard, "embedding": unit[:len(row)],
                       "reject_reason": no_reject[:len(row)]})
    info = committer.finish()
    commit_s, commit_cpu_s = time.perf_counter() - tick, time.process_time() - cpu
    assert info["complete"] and info["rows"] == rows
    return {"rows": rows, "dim": dim, "shards": len(plan),
            "rss_start_mib": start_rss / 2**20, "rss_after_listing_mib": listing_rss / 2**20,
            "rss_after_fingerprint_mib": fingerprint_rss / 2**20, "rss_peak_mib": vm_hwm() / 2**20,
            "fingerprint_rows_per_s": rows / fingerprint_s, "commit_rows_per_s": rows / commit_s,
            "commit_s": commit_s, "commit_rows_per_cpu_s": rows / commit_cpu_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=64, help="Embedding size (64 keeps 10M rows at 2.5 GB on disk).")
    parser.add_argument("--batch", type=int, default=256, help="Rows per batch from the pipeline.")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single size, in this process
    parser.add_argument("--json", help="Also write the results here.")
    args = parser.parse_args()

    if args.one:
        out = tempfile.mkdtemp(prefix="tpr-driver-bench-")
        try:
            print(json.dumps(one_size(args.rows[0], args.dim, args.batch, args.rows_per_shard, out + "/gallery")))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return

    results = []
    for rows in args.rows:
        proc = subprocess.run([sys.executable, __file__, "--one", "--rows", str(rows), "--dim", str(args.dim),
                               "--batch", str(args.batch), "--rows-per-shard", str(args.rows_per_shard)],
                              capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{rows:>11,} rows: peak {r['rss_peak_mib']:8.0f} MiB (listing {r['rss_after_listing_mib']:.0f}, "
              f"after fingerprint {r['rss_after_fingerprint_mib']:.0f}); fingerprint "
              f"{r['fingerprint_rows_per_s'] / 1e6:6.2f} M rows/s; commit {r['commit_rows_per_s'] / 1e3:8.1f} k rows/s "
              f"({r['commit_rows_per_cpu_s'] / 1e3:.1f} k rows per CPU-second)",
              flush=True)
    if len(results) >= 2:
        a, b = results[-2], results[-1]
        per_row = (b["rss_peak_mib"] - a["rss_peak_mib"]) / (b["rows"] - a["rows"])
        at_100m = b["rss_peak_mib"] + per_row * (100_000_000 - b["rows"])
        hours = 100_000_000 / b["commit_rows_per_s"] / 3600
        print(f"extrapolated to 100M rows: driver peak ~{at_100m / 1024:.1f} GiB ({per_row * 2**20:.0f} B/row), "
              f"commit alone ~{hours:.2f} h")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
