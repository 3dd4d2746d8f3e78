import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tpr_ray.model.checkpoint import load_method
from tpr_ray.data import load_manifest
from tpr_ray.embedding.pipeline import EmbedConfig, embed
from tpr_ray.tables import SIDECAR
from tpr_ray.evaluation.in_memory import evaluate_embeddings
from tpr_ray.model.encode import encode_captions, encode_images
from tpr_ray.evaluation.metrics import retrieval_metrics
from tpr_ray.io.storage import read_bytes
from tpr_ray.io.images import decode_image, resize_uint8
from tests.helpers import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "checkpoint"), seed=1, num_classes=5,
                                meta={"stage": 1})


@pytest.mark.slow
def test_embedding_tables_match_in_process_reference(ray_cluster, cuhk_small, tiny_checkpoint, tmp_path):
    out = str(tmp_path / "emb")
    summary = embed(EmbedConfig(checkpoint=tiny_checkpoint, data=cuhk_small, out=out, split="test",
                                batch_size=4, rows_per_shard=5, block_rows=3))
    test = load_manifest(cuhk_small).filter(pa.compute.equal(pa.compute.field("split"), "test"))

    gallery = pq.read_table(os.path.join(out, "gallery"))
    info = json.load(open(os.path.join(out, "gallery", SIDECAR)))
    assert info["rows"] == test.num_rows == gallery.num_rows == summary["gallery"]["rows"]
    assert len(info["shards"]) == -(-test.num_rows // 5)  # 5 rows per shard, rounded up
    assert sorted(os.listdir(os.path.join(out, "gallery"))) == sorted([SIDECAR] + [s["file"] for s in info["shards"]])
    assert gallery.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert gallery.column("image_id").to_pylist() == test.column("image_id").to_pylist()  # input order kept
    assert set(gallery.column("method").to_pylist()) == {"baseline"}
    assert set(gallery.column("checkpoint").to_pylist()) == {tiny_checkpoint}

    method, _ = load_method(tiny_checkpoint)
    pixels = np.stack([resize_uint8(decode_image(read_bytes(u)), (384, 128)) for u in test.column("image_uri").to_pylist()])
    expected = encode_images(method, pixels, torch.device("cpu"))
    got = np.asarray(gallery.column("embedding").combine_chunks().flatten()).reshape(-1, 64)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)

    queries = pq.read_table(os.path.join(out, "queries"))
    captions = [c for caps in test.column("captions").to_pylist() for c in caps]
    assert queries.column("caption").to_pylist() == captions
    assert queries.column("query_id").to_pylist() == list(range(len(captions)))
    q = np.asarray(queries.column("embedding").combine_chunks().flatten()).reshape(-1, 64)
    np.testing.assert_allclose(q, encode_captions(method, captions, torch.device("cpu")), atol=1e-5)

    metrics = evaluate_embeddings(os.path.join(out, "gallery"), os.path.join(out, "queries"))
    reference = retrieval_metrics(q @ got.T, np.asarray(queries.column("person_id")), np.asarray(gallery.column("person_id")))
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert metrics[key] == pytest.approx(reference[key])


# --- the committer, without Ray ------------------------------------------------------

def _gallery_rows(n):
    return pa.table({"image_id": [f"img{i}" for i in range(n)], "person_id": pa.array(range(n), pa.int64()),
                     "image_uri": [f"/nowhere/img{i}.jpg" for i in range(n)]})


HEADER = {"method": "baseline", "model": "tpr-tiny", "checkpoint": "/ckpt", "dim": 2, "fingerprint": "f"}


def _batch(rows, shard, emb, reasons=None):
    batch = {"row": np.array(rows), "shard": np.full(len(rows), shard), "embedding": np.asarray(emb, np.float32)}
    if reasons is not None:
        batch["reject_reason"] = np.array(reasons, dtype=object)
    return batch


def test_non_finite_embeddings_stop_the_job_before_the_shard_is_committed(tmp_path):
    from tpr_ray.embedding.committer import ShardCommitter
    from tpr_ray.embedding.plan import plan_shards
    from tpr_ray.errors import DataError

    out = str(tmp_path / "gallery")
    committer = ShardCommitter(out, "gallery", _gallery_rows(4), plan_shards(4, 2), HEADER, {})
    committer.add(_batch([0, 1], 0, [[1, 0], [0, 1]], ["", ""]))
    with pytest.raises(DataError, match=r"non-finite embeddings for 1 row.*img3"):
        committer.add(_batch([2, 3], 1, [[1, 0], [np.nan, np.inf]], ["", ""]))
    assert sorted(os.listdir(out)) == [SIDECAR, "part-00000.parquet"]  # shard 1 was not committed
    assert not os.path.exists(out + "-rejects")  # and its bad row was not passed off as a reject


def test_a_reject_rate_over_the_limit_stops_the_job_and_says_so(tmp_path):
    from tpr_ray.embedding.committer import ShardCommitter
    from tpr_ray.embedding.plan import plan_shards
    from tpr_ray.errors import DataError

    out = str(tmp_path / "gallery")
    plan = plan_shards(20, 5)
    # 20 inputs at 10 %: 2 rejects are within the budget, the 3rd crosses it
    committer = ShardCommitter(out, "gallery", _gallery_rows(20), plan, HEADER, {}, max_reject_rate=0.1)
    committer.add(_batch(range(0, 5), 0, np.ones((5, 2)), ["bad", "", "", "", "bad"]))
    with pytest.raises(DataError, match=r"3 of 20 inputs were rejected.*max-reject-rate 0.1"):
        committer.add(_batch(range(5, 10), 1, np.ones((5, 2)), ["", "", "bad", "", ""]))
    assert len(os.listdir(out + "-rejects")) == 2  # the rejects stay for the user to look at
    # a re-run with the same limit stops at once; a higher one carries on
    done = {0: {"file": "part-00000.parquet", "rows": 3, "rejects": 2},
            1: {"file": "part-00001.parquet", "rows": 4, "rejects": 1}}
    with pytest.raises(DataError, match="max-reject-rate"):
        ShardCommitter(out, "gallery", _gallery_rows(20), plan, HEADER, done, max_reject_rate=0.1)
    ShardCommitter(out, "gallery", _gallery_rows(20), plan, HEADER, done, max_reject_rate=0.2)


# --- the driver at scale: no listing in the driver, a sidecar that does not grow per shard ------

def test_the_committer_needs_no_listing_and_writes_the_sidecar_only_at_start_and_end(tmp_path, monkeypatch):
    from tpr_ray.embedding import committer as commit
    from tpr_ray.embedding.plan import plan_shards

    writes = []
    write_sidecar = commit.write_sidecar
    monkeypatch.setattr(commit, "write_sidecar", lambda uri, info: (writes.append(info), write_sidecar(uri, info)))
    out = str(tmp_path / "gallery")
    committer = commit.open_job(out, "gallery", None, plan_shards(5, 2), HEADER)

    def carried(rows):  # as the workers send them: the input columns travel with the results
        rows = np.asarray(rows)
        return {"image_id": np.array([f"img{r}" for r in rows], dtype=object),
                "person_id": np.where(rows == 3, np.nan, rows.astype(float)),  # Ray's numpy for a null int64
                "image_uri": pa.array([f"/g/img{r}.jpg" for r in rows])}

    # one batch mixing shards 0 and 2, out of order; then shard 1 in two batches, a row twice (a retry)
    committer.add({"row": np.array([4, 0, 1]), "shard": np.array([2, 0, 0]), **carried([4, 0, 1]),
                   "embedding": np.array([[4, 0], [0, 0], [1, 0]], np.float32),
                   "reject_reason": np.array(["", "", "bad"], dtype=object)})
    committer.add({"row": np.array([3]), "shard": np.array([1]), **carried([3]),
                   "embedding": np.array([[3, 0]], np.float32), "reject_reason": np.array([""], dtype=object)})
    committer.add(pa.table({"row": [3, 2], "shard": [1, 1], **carried([3, 2]), "embedding": [[3.0, 0], [2.0, 0]],
                            "reject_reason": ["", ""]}))
    info = committer.finish()
    assert [w["complete"] for w in writes] == [False, True]  # not once per shard
    assert "shards" not in writes[0] and [s["file"] for s in info["shards"]] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(out)
    assert table.column("image_id").to_pylist() == ["img0", "img2", "img3", "img4"]
    assert table.column("person_id").to_pylist() == [0, 2, None, 4]
    assert table.schema.field("person_id").type == pa.int64()
    assert table.column("image_uri").to_pylist() == ["/g/img0.jpg", "/g/img2.jpg", "/g/img3.jpg", "/g/img4.jpg"]
    emb = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, 2)
    np.testing.assert_array_equal(emb[:, 0], [0, 2, 3, 4])
    assert pq.read_table(out + "-rejects").column("image_uri").to_pylist() == ["/g/img1.jpg"]
    assert info["rows"] == 4 and info["rejected"] == 1


def test_the_fingerprint_streams_and_the_plan_files_hold_each_pending_shard(tmp_path):
    from tpr_ray.embedding.committer import open_job
    from tpr_ray.embedding.pipeline import EmbedConfig, plan_job
    from tpr_ray.embedding.plan import Fingerprint, plan_fingerprint, plan_shards, read_plan
    from tpr_ray.tables import plan_dir

    rows = _gallery_rows(10).set_column(1, "person_id", pa.array([1, None] * 5, pa.int64()))
    whole = plan_fingerprint(rows, {"s": 1})
    for cut in (1, 3, 7, 10):  # however the listing arrives in batches
        streamed = Fingerprint(rows.column_names, {"s": 1})
        for batch in rows.to_batches(max_chunksize=cut):
            streamed.update(batch)
        assert streamed.hexdigest() == whole
    assert plan_fingerprint(rows.slice(0, 9), {"s": 1}) != whole

    out = str(tmp_path / "gallery")
    cfg = EmbedConfig(checkpoint="/ckpt", out=str(tmp_path), images="/g", rows_per_shard=4)
    identity = {k: HEADER[k] for k in ("method", "model", "checkpoint", "dim")}
    committer, pending = plan_job(out, "gallery", lambda: rows.to_batches(max_chunksize=3), {"s": 1}, cfg, identity)
    assert committer.plan == plan_shards(10, 4) and pending == [0, 1, 2]
    assert committer.header["fingerprint"] == plan_fingerprint(rows, {"s": 1}) and committer.header["inputs"] == 10
    blocks = list(read_plan({"shard": np.array([2, 1])}, plan_dir(out), block_rows=3))
    assert [b.num_rows for b in blocks] == [2, 3, 1]
    got = pa.concat_tables(blocks)
    assert got.column("row").to_pylist() == [8, 9, 4, 5, 6, 7] and got.column("shard").to_pylist() == [2] * 2 + [1] * 4
    assert got.column("image_id").to_pylist() == [f"img{i}" for i in (8, 9, 4, 5, 6, 7)]
    assert got.column("person_id").to_pylist() == [1, None, 1, None, 1, None]

    for block in blocks + list(read_plan({"shard": [0]}, plan_dir(out), 4)):  # results come back with the columns
        committer.add(block.append_column("embedding", pa.array([[1.0, 0.0]] * block.num_rows)))
    committer.finish()
    assert pq.read_table(out).column("image_id").to_pylist() == rows.column("image_id").to_pylist()
    # a re-run plans only what is missing (nothing), and a changed listing is refused
    assert plan_job(out, "gallery", lambda: rows.to_batches(), {"s": 1}, cfg, identity)[1] == []
    from tpr_ray.errors import ConfigError
    with pytest.raises(ConfigError, match="different embedding job"):
        open_job(out, "gallery", None, plan_shards(9, 4), {**HEADER, "fingerprint": plan_fingerprint(rows.slice(1), {})})


@pytest.mark.parametrize("seed", range(4))
def test_the_committer_matches_a_brute_force_reference_on_shuffled_repeated_batches(tmp_path, seed):
    """Batches as a pipeline with retries delivers them: shards mixed and out of order, rows
    delivered twice (until its shard is complete, the later copy wins; after, copies are
    ignored), columns as Arrow or numpy, some rows rejected. The committed table and rejects
    must be what a row-by-row reference computes."""
    from tpr_ray.embedding import committer as commit
    from tpr_ray.embedding.plan import plan_shards

    rng = np.random.default_rng(seed)
    n, per_shard = int(rng.integers(40, 120)), int(rng.integers(3, 17))
    plan = plan_shards(n, per_shard)
    deliveries = list(rng.permutation(n)) + list(rng.choice(n, size=n // 3))  # retries deliver rows again
    blocks, at = [], 0
    while at < len(deliveries):
        size = int(rng.integers(1, 20))
        blocks.append(np.array(deliveries[at:at + size]))
        at += size
    if seed % 2:  # in order and whole, as a pipeline without retries mostly delivers them
        blocks = [np.arange(s, min(s + 7, n)) for s in range(0, n, 7)]
    expected, copy, seen = {}, 0, {}
    out = str(tmp_path / "gallery")
    committer = commit.open_job(out, "gallery", None, plan, HEADER)
    for block in blocks:
        copy += 1
        emb = np.stack([block, np.full(len(block), copy)], axis=1).astype(np.float32)
        reasons = np.array(["bad" if (r * 7 + copy) % 11 == 0 else "" for r in block], dtype=object)
        for r, e, why in zip(block, emb, reasons):
            shard = int(r) // per_shard
            if len(seen.setdefault(shard, set())) < plan[shard][1] - plan[shard][0]:  # not yet committed
                expected[int(r)] = (e, why)
        for r in block:
            seen[int(r) // per_shard].add(int(r))
        ids = [f"img{r}" for r in block]
        person = np.where(block % 5 == 0, np.nan, block.astype(float))
        if copy % 2:
            columns = {"image_id": pa.array(ids), "person_id": pa.array(person, from_pandas=True).cast(pa.int64()),
                       "image_uri": pa.array([f"/g/{i}.jpg" for i in ids])}
        else:
            columns = {"image_id": np.array(ids, dtype=object), "person_id": person,
                       "image_uri": np.array([f"/g/{i}.jpg" for i in ids], dtype=object)}
        committer.add({"row": block, "shard": block // per_shard, **columns, "embedding": emb,
                       "reject_reason": reasons})
    info = committer.finish()

    kept = [r for r in range(n) if not expected[r][1]]
    table = pq.read_table(out)
    assert table.column("image_id").to_pylist() == [f"img{r}" for r in kept]
    assert table.column("person_id").to_pylist() == [None if r % 5 == 0 else r for r in kept]
    assert table.column("image_uri").to_pylist() == [f"/g/img{r}.jpg" for r in kept]
    emb = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, 2)
    np.testing.assert_array_equal(emb, np.stack([expected[r][0] for r in kept]) if kept else emb)
    rejected = [r for r in range(n) if expected[r][1]]
    if rejected:
        assert pq.read_table(out + "-rejects").column("image_id").to_pylist() == [f"img{r}" for r in rejected]
    assert info["rows"] == len(kept) and info["rejected"] == len(rejected)
