import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from tpr_ray.backbone import BackboneConfig
from tpr_ray.checkpoint import load_method, save_checkpoint
from tpr_ray.embed import SIDECAR, embedding_array
from tpr_ray.errors import ConfigError
from tpr_ray.index import build_index, fill_index, load_index, make_index, measure_recall, recall_at_k
from tpr_ray.inference import encode_captions
from tpr_ray.methods import get_method
from tests.helpers import TINY


def unit(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_gallery(path, vectors, checkpoint="ckpt"):
    path.mkdir(parents=True)
    n = len(vectors)
    table = pa.table({"image_id": [f"img{i}" for i in range(n)], "person_id": pa.array(np.arange(n) % 7),
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
    torch.manual_seed(0)
    cls = get_method("baseline")
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(cls(BackboneConfig(**TINY), cls.default_recipe, 3), ckpt, {})
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
