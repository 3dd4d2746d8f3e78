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
            "shards": [{"file": tables.shard_name(s), "rows": int(b - a), "rejects": 0,
                        **tables.shard_record((directory / tables.shard_name(s)).read_bytes())}
                       for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))], **sidecar}
    (directory / tables.SIDECAR).write_text(json.dumps(info))
    return str(directory)


def unit_rows():
    """8 seeded unit vectors of dimension 4, of persons 0-3 (twice each)."""
    vectors = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), np.arange(8) % 4


@pytest.fixture()
def run(tmp_path):
    """An embedding run whose gallery job stopped after 2 of its 3 planned shards."""
    vectors, pids = unit_rows()
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
                 "_meta.parquet"):
        (folder / name).write_bytes(b"")
    (folder / tables.SIDECAR).write_text("{}")
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


# --- issue 19 item 4: the sidecar's shard list, unique ids, unreadable files -----------------


@pytest.fixture()
def done(tmp_path):
    """A complete embedding run: gallery of 8 rows in 2 shards, 4 queries with captions."""
    vectors, pids = unit_rows()
    write_table(tmp_path / "emb" / "gallery", "gallery", pids, vectors, [0, 4, 8])
    queries = write_table(tmp_path / "emb" / "queries", "queries", pids[:4], vectors[:4], [0, 4])
    shard = f"{queries}/{tables.shard_name(0)}"
    table = pq.read_table(shard)
    table = table.append_column("caption", pa.array(["a person."] * table.num_rows))
    pq.write_table(table.append_column("image_id", pa.array([f"img{i}.jpg" for i in range(table.num_rows)])), shard)
    (tmp_path / "emb" / "queries" / tables.SIDECAR).unlink()  # rewritten by hand above
    return tmp_path / "emb"


def every_reader(run, tmp_path):
    """Each way a table is read: eval in memory and streaming, index build, crosseval's samples, the CLI."""
    from tpr_ray.crosseval.cells import query_samples

    gallery, queries = str(run / "gallery"), str(run / "queries")
    yield "eval in-memory", lambda: evaluate_embeddings(gallery, queries)
    yield "eval streaming", lambda: evaluate_tables(gallery, queries, use_ray=False)
    yield "index build", lambda: build_index(gallery, str(tmp_path / "index"))
    yield "crosseval samples", lambda: query_samples(_samples_result(), gallery, queries, 2)
    yield "cli eval", lambda: _cli_eval(run)


def _samples_result():
    """What crosseval's report reads the gallery and query tables for: a ranking's top hits."""
    from types import SimpleNamespace

    return SimpleNamespace(top_positions=np.array([[0, 1]]), top_scores=np.array([[1.0, 0.5]]),
                           positive_ranks=[np.array([1])])


def _cli_eval(run):
    result = CliRunner().invoke(eval_command, ["--embeddings", str(run)])
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    raise DataError(result.output.strip().splitlines()[-1])


def refused_everywhere(run, tmp_path, pattern):
    for reader, call in every_reader(run, tmp_path):
        with pytest.raises(DataError, match=pattern) as error:
            call()
        print(f"\n{reader}: {error.value}")


def test_a_complete_table_reads_with_its_shard_list(done, tmp_path):
    for reader, call in every_reader(done, tmp_path):
        if reader != "cli eval":
            call()
    entry = json.loads((done / "gallery" / tables.SIDECAR).read_text())["shards"][0]
    assert set(entry) == {"file", "rows", "rejects", "bytes", "footer"}


def test_a_shard_missing_from_the_folder_is_refused_naming_it(done, tmp_path):
    (done / "gallery" / "part-00001.parquet").unlink()
    refused_everywhere(done, tmp_path, r"gallery/part-00001.parquet: shard part-00001.parquet is in the sidecar's list "
                                       r"but not in the folder")


def test_an_extra_shard_is_refused_naming_it(done, tmp_path):
    other = done / "gallery" / "part-00002.parquet"
    other.write_bytes((done / "gallery" / "part-00001.parquet").read_bytes())
    refused_everywhere(done, tmp_path, r"gallery/part-00002.parquet: shard not in the sidecar's list")


def test_a_shard_list_of_bare_names_is_checked_by_name(done, tmp_path):
    """Another writer's sidecar may list file names only: present ones read, an extra one is refused."""
    sidecar = done / "gallery" / tables.SIDECAR
    info = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**info, "shards": [entry["file"] for entry in info["shards"]]}))
    assert tables.read_embeddings(str(done / "gallery"))[0].num_rows == info["rows"]
    (done / "gallery" / "part-00002.parquet").write_bytes((done / "gallery" / "part-00001.parquet").read_bytes())
    with pytest.raises(DataError, match=r"part-00002.parquet: shard not in the sidecar's list of this table's 2"):
        tables.read_embeddings(str(done / "gallery"))


@pytest.mark.parametrize("entry", [{"rows": 4}, 7, None])
def test_a_shard_list_entry_without_a_file_name_is_refused_naming_the_sidecar(done, entry):
    sidecar = done / "gallery" / tables.SIDECAR
    info = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**info, "shards": [info["shards"][0], entry]}))
    with pytest.raises(DataError, match=r"_tpr_ray.json, field 'shards': entry 1 of the sidecar's shard list names "
                                        r"no file"):
        tables.read_embeddings(str(done / "gallery"))


def test_a_replaced_shard_is_refused_naming_it(done, tmp_path):
    """Another checkpoint's shard of the same rows: same row count and (here) the same size."""
    path = done / "gallery" / "part-00001.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.column_names.index("checkpoint"), "checkpoint",
                                    pa.array(["/runs/ckpX"] * table.num_rows)), path)
    refused_everywhere(done, tmp_path, r"gallery/part-00001.parquet: shard was replaced after it was committed: "
                                       r"\d+ bytes, the sidecar recorded \d+")
    sidecar = done / "gallery" / tables.SIDECAR
    info = json.loads(sidecar.read_text())
    info["shards"][1]["bytes"] = path.stat().st_size  # as if the replacement had the same size: the footer tells
    sidecar.write_text(json.dumps(info))
    refused_everywhere(done, tmp_path, r"gallery/part-00001.parquet: shard was replaced after it was committed: its "
                                       r"Parquet footer")


def test_a_repeated_image_id_is_refused_naming_both_shards(done, tmp_path):
    gallery = done / "gallery"
    path = gallery / "part-00001.parquet"
    table = pq.read_table(path)
    ids = table.column("image_id").to_pylist()
    ids[2] = "img0.jpg"
    pq.write_table(table.set_column(table.column_names.index("image_id"), "image_id", pa.array(ids)), path)
    info = json.loads((gallery / tables.SIDECAR).read_text())
    info.pop("shards")  # a table of another tool or an older version: no list to compare with
    (gallery / tables.SIDECAR).write_text(json.dumps(info))
    pattern = r"image_id 'img0.jpg' appears more than once in the gallery \(part-00000.parquet row 0 and " \
              r"part-00001.parquet row 2\)"
    for reader, call in every_reader(done, tmp_path):
        if reader in ("eval in-memory", "index build", "crosseval samples", "cli eval"):
            with pytest.raises(DataError, match=pattern) as error:
                call()
            print(f"\n{reader}: {error.value}")


def test_a_corrupt_shard_is_one_line_naming_the_file(done, tmp_path):
    path = done / "gallery" / "part-00001.parquet"
    info = json.loads((done / "gallery" / tables.SIDECAR).read_text())
    info.pop("shards")
    (done / "gallery" / tables.SIDECAR).write_text(json.dumps(info))
    data = path.read_bytes()
    thrift = data[:4] + b"\0" * (len(data) - 12) + data[-8:]  # magic bytes right, footer garbage: pyarrow's OSError
    for data in (b"not parquet at all", data[:-13], data[:40] + data[-8:], thrift):
        path.write_bytes(data)
        refused_everywhere(done, tmp_path, r"gallery/part-00001.parquet: not a readable Parquet file")


@pytest.mark.parametrize("text, problem", [("{not json", "is not valid JSON"), ("13", "holds a JSON int"),
                                           ("", "is not valid JSON")])
def test_a_sidecar_that_is_not_a_json_object_is_one_line_naming_it(done, tmp_path, text, problem):
    (done / "gallery" / tables.SIDECAR).write_text(text)
    refused_everywhere(done, tmp_path, rf"gallery/_tpr_ray.json: sidecar {problem}")
