"""faiss indexes over embedding shards, and text search against them.

``build_index`` reads a gallery table shard by shard into one faiss index:

- ``flat``: exact inner-product search (cosine, the embeddings are unit vectors); the default.
- ``ivf``:  an inverted file over k-means cells (``nlist`` ~ 4 sqrt(N), ``nprobe`` searched);
            for large galleries. Its recall@k against exact search is measured when it is built.
- ``hnsw``: a graph index (``M`` = 32, ``efSearch`` = 128); no training, fast queries, more memory.

An index directory holds ``index.faiss``, ``ids.parquet`` (row -> image_id, image_uri,
person_id) and ``index.json`` (kind, parameters, size, the checkpoint that made the
embeddings, measured recall). ``search`` embeds query text with that same checkpoint.
"""

from __future__ import annotations

import os
import tempfile
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tpr_ray import storage
from tpr_ray.errors import ConfigError
from tpr_ray.tables import check_kind, embedding_matrix, read_embeddings

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
INFO_FILE = "index.json"
KINDS = ("flat", "ivf", "hnsw")


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


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray) -> float:
    """Mean share of the exact top-k found in the approximate top-k."""
    k = exact_ids.shape[1]
    hits = [len(set(e) & set(a)) for e, a in zip(exact_ids.tolist(), approx_ids.tolist())]
    return float(np.sum(hits)) / (k * len(hits))


def measure_recall(index: faiss.Index, vectors: np.ndarray, k: int = 10, num_queries: int = 1000,
                   noise: float = 0.05, seed: int = 0) -> float:
    """recall@k of ``index`` against exact search, for queries near gallery vectors.

    Queries are gallery vectors with a little Gaussian noise, re-normalised: what a matching
    text query looks like to the index (close to a few items, not exactly on one).
    """
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(vectors), size=min(num_queries, len(vectors)), replace=False)
    queries = vectors[picks] + noise * rng.standard_normal((len(picks), vectors.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, exact_ids = exact.search(queries, k)
    _, approx_ids = index.search(queries, k)
    return recall_at_k(exact_ids, approx_ids)


def build_index(embeddings: str, out: str, kind: str = "flat", nlist: int | None = None, nprobe: int = 32,
                recall_k: int = 10, allow_incomplete: bool = False) -> dict:
    """Index a gallery embedding table (a folder written by `tpr-ray embed`) into ``out``."""
    tick = time.perf_counter()
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
    storage.makedirs(out)
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, os.path.join(tmp, INDEX_FILE))
        with open(os.path.join(tmp, INDEX_FILE), "rb") as f:
            storage.write_bytes_atomic(storage.join(out, INDEX_FILE), f.read())
    ids = table.select([c for c in ("image_id", "image_uri", "person_id") if c in table.column_names])
    fs, path = storage.filesystem(storage.join(out, IDS_FILE))
    with fs.open(path, "wb") as f:
        pq.write_table(ids, f)
    details["seconds"] = time.perf_counter() - tick
    storage.write_json(storage.join(out, INFO_FILE), details)
    return details


def load_index(index_dir: str) -> tuple[faiss.Index, pa.Table, dict]:
    info_uri = storage.join(index_dir, INFO_FILE)
    if not storage.exists(info_uri):
        raise ConfigError(f"{index_dir} is not an index directory (no {INFO_FILE}); build one with `tpr-ray index build`")
    info = storage.read_json(info_uri)
    with tempfile.NamedTemporaryFile(suffix=".faiss") as tmp:
        tmp.write(storage.read_bytes(storage.join(index_dir, INDEX_FILE)))
        tmp.flush()
        index = faiss.read_index(tmp.name)
    fs, path = storage.filesystem(storage.join(index_dir, IDS_FILE))
    with fs.open(path, "rb") as f:
        ids = pq.read_table(f)
    return index, ids, info


def search(index_dir: str, texts: list[str], k: int = 10, checkpoint: str | None = None) -> list[list[dict]]:
    """Top-k gallery images for each text, embedded by the checkpoint that made the index."""
    import torch

    from tpr_ray.checkpoint import load_method
    from tpr_ray.inference import encode_captions

    index, ids, info = load_index(index_dir)
    checkpoint = checkpoint or info.get("checkpoint")
    if not checkpoint:
        raise ConfigError(f"index {index_dir} does not name the checkpoint of its embeddings; pass --checkpoint")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method, _ = load_method(checkpoint)
    queries = encode_captions(method.to(device), texts, device)
    if queries.shape[1] != info["dim"]:
        raise ConfigError(f"checkpoint {checkpoint} embeds to dim {queries.shape[1]}, the index holds dim {info['dim']}")
    scores, rows = index.search(np.ascontiguousarray(queries), min(k, index.ntotal))
    columns = {name: ids.column(name).to_pylist() for name in ids.column_names}
    results = []
    for text, score_row, id_row in zip(texts, scores, rows):
        hits = [{"rank": rank + 1, "score": float(s), **{name: columns[name][r] for name in columns}}
                for rank, (s, r) in enumerate(zip(score_row, id_row)) if r >= 0]
        results.append(hits)
    return results
