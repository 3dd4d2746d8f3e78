"""The embedding-table format module: names, listing, kinds, completeness, row counts."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.evaluate import eval_command
from cli.main import cli
from tpr_ray import tables
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.evaluation.in_memory import evaluate_embeddings
from tpr_ray.index.faiss_index import build_index
from tpr_ray.evaluation.streaming import evaluate_tables


def write_table(directory, kind, pids, vectors, bounds, **sidecar):
    directory.mkdir(parents=True)
    n = len(pids)
    table = pa.table({("query_id" if kind == "queries" else "image_id"):
                      list(range(n)) if kind == "queries" else [f"img{i}.jpg" for i in range(n)],
                      "image_uri": [f"/data/img{i}.jpg" for i in range(n)],
                      "person_id": pa.array(pids, pa.int64()), "embedding": tables.embedding_array(vectors),
                      "method": ["baseline"] * n, "model": ["tpr-tiny"] * n, "checkpoint": ["/runs/ckpt"] * n})
    for shard, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(table.slice(start, stop - start), directory / tables.shard_name(shard))
    info = {"kind": kind, "dim": vectors.shape[1], "rows": n, "method": "baseline", "model": "tpr-tiny",
            "checkpoint": "/runs/ckpt", "complete": True, "num_shards": len(bounds) - 1,
            "shards": [{"file": tables.shard_name(s), "rows": int(b - a), "rejects": 0}
                       for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))], **sidecar}
    (directory / tables.SIDECAR).write_text(json.dumps(info))
    return str(directory)


@pytest.fixture()
def run(tmp_path):
    """An embedding run whose gallery job stopped after 2 of its 3 planned shards."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((8, 4)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pids = np.arange(8) % 4
    write_table(tmp_path / "emb" / "gallery", "gallery", pids, vectors, [0, 4, 8], complete=False, num_shards=3,
                source="/data/cuhk", split="test", settings={"rows_per_shard": 4})
    write_table(tmp_path / "emb" / "queries", "queries", pids[:4], vectors[:4], [0, 4])
    return tmp_path / "emb"


INCOMPLETE = r"incomplete.*2 of 3 shards.*tpr-ray embed --checkpoint /runs/ckpt --data /data/cuhk --split test"


def test_in_memory_eval_refuses_an_incomplete_gallery(run):
    gallery, queries = str(run / "gallery"), str(run / "queries")
    with pytest.raises(DataError, match=INCOMPLETE):
        evaluate_embeddings(gallery, queries)
    result = evaluate_embeddings(gallery, queries, allow_incomplete=True)
    assert result["num_gallery"] == 8


def test_incomplete_message_names_the_out_folder_and_shard_size(run):
    with pytest.raises(DataError) as error:
        tables.read_embeddings(str(run / "gallery"))
    message = str(error.value)
    assert f"--out {run}" in message and "--rows-per-shard 4" in message and "--allow-incomplete" in message


def test_streaming_eval_refuses_an_incomplete_gallery(run):
    gallery, queries = str(run / "gallery"), str(run / "queries")
    with pytest.raises(DataError, match=INCOMPLETE):
        evaluate_tables(gallery, queries, use_ray=False)
    assert evaluate_tables(gallery, queries, use_ray=False, allow_incomplete=True).metrics["num_gallery"] == 8


def test_streaming_eval_checks_the_sidecar_row_count(run):
    info = json.loads((run / "gallery" / tables.SIDECAR).read_text())
    (run / "gallery" / tables.SIDECAR).write_text(json.dumps({**info, "complete": True, "rows": 12}))
    with pytest.raises(DataError, match="sidecar says 12 rows but the shards hold 8"):
        evaluate_tables(str(run / "gallery"), str(run / "queries"), use_ray=False)


def test_index_build_refuses_an_incomplete_gallery(run, tmp_path):
    with pytest.raises(DataError, match=INCOMPLETE):
        build_index(str(run / "gallery"), str(tmp_path / "index"))
    assert build_index(str(run / "gallery"), str(tmp_path / "index"), allow_incomplete=True)["ntotal"] == 8


def test_cli_eval_and_index_refuse_then_accept_with_the_flag(run, tmp_path):
    refused = CliRunner().invoke(eval_command, ["--embeddings", str(run)])
    assert refused.exit_code != 0 and "2 of 3 shards" in refused.output and "Traceback" not in refused.output
    accepted = CliRunner().invoke(eval_command, ["--embeddings", str(run), "--allow-incomplete"])
    assert accepted.exit_code == 0, accepted.output
    refused = CliRunner().invoke(cli, ["index", "build", "--embeddings", str(run), "--out", str(tmp_path / "i")])
    assert refused.exit_code != 0 and "2 of 3 shards" in refused.output
    accepted = CliRunner().invoke(cli, ["index", "build", "--embeddings", str(run), "--out", str(tmp_path / "i"),
                                        "--allow-incomplete"])
    assert accepted.exit_code == 0, accepted.output


def test_a_table_without_sidecar_is_read_as_it_is(run):
    (run / "queries" / tables.SIDECAR).unlink()
    table, info = tables.read_embeddings(str(run / "queries"))
    assert table.num_rows == 4 and info["kind"] == "queries"


def test_shard_names_and_listing_skip_temporaries_and_metadata(tmp_path):
    assert tables.shard_name(12) == "part-00012.parquet"
    assert tables.shard_number("part-00012.parquet") == 12
    assert tables.shard_number("part-x.parquet") is None and tables.shard_number("_tpr_ray.json") is None
    folder = tmp_path / "t"
    folder.mkdir()
    for name in ("part-00001.parquet", "part-00000.parquet", "_tmp.part-00002.parquet.ab12", ".hidden.parquet",
                 "_meta.parquet", tables.SIDECAR):
        (folder / name).write_bytes(b"")
    assert [p.rsplit("/", 1)[1] for p in tables.list_shards(str(folder))] == ["part-00000.parquet",
                                                                             "part-00001.parquet"]


def test_a_wrong_table_kind_is_one_error_type_everywhere(run, tmp_path):
    gallery, queries = str(run / "gallery"), str(run / "queries")
    for call in (lambda: evaluate_embeddings(queries, gallery, allow_incomplete=True),
                 lambda: evaluate_tables(queries, gallery, use_ray=False, allow_incomplete=True),
                 lambda: build_index(queries, str(tmp_path / "i"))):
        with pytest.raises(tables.TableKindError, match=r"holds a \w+ table, expected (gallery|queries)"):
            call()
    assert issubclass(tables.TableKindError, ConfigError)
