"""Unreadable training images: found before any worker starts, then a clear error or a counted skip."""

import errno
import shutil

import pytest

from tpr_ray.io import storage
from tpr_ray.data import load_manifest, selection_split
from tpr_ray.errors import DataError
from tpr_ray.training.config import TrainConfig
from tpr_ray.training.driver import train
from tpr_ray.training.inputs import check_images, find_unreadable_images, load_training_data

SIZE = (32, 16)


@pytest.fixture
def broken_copy(cuhk_small, tmp_path):
    """cuhk_small with two damaged train images: one truncated, one emptied. Returns (root, [uris])."""
    root = tmp_path / "CUHK-PEDES"
    shutil.copytree(cuhk_small, root)
    train_rows, _ = selection_split(load_manifest(str(root)))
    uris = sorted(set(train_rows.column("image_uri").to_pylist()))[:2]
    with open(uris[0], "rb") as f:
        data = f.read()
    with open(uris[0], "wb") as f:
        f.write(data[: len(data) // 2])
    open(uris[1], "wb").close()
    return str(root), uris


def test_unreadable_images_are_listed_with_their_reason(broken_copy, tmp_path):
    root, uris = broken_copy
    (tmp_path / "notes.jpg").write_text("not an image")
    candidates = uris + [str(tmp_path / "notes.jpg")]
    bad = dict(find_unreadable_images(candidates, SIZE, threads=2))
    assert set(bad) == set(candidates)
    assert "truncated" in bad[uris[0]]
    assert bad[uris[1]].startswith("UnidentifiedImageError")


def test_a_missing_image_stops_the_check_instead_of_being_skipped(broken_copy, tmp_path, monkeypatch):
    """Missing on this node is not proof of a bad image (a mount, an object not visible yet):
    the check stops naming it rather than let --bad-images skip drop it."""
    monkeypatch.setattr("tpr_ray.io.images.FETCH_BACKOFF_S", 0.0)
    with pytest.raises(DataError, match="missing.jpg"):
        find_unreadable_images([str(tmp_path / "missing.jpg")], SIZE, threads=1)


def test_a_fault_of_access_stops_the_check_instead_of_skipping_the_image(broken_copy, monkeypatch):
    root, uris = broken_copy

    def denied(uri):
        raise PermissionError(errno.EACCES, "Access Denied (403)")

    monkeypatch.setattr(storage, "read_bytes", denied)
    with pytest.raises(DataError, match="not a bad image but a fault of access"):
        find_unreadable_images(uris, SIZE, threads=1)


def test_training_fails_before_ray_starts_listing_the_unreadable_images(broken_copy, tmp_path):
    root, uris = broken_copy
    cfg = TrainConfig(method="baseline", data=root, out=str(tmp_path / "runs"), model="tpr-tiny", pretrained=None)
    with pytest.raises(DataError, match="2 of .* training images cannot be decoded") as error:
        train(cfg)
    assert all(uri in str(error.value) for uri in uris) and "--bad-images skip" in str(error.value)
    assert not (tmp_path / "runs").exists()  # nothing started


def test_skip_leaves_exactly_the_unreadable_images_out(broken_copy):
    root, uris = broken_copy
    skipped = check_images(root, SIZE, "skip", holdout_fraction=0.05, seed=0)
    assert sorted(skipped) == sorted(uris)
    full = load_training_data(root, 0.05, 0)
    kept = load_training_data(root, 0.05, 0, exclude=skipped)
    assert set(full.train.column("image_uri").to_pylist()) - set(kept.train.column("image_uri").to_pylist()) == set(uris)
    assert kept.train.num_rows == full.train.num_rows - 2 and kept.val.num_rows == full.val.num_rows
    assert check_images(root, SIZE, "off", 0.05, 0) == []
