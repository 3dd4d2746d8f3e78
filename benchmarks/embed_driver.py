"""The embedding driver at scale: peak memory and commit throughput, with a stub model.

    python benchmarks/embed_driver.py                       # 1M and 10M inputs
    python benchmarks/embed_driver.py --rows 100000 --dim 64

What the driver of `tpr-ray embed` does, without Ray and without images. The input listing
(a synthetic bare gallery: ``image_id``, null ``person_id``, ``image_uri``) is written to a
Parquet file first, by another process: what ``tpr-ray embed --images listing.parquet`` reads.
The measured process then reads it as that command does (:func:`tpr_ray.embedding.inputs.listing_batches`)
and plans the job as the driver does (:func:`tpr_ray.embedding.pipeline.plan_job`: streams the listing twice, for the resume
fingerprint and to write the shard-plan files), and commits every shard as the results come
back from the pipeline: batches of ``--batch`` rows carrying the input columns (read here from
the plan files, as the workers do) and random unit ``--dim`` embeddings, in shard order, as a
stub model would send them. Each size runs in a fresh process so its peak resident memory
(VmHWM) is its own. Reports: peak memory after planning and at the end; planning rows/s;
commit rows/s (``ShardCommitter.add`` and ``finish``, including the Parquet writes to local
disk, but not the worker-side reading of the plan files). The extrapolation to 100M assumes
memory and time linear in rows between the two sizes.
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


def make_listing(rows: int, path: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("image_id", pa.string()), ("person_id", pa.int64()),
                                           ("image_uri", pa.string())])) as writer:
        for first in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - first)
            ids = pa.array([f"cam{i % 8}/{i:09d}.jpg" for i in range(first, first + n)], pa.string())
            writer.write_table(pa.table({"image_id": ids, "person_id": pa.nulls(n, pa.int64()),
                                         "image_uri": pc.binary_join_element_wise("s3://bucket/crops/", ids, "")}))


def one_size(listing: str, dim: int, batch: int, rows_per_shard: int, out: str) -> dict:
    import numpy as np

    from tpr_ray.embedding.pipeline import EmbedConfig, plan_job
    from tpr_ray.embedding.inputs import listing_batches
    from tpr_ray.embedding.plan import read_plan
    from tpr_ray.tables import plan_dir

    start_rss = vm_hwm()
    cfg = EmbedConfig(checkpoint="stub", out=out, images=listing, rows_per_shard=rows_per_shard)
    identity = {"method": "stub", "model": "stub", "checkpoint": "stub", "dim": dim}
    tick = time.perf_counter()
    committer, pending = plan_job(out, "gallery", lambda: listing_batches(listing),
                                  {"rows_per_shard": rows_per_shard}, cfg, identity)
    plan_s = time.perf_counter() - tick
    plan_rss = vm_hwm()
    rows = committer.plan[-1][1]

    rng = np.random.default_rng(0)
    unit = rng.normal(size=(batch, dim)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    no_reject = np.array([""] * batch, dtype=object)
    commit_s = commit_cpu_s = 0.0
    loop = time.perf_counter()
    for shard in pending:  # the workers' side: read the plan, send batches with the columns
        for block in read_plan({"shard": [shard]}, plan_dir(out), batch):
            results = {c: block.column(c) for c in block.column_names}  # Arrow, as the driver reads them
            n = block.num_rows
            results.update(embedding=unit[:n], reject_reason=no_reject[:n])
            tick, cpu = time.perf_counter(), time.process_time()
            committer.add(results)
            commit_s += time.perf_counter() - tick
            commit_cpu_s += time.process_time() - cpu
    tick, cpu = time.perf_counter(), time.process_time()
    info = committer.finish()
    commit_s += time.perf_counter() - tick
    commit_cpu_s += time.process_time() - cpu
    loop_s = time.perf_counter() - loop
    assert info["complete"] and info["rows"] == rows
    return {"rows": rows, "dim": dim, "shards": len(committer.plan),
            "rss_start_mib": start_rss / 2**20, "rss_after_planning_mib": plan_rss / 2**20,
            "rss_peak_mib": vm_hwm() / 2**20, "planning_rows_per_s": rows / plan_s,
            "commit_rows_per_s": rows / commit_s, "commit_s": commit_s, "commit_rows_per_cpu_s": rows / commit_cpu_s,
            "loop_rows_per_s": rows / loop_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=64, help="Embedding size (64 keeps 10M rows at 2.5 GB on disk).")
    parser.add_argument("--batch", type=int, default=256, help="Rows per batch from the pipeline.")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # measure one listing file, in this process
    parser.add_argument("--make-listing", help=argparse.SUPPRESS)  # write a listing of --rows rows here
    parser.add_argument("--json", help="Also write the results here.")
    args = parser.parse_args()

    if args.make_listing:
        make_listing(args.rows[0], args.make_listing)
        return
    if args.one:
        out = tempfile.mkdtemp(prefix="tpr-driver-bench-")
        try:
            print(json.dumps(one_size(args.one, args.dim, args.batch, args.rows_per_shard, out + "/gallery")))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return

    results = []
    work = tempfile.mkdtemp(prefix="tpr-driver-listing-")
    try:
        for rows in args.rows:
            listing = os.path.join(work, f"listing-{rows}.parquet")
            subprocess.run([sys.executable, __file__, "--make-listing", listing, "--rows", str(rows)], check=True)
            proc = subprocess.run([sys.executable, __file__, "--one", listing, "--dim", str(args.dim),
                                   "--batch", str(args.batch), "--rows-per-shard", str(args.rows_per_shard)],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr)
            os.remove(listing)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{rows:>11,} rows: peak {r['rss_peak_mib']:8.0f} MiB (after planning "
                  f"{r['rss_after_planning_mib']:.0f}); planning {r['planning_rows_per_s'] / 1e6:6.2f} M rows/s; "
                  f"commit {r['commit_rows_per_s'] / 1e3:8.1f} k rows/s "
                  f"({r['commit_rows_per_cpu_s'] / 1e3:.1f} k rows per CPU-second); loop with the worker side "
                  f"{r['loop_rows_per_s'] / 1e3:.1f} k rows/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
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
