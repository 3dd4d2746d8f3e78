import numpy as np
import pytest

from tpr_ray.errors import DataError
from tpr_ray.evaluation.metrics import (
    count_ranked_ahead,
    metrics_from_positive_ranks,
    positive_ranks,
    ranked_positives,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
    stable_descending_order,
)

# A hand-worked case. Gallery positions 0..5 with person ids:
GALLERY_PIDS = np.array([3, 1, 2, 1, 3, 1])
QUERY_PIDS = np.array([1, 2, 3, 1])
SIMILARITY = np.array([
    # q0, pid 1, positives at 1, 3, 5. Order: 3(+) 2 0 5(+) 4 1(+) -> ranks 1, 4, 6, the last
    # positive at the very end. AP = (1/1 + 2/4 + 3/6) / 3 = 2/3; INP = 3/6 = 1/2.
    [0.5, 0.05, 0.9, 0.95, 0.1, 0.3],
    # q1, pid 2, one positive at 2. Order: 0 3 2(+) ... -> rank 3. AP = 1/3; INP = 1/3.
    [0.8, 0.1, 0.4, 0.6, 0.2, 0.3],
    # q2, pid 3, positives at 0 and 4, both tied with a negative. Order: 2 (0.7), then the
    # 0.5 tie 0(+) before 3, then the 0.4 tie 1 before 4(+), then 5 -> ranks 2, 5.
    # AP = (1/2 + 2/5) / 2 = 0.45; INP = 2/5 = 0.4.
    [0.5, 0.4, 0.7, 0.5, 0.4, 0.1],
    # q3, pid 1, positives 1, 3, 5 on top -> ranks 1, 2, 3. AP = 1; INP = 1.
    [0.1, 0.9, 0.2, 0.8, 0.3, 0.7],
], dtype=np.float32)
EXPECTED_RANKS = [[1, 4, 6], [3], [2, 5], [1, 2, 3]]
# Best ranks 1, 3, 2, 1: R1 = 2/4, R2 = 3/4, R5 = 4/4.
# mAP = (2/3 + 1/3 + 0.45 + 1) / 4 = 2.45 / 4 = 0.6125.
# mINP = (1/2 + 1/3 + 2/5 + 1) / 4 = ((15 + 10 + 12 + 30) / 30) / 4 = 67/120 = 0.55833...
EXPECTED = {"R1": 50.0, "R2": 75.0, "R5": 100.0, "mAP": 61.25, "mINP": 100 * 67 / 120}


def assert_metrics(result, expected):
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key


def test_hand_computed_case():
    result = retrieval_metrics(SIMILARITY, QUERY_PIDS, GALLERY_PIDS, ks=(1, 2, 5))
    assert_metrics(result, EXPECTED)
    assert result["num_queries"] == 4
    assert result["num_gallery"] == 6
    assert result["num_queries_skipped"] == 0


def test_positive_ranks_follow_the_tie_rule():
    for scores, pid, expected in zip(SIMILARITY, QUERY_PIDS, EXPECTED_RANKS):
        np.testing.assert_array_equal(positive_ranks(scores, GALLERY_PIDS == pid), expected)


def test_tie_between_positive_and_negative_goes_to_the_earlier_position():
    scores = np.array([0.5, 0.5], dtype=np.float32)
    np.testing.assert_array_equal(positive_ranks(scores, np.array([True, False])), [1])
    np.testing.assert_array_equal(positive_ranks(scores, np.array([False, True])), [2])
    assert retrieval_metrics(scores[None], [7], [7, 8])["R1"] == 100.0
    assert retrieval_metrics(scores[None], [7], [8, 7])["R1"] == 0.0


def test_counts_summed_over_shards_give_the_ranks():
    # A streaming evaluator sees positions 0..2 then 3..5; global position = concatenation order.
    for scores, pid, expected in zip(SIMILARITY, QUERY_PIDS, EXPECTED_RANKS):
        positives = np.flatnonzero(GALLERY_PIDS == pid)
        ahead = sum(count_ranked_ahead(scores[start:start + 3], scores[positives], positives, first_position=start)
                    for start in (0, 3))
        np.testing.assert_array_equal(np.sort(1 + ahead), expected)


def test_count_ranked_ahead_batched_matches_single_query():
    positives = np.array([[0, 4], [1, 3], [0, 4], [1, 5]])
    target_scores = np.take_along_axis(SIMILARITY, positives, axis=1)
    batched = count_ranked_ahead(SIMILARITY, target_scores, positives)
    for q in range(4):
        np.testing.assert_array_equal(batched[q], count_ranked_ahead(SIMILARITY[q], target_scores[q], positives[q]))


def test_metrics_from_positive_ranks_list_and_padded():
    shuffled = [[6, 1, 4], [3], [5, 2], [3, 2, 1]]
    assert_metrics(metrics_from_positive_ranks(shuffled, ks=(1, 2, 5)), EXPECTED)
    padded = np.array([[6, 1, 4], [3, 0, 0], [5, 2, 0], [3, 2, 1]])
    assert_metrics(metrics_from_positive_ranks(padded, ks=(1, 2, 5)), EXPECTED)


def test_metrics_from_positive_ranks_rejects_repeated_ranks():
    with pytest.raises(DataError, match="entry 1"):
        metrics_from_positive_ranks([[1], [2, 2]])


def test_query_without_positive_is_an_error_naming_it():
    query_pids = np.array([1, 2, 9, 1])  # person 9 has no gallery image
    with pytest.raises(DataError, match="entry 2") as error:
        retrieval_metrics(SIMILARITY, query_pids, GALLERY_PIDS)
    assert "9" in str(error.value)
    with pytest.raises(DataError, match="entry 1"):
        metrics_from_positive_ranks([[1], []])


def test_query_without_positive_can_be_skipped():
    query_pids = np.array([1, 2, 9, 1])
    result = retrieval_metrics(SIMILARITY, query_pids, GALLERY_PIDS, ks=(1, 2, 5), skip_queries_without_positives=True)
    # q0, q1, q3 remain: best ranks 1, 3, 1; AP 2/3, 1/3, 1; INP 1/2, 1/3, 1.
    assert_metrics(result, {"R1": 200 / 3, "R2": 200 / 3, "R5": 100.0,
                            "mAP": 100 * 2 / 3, "mINP": 100 * (11 / 6) / 3})
    assert result["num_queries"] == 3
    assert result["num_queries_skipped"] == 1


def test_all_queries_without_positives_is_an_error():
    with pytest.raises(DataError, match="no query"):
        retrieval_metrics(SIMILARITY[:1], [9], GALLERY_PIDS, skip_queries_without_positives=True)


def test_stable_descending_order_matches_stable_argsort():
    rng = np.random.default_rng(0)
    scores = rng.choice(np.array([-np.inf, -1.5, -0.0, 0.0, 1e-40, 0.25, 3.0, np.inf], dtype=np.float32),
                        size=(20, 50))
    np.testing.assert_array_equal(stable_descending_order(scores), np.argsort(-scores, axis=1, kind="stable"))


def test_counting_and_sorting_forms_agree():
    rng = np.random.default_rng(5)
    scores = (rng.integers(0, 5, (30, 40)) / 4).astype(np.float32)
    gallery_pids = rng.integers(0, 6, 40)
    query_pids = rng.choice(gallery_pids, 30)
    query_index, ranks = ranked_positives(scores, query_pids, gallery_pids)
    for q in range(30):
        np.testing.assert_array_equal(ranks[query_index == q], positive_ranks(scores[q], gallery_pids == query_pids[q]))


def brute_force_metrics(similarity, query_pids, gallery_pids, ks):
    """Plain-Python reference: walk each query's stable ranking one item at a time."""
    hits = {k: 0 for k in ks}
    ap_sum = inp_sum = 0.0
    for q in range(len(query_pids)):
        ranking = sorted(range(len(gallery_pids)), key=lambda g: (-float(similarity[q][g]), g))
        found, precision_sum, first_hit, last_hit = 0, 0.0, None, None
        for rank, g in enumerate(ranking, start=1):
            if gallery_pids[g] == query_pids[q]:
                found += 1
                precision_sum += found / rank
                first_hit = first_hit or rank
                last_hit = rank
        for k in ks:
            hits[k] += first_hit <= k
        ap_sum += precision_sum / found
        inp_sum += found / last_hit
    n = len(query_pids)
    return {**{f"R{k}": 100 * hits[k] / n for k in ks}, "mAP": 100 * ap_sum / n, "mINP": 100 * inp_sum / n}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    num_queries, num_gallery, ks = 40, 60, (1, 3, 10)
    gallery_pids = rng.integers(0, 12, num_gallery)
    query_pids = rng.choice(gallery_pids, num_queries)
    # Scores on a coarse grid, so many ties between positives and negatives.
    similarity = (rng.integers(0, 8, (num_queries, num_gallery)) / 8).astype(np.float32)
    result = retrieval_metrics(similarity, query_pids, gallery_pids, ks)
    assert_metrics(result, brute_force_metrics(similarity, query_pids, gallery_pids, ks))


def dyadic_embeddings(rng, n):
    """Unit vectors whose inner products are exact in float32 (entries 0, +-1/2, +-1).

    Exact scores keep ties exact, so chunked and full matrix products must agree bit for bit.
    """
    choices = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 0], [0.5, 0.5, 0.5, 0.5],
                        [0.5, -0.5, 0.5, -0.5], [-0.5, -0.5, 0.5, 0.5]], dtype=np.float32)
    return choices[rng.integers(0, len(choices), n)]


def test_chunked_embeddings_equal_full_matrix():
    rng = np.random.default_rng(3)
    query_emb, gallery_emb = dyadic_embeddings(rng, 50), dyadic_embeddings(rng, 70)
    gallery_pids = rng.integers(0, 15, 70)
    query_pids = rng.choice(gallery_pids, 50)
    full = retrieval_metrics(query_emb @ gallery_emb.T, query_pids, gallery_pids)
    for chunk_size in (1, 7, 50, 1000):
        chunked = retrieval_metrics_from_embeddings(query_emb, gallery_emb, query_pids, gallery_pids,
                                                    chunk_size=chunk_size)
        assert chunked == full


def test_embeddings_are_normalised_when_they_are_not_unit_length():
    rng = np.random.default_rng(4)
    query_emb, gallery_emb = dyadic_embeddings(rng, 20), dyadic_embeddings(rng, 30)
    gallery_pids = rng.integers(0, 6, 30)
    query_pids = rng.choice(gallery_pids, 20)
    scales = np.array([2.0, 4.0, 0.5], dtype=np.float32)  # powers of two keep the scores exact
    expected = retrieval_metrics_from_embeddings(query_emb, gallery_emb, query_pids, gallery_pids)
    scaled = retrieval_metrics_from_embeddings(query_emb * rng.choice(scales, (20, 1)),
                                               gallery_emb * rng.choice(scales, (30, 1)),
                                               query_pids, gallery_pids)
    assert scaled == expected


def test_zero_embedding_is_an_error():
    gallery_emb = np.eye(3, dtype=np.float32)
    gallery_emb[1] = 0
    with pytest.raises(DataError, match="entry 1"):
        retrieval_metrics_from_embeddings(np.eye(3, dtype=np.float32), gallery_emb, [0, 1, 2], [0, 1, 2])
