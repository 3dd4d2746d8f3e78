import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tpr_ray.evaluation import kernels as streaming_kernels
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.evaluation.in_memory import evaluate_embeddings
from tpr_ray.evaluation.metrics import (
    count_ranked_ahead,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
    stable_descending_order,
)
from tpr_ray.evaluation.streaming import ShardArrays, StreamingSettings, evaluate_sharded, evaluate_tables
from tpr_ray.evaluation.kernels import (
    count_ahead,
    merge_top_k,
    positive_positions,
    shard_positive_scores,
    shard_ranks,
    top_k_of_block,
)
from tpr_ray.evaluation.kernels_torch import shard_ranks_torch

METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP", "num_queries", "num_queries_skipped", "num_gallery")


def tie_vectors(rng, n, dim=8):
    """Unit vectors with four entries of +-0.5: every dot product is an exact multiple of
    0.25, whatever the order of summation, so scores tie often and identically everywhere."""
    x = np.zeros((n, dim), np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([0.5, -0.5], 4)
    return x


def unit_rows(rng, n, dim=16):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def uneven_shards(rng, embeddings, pids, num_cuts):
    """Shards cut at random places: uneven sizes, some possibly empty."""
    cuts = np.sort(rng.integers(0, len(pids) + 1, num_cuts))
    bounds = [0, *cuts.tolist(), len(pids)]
    return [ShardArrays(embeddings[a:b], pids[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def expected_top(similarity, k):
    order = stable_descending_order(np.asarray(similarity, dtype=np.float32))[:, :k]
    top = np.full((len(similarity), k), -1)
    top[:, :order.shape[1]] = order
    return top


def assert_same_metrics(actual, expected):
    for key in METRIC_KEYS:
        assert actual[key] == pytest.approx(expected[key], abs=1e-9), key


@pytest.mark.parametrize("device", ["numpy", "cpu"])
@pytest.mark.parametrize("seed", range(12))
def test_equals_in_memory_with_ties_and_uneven_shards(seed, device):
    rng = np.random.default_rng(seed)
    num_gallery, num_queries = int(rng.integers(1, 70)), int(rng.integers(1, 50))
    gallery, queries = tie_vectors(rng, num_gallery), tie_vectors(rng, num_queries)
    gallery[rng.integers(0, num_gallery, num_gallery // 3)] = gallery[0]  # exact duplicates too
    gallery_pids = rng.integers(0, 6, num_gallery)
    query_pids = rng.choice(gallery_pids, num_queries)
    shards = uneven_shards(rng, gallery, gallery_pids, int(rng.integers(0, 5)))
    top_k = int(rng.integers(1, 12))

    result = evaluate_sharded(queries, query_pids, shards, ks=(1, 5, 10), top_k=top_k,
                              block_size=int(rng.integers(1, 9)), use_ray=False,
                              settings=StreamingSettings(device=device))
    assert result.timings["rank_devices"] == [device]

    similarity = queries @ gallery.T
    assert_same_metrics(result.metrics, retrieval_metrics(similarity, query_pids, gallery_pids))
    np.testing.assert_array_equal(result.top_positions, expected_top(similarity, top_k))
    assert result.metrics["num_shards"] == len(shards)


@pytest.mark.parametrize("device", ["numpy", "cpu"])
@pytest.mark.parametrize("seed", range(4))
def test_equals_in_memory_on_random_embeddings(seed, device):
    rng = np.random.default_rng(100 + seed)
    gallery, queries = unit_rows(rng, 400), unit_rows(rng, 150)
    gallery_pids = rng.integers(0, 60, 400)
    query_pids = rng.choice(gallery_pids, 150)
    shards = uneven_shards(rng, gallery, gallery_pids, 5)

    result = evaluate_sharded(queries, query_pids, shards, ks=(1, 5, 10, 20), top_k=10, block_size=64,
                              use_ray=False, settings=StreamingSettings(device=device))

    assert_same_metrics(result.metrics, retrieval_metrics_from_embeddings(queries, gallery, query_pids,
                                                                          gallery_pids, ks=(1, 5, 10, 20)))
    assert result.metrics["R20"] >= result.metrics["R10"]
    np.testing.assert_array_equal(result.top_positions, expected_top(queries @ gallery.T, 10))
    # Ranks are distinct per query and agree with the best rank behind R@1.
    ranks = result.positive_ranks
    assert np.mean(ranks[:, 0] == 1) * 100 == pytest.approx(result.metrics["R1"])


def test_all_scores_tied_rank_by_gallery_position():
    gallery = np.tile(np.eye(4, dtype=np.float32)[:1], (9, 1))
    gallery_pids = np.array([5, 1, 1, 2, 5, 2, 1, 5, 2])
    queries = np.eye(4, dtype=np.float32)[[0, 0, 1]]  # the last one scores 0 against everything
    query_pids = np.array([1, 2, 5])
    shards = [ShardArrays(gallery[:2], gallery_pids[:2]), ShardArrays(gallery[2:7], gallery_pids[2:7]),
              ShardArrays(gallery[7:], gallery_pids[7:])]

    result = evaluate_sharded(queries, query_pids, shards, top_k=4, use_ray=False)

    np.testing.assert_array_equal(result.positive_ranks, [[2, 3, 7], [4, 6, 9], [1, 5, 8]])
    np.testing.assert_array_equal(result.top_positions, [[0, 1, 2, 3]] * 3)
    assert_same_metrics(result.metrics, retrieval_metrics(queries @ gallery.T, query_pids, gallery_pids))


def test_negative_zero_ties_with_positive_zero():
    gallery = np.array([[0.0, 1.0], [0.0, -1.0], [0.0, 1.0]], np.float32)
    queries = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)  # scores +0.0 and -0.0: all tied
    pids = np.array([1, 2, 2])
    result = evaluate_sharded(queries, [2, 1], [ShardArrays(gallery[:1], pids[:1]), ShardArrays(gallery[1:], pids[1:])],
                              use_ray=False)
    np.testing.assert_array_equal(result.positive_ranks, [[2, 3], [1, 0]])


def test_count_ahead_matches_count_ranked_ahead_for_targets_anywhere(monkeypatch):
    """Targets inside and outside the shard, ties included, with a tiny candidate budget so
    the row groups are exercised."""
    monkeypatch.setattr(streaming_kernels, "CANDIDATE_BUDGET", 7)
    rng = np.random.default_rng(3)
    scores = rng.integers(-4, 5, (13, 30)).astype(np.float32) / 4
    first = 100
    target_positions = rng.integers(80, 150, (13, 4))
    target_scores = rng.integers(-4, 5, (13, 4)).astype(np.float32) / 4
    target_scores[:, 3] = np.inf  # padding
    expected = count_ranked_ahead(scores, target_scores, target_positions, first)
    np.testing.assert_array_equal(count_ahead(scores, first, target_scores, target_positions), expected)


def test_deep_positives_are_counted_with_bounded_groups(monkeypatch):
    monkeypatch.setattr(streaming_kernels, "CANDIDATE_BUDGET", 50)
    rng = np.random.default_rng(5)
    gallery, queries = unit_rows(rng, 300), unit_rows(rng, 40)
    gallery_pids = rng.integers(0, 3, 300)  # ~100 positives per query: many rank deep
    query_pids = rng.choice(gallery_pids, 40)
    result = evaluate_sharded(queries, query_pids, uneven_shards(rng, gallery, gallery_pids, 3), use_ray=False)
    assert_same_metrics(result.metrics, retrieval_metrics_from_embeddings(queries, gallery, query_pids, gallery_pids))


def test_top_k_of_block_keeps_ties_in_position_order():
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1, 0.9, 0.5] * 40], np.float32)
    values, positions = top_k_of_block(scores, 1000, 4)
    np.testing.assert_array_equal(positions, [[1001, 1005, 1008, 1012]])
    np.testing.assert_array_equal(values, np.full((1, 4), 0.9, np.float32))


def test_merge_top_k_orders_by_score_then_position_and_drops_padding():
    part_a = (np.array([[0.9, 0.5]], np.float32), np.array([[7, 3]]))
    part_b = (np.array([[0.5, -np.inf]], np.float32), np.array([[1, -1]]))
    values, positions = merge_top_k([part_a, part_b], 3)
    np.testing.assert_array_equal(positions, [[7, 1, 3]])
    np.testing.assert_array_equal(values, np.array([[0.9, 0.5, 0.5]], np.float32))


def test_positive_positions_pads_and_sorts():
    np.testing.assert_array_equal(positive_positions([3, 9, 1], [1, 3, 1, 1]), [[1, -1, -1], [-1, -1, -1], [0, 2, 3]])


def test_queries_without_positives_raise_or_are_skipped():
    rng = np.random.default_rng(0)
    gallery = unit_rows(rng, 10)
    shards = [ShardArrays(gallery, np.arange(10) % 3)]
    queries = unit_rows(rng, 4)
    with pytest.raises(DataError, match="person id 7 has no image"):
        evaluate_sharded(queries, [0, 7, 1, 7], shards, use_ray=False)
    result = evaluate_sharded(queries, [0, 7, 1, 7], shards, use_ray=False, skip_queries_without_positives=True)
    assert result.metrics["num_queries"] == 2 and result.metrics["num_queries_skipped"] == 2
    with pytest.raises(ConfigError, match="block_size"):
        evaluate_sharded(queries, [0, 1, 1, 2], shards, block_size=0, use_ray=False)


# --------------------------------------------------------------------------- tables


def write_table(directory, kind, person_ids, vectors, bounds, checkpoint="ckpt-1"):
    directory.mkdir(parents=True)
    n = len(person_ids)
    columns = {("query_id" if kind == "queries" else "image_id"):
               list(range(n)) if kind == "queries" else [f"img{i}.jpg" for i in range(n)],
               "person_id": pa.array(person_ids, pa.int64()),
               "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), vectors.shape[1]),
               "method": ["baseline"] * n, "model": ["tpr-tiny"] * n, "checkpoint": [checkpoint] * n}
    table = pa.table(columns)
    for shard, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(table.slice(start, stop - start), directory / f"part-{shard:05d}.parquet")
    (directory / "_tpr_ray.json").write_text(json.dumps({"kind": kind, "dim": vectors.shape[1], "rows": n}))
    return str(directory)


@pytest.fixture()
def tables(tmp_path):
    rng = np.random.default_rng(11)
    gallery = tie_vectors(rng, 90)
    gallery_pids = rng.integers(0, 12, 90)
    queries = tie_vectors(rng, 40)
    query_pids = rng.choice(gallery_pids, 40)
    return (write_table(tmp_path / "gallery", "gallery", gallery_pids, gallery, [0, 7, 50, 51, 90]),
            write_table(tmp_path / "queries", "queries", query_pids, queries, [0, 40]))


def test_tables_give_the_in_memory_evaluators_result(tables):
    gallery_uri, queries_uri = tables
    expected = evaluate_embeddings(gallery_uri, queries_uri)
    result = evaluate_tables(gallery_uri, queries_uri, block_size=16, use_ray=False)
    assert_same_metrics(result.metrics, expected)
    for key in ("method", "model", "checkpoint", "dim", "ks", "chance"):
        assert result.metrics[key] == expected[key], key
    assert result.metrics["num_shards"] == 4


def test_tables_from_different_checkpoints_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    vectors = unit_rows(rng, 6)
    gallery = write_table(tmp_path / "g", "gallery", np.arange(6), vectors, [0, 6], checkpoint="a")
    queries = write_table(tmp_path / "q", "queries", np.arange(6), vectors, [0, 6], checkpoint="b")
    with pytest.raises(ConfigError, match="not embedded by one model"):
        evaluate_tables(gallery, queries, use_ray=False)
    assert "mismatch" in evaluate_tables(gallery, queries, use_ray=False, allow_mismatch=True).metrics
    with pytest.raises(ConfigError, match="expected queries"):
        evaluate_tables(queries, gallery, use_ray=False)


@pytest.mark.slow
def test_ray_tasks_give_the_same_result(ray_cluster, tables):
    gallery_uri, queries_uri = tables
    local = evaluate_tables(gallery_uri, queries_uri, block_size=16, use_ray=False)
    distributed = evaluate_tables(gallery_uri, queries_uri, block_size=16, use_ray=True)
    assert_same_metrics(distributed.metrics, local.metrics)
    np.testing.assert_array_equal(distributed.top_positions, local.top_positions)
    np.testing.assert_array_equal(distributed.positive_ranks, local.positive_ranks)


def test_one_settings_object_or_keywords_give_the_same_run(tables):
    gallery_uri, queries_uri = tables
    settings = StreamingSettings(ks=(1, 3), top_k=4, block_size=7, use_ray=False, local_threads=2)
    by_settings = evaluate_tables(gallery_uri, queries_uri, settings=settings)
    by_keywords = evaluate_tables(gallery_uri, queries_uri, (1, 3), top_k=4, block_size=7, use_ray=False)
    for key in ("R1", "R3", "mAP", "mINP", "num_queries", "num_gallery"):
        assert by_settings.metrics[key] == by_keywords.metrics[key], key
    assert by_settings.top_positions.shape == (40, 4) and "R3" in by_settings.metrics
    np.testing.assert_array_equal(by_settings.top_positions, by_keywords.top_positions)
    for bad in ({"top_k": 0}, {"local_threads": 0}, {"cpus_per_task": 0}, {"ks": (0,)}):
        with pytest.raises(ConfigError):
            StreamingSettings(**bad)


@pytest.mark.parametrize("seed", range(6))
def test_torch_rank_pass_equals_the_numpy_kernel_output_for_output(seed):
    """Counts, top scores and top positions, for targets before, inside and after the shard."""
    rng = np.random.default_rng(200 + seed)
    gallery = tie_vectors(rng, 60)
    gallery[rng.integers(0, 60, 15)] = gallery[3]
    gallery[7] = -0.0 * gallery[7]  # -0.0 scores tie with +0.0
    pids = rng.integers(0, 5, 60)
    queries = tie_vectors(rng, 25)
    targets = positive_positions(rng.choice(pids, 25), pids)
    first, stop = 20, 45  # this shard holds positions 20..44 of the gallery
    target_scores = shard_positive_scores(queries, gallery, 0, targets)
    shard = gallery[first:stop]
    expected = shard_ranks(queries, shard, first, target_scores, targets, top_k=7, block_size=4)
    actual = shard_ranks_torch(queries, shard, first, target_scores, targets, top_k=7, block_size=6)
    for key in ("counts", "top_scores", "top_positions"):
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_a_bad_device_is_a_config_error():
    with pytest.raises(ConfigError, match="device must be one of"):
        StreamingSettings(device="tpu")
