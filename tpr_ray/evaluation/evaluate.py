"""The one way to evaluate two embedding tables: ``evaluate`` picks the in-memory evaluator
for a gallery that fits and the streaming one (bounded memory, shard by shard, optionally as
Ray tasks) above ``STREAMING_ABOVE_ROWS``; both give the same metrics (tested)."""

from __future__ import annotations

from collections.abc import Sequence

from tpr_ray.evaluation.metrics import DEFAULT_KS
from tpr_ray.tables import check_row_count, list_shards, read_sidecar

# The in-memory evaluator holds the gallery and a chunk x gallery score matrix; above this
# many gallery rows the gallery is streamed unless the caller says otherwise.
STREAMING_ABOVE_ROWS = 500_000
MODES = ("auto", "in-memory", "streaming")


def gallery_rows(gallery_uri: str) -> int:
    info = read_sidecar(gallery_uri)
    return info["rows"] if "rows" in info else check_row_count({"uri": gallery_uri}, list_shards(gallery_uri))


def evaluate(gallery_uri: str, queries_uri: str, ks: Sequence[int] = DEFAULT_KS, *, mode: str = "auto",
             allow_mismatch: bool = False, skip_queries_without_positives: bool = False,
             allow_incomplete: bool = False, block_size: int = 1024, address: str | None = None) -> dict:
    """Text-to-image metrics of a query table against a gallery table (see
    :func:`tpr_ray.evaluation.in_memory.evaluate_embeddings` for the keys and the checks).

    ``mode``: "auto" streams above ``STREAMING_ABOVE_ROWS`` gallery rows. ``address``: with
    streaming, run the shard tasks on this Ray cluster ("auto": RAY_ADDRESS); otherwise here.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    streaming = mode == "streaming" or (mode == "auto" and gallery_rows(gallery_uri) > STREAMING_ABOVE_ROWS)
    if not streaming:
        from tpr_ray.evaluation.in_memory import evaluate_embeddings

        return evaluate_embeddings(gallery_uri, queries_uri, ks, allow_mismatch=allow_mismatch,
                                   skip_queries_without_positives=skip_queries_without_positives,
                                   chunk_size=block_size, allow_incomplete=allow_incomplete)
    from tpr_ray.evaluation.streaming import StreamingSettings, evaluate_tables

    if address:
        from tpr_ray.io.cluster import init_ray

        init_ray(None if address == "auto" else address)
    settings = StreamingSettings(ks=tuple(ks), block_size=block_size, use_ray=bool(address),
                                 skip_queries_without_positives=skip_queries_without_positives)
    return evaluate_tables(gallery_uri, queries_uri, settings=settings, allow_mismatch=allow_mismatch,
                           allow_incomplete=allow_incomplete).metrics
