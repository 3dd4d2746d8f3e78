"""The canonical manifest: schema, round trip, validation on read, stats and the selection split."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tpr_ray.data.loading import load_manifest
from tpr_ray.data.manifest import (
    MANIFEST_SCHEMA,
    build_manifest,
    manifest_info,
    read_manifest,
    selection_split,
    split_stats,
    write_manifest,
)
from tpr_ray.errors import ConfigError, DataError


def make_table(splits_by_person: dict, images_per_person=2) -> pa.Table:
    rows = [(pid, split, k) for pid, split in splits_by_person.items() for k in range(images_per_person)]
    columns = {
        "image_id": [f"p{pid}/{k}.jpg" for pid, _, k in rows],
        "person_id": [pid for pid, _, _ in rows],
        "split": [split for _, split, _ in rows],
        "image_uri": [f"/data/imgs/p{pid}/{k}.jpg" for pid, _, k in rows],
        "captions": [["a caption.", "another one."] for _ in rows],
        "dataset": ["cuhk"] * len(rows),
    }
    return build_manifest(columns, {"dataset": "cuhk", "source": "/data/reid_raw.json", "version": "0" * 16})


def test_schema_is_exactly_the_documented_one():
    assert [(f.name, str(f.type)) for f in MANIFEST_SCHEMA] == [
        ("image_id", "string"), ("person_id", "int64"), ("split", "string"),
        ("image_uri", "string"), ("captions", "list<item: string>"), ("dataset", "string"),
    ]


def test_round_trip_keeps_rows_and_metadata(tmp_path):
    table = make_table({1: "train", 2: "val", 3: "test"})
    uri = str(tmp_path / "sub" / "manifest.parquet")
    write_manifest(table, uri)
    back = read_manifest(uri)
    assert back.schema.equals(MANIFEST_SCHEMA) and back.to_pylist() == table.to_pylist()
    assert manifest_info(back) == {"dataset": "cuhk", "source": "/data/reid_raw.json", "version": "0" * 16}
    assert load_manifest(uri).to_pylist() == table.to_pylist()


def test_round_trip_through_fsspec_uri():
    table = make_table({1: "train"})
    write_manifest(table, "memory://bucket/m.parquet")
    assert read_manifest("memory://bucket/m.parquet").num_rows == 2


def test_version_is_the_annotation_file_hash(tmp_path):
    entries = [{"split": "train", "captions": ["c."], "file_path": "a.jpg", "processed_tokens": [], "id": 1}]
    (tmp_path / "reid_raw.json").write_text(json.dumps(entries))
    table = load_manifest(str(tmp_path))
    expected = hashlib.sha256((tmp_path / "reid_raw.json").read_bytes()).hexdigest()[:16]
    assert manifest_info(table)["version"] == expected
    assert manifest_info(table)["source"] == str(tmp_path / "reid_raw.json")


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(make_table({1: "train"}).drop_columns(["captions"]), path)
    with pytest.raises(DataError, match=r"m.parquet, field 'captions': missing column"):
        read_manifest(str(path))


def test_mistyped_column_is_named(tmp_path):
    path = tmp_path / "m.parquet"
    table = make_table({1: "train"})
    table = table.set_column(1, "person_id", pa.array(["1", "1"]))
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"m.parquet, field 'person_id': column has type string, expected int64"):
        read_manifest(str(path))


def test_equivalent_types_are_accepted(tmp_path):
    path = tmp_path / "m.parquet"
    table = make_table({1: "train"})
    table = table.set_column(1, "person_id", table.column("person_id").cast(pa.int32()))
    table = table.set_column(0, "image_id", table.column("image_id").cast(pa.large_string()))
    pq.write_table(table, path)
    assert read_manifest(str(path)).schema.equals(MANIFEST_SCHEMA)


def test_bad_values_are_rejected_on_write_and_read(tmp_path):
    table = make_table({1: "train", 2: "train"})
    bad_split = table.set_column(2, "split", pa.array(["train", "train", "dev", "train"]))
    with pytest.raises(DataError, match=r"entry 2, field 'split': split 'dev'"):
        write_manifest(bad_split, str(tmp_path / "m.parquet"))
    duplicated = table.set_column(0, "image_id", pa.array(["a", "b", "a", "c"]))
    pq.write_table(duplicated, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"field 'image_id': image_id 'a' appears more than once"):
        read_manifest(str(tmp_path / "d.parquet"))


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(str(tmp_path / "nope.parquet"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_manifest(str(tmp_path / "junk.parquet"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="dataset folder or a .parquet manifest"):
        load_manifest(str(tmp_path / "notes.txt"))


def test_split_stats():
    table = make_table({1: "train", 2: "train", 3: "test"}, images_per_person=3)
    assert split_stats(table) == {
        "train": {"ids": 2, "images": 6, "captions": 12},
        "test": {"ids": 1, "images": 3, "captions": 6},
    }


def test_selection_split_uses_val_when_present():
    table = make_table({1: "train", 2: "train", 3: "val", 4: "test"})
    train, val = selection_split(table)
    assert set(train.column("person_id").to_pylist()) == {1, 2}
    assert set(val.column("person_id").to_pylist()) == {3}


def test_selection_split_holds_out_whole_identities_from_train():
    table = make_table({**{pid: "train" for pid in range(100)}, 100: "test", 101: "test"})
    train, val = selection_split(table, holdout_fraction=0.1, seed=3)
    train_ids, val_ids = set(train.column("person_id").to_pylist()), set(val.column("person_id").to_pylist())
    assert len(val_ids) == 10 and not train_ids & val_ids and train_ids | val_ids == set(range(100))
    assert train.num_rows + val.num_rows == 200 and val.num_rows == 20
    again = selection_split(table, holdout_fraction=0.1, seed=3)[1]
    assert again.column("image_id").to_pylist() == val.column("image_id").to_pylist()
    other = set(selection_split(table, holdout_fraction=0.1, seed=4)[1].column("person_id").to_pylist())
    assert other != val_ids
    assert manifest_info(val)["dataset"] == "cuhk"


def test_selection_split_holds_out_at_least_one_identity():
    train, val = selection_split(make_table({1: "train", 2: "train", 3: "test"}))
    assert len(set(val.column("person_id").to_pylist())) == 1 and train.num_rows == 2


def test_selection_split_errors():
    with pytest.raises(DataError, match="cannot hold out"):
        selection_split(make_table({1: "train", 3: "test"}))
    with pytest.raises(ConfigError):
        selection_split(make_table({1: "train", 2: "train"}), holdout_fraction=1.5)
