import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.evaluate import eval_command
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.evaluation.in_memory import (
    chance_level,
    evaluate_embeddings,
    format_metrics_table,
    write_metrics_json,
)
from tpr_ray.tables import read_embeddings
from tpr_ray.evaluation.metrics import retrieval_metrics

PROVENANCE = {"method": "cskt", "model": "ViT-B-16", "checkpoint": "runs/cskt/epoch_60.pt"}


def embedding_column(vectors, list_type="fixed"):
    values = pa.array(np.asarray(vectors, dtype=np.float32).ravel(), type=pa.float32())
    dim = np.asarray(vectors).shape[1]
    if list_type == "fixed":
        return pa.FixedSizeListArray.from_arrays(values, dim)
    offsets = pa.array(np.arange(0, len(values) + 1, dim), type=pa.int32() if list_type == "list" else pa.int64())
    array_type = pa.ListArray if list_type == "list" else pa.LargeListArray
    return array_type.from_arrays(offsets, values)


def write_table(directory, kind, person_ids, vectors, *, shards=1, list_type="fixed", sidecar=True, **provenance):
    """Write an embedding table the way the embedder does: part-NNNNN.parquet + _tpr_ray.json."""
    provenance = {**PROVENANCE, **provenance}
    directory.mkdir(parents=True)
    n = len(person_ids)
    columns = {
        "query_id" if kind == "queries" else "image_id":
            list(range(n)) if kind == "queries" else [f"img{i}.jpg" for i in range(n)],
        "person_id": pa.array(person_ids, type=pa.int64()),
        "embedding": embedding_column(vectors, list_type),
        **{field: [value] * n for field, value in provenance.items()},
    }
    table = pa.table(columns)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for shard, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(table.slice(start, stop - start), directory / f"part-{shard:05d}.parquet")
    if sidecar:
        info = {"kind": kind, **provenance, "dim": int(np.asarray(vectors).shape[1]), "rows": n,
                "shards": [f"part-{s:05d}.parquet" for s in range(shards)]}
        (directory / "_tpr_ray.json").write_text(json.dumps(info))
    return directory


def unit_rows(rng, n, dim=8):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def run_dir(tmp_path):
    """An embedding run: 12 gallery images of 4 people, 10 captions, shards of unequal size."""
    rng = np.random.default_rng(0)
    gallery_pids = np.repeat([10, 11, 12, 13], 3)
    query_pids = rng.choice(gallery_pids, 10)
    gallery, queries = unit_rows(rng, 12), unit_rows(rng, 10)
    write_table(tmp_path / "run" / "gallery", "gallery", gallery_pids, gallery, shards=3)
    write_table(tmp_path / "run" / "queries", "queries", query_pids, queries, shards=2)
    expected = retrieval_metrics(queries @ gallery.T, query_pids, gallery_pids)
    return tmp_path / "run", expected


def test_evaluate_embeddings_matches_direct_metrics(run_dir):
    run, expected = run_dir
    result = evaluate_embeddings(str(run / "gallery"), str(run / "queries"))
    for key in ("R1", "R5", "R10", "mAP", "mINP", "num_queries", "num_gallery"):
        assert result[key] == pytest.approx(expected[key]), key
    assert {k: result[k] for k in PROVENANCE} == PROVENANCE
    assert result["dim"] == 8
    assert set(result["chance"]) == {"R1", "R5", "R10", "mAP", "mINP"}


def test_read_embeddings_concatenates_shards_in_name_order(run_dir):
    run, _ = run_dir
    table, info = read_embeddings(str(run / "gallery"))
    assert info["files"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert info["kind"] == "gallery" and info["rows"] == 12 and info["dim"] == 8
    assert table.column("image_id").to_pylist() == [f"img{i}.jpg" for i in range(12)]


def test_shard_order_breaks_ties(tmp_path):
    # Two identical gallery embeddings: the negative sits in part-00000, the positive in
    # part-00001, so the positive is ranked second and R1 is 0.
    same = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    write_table(tmp_path / "gallery", "gallery", [2, 1], same, shards=2)
    write_table(tmp_path / "queries", "queries", [1], same[:1])
    result = evaluate_embeddings(str(tmp_path / "gallery"), str(tmp_path / "queries"), ks=(1, 2))
    assert result["R1"] == 0.0 and result["R2"] == 100.0
    assert result["mAP"] == 50.0


@pytest.mark.parametrize("list_type", ["list", "large_list"])
def test_variable_list_embeddings_are_converted(tmp_path, list_type):
    rng = np.random.default_rng(1)
    vectors = unit_rows(rng, 5, dim=4)
    write_table(tmp_path / "g", "gallery", [1, 1, 2, 2, 3], vectors, list_type=list_type)
    table, info = read_embeddings(str(tmp_path / "g"))
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert info["dim"] == 4


def test_missing_column_names_file_and_column(tmp_path):
    directory = tmp_path / "g"
    directory.mkdir()
    pq.write_table(pa.table({"image_id": ["a"], "embedding": embedding_column([[1.0, 0.0]])}),
                   directory / "part-00000.parquet")
    with pytest.raises(DataError, match="part-00000.parquet.*'person_id'"):
        read_embeddings(str(directory))


def test_ragged_embeddings_name_the_row(tmp_path):
    directory = tmp_path / "g"
    directory.mkdir()
    ragged = pa.array([[1.0, 0.0], [0.0, 1.0], [1.0]], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"image_id": ["a", "b", "c"], "person_id": [1, 2, 3], "embedding": ragged}),
                   directory / "part-00000.parquet")
    with pytest.raises(DataError, match="part-00000.parquet, entry 2, field 'embedding'"):
        read_embeddings(str(directory))


def test_nan_embedding_names_the_row(tmp_path):
    vectors = np.array([[1, 0], [0, 1], [np.nan, 0]], dtype=np.float32)
    write_table(tmp_path / "g", "gallery", [1, 2, 3], vectors, shards=1)
    with pytest.raises(DataError, match="entry 2.*'embedding'.*NaN"):
        read_embeddings(str(tmp_path / "g"))


def test_dims_must_agree_between_tables(tmp_path):
    write_table(tmp_path / "g", "gallery", [1, 2], np.eye(2, dtype=np.float32))
    write_table(tmp_path / "q", "queries", [1], np.eye(3, dtype=np.float32)[:1])
    with pytest.raises(DataError, match="dim 3.*dim.*2|dim 3 but gallery embeddings have 2"):
        evaluate_embeddings(str(tmp_path / "g"), str(tmp_path / "q"))


def test_sidecar_row_count_catches_a_missing_shard(run_dir):
    run, _ = run_dir
    (run / "gallery" / "part-00001.parquet").unlink()
    with pytest.raises(DataError, match="part-00001.parquet is in the sidecar's list but not in the folder"):
        read_embeddings(str(run / "gallery"))
    sidecar = run / "gallery" / "_tpr_ray.json"
    info = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**info, "shards": None}))  # no list: the row count still tells
    with pytest.raises(DataError, match="sidecar says 12 rows"):
        read_embeddings(str(run / "gallery"))


def test_different_checkpoints_are_refused_unless_allowed(tmp_path):
    write_table(tmp_path / "g", "gallery", [1, 2], np.eye(2, dtype=np.float32))
    write_table(tmp_path / "q", "queries", [1], np.eye(2, dtype=np.float32)[:1], checkpoint="runs/cskt/epoch_10.pt")
    with pytest.raises(ConfigError, match="checkpoint.*epoch_60.*epoch_10"):
        evaluate_embeddings(str(tmp_path / "g"), str(tmp_path / "q"))
    result = evaluate_embeddings(str(tmp_path / "g"), str(tmp_path / "q"), allow_mismatch=True)
    assert result["mismatch"] == {"checkpoint": {"gallery": "runs/cskt/epoch_60.pt",
                                                 "queries": "runs/cskt/epoch_10.pt"}}
    assert result["R1"] == 100.0


def test_provenance_falls_back_to_columns_without_sidecar(tmp_path):
    write_table(tmp_path / "g", "gallery", [1, 2], np.eye(2, dtype=np.float32), sidecar=False)
    write_table(tmp_path / "q", "queries", [1], np.eye(2, dtype=np.float32)[:1], sidecar=False, model="RN50")
    with pytest.raises(ConfigError, match="model: gallery 'ViT-B-16', queries 'RN50'"):
        evaluate_embeddings(str(tmp_path / "g"), str(tmp_path / "q"))


def test_swapped_tables_are_refused(run_dir):
    run, _ = run_dir
    with pytest.raises(ConfigError, match="expected gallery"):
        evaluate_embeddings(str(run / "queries"), str(run / "gallery"))


def test_chance_level_hand_computed():
    # G = 4, P = 2. R@1 = 1 - C(2,1)/C(4,1) = 1/2; R@2 = 1 - C(2,2)/C(4,2) = 5/6.
    # The 6 equally likely rank pairs {1,2} {1,3} {1,4} {2,3} {2,4} {3,4} give
    # AP 1, 5/6, 3/4, 7/12, 1/2, 5/12 (mean 49/72) and INP 1, 2/3, 1/2, 2/3, 1/2, 1/2 (mean 23/36).
    chance = chance_level([1], [1, 1, 2, 3], ks=(1, 2))
    assert chance["R1"] == pytest.approx(50.0)
    assert chance["R2"] == pytest.approx(100 * 5 / 6)
    assert chance["mAP"] == pytest.approx(100 * 49 / 72)
    assert chance["mINP"] == pytest.approx(100 * 23 / 36)


@pytest.mark.parametrize("num_gallery,num_positives", [(6, 1), (6, 3), (5, 5), (9, 4)])
def test_chance_level_matches_enumeration(num_gallery, num_positives):
    aps, inps, top3 = [], [], []
    for ranks in itertools.combinations(range(1, num_gallery + 1), num_positives):
        aps.append(np.mean([(i + 1) / r for i, r in enumerate(ranks)]))
        inps.append(num_positives / ranks[-1])
        top3.append(ranks[0] <= 3)
    gallery_pids = [1] * num_positives + [2] * (num_gallery - num_positives)
    chance = chance_level([1, 1], gallery_pids, ks=(3,))
    assert chance["mAP"] == pytest.approx(100 * np.mean(aps))
    assert chance["mINP"] == pytest.approx(100 * np.mean(inps))
    assert chance["R3"] == pytest.approx(100 * np.mean(top3))


def test_format_metrics_table():
    metrics = {"R1": 68.19, "R5": 86.468, "R10": 91.47, "mAP": 61.12, "mINP": 45.0, "method": "baseline"}
    chance = {"R1": 0.1, "R5": 0.5, "R10": 1.0, "mAP": 0.2, "mINP": 0.15}
    assert format_metrics_table(metrics, chance) == "\n".join([
        "              R1      R5     R10     mAP    mINP",
        "baseline   68.19   86.47   91.47   61.12   45.00",
        "chance      0.10    0.50    1.00    0.20    0.15",
    ])


def test_write_metrics_json_handles_numpy_values(tmp_path):
    out = tmp_path / "sub" / "metrics.json"
    write_metrics_json({"R1": np.float64(12.5), "num_queries": np.int64(3), "ks": (1, 5)}, str(out))
    assert json.loads(out.read_text()) == {"R1": 12.5, "num_queries": 3, "ks": [1, 5]}


def test_cli_prints_table_and_writes_json(run_dir, tmp_path):
    run, expected = run_dir
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(eval_command, ["--embeddings", str(run), "--out", str(out), "--k", "1,2,5"])
    assert result.exit_code == 0, result.output
    assert "chance" in result.output and "R2" in result.output and "mINP" in result.output
    written = json.loads(out.read_text())
    assert written["mAP"] == pytest.approx(expected["mAP"])
    assert written["ks"] == [1, 2, 5] and written["checkpoint"] == PROVENANCE["checkpoint"]


def test_cli_separate_gallery_and_queries(run_dir):
    run, _ = run_dir
    result = CliRunner().invoke(eval_command, ["--gallery", str(run / "gallery"), "--queries", str(run / "queries")])
    assert result.exit_code == 0, result.output
    assert "R10" in result.output


def test_cli_reports_bad_input_without_traceback(tmp_path):
    write_table(tmp_path / "run" / "gallery", "gallery", [1, 2], np.eye(2, dtype=np.float32))
    write_table(tmp_path / "run" / "queries", "queries", [1], np.eye(2, dtype=np.float32)[:1], model="RN50")
    result = CliRunner().invoke(eval_command, ["--embeddings", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: gallery and queries were not embedded by one model")
    assert "Traceback" not in result.output


def test_query_without_positive_names_the_queries_file(tmp_path):
    write_table(tmp_path / "run" / "gallery", "gallery", [1, 2], np.eye(2, dtype=np.float32))
    write_table(tmp_path / "run" / "queries", "queries", [1, 7], np.eye(2, dtype=np.float32))
    result = CliRunner().invoke(eval_command, ["--embeddings", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "queries, entry 1, field 'person_id': person id 7" in result.output
    result = CliRunner().invoke(eval_command,
                                ["--embeddings", str(tmp_path / "run"), "--skip-queries-without-positives"])
    assert result.exit_code == 0, result.output
    assert "(1 skipped, no positive)" in result.output


def test_cli_needs_an_embedding_location():
    result = CliRunner().invoke(eval_command, ["--gallery", "g"])
    assert result.exit_code == 2
    assert "--embeddings DIR" in result.output
    result = CliRunner().invoke(eval_command, ["--embeddings", "x", "--k", "1,five"])
    assert result.exit_code == 2


def test_cli_streaming_gives_the_in_memory_metrics(run_dir, tmp_path, monkeypatch):
    import tpr_ray.evaluation.evaluate

    run, expected = run_dir
    outputs = {}
    for mode in ("--in-memory", "--streaming", None):
        if mode is None:  # auto: streams because the gallery is above the (lowered) threshold
            monkeypatch.setattr(tpr_ray.evaluation.evaluate, "STREAMING_ABOVE_ROWS", 11)
        out = tmp_path / f"{mode}.json"
        args = ["--embeddings", str(run), "--k", "1,2,5", "--out", str(out)] + ([mode] if mode else [])
        result = CliRunner().invoke(eval_command, args)
        assert result.exit_code == 0, result.output
        outputs[mode] = json.loads(out.read_text())
    assert "num_shards" not in outputs["--in-memory"]
    assert outputs["--streaming"]["num_shards"] == outputs[None]["num_shards"] == 3
    for key in ("R1", "R2", "R5", "mAP", "mINP", "num_queries", "num_gallery", "chance", "checkpoint"):
        assert outputs["--streaming"][key] == pytest.approx(outputs["--in-memory"][key]), key
    assert outputs["--in-memory"]["R1"] == pytest.approx(expected["R1"])
