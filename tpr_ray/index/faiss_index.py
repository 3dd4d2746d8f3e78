"""faiss indexes over embedding shards, and text search against them.

``build_index`` reads a gallery table shard by shard into one faiss index:

- ``flat``: exact inner-product search (cosine, the embeddings are unit vectors); the default.
- ``ivf``:  an inverted file over k-means cells (``nlist`` ~ 4 sqrt(N), ``nprobe`` searched);
            for large galleries. Its recall@k against exact search is measured when it is built.
- ``hnsw``: a graph index (``M`` = 32, ``efSearch`` = 128); no training, fast queries, more memory.
- ``ivfpq``: inverted file with product-quantised codes, sized for a memory budget and built
            shard by shard on Ray, searched memory-mapped: for galleries larger than memory
            (see :mod:`tpr_ray.index.build`).

An index directory holds one folder per build, ``builds/<id>/`` with ``index.faiss``,
``ids.parquet`` (row -> image_id, image_uri, person_id) and ``index.json`` (kind,
parameters, size, the checkpoint that made the embeddings, measured recall, and the content
hashes of the two files), and a top-level ``index.json``: a copy of the current build's,
which is the pointer to it and is written last. ``search`` embeds query text with that same
checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import time
import uuid

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tpr_ray.io import storage
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.index.build import build_ivfpq, load_ivfpq, parse_size
from tpr_ray.index.folder import BUILDS_DIR, IDS_FILE, INDEX_FILE, INFO_FILE, near_queries, recall_at_k
from tpr_ray.tables import check_kind, embedding_matrix, read_embeddings

KINDS = ("flat", "ivf", "hnsw", "ivfpq")


def make_index(kind: str, dim: int, num_vectors: int, nlist: int | None = None) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        nlist = nlist or max(1, min(int(4 * np.sqrt(num_vectors)), num_vectors // 39 or 1))
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        return index
    raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")


def set_search_effort(index: faiss.Index, nprobe: int = 32, ef_search: int = 128) -> None:
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(nprobe, index.nlist)
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = ef_search


def fill_index(index: faiss.Index, vectors: np.ndarray, train_sample: int = 100_000, seed: int = 0) -> None:
    """Train (when the index needs it) on a random sample, then add every vector."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors[rng.choice(len(vectors), size=min(train_sample, len(vectors)), replace=False)]
        index.train(sample)
    index.add(vectors)


def measure_recall(index: faiss.Index, vectors: np.ndarray, k: int = 10, num_queries: int = 1000,
                   noise: float = 0.05, seed: int = 0) -> float:
    """recall@k of ``index`` against exact search, for queries near gallery vectors.

    Queries are gallery vectors with a little Gaussian noise, re-normalised: what a matching
    text query looks like to the index (close to a few items, not exactly on one).
    """
    queries = near_queries(vectors, num_queries, noise, seed)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, exact_ids = exact.search(queries, k)
    _, approx_ids = index.search(queries, k)
    return recall_at_k(exact_ids, approx_ids)


def build_index(embeddings: str, out: str, kind: str = "flat", nlist: int | None = None, nprobe: int = 32,
                recall_k: int = 10, allow_incomplete: bool = False, overwrite: bool = False,
                memory_budget: int | str = "4G", opq: bool = False, rows_per_part: int = 250_000) -> dict:
    """Index a gallery embedding table (a folder written by `tpr-ray embed`) into ``out``.

    The build goes to a folder of its own under ``out/builds/``; ``out/index.json`` (the
    pointer) is switched to it last, so a build that dies midway leaves the previous index
    whole. An existing index is replaced only with ``overwrite``. ``kind="ivfpq"`` never reads
    the table into one process: ``memory_budget`` (bytes, or "4G") bounds the index, ``opq``
    adds a learnt rotation, ``rows_per_part`` bounds what each Ray task reads (see
    :mod:`tpr_ray.index.build`); re-running a build that died continues it.
    """
    tick = time.perf_counter()
    pointer_uri = storage.join(out, INFO_FILE)
    if storage.exists(pointer_uri) and not overwrite:
        raise ConfigError(f"{out} already holds an index; pass --overwrite (overwrite=True) to replace it, "
                          "or choose another --out")
    if kind == "ivfpq":
        return _build_ivfpq(embeddings, out, tick, nlist=nlist, nprobe=nprobe, recall_k=recall_k,
                            allow_incomplete=allow_incomplete, memory_budget=memory_budget, opq=opq,
                            rows_per_part=rows_per_part)
    if kind not in KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    table, info = read_embeddings(embeddings, allow_incomplete=allow_incomplete)
    check_kind(info, "gallery", hint="index the gallery/ table of an embedding run")
    vectors = embedding_matrix(table)
    index = make_index(kind, vectors.shape[1], len(vectors), nlist)
    fill_index(index, vectors)
    set_search_effort(index, nprobe=nprobe)
    details = {"kind": kind, "dim": int(vectors.shape[1]), "ntotal": int(index.ntotal), "embeddings": embeddings,
               "method": info.get("method"), "model": info.get("model"), "checkpoint": info.get("checkpoint")}
    if kind == "ivf":
        details.update(nlist=int(index.nlist), nprobe=int(index.nprobe))
    if kind == "hnsw":
        details.update(M=32, ef_search=int(index.hnsw.efSearch))
    if kind != "flat":
        details[f"recall_at_{recall_k}_vs_exact"] = measure_recall(index, vectors, recall_k)

    index_bytes = faiss.serialize_index(index).tobytes()
    ids = table.select([c for c in ("image_id", "image_uri", "person_id") if c in table.column_names])
    buffer = io.BytesIO()
    pq.write_table(ids, buffer)
    ids_bytes = buffer.getvalue()
    build = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    build_dir = storage.join(out, BUILDS_DIR, build)
    details.update(build=build, ids_rows=ids.num_rows, index_sha256=_sha256(index_bytes),
                   ids_sha256=_sha256(ids_bytes))
    previous = storage.read_json(pointer_uri).get("build") if storage.exists(pointer_uri) else None
    storage.write_bytes_atomic(storage.join(build_dir, INDEX_FILE), index_bytes)
    storage.write_bytes_atomic(storage.join(build_dir, IDS_FILE), ids_bytes)
    storage.write_json(storage.join(build_dir, INFO_FILE), details)
    _switch_to(out, build, previous, details, tick)
    return details


def _switch_to(out: str, build: str, previous: str | None, details: dict, tick: float) -> None:
    details["seconds"] = time.perf_counter() - tick
    storage.write_json(storage.join(out, INFO_FILE), details)  # the switch: readers see the old build or the new one
    _remove_old_builds(out, keep={build, previous})


def _build_ivfpq(embeddings: str, out: str, tick: float, *, allow_incomplete: bool, memory_budget, **options) -> dict:
    from tpr_ray.tables import check_complete, read_sidecar

    info = {**read_sidecar(embeddings), "uri": embeddings}
    check_complete(info, embeddings, allow_incomplete)
    check_kind(info, "gallery", hint="index the gallery/ table of an embedding run")
    build, details = build_ivfpq(embeddings, out, info, memory_budget=parse_size(memory_budget), **options)
    details.update(embeddings=embeddings, **{f: info.get(f) for f in ("method", "model", "checkpoint")})
    pointer_uri = storage.join(out, INFO_FILE)
    previous = storage.read_json(pointer_uri).get("build") if storage.exists(pointer_uri) else None
    _switch_to(out, build, previous, details, tick)
    return details


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _remove_old_builds(out: str, keep: set) -> None:
    """Delete builds other than the current and the previous one (a search may still be reading that)."""
    fs, path = storage.filesystem(storage.join(out, BUILDS_DIR))
    for entry in fs.ls(path, detail=False):
        if posixpath.basename(entry.rstrip("/")) not in keep:
            fs.rm(entry, recursive=True)
    # Files of the layout before builds had folders would be paired with nothing now.
    for name in (INDEX_FILE, IDS_FILE):
        if storage.exists(storage.join(out, name)):
            fs_top, top = storage.filesystem(storage.join(out, name))
            fs_top.rm(top)


def load_index(index_dir: str) -> tuple[faiss.Index, pa.Table, dict]:
    """The current build of an index folder: (faiss index, ids table, its index.json).

    Vectors and ids are checked to belong together: the same count, and the content hashes
    recorded when they were built.
    """
    pointer_uri = storage.join(index_dir, INFO_FILE)
    if not storage.exists(pointer_uri):
        raise ConfigError(f"{index_dir} is not an index directory (no {INFO_FILE}); "
                          "build one with `tpr-ray index build`")
    info = storage.read_json(pointer_uri)
    # Folders built before builds had folders of their own hold the files at the top.
    folder = storage.join(index_dir, BUILDS_DIR, info["build"]) if info.get("build") else index_dir
    if info.get("kind") == "ivfpq":

        return (*load_ivfpq(folder, info), info)
    index_uri, ids_uri = storage.join(folder, INDEX_FILE), storage.join(folder, IDS_FILE)
    for uri in (index_uri, ids_uri):
        if not storage.exists(uri):
            raise DataError(f"the index's current build has no {posixpath.basename(uri)}; rebuild it with "
                            "`tpr-ray index build --overwrite`", file=uri)
    index_bytes, ids_bytes = storage.read_bytes(index_uri), storage.read_bytes(ids_uri)
    for name, data, uri in (("index_sha256", index_bytes, index_uri), ("ids_sha256", ids_bytes, ids_uri)):
        if name in info and _sha256(data) != info[name]:
            raise DataError(f"file differs from the one this build recorded ({name}); vectors and ids may not "
                            "belong together, rebuild with `tpr-ray index build --overwrite`", file=uri)
    index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
    ids = pq.read_table(io.BytesIO(ids_bytes))
    if index.ntotal != ids.num_rows:
        raise DataError(f"the index holds {index.ntotal} vectors but its ids table {ids.num_rows} rows; they come "
                        "from different builds, rebuild with `tpr-ray index build --overwrite`", file=ids_uri)
    return index, ids, info


def same_checkpoint(a: str, b: str) -> bool:
    """Whether two checkpoint locations name one checkpoint (local paths compared absolute)."""
    def norm(uri: str) -> str:
        return uri.rstrip("/") if "://" in uri else os.path.normpath(os.path.abspath(uri))
    return norm(a) == norm(b)


def check_queries(texts) -> list[str]:
    """The query texts as a list; an empty or whitespace-only one is refused (it would still
    be embedded and return the gallery's top images for no description at all)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for number, text in enumerate(texts, 1):
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"query {number} of {len(texts)} is empty: give a description of the person, "
                              f"e.g. \"a woman in a red coat with a black backpack\"")
    return texts


class Searcher:
    """An index with its text encoder loaded once, for many queries (see :func:`search`)."""

    def __init__(self, index_dir: str, checkpoint: str | None = None, allow_other_checkpoint: bool = False):
        import torch

        from tpr_ray.model.checkpoint import load_method, resolve_checkpoint, validate_checkpoint

        self.index, ids, self.info = load_index(index_dir)
        built_with = self.info.get("checkpoint")
        if checkpoint is None:
            if not built_with:
                raise ConfigError(f"index {index_dir} does not name the checkpoint of its embeddings; "
                                  "pass --checkpoint")
            checkpoint = built_with
        else:
            checkpoint = resolve_checkpoint(checkpoint)
            if built_with and not same_checkpoint(checkpoint, built_with) and not allow_other_checkpoint:
                raise ConfigError(f"checkpoint {checkpoint} is not the one that embedded this index ({built_with}); "
                                  "its text embeddings would not match the gallery's. Leave out --checkpoint, or pass "
                                  "--allow-other-checkpoint (allow_other_checkpoint=True) on purpose")
        self.checkpoint, _ = validate_checkpoint(checkpoint)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.method, _ = load_method(checkpoint)
        self.method.to(self.device)
        self.ids = ids  # memory-mapped for ivfpq: only the rows of hits are read

    def search(self, texts: list[str], k: int = 10) -> list[list[dict]]:
        from tpr_ray.model.encode import encode_captions

        if k < 1:
            raise ConfigError(f"the number of results must be at least 1, got {k}")
        texts = check_queries(texts)
        if not texts:
            return []
        queries = encode_captions(self.method, texts, self.device)
        if queries.shape[1] != self.info["dim"]:
            raise ConfigError(f"checkpoint {self.checkpoint} embeds to dim {queries.shape[1]}, the index holds dim "
                              f"{self.info['dim']}")
        scores, rows = self.index.search(np.ascontiguousarray(queries), min(k, self.index.ntotal))
        results = []
        for score_row, id_row in zip(scores, rows):
            found = id_row >= 0
            named = self.ids.take(pa.array(id_row[found])).to_pylist()
            results.append([{"rank": rank + 1, "score": float(s), **row}
                            for rank, (s, row) in enumerate(zip(score_row[found], named))])
        return results


def search(index_dir: str, texts: list[str], k: int = 10, checkpoint: str | None = None,
           allow_other_checkpoint: bool = False) -> list[list[dict]]:
    """Top-k gallery images for each text, embedded by the checkpoint that made the index.

    Each hit is ``{"rank", "score", "image_id", "image_uri", "person_id"}``. Another
    ``checkpoint`` is refused unless ``allow_other_checkpoint``. To search many times with
    the model loaded once, use :class:`Searcher`.
    """
    texts = check_queries(texts)  # before the model loads
    return Searcher(index_dir, checkpoint, allow_other_checkpoint).search(texts, k)
