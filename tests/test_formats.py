"""The dataset readers: split counts per format, and every kind of bad entry named precisely."""

import json
import logging

import pyarrow.parquet as pq
import pytest

from tpr_ray.data.formats import cuhk_standard_split, detect_format, read_dataset
from tpr_ray.data.manifest import MANIFEST_SCHEMA, manifest_info, split_stats
from tpr_ray.errors import ConfigError, DataError


def cuhk_entry(pid, path, split="train", captions=("a man in a red coat.", "the man wears a red coat.")):
    return {"split": split, "captions": list(captions), "file_path": path,
            "processed_tokens": [c.split() for c in captions], "id": pid}


def rstp_entry(pid, path, split="train"):
    return {"id": pid, "img_path": path, "captions": ["a woman in blue.", "blue top, black pants."], "split": split}


def write_json(root, name, entries):
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(entries), encoding="utf-8")
    return root


def cuhk_entries():
    """3 train identities, 1 val, 1 test; one image with three captions as in the real set."""
    entries = [cuhk_entry(pid, f"CUHK01/{pid:04d}{k:03d}.png") for pid in (1, 2, 3) for k in (1, 2)]
    entries.append(cuhk_entry(4, "Market/0004001.jpg", "val"))
    entries.append(cuhk_entry(5, "test_query/p5_s1.jpg", "test", captions=("one.", "two.", "three.")))
    return entries


def test_cuhk_counts_by_split(tmp_path):
    root = write_json(tmp_path / "CUHK-PEDES", "reid_raw.json", cuhk_entries())
    table = read_dataset(str(root))
    assert table.schema.names == MANIFEST_SCHEMA.names
    assert split_stats(table) == {
        "train": {"ids": 3, "images": 6, "captions": 12},
        "val": {"ids": 1, "images": 1, "captions": 2},
        "test": {"ids": 1, "images": 1, "captions": 3},
    }
    row = table.slice(0, 1).to_pylist()[0]
    assert row["image_id"] == "CUHK01/0001001.png"
    assert row["image_uri"] == f"{root}/imgs/CUHK01/0001001.png"
    assert row["dataset"] == "cuhk"
    info = manifest_info(table)
    assert info["source"].endswith("reid_raw.json") and len(info["version"]) == 16 and info["rejected"] == 0


def test_icfg_both_file_names_and_no_val(tmp_path):
    entries = [cuhk_entry(0, "train/0000/0000_001.jpg"), cuhk_entry(1, "test/0001/0001_001.jpg", "test")]
    for name in ("ICFG-PEDES.json", "ICFG_PEDES.json"):
        root = write_json(tmp_path / name, name, entries)
        assert detect_format(str(root)) == "icfg"
        assert set(split_stats(read_dataset(str(root)))) == {"train", "test"}


def test_rstp_counts_by_split(tmp_path):
    entries = [rstp_entry(pid, f"{pid:04d}_c{k}_0001.jpg", split)
               for pid, split in ((0, "train"), (1, "train"), (2, "val"), (3, "test")) for k in range(5)]
    root = write_json(tmp_path, "data_captions.json", entries)
    stats = split_stats(read_dataset(str(root)))
    assert stats["train"] == {"ids": 2, "images": 10, "captions": 20}
    assert stats["val"] == stats["test"] == {"ids": 1, "images": 5, "captions": 10}


def test_caption_all_gets_the_standard_split_by_id(tmp_path):
    ids = (1, 11003, 11004, 12003, 12004, 13003)
    entries = [{"id": pid, "file_path": f"x/{pid}.jpg", "captions": ["c."]} for pid in ids]
    table = read_dataset(str(write_json(tmp_path, "caption_all.json", entries)))
    assert table.column("split").to_pylist() == ["train", "train", "val", "val", "test", "test"]
    assert cuhk_standard_split(13004) is None


def test_reid_raw_is_preferred_over_caption_all(tmp_path):
    write_json(tmp_path, "caption_all.json", [{"id": 1, "file_path": "a.jpg", "captions": ["c."]}])
    write_json(tmp_path, "reid_raw.json", [cuhk_entry(1, "b.jpg")])
    assert read_dataset(str(tmp_path)).column("image_id").to_pylist() == ["b.jpg"]


def test_remote_uri_gives_remote_image_uris():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/rstp/data_captions.json", json.dumps([rstp_entry(0, "0000_c1_0001.jpg")]).encode())
    table = read_dataset("memory://bucket/rstp")
    assert table.column("image_uri").to_pylist() == ["memory:///bucket/rstp/imgs/0000_c1_0001.jpg"]


def test_detect_format_errors_list_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match="reid_raw.json.*ICFG-PEDES.json.*data_captions.json"):
        detect_format(str(tmp_path))
    with pytest.raises(DataError, match="not found"):
        detect_format(str(tmp_path / "missing"))
    write_json(tmp_path, "reid_raw.json", [])
    write_json(tmp_path, "data_captions.json", [])
    with pytest.raises(DataError, match="several formats"):
        detect_format(str(tmp_path))


# Each case: (what to do to entry 1, the field the error must name, words the reason must contain)
BAD_ENTRIES = [
    (lambda e: e.pop("captions"), "captions", "missing field"),
    (lambda e: e.pop("id"), "id", "missing field"),
    (lambda e: e.pop("split"), "split", "missing field"),
    (lambda e: e.pop("file_path"), "file_path", "missing field"),
    (lambda e: e.update(captions=[]), "captions", "non-empty list"),
    (lambda e: e.update(captions="a man in red"), "captions", "non-empty list"),
    (lambda e: e.update(captions=["ok.", "  "]), "captions", "caption 1"),
    (lambda e: e.update(captions=["ok.", 7]), "captions", "caption 1"),
    (lambda e: e.update(id="12"), "id", "without quotes"),
    (lambda e: e.update(id=3.5), "id", "integer"),
    (lambda e: e.update(id=True), "id", "integer"),
    (lambda e: e.update(id=-1), "id", "out of range"),
    (lambda e: e.update(split="dev"), "split", "one of train, val, test"),
    (lambda e: e.update(file_path="/etc/passwd"), "file_path", "absolute"),
    (lambda e: e.update(file_path="C:/imgs/a.jpg"), "file_path", "absolute"),
    (lambda e: e.update(file_path="s3://bucket/a.jpg"), "file_path", "absolute"),
    (lambda e: e.update(file_path="../secret.jpg"), "file_path", "escape"),
    (lambda e: e.update(file_path="CUHK01/../../secret.jpg"), "file_path", "escape"),
    (lambda e: e.update(file_path="CUHK01\\a.jpg"), "file_path", "backslash"),
    (lambda e: e.update(file_path="CUHK01/"), "file_path", "folder"),
    (lambda e: e.update(file_path=""), "file_path", "non-empty string"),
    (lambda e: e.update(captions=["bad \ud800 text"]), "captions", "lone surrogate"),
    (lambda e: e.update(file_path="CUHK01/0001001.png"), "file_path", "already listed by entry 0"),
    (lambda e: e.update(file_path="CUHK01/0001001.png", id=9), "file_path", "with id 1 and here with id 9"),
    (lambda e: e.update(split="test"), "split", "one split"),
]


@pytest.mark.parametrize("mutate, field, reason", BAD_ENTRIES)
def test_bad_entry_names_file_index_and_field(tmp_path, mutate, field, reason):
    entries = [cuhk_entry(1, "CUHK01/0001001.png"), cuhk_entry(1, "CUHK01/0001002.png"),
               cuhk_entry(2, "CUHK01/0002001.png")]
    mutate(entries[1])
    root = write_json(tmp_path, "reid_raw.json", entries)
    with pytest.raises(DataError) as caught:
        read_dataset(str(root))
    message = str(caught.value)
    assert "reid_raw.json" in message and "entry 1" in message and f"field {field!r}" in message
    assert reason in message
    assert (caught.value.entry, caught.value.field) == (1, field)


def test_entry_that_is_not_an_object(tmp_path):
    root = write_json(tmp_path, "reid_raw.json", [cuhk_entry(1, "a.jpg"), ["not", "an", "object"]])
    with pytest.raises(DataError, match=r"reid_raw.json, entry 1: expected a JSON object"):
        read_dataset(str(root))


def test_non_utf8_file_names_the_byte_offset(tmp_path):
    text = json.dumps([cuhk_entry(1, "a.jpg", captions=["caf\u00e9"])], ensure_ascii=False).encode("utf-8")
    bad = text.replace("é".encode("utf-8"), b"\xe9")  # Latin-1 é inside UTF-8 text
    (tmp_path / "reid_raw.json").write_bytes(bad)
    with pytest.raises(DataError, match=rf"reid_raw.json: not valid UTF-8: byte offset {bad.index(0xE9)}"):
        read_dataset(str(tmp_path))


def test_broken_json_and_wrong_top_level(tmp_path):
    (tmp_path / "reid_raw.json").write_text('[{"id": 1,')
    with pytest.raises(DataError, match="not valid JSON.*line 1"):
        read_dataset(str(tmp_path))
    (tmp_path / "reid_raw.json").write_text('{"id": 1}')
    with pytest.raises(DataError, match="expected a JSON list"):
        read_dataset(str(tmp_path))


def bad_dataset(tmp_path):
    entries = cuhk_entries()
    entries[1]["id"] = "1"  # string id
    entries[3]["captions"] = []
    entries.append(cuhk_entry(9, "CUHK01/0001001.png"))  # same image as entry 0, another id
    return write_json(tmp_path / "data", "reid_raw.json", entries)


def test_skip_mode_writes_rejects_and_counts_them(tmp_path, caplog):
    rejects = tmp_path / "rejects.jsonl"
    with caplog.at_level(logging.WARNING):
        table = read_dataset(str(bad_dataset(tmp_path)), on_error="skip", rejects_uri=str(rejects))
    records = [json.loads(line) for line in rejects.read_text().splitlines()]
    # Entry 0 and entry 8 disagree on the person of one image: neither is kept.
    where = [(r["entry"], r["field"]) for r in records]
    assert where == [(0, "file_path"), (1, "id"), (3, "captions"), (8, "file_path")]
    assert all(r["file"].endswith("reid_raw.json") and r["reason"] for r in records)
    assert table.num_rows == len(cuhk_entries()) - 3
    assert manifest_info(table)["rejected"] == 4
    assert "skipped 4 bad entries" in caplog.text


def test_skip_mode_parquet_rejects(tmp_path):
    rejects = tmp_path / "rejects.parquet"
    read_dataset(str(bad_dataset(tmp_path)), on_error="skip", rejects_uri=str(rejects))
    assert pq.read_table(rejects).column_names == ["file", "entry", "field", "reason"]
    assert pq.read_table(rejects).num_rows == 4


def test_skip_mode_without_usable_entries_is_an_error(tmp_path):
    root = write_json(tmp_path, "reid_raw.json", [{"id": "x"}])
    with pytest.raises(DataError, match=r"no usable entries \(1 rejected\)"):
        read_dataset(str(root), on_error="skip")


def test_bad_options(tmp_path):
    root = write_json(tmp_path, "reid_raw.json", cuhk_entries())
    with pytest.raises(ConfigError):
        read_dataset(str(root), on_error="ignore")
    with pytest.raises(ConfigError, match="on_error='skip'"):
        read_dataset(str(root), rejects_uri=str(tmp_path / "r.jsonl"))
    with pytest.raises(ConfigError, match="unknown dataset format"):
        read_dataset(str(root), fmt="market")
