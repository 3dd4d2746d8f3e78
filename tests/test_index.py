import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from tpr_ray.model.checkpoint import load_method
from tpr_ray.tables import SIDECAR, embedding_array
from tpr_ray.index import faiss_index as index_module
from tpr_ray.io import storage
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.index.faiss_index import build_index, fill_index, load_index, make_index, measure_recall, recall_at_k
from tpr_ray.model.encode import encode_captions
from tests.helpers import save_tiny_checkpoint


def unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_gallery(path, vectors, checkpoint="ckpt", prefix="img"):
    path.mkdir(parents=True)
    n = len(vectors)
    table = pa.table({"image_id": [f"{prefix}{i}" for i in range(n)], "person_id": pa.array(np.arange(n) % 7),
                      "image_uri": [f"s3://b/img{i}.jpg" for i in range(n)], "embedding": embedding_array(vectors),
                      "method": ["baseline"] * n, "model": ["tpr-tiny"] * n, "checkpoint": [checkpoint] * n})
    pq.write_table(table.slice(0, n // 2), path / "part-00000.parquet")
    pq.write_table(table.slice(n // 2), path / "part-00001.parquet")
    (path / SIDECAR).write_text(json.dumps({"kind": "gallery", "method": "baseline", "model": "tpr-tiny",
                                            "checkpoint": checkpoint, "dim": vectors.shape[1], "rows": n}))


def test_recall_at_k_counts_overlap():
    assert recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 9], [4, 5, 6]])) == pytest.approx(5 / 6)


def test_exact_index_matches_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    gallery = unit(rng, 500, 32)
    write_gallery(tmp_path / "gallery", gallery)
    info = build_index(str(tmp_path / "gallery"), str(tmp_path / "idx"))
    index, ids, saved = load_index(str(tmp_path / "idx"))
    assert info["ntotal"] == saved["ntotal"] == 500 and ids.num_rows == 500
    queries = unit(rng, 20, 32)
    _, rows = index.search(queries, 5)
    expected = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(rows, expected)
    assert ids.column("image_id").to_pylist()[:2] == ["img0", "img1"]  # shard order kept


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_have_high_measured_recall(kind):
    rng = np.random.default_rng(1)
    centres = unit(rng, 200, 64)
    vectors = centres[rng.integers(0, 200, 20_000)] + 0.3 * unit(rng, 20_000, 64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = make_index(kind, 64, len(vectors))
    fill_index(index, vectors)
    if kind == "ivf":
        index.nprobe = 16
    assert measure_recall(index, vectors, k=10, num_queries=300) > 0.9


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown index kind"):
        make_index("lsh", 8, 10)


def test_search_embeds_text_with_the_indexed_checkpoint(tmp_path):
    ckpt = save_tiny_checkpoint(str(tmp_path / "ckpt"))
    gallery = unit(np.random.default_rng(2), 50, 64)
    write_gallery(tmp_path / "emb" / "gallery", gallery, checkpoint=ckpt)
    runner = CliRunner()
    result = runner.invoke(cli, ["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["search", "a man in a blue jacket", "--index", str(tmp_path / "idx"), "--top", "3",
                                 "--json", str(tmp_path / "hits.json")])
    assert result.exit_code == 0, result.output
    hits = json.loads((tmp_path / "hits.json").read_text())[0]["results"]
    method, _ = load_method(ckpt)
    q = encode_captions(method, ["a man in a blue jacket"], torch.device("cpu"))[0]
    best = np.argsort(-(gallery @ q), kind="stable")[:3]
    assert [h["image_id"] for h in hits] == [f"img{i}" for i in best]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["score"] == pytest.approx(float(gallery[best[0]] @ q), abs=1e-5)
    assert "s3://b/img" in result.output


# --------------------------------------------------------------------------- atomic rebuilds


class Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


def _pairing(index_dir):
    """Which gallery the current index's vectors and its ids each come from."""
    index, ids, _ = load_index(index_dir)
    vectors = index.reconstruct_n(0, index.ntotal)
    names = ids.column("image_id").to_pylist()
    assert index.ntotal == len(names)
    return vectors, names


@pytest.mark.parametrize("survive_writes", [0, 1, 2, 3, 4])
def test_a_rebuild_killed_between_steps_never_pairs_vectors_with_other_ids(tmp_path, monkeypatch, survive_writes):
    rng = np.random.default_rng(4)
    old, new = unit(rng, 30, 8), unit(rng, 20, 8)
    write_gallery(tmp_path / "old", old, prefix="old")
    write_gallery(tmp_path / "new", new, prefix="new")
    out = str(tmp_path / "idx")
    build_index(str(tmp_path / "old"), out)

    real_write, writes = storage.write_bytes_atomic, []

    def write_then_die(uri, data):
        if len(writes) == survive_writes:
            raise Killed(uri)
        writes.append(uri)
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", write_then_die)
    try:
        build_index(str(tmp_path / "new"), out, overwrite=True)
        finished = True
    except Killed:
        finished = False
    monkeypatch.undo()

    vectors, names = _pairing(out)
    expected, prefix = (new, "new") if finished else (old, "old")
    np.testing.assert_array_equal(vectors, expected)
    assert names == [f"{prefix}{i}" for i in range(len(expected))]
    assert finished == (survive_writes >= 4)  # index, ids, the build's info, then the pointer
    # The next build succeeds over whatever the dead one left.
    build_index(str(tmp_path / "new"), out, overwrite=True)
    vectors, names = _pairing(out)
    np.testing.assert_array_equal(vectors, new)
    assert names == [f"new{i}" for i in range(20)]


def test_load_index_refuses_ids_that_do_not_belong_to_the_vectors(tmp_path):
    rng = np.random.default_rng(5)
    write_gallery(tmp_path / "emb", unit(rng, 10, 8))
    out = tmp_path / "idx"
    info = build_index(str(tmp_path / "emb"), str(out))
    ids_file = out / "builds" / info["build"] / "ids.parquet"
    table = pq.read_table(ids_file)
    pq.write_table(table.slice(0, 9), ids_file)
    with pytest.raises(DataError, match="ids_sha256"):
        load_index(str(out))
    pointer = json.loads((out / "index.json").read_text())
    del pointer["ids_sha256"]
    (out / "index.json").write_text(json.dumps(pointer))
    with pytest.raises(DataError, match="10 vectors but its ids table 9 rows"):
        load_index(str(out))


def test_rebuilds_keep_only_the_current_and_previous_build(tmp_path):
    write_gallery(tmp_path / "emb", unit(np.random.default_rng(6), 10, 8))
    builds = [build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), overwrite=True)["build"] for _ in range(3)]
    assert sorted(p.name for p in (tmp_path / "idx" / "builds").iterdir()) == sorted(builds[1:])


def test_index_build_refuses_to_overwrite_without_the_flag(tmp_path):
    write_gallery(tmp_path / "emb", unit(np.random.default_rng(7), 10, 8))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"))
    with pytest.raises(ConfigError, match="already holds an index.*--overwrite"):
        build_index(str(tmp_path / "emb"), str(tmp_path / "idx"))
    args = ["index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code != 0 and "--overwrite" in refused.output and "Traceback" not in refused.output
    assert CliRunner().invoke(cli, args + ["--overwrite"]).exit_code == 0


# --------------------------------------------------------------------------- search


@pytest.fixture()
def two_checkpoints(tmp_path):
    paths = [save_tiny_checkpoint(str(tmp_path / name), seed=seed) for seed, name in enumerate("ab")]
    gallery = unit(np.random.default_rng(2), 50, 64)
    write_gallery(tmp_path / "emb", gallery, checkpoint=paths[0])
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"))
    return str(tmp_path / "idx"), paths, gallery


def test_search_refuses_another_checkpoint_unless_told(two_checkpoints):
    index_dir, (built_with, other), _ = two_checkpoints
    with pytest.raises(ConfigError, match="not the one that embedded this index"):
        index_module.search(index_dir, ["a woman"], 3, checkpoint=other)
    assert len(index_module.search(index_dir, ["a woman"], 3, checkpoint=other, allow_other_checkpoint=True)[0]) == 3
    assert len(index_module.search(index_dir, ["a woman"], 3, checkpoint=built_with)[0]) == 3
    result = CliRunner().invoke(cli, ["search", "a woman", "--index", index_dir, "--checkpoint", other])
    assert result.exit_code != 0 and "--allow-other-checkpoint" in result.output


def test_search_function_ranks_by_the_indexed_checkpoint(two_checkpoints):
    index_dir, (ckpt, _), gallery = two_checkpoints
    texts = ["a man in a red coat", "a child"]
    results = index_module.search(index_dir, texts, 4)
    method, _ = load_method(ckpt)
    queries = encode_captions(method, texts, torch.device("cpu"))
    for hits, q in zip(results, queries):
        assert [h["image_id"] for h in hits] == [f"img{i}" for i in np.argsort(-(gallery @ q), kind="stable")[:4]]


def test_search_reads_queries_from_stdin_loading_the_model_once(two_checkpoints, monkeypatch, tmp_path):
    index_dir, _, _ = two_checkpoints
    import tpr_ray.model.checkpoint as checkpoint_module

    loads = []
    real_load = checkpoint_module.load_method
    monkeypatch.setattr(checkpoint_module, "load_method", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    result = CliRunner().invoke(cli, ["search", "--index", index_dir, "--top", "2", "--interactive",
                                      "--json", str(tmp_path / "hits.json")], input="a man\n\na woman\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("query: ") == 2 and len(loads) == 1
    saved = json.loads((tmp_path / "hits.json").read_text())
    assert [s["query"] for s in saved] == ["a man", "a woman"]
    expected = index_module.search(index_dir, ["a man", "a woman"], 2)
    # one query at a time vs a batch of two: the same hits, scores equal to float rounding
    assert [[{k: v for k, v in h.items() if k != "score"} for h in s["results"]] for s in saved] == \
        [[{k: v for k, v in h.items() if k != "score"} for h in hits] for hits in expected]
    assert [h["score"] for s in saved for h in s["results"]] == \
        pytest.approx([h["score"] for hits in expected for h in hits], abs=1e-5)


def test_an_index_folder_of_the_earlier_layout_still_loads_and_is_replaced_cleanly(tmp_path):
    import faiss

    vectors = unit(np.random.default_rng(8), 6, 8)
    legacy = tmp_path / "idx"
    legacy.mkdir()
    index = faiss.IndexFlatIP(8)
    index.add(vectors)
    faiss.write_index(index, str(legacy / "index.faiss"))
    pq.write_table(pa.table({"image_id": [f"img{i}" for i in range(6)]}), legacy / "ids.parquet")
    (legacy / "index.json").write_text(json.dumps({"kind": "flat", "dim": 8, "ntotal": 6}))
    loaded, ids, _ = load_index(str(legacy))
    assert loaded.ntotal == ids.num_rows == 6
    write_gallery(tmp_path / "emb", unit(np.random.default_rng(9), 10, 8))
    build_index(str(tmp_path / "emb"), str(legacy), overwrite=True)
    assert not (legacy / "index.faiss").exists() and load_index(str(legacy))[0].ntotal == 10
