"""IVF-PQ indexes for galleries larger than one machine's memory, built shard by shard on Ray.

The build runs in four steps; each one's output is kept, so a build that died is resumed:

1. choose ``nlist``, PQ ``m`` and ``nbits`` from the gallery size and a memory budget
   (:func:`choose_ivfpq`; the rule is written down in docs/embedding.md);
2. train: Ray tasks draw a random sample of rows from their shards; the driver trains the
   coarse quantiser, the PQ codebooks (and the OPQ rotation) on that sample alone;
3. add: one Ray task per part (consecutive shards, at most ``rows_per_part`` rows) adds its
   vectors to an empty copy of the trained index and writes that part; it also finds the exact
   top-k of the recall queries among its rows, so exact search never needs the whole table;
4. merge: the parts' inverted lists are merged into one on-disk file that search memory-maps.

One merged file rather than parts searched together: a query then scans its ``nprobe`` lists
once instead of once per part, and a gallery of thousands of shards stays one mapped file.

A build's folder ``builds/ivfpq-<fingerprint>/`` holds ``index.faiss`` (quantiser, codebooks,
list offsets; small), ``index.ivfdata`` (codes and ids, memory-mapped), ``ids.arrow`` (row ->
image_id, image_uri, person_id as Arrow IPC, memory-mapped) and ``index.json``; ``work/``
holds the trained index, the recall queries and the parts while it is built. The fingerprint
covers the table's shards (names, sizes, rows) and the parameters, so re-running the same
build continues it. The top-level pointer ``index.json`` is switched last, as for the other
kinds: a build killed at any point leaves the previous index loadable.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tpr_ray import tables
from tpr_ray.io import storage
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.index.folder import BUILDS_DIR, INDEX_FILE, INFO_FILE, near_queries, recall_at_k

IVFDATA_FILE = "index.ivfdata"
IDS_ARROW_FILE = "ids.arrow"
WORK_DIR = "work"
TRAINED_FILE = "trained.faiss"
QUERIES_FILE = "queries.npy"
ID_COLUMNS = ("image_id", "image_uri", "person_id")
M_CHOICES = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
MIN_VECTORS = 1_000
HNSW_QUANTISER_FROM = 16_384  # nlist from which the coarse quantiser is an HNSW graph over the centroids
ID_BYTES = 8  # faiss keeps one int64 id per vector in the inverted lists
KMEANS_ITERATIONS = 10  # coarse k-means; faiss's default 25 triples training time for little gain in recall
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class IvfPqParams:
    nlist: int
    m: int
    nbits: int
    opq: bool
    train_rows: int
    nprobe: int

    @property
    def hnsw_quantiser(self) -> bool:
        return self.nlist >= HNSW_QUANTISER_FROM

    def factory(self) -> str:
        """The faiss index_factory string."""
        coarse = f"IVF{self.nlist}" + ("_HNSW32" if self.hnsw_quantiser else "")
        return (f"OPQ{self.m}," if self.opq else "") + f"{coarse},PQ{self.m}x{self.nbits}"

    def index_bytes(self, num_vectors: int, dim: int) -> int:
        """What the index holds: codes and ids of every vector, centroids (and their graph),
        PQ codebooks, OPQ rotation."""
        codes = num_vectors * (math.ceil(self.m * self.nbits / 8) + ID_BYTES)
        centroids = self.nlist * dim * 4 + (self.nlist * 2 * 32 * 4 if self.hnsw_quantiser else 0)
        return codes + centroids + (1 << self.nbits) * dim * 4 + (dim * dim * 4 if self.opq else 0)


def default_nlist(num_vectors: int) -> int:
    """The power of two at or below 4 sqrt(N), with at least 39 training vectors per cell."""
    nlist = 1 << int(math.log2(max(1.0, 4 * math.sqrt(num_vectors))))
    return max(1, min(nlist, num_vectors // 39))


def choose_ivfpq(num_vectors: int, dim: int, memory_budget: int, *, opq: bool = False, nlist: int | None = None,
                 nprobe: int = 32) -> IvfPqParams:
    """IVF-PQ parameters for ``num_vectors`` of ``dim`` whose index fits ``memory_budget`` bytes:
    the largest PQ ``m`` (most bytes per vector, best recall) that divides ``dim``, leaves at
    least 4 dims per sub-quantiser and fits."""
    if num_vectors < MIN_VECTORS:
        raise ConfigError(f"a gallery of {num_vectors} vectors is too small for --kind ivfpq (it needs at least "
                          f"{MIN_VECTORS}); use --kind flat")
    nlist = nlist or default_nlist(num_vectors)
    if not 1 <= nlist <= num_vectors // 39:
        raise ConfigError(f"--nlist {nlist} needs 1 to {num_vectors // 39} cells for {num_vectors} vectors "
                          "(at least 39 per cell to train them)")
    train_rows = min(num_vectors, max(40 * nlist, 10_000))
    nbits = min(8, int(math.log2(train_rows / 39)))  # PQ codebooks want 39 training vectors per centroid too
    candidates = [IvfPqParams(nlist, m, nbits, opq, train_rows, min(nprobe, nlist))
                  for m in M_CHOICES if dim % m == 0 and dim // m >= min(4, dim)]
    for params in candidates:
        if params.index_bytes(num_vectors, dim) <= memory_budget:
            return params
    need = candidates[-1].index_bytes(num_vectors, dim)
    raise ConfigError(f"--memory-budget {memory_budget:,} bytes is too small for {num_vectors:,} vectors of dim {dim}: "
                      f"the smallest IVF-PQ ({candidates[-1].factory()}) needs {need:,}")


def parse_size(text: str | int) -> int:
    """Bytes from ``123``, ``512M``, ``1.5G`` (binary units K, M, G, T; a trailing B or iB is allowed)."""
    if isinstance(text, int):
        return text
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in SIZE_UNITS and value[-1:] else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise ConfigError(f"--memory-budget: cannot read {text!r} as a size such as 4G or 512M") from None
    if number <= 0:
        raise ConfigError(f"--memory-budget must be positive, got {text!r}")
    return int(number * SIZE_UNITS[unit])


# --------------------------------------------------------------------------- the table's parts


def plan_parts(shard_uris: list[str], rows: list[int], rows_per_part: int) -> list[dict]:
    """Consecutive shards grouped into parts of at most ``rows_per_part`` rows (a shard is
    never split); each part knows the gallery row of its first vector."""
    parts, start = [], 0
    for uri, count in zip(shard_uris, rows):
        if not parts or (parts[-1]["rows"] and parts[-1]["rows"] + count > rows_per_part):
            parts.append({"start": start, "rows": 0, "shards": []})
        parts[-1]["shards"].append((uri, start, count))
        parts[-1]["rows"] += count
        start += count
    return parts


def read_vectors(shard_uri: str, rows: int, dim: int) -> np.ndarray:
    """One shard's embeddings as ``[rows, dim]`` float32, checked by the table reader."""
    column = tables.read_columns(shard_uri, ["embedding"]).column("embedding")
    array = tables.fixed_size_embeddings(column, shard_uri)
    if array.type.list_size != dim or len(array) != rows:
        raise DataError(f"shard holds {len(array)} x {array.type.list_size} embeddings, the build planned {rows} x "
                        f"{dim}; the table changed while it was indexed, re-run the build", file=shard_uri,
                        field="embedding")
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def sample_rows(shards: list[tuple], picks: np.ndarray, dim: int) -> np.ndarray:
    """Ray task: the rows ``picks`` (gallery row numbers, sorted) of these shards."""
    found = [np.empty((0, dim), np.float32)]
    for uri, start, count in shards:
        local = picks[(picks >= start) & (picks < start + count)] - start
        if len(local):
            found.append(read_vectors(uri, count, dim)[local])
    return np.concatenate(found)


def merge_top_k(best: tuple | None, found: tuple, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest scores of two (scores, ids) results per query."""
    if best is not None:
        found = (np.hstack([best[0], found[0]]), np.hstack([best[1], found[1]]))
    scores, ids = found
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def add_part(trained: bytes, part: dict, dim: int, queries: np.ndarray, k: int, part_uri: str,
             exact_uri: str) -> dict:
    """Ray task: add one part's vectors to an empty copy of the trained index and write it
    (after the queries' exact top-k among its rows); returns its time and peak memory."""
    tick = time.perf_counter()
    faiss.omp_set_num_threads(1)  # one CPU per task; more would oversubscribe the node
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    best = None
    for uri, start, count in part["shards"]:
        vectors = read_vectors(uri, count, dim)
        index.add_with_ids(vectors, np.arange(start, start + count, dtype=np.int64))
        scores, rows = faiss.knn(queries, vectors, min(k, max(count, 1)), metric=faiss.METRIC_INNER_PRODUCT)
        scores[rows < 0] = -np.inf
        best = merge_top_k(best, (scores, np.where(rows < 0, -1, rows + start)), k)
        del vectors
    buffer = io.BytesIO()
    np.savez(buffer, scores=best[0], ids=best[1])
    storage.write_bytes_atomic(exact_uri, buffer.getvalue())
    storage.write_bytes_atomic(part_uri, faiss.serialize_index(index))  # written last: the part is done
    return {"rows": part["rows"], "seconds": time.perf_counter() - tick,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# --------------------------------------------------------------------------- the build


def table_dim(shard_uri: str, info: dict) -> int:
    """The embedding dim: from the sidecar, the first shard's schema, or (a plain list column) its rows."""
    if info.get("dim"):
        return int(info["dim"])
    fs, path = storage.filesystem(shard_uri)
    with fs.open(path, "rb") as f:
        kind = pq.read_schema(f).field("embedding").type
    if pa.types.is_fixed_size_list(kind):
        return kind.list_size
    column = tables.read_columns(shard_uri, ["embedding"]).column("embedding")
    return tables.fixed_size_embeddings(column, shard_uri).type.list_size


def fingerprint(shard_uris: list[str], rows: list[int], info: dict, params: IvfPqParams, settings: dict) -> str:
    """What a build depends on: the shards (name, size, rows), the table's own fingerprint, the parameters."""
    shards = []
    for uri, count in zip(shard_uris, rows):
        fs, path = storage.filesystem(uri)
        shards.append([os.path.basename(path), fs.size(path), count])
    record = {"shards": shards, "table": info.get("fingerprint"), "params": asdict(params), **settings}
    return hashlib.sha256(storage.json_bytes(record)).hexdigest()


def train(params: IvfPqParams, dim: int, parts: list[dict], work: str, seed: int, num_queries: int) -> tuple:
    """The trained, empty index (bytes) and the recall queries: read back when an earlier run
    of this build wrote them, else trained on a sample the Ray tasks draw from their shards."""
    import ray

    trained_uri, queries_uri = storage.join(work, TRAINED_FILE), storage.join(work, QUERIES_FILE)
    if storage.exists(trained_uri) and storage.exists(queries_uri):
        return storage.read_bytes(trained_uri), np.load(io.BytesIO(storage.read_bytes(queries_uri)))
    rng = np.random.default_rng(seed)
    total = sum(part["rows"] for part in parts)
    picks = np.sort(rng.choice(total, size=params.train_rows, replace=False))
    task = ray.remote(num_cpus=1)(sample_rows)
    sample = np.concatenate(ray.get([task.remote(part["shards"], picks[(picks >= part["start"])
                                                                      & (picks < part["start"] + part["rows"])], dim)
                                     for part in parts]))
    index = faiss.index_factory(dim, params.factory(), faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter, ivf.cp.seed = KMEANS_ITERATIONS, seed
    index.train(sample)
    queries = near_queries(sample, num_queries, seed=seed)
    buffer = io.BytesIO()
    np.save(buffer, queries)
    storage.write_bytes_atomic(queries_uri, buffer.getvalue())
    trained = faiss.serialize_index(index).tobytes()
    storage.write_bytes_atomic(trained_uri, trained)  # written last: training is done
    return trained, queries


def add_parts(trained: bytes, parts: list[dict], dim: int, queries: np.ndarray, k: int, work: str) -> dict:
    """Run :func:`add_part` for every part not written by an earlier run; its stats per part."""
    import ray

    task = ray.remote(num_cpus=1, max_calls=1)(sys.modules[__name__].add_part)  # a fresh worker: its own peak RSS
    trained_ref, queries_ref = ray.put(trained), ray.put(queries)
    pending, stats = {}, {"built": [], "reused": 0}
    for number, part in enumerate(parts):
        part_uri, exact_uri = part_files(work, number)
        if storage.exists(part_uri) and storage.exists(exact_uri):
            stats["reused"] += 1
            continue
        pending[task.remote(trained_ref, part, dim, queries_ref, k, part_uri, exact_uri)] = number
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        stats["built"].append({"part": pending.pop(done[0]), **ray.get(done[0])})
    return stats


def part_files(work: str, number: int) -> tuple[str, str]:
    name = f"part-{number:05d}"
    return storage.join(work, "parts", name + ".faiss"), storage.join(work, "parts", name + ".exact.npz")


@contextlib.contextmanager
def c_stdout_muted():
    """faiss prints progress lines from C++ while merging and mapping lists: keep them out of stdout."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def merge_parts(trained: bytes, part_paths: list[str], build_dir: str, params: IvfPqParams) -> bytes:
    """Merge the parts' lists into ``index.ivfdata``; the small ``index.faiss`` that maps it (bytes)."""
    from faiss.contrib.ondisk import merge_ondisk

    ivfdata = os.path.join(build_dir, IVFDATA_FILE)
    if os.path.exists(ivfdata):
        os.remove(ivfdata)  # a merge that died midway starts over
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    with c_stdout_muted():
        merge_ondisk(index, part_paths, ivfdata)
    set_ivfpq_effort(index, params.nprobe)
    data = faiss.serialize_index(index).tobytes()
    del index  # unmaps the merged lists
    with open(ivfdata, "rb") as f:
        os.fsync(f.fileno())
    return data


def set_ivfpq_effort(index: faiss.Index, nprobe: int) -> None:
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = min(nprobe, ivf.nlist)
    quantiser = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantiser, faiss.IndexHNSW):
        quantiser.hnsw.efSearch = max(64, 2 * ivf.nprobe)


def write_ids(shards: list[tuple], path: str) -> None:
    """row -> image_id, image_uri, person_id, streamed shard by shard into one Arrow IPC file."""
    tmp = os.path.join(os.path.dirname(path), storage.TEMP_PREFIX + os.path.basename(path))
    writer, schema = None, None
    with pa.OSFile(tmp, "wb") as sink:
        for uri, _, count in shards:
            fs, file_path = storage.filesystem(uri)
            with fs.open(file_path, "rb") as f:
                names = [c for c in ID_COLUMNS if c in pq.read_schema(f).names]
            table = tables.read_columns(uri, names)
            if writer is None:
                schema = table.schema
                writer = pa.ipc.new_file(sink, schema)
            try:
                writer.write_table(table.cast(schema))
            except (pa.ArrowInvalid, ValueError) as error:
                raise DataError(f"id columns differ from the first shard's ({error})", file=uri) from None
        writer.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_ivfpq(embeddings: str, out: str, info: dict, *, memory_budget: int, opq: bool = False,
                nlist: int | None = None, nprobe: int = 32, recall_k: int = 10, rows_per_part: int = 250_000,
                num_queries: int = 1000, seed: int = 0) -> tuple[str, dict]:
    """Build (or finish) the IVF-PQ index of the gallery table ``embeddings`` under ``out/builds/``;
    returns the build's name and its index.json. ``info`` is the table's checked sidecar."""
    from tpr_ray.io.cluster import init_ray, require_shared_storage

    if storage.is_remote(out):
        raise ConfigError(f"--kind ivfpq memory-maps its files: give a local or shared-filesystem --out, not {out}")
    init_ray()
    require_shared_storage(out, "index --out")
    shard_uris = tables.list_shards(embeddings)
    rows = tables.shard_row_counts(shard_uris)
    if "rows" in info and info["rows"] != sum(rows):
        raise DataError(f"sidecar says {info['rows']} rows but the shards hold {sum(rows)}", field="rows",
                        file=tables.sidecar_uri(embeddings))
    dim = table_dim(shard_uris[0], info)
    params = choose_ivfpq(sum(rows), dim, memory_budget, opq=opq, nlist=nlist, nprobe=nprobe)
    parts = plan_parts(shard_uris, rows, rows_per_part)
    settings = {"rows_per_part": rows_per_part, "seed": seed, "recall_k": recall_k, "num_queries": num_queries}
    build = "ivfpq-" + fingerprint(shard_uris, rows, info, params, settings)[:16]
    build_dir = os.path.abspath(storage.join(out, BUILDS_DIR, build))
    work = os.path.join(build_dir, WORK_DIR)
    if storage.exists(os.path.join(build_dir, INFO_FILE)):  # finished earlier; only the pointer switch was missing
        return build, storage.read_json(os.path.join(build_dir, INFO_FILE))

    tick = time.perf_counter()
    trained, queries = train(params, dim, parts, work, seed, num_queries)
    trained_seconds = time.perf_counter() - tick
    stats = add_parts(trained, parts, dim, queries, recall_k, work)
    added_seconds = time.perf_counter() - tick - trained_seconds
    index_bytes = merge_parts(trained, [part_files(work, n)[0] for n in range(len(parts))], build_dir, params)
    storage.write_bytes_atomic(os.path.join(build_dir, INDEX_FILE), index_bytes)
    write_ids([s for part in parts for s in part["shards"]], os.path.join(build_dir, IDS_ARROW_FILE))

    exact = None
    for number in range(len(parts)):
        found = np.load(io.BytesIO(storage.read_bytes(part_files(work, number)[1])))
        exact = merge_top_k(exact, (found["scores"], found["ids"]), recall_k)
    index, ids = load_ivfpq(build_dir, {})
    _, approx = index.search(queries, recall_k)
    details = {"kind": "ivfpq", "dim": dim, "ntotal": int(index.ntotal), "factory": params.factory(),
               **asdict(params), "memory_budget": memory_budget, "index_bytes_estimate": params.index_bytes(
                   int(index.ntotal), dim), "parts": len(parts), "parts_built": len(stats["built"]),
               "parts_reused": stats["reused"], "part_tasks": stats["built"], "ids_rows": ids.num_rows,
               f"recall_at_{recall_k}_vs_exact": recall_at_k(exact[1], approx), "recall_queries": len(queries),
               "train_seconds": trained_seconds, "add_seconds": added_seconds, "build": build,
               "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
               "ivfdata_bytes": os.path.getsize(os.path.join(build_dir, IVFDATA_FILE)),
               "ids_bytes": os.path.getsize(os.path.join(build_dir, IDS_ARROW_FILE))}
    del index
    storage.write_json(os.path.join(build_dir, INFO_FILE), details)
    shutil.rmtree(work, ignore_errors=True)  # the parts are in index.ivfdata now
    return build, details


def load_ivfpq(folder: str, info: dict) -> tuple[faiss.Index, pa.Table]:
    """An IVF-PQ build with its lists and ids memory-mapped: the process holds the quantiser and
    codebooks; pages of the lists a query scans come from disk (and stay in the page cache)."""
    index_path = os.path.join(folder, "index.faiss")
    files = {"index_sha256": index_path, "ivfdata_bytes": os.path.join(folder, IVFDATA_FILE),
             "ids_bytes": os.path.join(folder, IDS_ARROW_FILE)}
    for name, path in files.items():
        if not os.path.exists(path):
            raise DataError(f"the index's current build has no {os.path.basename(path)}; rebuild it with "
                            "`tpr-ray index build --overwrite`", file=path)
        if name not in info:
            continue
        found = (hashlib.sha256(open(path, "rb").read()).hexdigest() if name == "index_sha256"
                 else os.path.getsize(path))
        if found != info[name]:
            raise DataError(f"file differs from the one this build recorded ({name}); rebuild with "
                            "`tpr-ray index build --overwrite`", file=path)
    with c_stdout_muted():
        index = faiss.read_index(index_path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    ids = pa.ipc.open_file(pa.memory_map(files["ids_bytes"])).read_all()
    if index.ntotal != ids.num_rows:
        raise DataError(f"the index holds {index.ntotal} vectors but its ids table {ids.num_rows} rows; rebuild with "
                        "`tpr-ray index build --overwrite`", file=files["ids_bytes"])
    return index, ids
