"""What an index folder holds, shared by the in-memory builds and the IVF-PQ build: the file
names of one build (``builds/<id>/``: the index, its id table, its index.json, which is also the
top-level pointer), and how recall against exact search is measured."""

import numpy as np

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
INFO_FILE = "index.json"
BUILDS_DIR = "builds"


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray) -> float:
    """Mean share of the exact top-k found in the approximate top-k."""
    k = exact_ids.shape[1]
    hits = [len(set(e) & set(a)) for e, a in zip(exact_ids.tolist(), approx_ids.tolist())]
    return float(np.sum(hits)) / (k * len(hits))


def near_queries(vectors: np.ndarray, num_queries: int = 1000, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """Some of ``vectors`` with a little Gaussian noise, re-normalised (see :func:`measure_recall`)."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(vectors), size=min(num_queries, len(vectors)), replace=False)
    queries = vectors[picks] + noise * rng.standard_normal((len(picks), vectors.shape[1])).astype(np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)
