import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from tpr_ray.training import decoded_cache
from tpr_ray.data.manifest import build_manifest, read_manifest, write_manifest
from tpr_ray.errors import ConfigError, DataError
from tpr_ray.embedding.inputs import manifest_split
from tpr_ray.io.images import decode_image, resize_uint8
from tpr_ray.training.inputs import CaptionPairs
from tpr_ray.model.transforms import normalize

SIZE = (32, 16)


def _dataset(tmp_path, n=10, broken=(), version="v1"):
    """A manifest of ``n`` PNG crops of varied sizes (two captions each); ``broken`` rows hold junk bytes."""
    rng = np.random.default_rng(0)
    rows = {"image_id": [], "person_id": [], "split": [], "image_uri": [], "captions": [], "dataset": []}
    for k in range(n):
        path = tmp_path / "imgs" / f"{k}.png"
        path.parent.mkdir(exist_ok=True)
        if k in broken:
            path.write_bytes(b"not an image")
        else:
            h, w = int(rng.integers(20, 90)), int(rng.integers(10, 40))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        rows["image_id"].append(f"img{k}")
        rows["person_id"].append(k // 2)
        rows["split"].append("train")
        rows["image_uri"].append(str(path))
        rows["captions"].append([f"person {k // 2} view {k} a", f"person {k // 2} view {k} b"])
        rows["dataset"].append("test")
    uri = str(tmp_path / "manifest.parquet")
    # "source" names the dataset folder, whose imgs/ the manifest's image URIs must lie under
    info = {"dataset": "test", "version": version, "source": str(tmp_path / "reid_raw.json")}
    write_manifest(build_manifest(rows, info), uri)
    return uri


def test_cache_key_changes_with_version_rows_split_and_size(tmp_path):
    rows = manifest_split(_dataset(tmp_path), "train")
    key = decoded_cache.cache_key(rows, "v1", "train", SIZE)
    assert key.startswith("train-32x16-") and key == decoded_cache.cache_key(rows, "v1", "train", SIZE)
    others = {decoded_cache.cache_key(rows, "v2", "train", SIZE), decoded_cache.cache_key(rows, "v1", "val", SIZE),
              decoded_cache.cache_key(rows, "v1", "train", (32, 17)),
              decoded_cache.cache_key(rows.slice(1), "v1", "train", SIZE)}
    assert key not in others and len(others) == 4


def test_build_stores_the_decoded_crops_and_reports_unreadable_images(tmp_path):
    manifest = _dataset(tmp_path, broken=(3,))
    out = decoded_cache.ensure(manifest, "train", SIZE, str(tmp_path / "cache"), executor="local", rows_per_shard=4)
    assert os.path.dirname(out) == str(tmp_path / "cache")
    ids, pixels, info = decoded_cache.load(out)
    assert ids == [f"img{k}" for k in range(10)] and pixels.shape == (10, 32, 16, 3)
    assert info["shards"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert info["rejected"] == 1 and info["rejects"][0]["image_id"] == "img3"
    assert "UnidentifiedImageError" in info["rejects"][0]["reason"]
    assert info["manifest_version"] == "v1" and info["image_size"] == [32, 16]
    uris = read_manifest(manifest).column("image_uri").to_pylist()
    for k in (0, 5, 9):
        with open(uris[k], "rb") as f:
            expected = resize_uint8(decode_image(f.read()), SIZE)
        assert np.array_equal(pixels[k], expected)
    assert not pixels[3].any()


def test_default_root_is_beside_the_manifest(tmp_path):
    assert decoded_cache.default_root(str(tmp_path / "m.parquet")) == str(tmp_path / "tpr-ray-decoded")
    assert decoded_cache.default_root("s3://b/data/CUHK-PEDES/") == "s3://b/data/CUHK-PEDES/tpr-ray-decoded"


def test_an_interrupted_build_is_never_read_and_is_completed_by_the_next(tmp_path):
    manifest = _dataset(tmp_path)
    rows = manifest_split(manifest, "train")
    out = str(tmp_path / "cache" / "x")
    decoded_cache.build(rows, out, SIZE, executor="local", rows_per_shard=4)
    # simulate a build killed after one shard: no marker, a missing shard, a temporary left behind
    os.remove(os.path.join(out, decoded_cache.MARKER))
    os.remove(os.path.join(out, "part-00001.parquet"))
    (tmp_path / "cache" / "x" / "_tmp.part-00002.parquet.1234").write_bytes(b"partial")
    with pytest.raises(DataError, match="not a finished decoded cache"):
        decoded_cache.load(out)
    kept = os.stat(os.path.join(out, "part-00000.parquet")).st_mtime_ns
    info = decoded_cache.build(rows, out, SIZE, executor="local", rows_per_shard=4)
    assert info["rows"] == 10 and os.stat(os.path.join(out, "part-00000.parquet")).st_mtime_ns == kept
    assert sorted(os.listdir(out)) == [decoded_cache.MARKER] + [f"part-0000{k}.parquet" for k in range(3)]


def test_a_shard_of_another_build_is_refused(tmp_path):
    rows = manifest_split(_dataset(tmp_path), "train")
    out = str(tmp_path / "c")
    decoded_cache.build(rows.slice(0, 4), out, SIZE, executor="local", rows_per_shard=4)
    os.remove(os.path.join(out, decoded_cache.MARKER))
    with pytest.raises(DataError, match="6 rows missing"):
        decoded_cache._verify_and_mark(out, rows, {})


def test_an_exception_from_the_decode_stage_fails_the_build_and_records_nothing(tmp_path, monkeypatch):
    """A fault the decode stage raises (not one it records as unreadable) stops the job: no reject,
    no marker, and the next build decodes the rows again."""
    manifest = _dataset(tmp_path)
    rows = manifest_split(manifest, "train")
    out = str(tmp_path / "c")
    real = decoded_cache.decode_batch

    def flaky(batch, image_size):
        if "img5" in list(batch["image_id"]):
            raise PermissionError("403 Forbidden (credentials revoked)")
        return real(batch, image_size)

    monkeypatch.setattr(decoded_cache, "decode_batch", flaky)
    with pytest.raises(PermissionError, match="403"):
        decoded_cache.build(rows, out, SIZE, executor="local", rows_per_shard=4)
    assert not os.path.exists(os.path.join(out, decoded_cache.MARKER))
    assert sorted(os.listdir(out)) == ["part-00000.parquet"]  # the shard before the fault, nothing of its own
    monkeypatch.setattr(decoded_cache, "decode_batch", real)
    info = decoded_cache.build(rows, out, SIZE, executor="local", rows_per_shard=4)
    assert info["rows"] == 10 and info["rejected"] == 0


def test_a_fetch_that_keeps_failing_stops_the_build_instead_of_becoming_a_reject(tmp_path, monkeypatch):
    from tpr_ray.io import images
    from tpr_ray.io import storage
    manifest = _dataset(tmp_path)
    rows = manifest_split(manifest, "train")
    out = str(tmp_path / "c")
    real = storage.read_bytes

    def revoked(uri):
        if uri.endswith("/6.png"):
            raise PermissionError("403 Forbidden: credentials revoked")
        return real(uri)

    monkeypatch.setattr(images, "FETCH_BACKOFF_S", 0.0)
    monkeypatch.setattr(storage, "read_bytes", revoked)
    with pytest.raises(images.ImageReadError, match="could not read .*6.png: PermissionError: 403"):
        decoded_cache.build(rows, out, SIZE, executor="local", rows_per_shard=4)
    assert not os.path.exists(os.path.join(out, decoded_cache.MARKER))
    monkeypatch.setattr(storage, "read_bytes", real)  # credentials restored: every image, none rejected
    info = decoded_cache.build(rows, out, SIZE, executor="local", rows_per_shard=4)
    assert info["rows"] == 10 and info["rejected"] == 0


def test_training_refuses_a_cache_that_lost_images_the_check_read():
    from tpr_ray.training.driver import check_cache_rejects

    marker = {"rejects": [{"image_id": "a", "image_uri": "/d/imgs/a.jpg", "reason": "OSError: [Errno 5] I/O error"}]}
    with pytest.raises(DataError, match="records 1 image.* the up-front check read .*/d/imgs/a.jpg"):
        check_cache_rejects(marker, [], "fail", "/cache/train-x")
    check_cache_rejects(marker, ["/d/imgs/a.jpg"], "skip", "/cache/train-x")  # the check found it unreadable too
    check_cache_rejects(marker, [], "off", "/cache/train-x")  # nothing was checked: the cache's rejects stand


def test_decoded_stream_needs_the_decoded_cache_before_ray_starts(tmp_path, monkeypatch):
    from tpr_ray.io import cluster as ray_utils
    from tpr_ray.training.config import TrainConfig
    from tpr_ray.training.driver import train

    monkeypatch.setattr(ray_utils, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(ConfigError, match="--decoded-stream streams the decoded cache: give --decoded-cache"):
        train(TrainConfig(method="baseline", data=str(tmp_path), out=str(tmp_path / "runs"), decoded_stream=True))


def _todays_batches(rows, labels, world, rank, batch, epoch):
    dataset = CaptionPairs(rows, labels, SIZE, augment=False)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=7, drop_last=True)
    sampler.set_epoch(epoch)
    return list(DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=0))


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_cached_pairs_sample_exactly_as_the_dataloader_does(tmp_path, world, rank):
    manifest = _dataset(tmp_path)
    rows = manifest_split(manifest, "train")
    labels = {pid: i for i, pid in enumerate(sorted(set(rows.column("person_id").to_pylist())))}
    cache = decoded_cache.ensure(manifest, "train", SIZE, str(tmp_path / "cache"), executor="local")
    pairs = decoded_cache.CachedPairs(cache, rows, labels, 3, world, rank, seed=7, device="cpu", augment=False)
    for epoch in (0, 1):
        pairs.set_epoch(epoch)
        ours, today = list(pairs), _todays_batches(rows, labels, world, rank, 3, epoch)
        assert len(ours) == len(today) == len(pairs) == 20 // world // 3
        for a, b in zip(ours, today):
            assert a["caption"] == b["caption"]
            assert torch.equal(a["label"], b["label"]) and torch.equal(a["person_id"], b["person_id"])
            torch.testing.assert_close(a["images"], normalize(b["image"]), atol=2e-6, rtol=0)


def test_cached_pairs_leave_out_unreadable_images_and_augment_when_asked(tmp_path, caplog):
    manifest = _dataset(tmp_path, broken=(0,))
    rows = manifest_split(manifest, "train")
    labels = {pid: pid for pid in range(5)}
    cache = decoded_cache.ensure(manifest, "train", SIZE, None, executor="local")
    assert cache.startswith(str(tmp_path / "tpr-ray-decoded"))
    pairs = decoded_cache.CachedPairs(cache, rows, labels, 2, 1, 0, seed=0, device="cpu", augment=True)
    assert len(pairs.items) == 18 and "2 caption(s) of 1 unreadable image(s) are left out" in caplog.text
    batches = list(pairs)
    assert all("view 0 " not in c for b in batches for c in b["caption"])
    plain = decoded_cache.CachedPairs(cache, rows, labels, 2, 1, 0, seed=0, device="cpu", augment=False)
    assert not all(torch.equal(a["images"], b["images"]) for a, b in zip(batches, plain))


@pytest.mark.slow
def test_ray_data_build_equals_the_local_build(ray_cluster, tmp_path):
    manifest = _dataset(tmp_path, broken=(4,))
    ray_out = decoded_cache.ensure(manifest, "train", SIZE, str(tmp_path / "ray"), rows_per_shard=3)
    local_out = decoded_cache.ensure(manifest, "train", SIZE, str(tmp_path / "local"), executor="local",
                                     rows_per_shard=3)
    (ids_r, px_r, info_r), (ids_l, px_l, info_l) = decoded_cache.load(ray_out), decoded_cache.load(local_out)
    assert ids_r == ids_l and np.array_equal(px_r, px_l)
    assert [r["image_id"] for r in info_r["rejects"]] == [r["image_id"] for r in info_l["rejects"]] == ["img4"]
    assert len(info_r["shards"]) == 4 and os.path.basename(ray_out) == os.path.basename(local_out)


@pytest.mark.slow
def test_training_from_the_cache_takes_the_same_first_step_as_todays_input(ray_cluster, cuhk_small, tmp_path):
    """The Ray Train call site: a run fed by the cache reports the loss today's loader gives in-process."""
    from tests.conftest import TINY
    from tpr_ray.methods.backbone import BackboneConfig
    from tpr_ray.model.checkpoint import read_config
    from tpr_ray.data import load_manifest, selection_split
    from tpr_ray.methods import get_method
    from tpr_ray.training.config import TrainConfig
    from tpr_ray.training.driver import train

    overrides = {"optimizer": "sgd", "lr": 0.5, "batch_size": 8, "augment": False, "warmup_factor": 1.0, "epochs": 1}
    cfg = TrainConfig(method="baseline", data=cuhk_small, out=str(tmp_path / "runs"), name="cached", **TINY,
                      cpus_per_worker=0.5, loader_workers=0, max_steps=1, seed=3, overrides=overrides,
                      decoded_cache=str(tmp_path / "cache"))
    result = train(cfg)
    (cache,) = os.listdir(tmp_path / "cache")
    assert cache.startswith("train-384x128-")
    assert os.path.exists(tmp_path / "cache" / cache / decoded_cache.MARKER)
    reported = read_config(result.latest_checkpoint)["metrics"]["train_loss"]

    train_rows, _ = selection_split(load_manifest(cuhk_small), seed=3)
    labels = {pid: i for i, pid in enumerate(sorted(set(train_rows.column("person_id").to_pylist())))}
    cls = get_method("baseline")
    torch.manual_seed(3)
    method = cls(BackboneConfig("tpr-tiny", None, (384, 128)), cls.default_recipe.override(**overrides), len(labels))
    method.set_stage(method.stages()[0])
    (batch,) = _todays_batches_of(train_rows, labels, batch=8, seed=3)
    with torch.no_grad():
        loss = method({"images": normalize(batch["image"]), "tokens": method.tokenize(batch["caption"]),
                       "person_ids": batch["person_id"], "labels": batch["label"]})["loss"]
    assert reported == pytest.approx(float(loss), rel=1e-4)


def _todays_batches_of(rows, labels, batch, seed):
    dataset = CaptionPairs(rows, labels, (384, 128), augment=False)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
    return [next(iter(DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True, num_workers=0)))]


@pytest.mark.slow
def test_streamed_pairs_are_the_cached_pairs(ray_cluster, tmp_path):
    from tpr_ray.training.augment import BatchAugment

    manifest = _dataset(tmp_path, broken=(2,))
    rows = manifest_split(manifest, "train")
    labels = {pid: pid + 100 for pid in range(5)}
    cache = decoded_cache.ensure(manifest, "train", SIZE, str(tmp_path / "cache"), executor="local", rows_per_shard=3)
    ds = decoded_cache.stream_pairs(cache, rows, labels)
    batches = list(decoded_cache.stream_batches(ds.iterator(), 4, BatchAugment("cpu", augment=False), 8))
    assert len(batches) == 18 // 4
    _, pixels, _ = decoded_cache.load(cache)
    seen = []
    for b in batches:
        for image, caption, pid, label in zip(b["images"], b["caption"], b["person_id"], b["label"]):
            k = int(caption.split()[3])  # "person P view K x"
            assert int(pid) == k // 2 and int(label) == k // 2 + 100 and k != 2
            torch.testing.assert_close(image, normalize(torch.from_numpy(pixels[k:k + 1]))[0], atol=2e-6, rtol=0)
            seen.append(caption)
    assert len(set(seen)) == len(seen) == 16


@pytest.mark.slow
def test_training_can_stream_the_cache_through_ray_data(ray_cluster, cuhk_small, tmp_path):
    from tests.conftest import TINY
    from tpr_ray.model.checkpoint import read_config
    from tpr_ray.training.config import TrainConfig
    from tpr_ray.training.driver import train

    overrides = {"batch_size": 8, "epochs": 1, "lr": 1e-3}
    cfg = TrainConfig(method="baseline", data=cuhk_small, out=str(tmp_path / "runs"), name="streamed", **TINY,
                      cpus_per_worker=0.5, max_steps=2, seed=3, overrides=overrides,
                      decoded_cache=str(tmp_path / "cache"), decoded_stream=True)
    metrics = read_config(train(cfg).latest_checkpoint)["metrics"]
    assert metrics["global_step"] == 2 and np.isfinite(metrics["train_loss"])
