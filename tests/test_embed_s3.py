"""Bulk embedding against a real S3 endpoint (moto's server on loopback): read, write,
resume after a killed driver, and rejects for damaged images."""

import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tpr_ray.io import storage
from tpr_ray.embedding.pipeline import EmbedConfig, embed
from tpr_ray.tables import SIDECAR, rejects_dir
from tpr_ray.embedding.plan import plan_fingerprint, plan_shards
from tpr_ray.errors import ConfigError, DataError
from tests.helpers import save_tiny_checkpoint


def test_shard_plan_covers_every_row_once():
    assert plan_shards(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_shards(8, 4) == [(0, 4), (4, 8)]
    assert plan_shards(0, 4) == []
    with pytest.raises(ConfigError):
        plan_shards(5, 0)


def test_fingerprint_depends_on_order_and_settings():
    import pyarrow as pa

    def fp(keys, rows_per_shard):
        return plan_fingerprint(pa.table({"image_uri": keys}), {"rows_per_shard": rows_per_shard})

    a = fp(["x", "y"], 2)
    assert a == fp(["x", "y"], 2)
    assert a != fp(["y", "x"], 2)
    assert a != fp(["x", "y"], 3)


def test_fingerprint_covers_every_column_and_values_cannot_join_into_a_collision():
    import pyarrow as pa

    base = {"image_id": ["a", "b"], "person_id": pa.array([1, 2], pa.int64()), "image_uri": ["u1", "u2"]}

    def fp(**changed):
        return plan_fingerprint(pa.table({**base, **changed}), {})

    assert fp() == fp()
    assert fp() != fp(person_id=pa.array([1, 3], pa.int64()))  # corrected annotations, same images
    assert fp() != fp(image_id=["a", "c"])
    assert fp() != fp(person_id=pa.array([1, None], pa.int64()))
    assert fp(image_id=["a\nb", "c"]) != fp(image_id=["a", "b\nc"])  # a separator inside a value
    assert fp(image_id=["ab", ""]) != fp(image_id=["a", "b"])
    assert fp(image_id=["", "b"]) != fp(image_id=pa.array([None, "b"], pa.string()))
    chunked = pa.table({**base, "image_id": pa.chunked_array([["a"], ["b"]])})
    assert plan_fingerprint(chunked, {}) == fp()  # how Arrow happens to chunk the input does not matter
    assert plan_fingerprint(pa.table({**base, "image_id": pa.array(["a", "b"], pa.large_string())}), {}) == fp()
    sliced = pa.table(
        {k: (v if k != "image_id" else pa.array(["z", "a", "b"]).slice(1)) for k, v in base.items()})
    assert plan_fingerprint(sliced, {}) == fp()


def test_job_fingerprint_changes_with_the_checkpoint_content_and_the_manifest_version(tmp_path):
    import pyarrow as pa

    from tpr_ray.embedding.pipeline import job_settings
    from tpr_ray.embedding.plan import plan_fingerprint

    def job_fingerprint(kind, rows, checkpoint, rows_per_shard, image_size, manifest_version):
        settings = job_settings(kind, checkpoint, rows_per_shard, image_size, manifest_version)
        return plan_fingerprint(rows, settings), settings

    path = save_tiny_checkpoint(str(tmp_path / "ckpt"))
    rows = pa.table({"image_id": ["a"], "person_id": pa.array([1], pa.int64()), "image_uri": ["u"]})
    first, settings = job_fingerprint("gallery", rows, path, 10, (384, 128), "v1")
    assert job_fingerprint("gallery", rows, path, 10, (384, 128), "v1")[0] == first
    assert job_fingerprint("gallery", rows, path, 10, (384, 128), "v2")[0] != first
    save_tiny_checkpoint(path, seed=1)  # other weights written at the same path
    assert job_fingerprint("gallery", rows, path, 10, (384, 128), "v1")[0] != first
    assert settings["manifest_version"] == "v1" and settings["checkpoint_digest"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "checkpoint"))


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def damaged_gallery() -> dict[str, bytes]:
    """Readable images in awkward formats, and unreadable ones (name -> bytes)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (300, 100, 3), dtype=np.uint8))
    good = _jpeg(rgb)
    return {
        "ok/plain.jpg": good,
        "ok/gray.png": _png(rgb.convert("L")),
        "ok/rgba.png": _png(rgb.convert("RGBA")),
        "ok/cmyk.jpg": _jpeg(rgb.convert("CMYK")),
        "ok/sixteen_bit.png": _png(Image.fromarray((rng.integers(0, 65535, (200, 80))).astype(np.uint16))),
        "ok/palette.png": _png(rgb.convert("P")),
        "ok/large.jpg": _jpeg(Image.new("RGB", (6000, 9000), (200, 30, 30)), quality=50),
        "bad/corrupt.jpg": b"this is not an image at all" * 10,
        "bad/truncated.jpg": good[: len(good) // 2],
        "bad/empty.png": b"",
    }


@pytest.mark.slow
def test_damaged_gallery_on_s3_embeds_readable_images_and_records_rejects(ray_cluster, s3_bucket, checkpoint):
    files = damaged_gallery()
    for name, data in files.items():
        storage.write_bytes_atomic(f"{s3_bucket}/damaged/{name}", data)
    out = f"{s3_bucket}/emb-damaged"
    cfg = EmbedConfig(checkpoint=checkpoint, images=f"{s3_bucket}/damaged/**/*.*", out=out, batch_size=4,
                      rows_per_shard=4, block_rows=4, max_reject_rate=0.5)
    info = embed(cfg)["gallery"]
    assert info["inputs"] == 10 and info["rows"] == 7 and info["rejected"] == 3
    table = pq.read_table(f"{out}/gallery".replace("s3://", ""), filesystem=storage.filesystem(out)[0])
    assert sorted(table.column("image_id").to_pylist()) == sorted(n for n in files if n.startswith("ok/"))
    emb = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, 64)
    assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert table.column("person_id").null_count == 7  # a bare gallery has no identities

    fs, path = storage.filesystem(rejects_dir(f"{out}/gallery"))
    rejects = pq.read_table(path, filesystem=fs)
    reasons = dict(zip(rejects.column("image_id").to_pylist(), rejects.column("reason").to_pylist()))
    assert sorted(reasons) == ["bad/corrupt.jpg", "bad/empty.png", "bad/truncated.jpg"]
    assert all(reasons.values())
    sidecar = storage.read_json(f"{out}/gallery/{SIDECAR}")
    assert sidecar["complete"] and sidecar["rejected"] == 3 and sidecar["rows"] == 7

    again = embed(cfg)["gallery"]  # a finished job re-run does nothing and changes nothing
    assert again["rows_this_run"] == 0 and again["shards"] == info["shards"]

    with pytest.raises(ConfigError, match="different embedding job"):
        embed(EmbedConfig(checkpoint=checkpoint, images=f"{s3_bucket}/damaged/**/*.*", out=out, rows_per_shard=5))


@pytest.mark.slow
def test_gallery_where_everything_is_rejected_is_an_error(ray_cluster, s3_bucket, checkpoint):
    for i in range(3):
        storage.write_bytes_atomic(f"{s3_bucket}/allbad/{i}.jpg", b"garbage")
    with pytest.raises(DataError, match="every one of the 3 images was rejected"):
        embed(EmbedConfig(checkpoint=checkpoint, images=f"{s3_bucket}/allbad/", out=f"{s3_bucket}/emb-allbad",
                          max_reject_rate=1.0))


def _sidecar_or_none(uri):
    try:
        return storage.read_json(uri)
    except Exception:
        return None


@pytest.mark.slow
def test_killed_driver_then_rerun_gives_every_image_exactly_once(ray_cluster, s3_bucket, checkpoint, tmp_path):
    rng = np.random.default_rng(1)
    names = [f"cam{c}/{i:04d}.jpg" for c in range(3) for i in range(50)]
    fs, bucket = storage.filesystem(s3_bucket)
    fs.pipe({f"{bucket}/big/{name}": _jpeg(Image.fromarray(rng.integers(0, 255, (96, 32, 3), dtype=np.uint8)))
             for name in names})
    out = f"{s3_bucket}/emb-killed"
    args = ["--checkpoint", checkpoint, "--images", f"{s3_bucket}/big/**/*.jpg", "--out", out,
            "--rows-per-shard", "5", "--batch-size", "5"]
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "embed", *args], cwd=os.getcwd(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": "local"})
    deadline = time.time() + 240

    def committed():  # while the job runs, its shard files are the record of what is committed
        try:
            return len([p for p in fs.ls(f"{bucket}/emb-killed/gallery", refresh=True) if p.endswith(".parquet")])
        except FileNotFoundError:
            return 0

    while time.time() < deadline and proc.poll() is None and committed() < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    sidecar = _sidecar_or_none(f"{out}/gallery/{SIDECAR}")
    assert sidecar is not None and not sidecar["complete"], "the job must be killed mid-run"
    committed_before = committed()
    assert 3 <= committed_before < 30

    info = embed(EmbedConfig(checkpoint=checkpoint, images=f"{s3_bucket}/big/**/*.jpg", out=out,
                             rows_per_shard=5, batch_size=5))["gallery"]
    assert info["complete"] and len(info["shards"]) == 30
    assert info["rows_this_run"] == 150 - 5 * committed_before
    ids = pq.read_table(f"{bucket}/emb-killed/gallery", filesystem=fs).column("image_id").to_pylist()
    assert len(ids) == 150 and sorted(ids) == sorted(names)  # nothing lost, nothing twice


def test_an_interrupted_atomic_write_leaves_nothing_a_reader_would_take_for_data(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "part-00000.parquet")
    storage.write_bytes_atomic(str(tmp_path / "part-00001.parquet"), (tmp_path / "part-00000.parquet").read_bytes())
    # what a writer killed between writing and moving leaves behind:
    leftover = tmp_path / f"{storage.TEMP_PREFIX}part-00002.parquet.deadbeef"
    leftover.write_bytes((tmp_path / "part-00000.parquet").read_bytes())
    assert pq.read_table(tmp_path).num_rows == 4  # pyarrow ignores the "_"-prefixed leftover
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert storage.remove_temporaries(str(tmp_path)) == 1 and not leftover.exists()


@pytest.mark.slow
def test_credentials_revoked_mid_job_stop_it_and_the_rerun_rejects_nothing(ray_cluster, s3_bucket, checkpoint,
                                                                           tmp_path, monkeypatch):
    """An STS token expiring mid-job: moto starts refusing every request (403) after a budget of
    requests, the job stops naming the image, nothing is recorded as a reject; once credentials
    are back the same command finishes with every image."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    from tpr_ray.embedding import pipeline as embed_module
    rng = np.random.default_rng(2)
    names = [f"{i:03d}.jpg" for i in range(40)]
    fs, bucket = storage.filesystem(s3_bucket)
    fs.pipe({f"{bucket}/revoked/{n}": _jpeg(Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)))
             for n in names})
    listed = embed_module.gallery_rows

    def list_then_revoke_soon(*args, **kwargs):
        rows = listed(*args, **kwargs)  # after the listing, ~10 more requests go through, then all get 403
        monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", ActionAuthenticatorMixin.request_count + 10)
        return rows

    monkeypatch.setattr(embed_module, "gallery_rows", list_then_revoke_soon)
    out = str(tmp_path / "emb")  # the output is local: only the image reads lose their credentials
    cfg = EmbedConfig(checkpoint=checkpoint, images=f"{s3_bucket}/revoked/", out=out, batch_size=5, rows_per_shard=5,
                      block_rows=5, read_retries=1)
    with pytest.raises(DataError, match=r"file s3://tpr-test/revoked/\d{3}\.jpg: could not read it now \(.*(403|Forbidden|"
                                        r"Access|Permission)"):
        embed(cfg)
    sidecar = storage.read_json(f"{out}/gallery/{SIDECAR}")
    committed = [n for n in os.listdir(f"{out}/gallery") if n.startswith("part-")]
    assert not sidecar["complete"] and len(committed) < 8
    assert not os.path.exists(rejects_dir(f"{out}/gallery"))  # nothing rejected

    monkeypatch.setattr(embed_module, "gallery_rows", listed)
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))  # credentials restored
    info = embed(cfg)["gallery"]
    assert info["complete"] and info["rows"] == 40 and info["rejected"] == 0
    assert info["rows_this_run"] == 40 - 5 * len(committed)
    ids = pq.read_table(f"{out}/gallery").column("image_id").to_pylist()
    assert sorted(ids) == names


def test_the_output_lease_works_on_s3(s3_bucket):
    from tpr_ray.io.lease import LEASE_FILE, Lease, LeaseHeld

    out = f"{s3_bucket}/leased"
    with Lease(out, settle_s=0.1) as first:
        with pytest.raises(LeaseHeld, match="being written by another job"):
            Lease(out, settle_s=0.1).acquire()
        record = storage.read_json(f"{out}/{LEASE_FILE}")
        assert record["owner"] == first.owner and record["pid"] == os.getpid() and record["expires"] > time.time()
        first.check()
    assert not storage.exists(f"{out}/{LEASE_FILE}")
    with Lease(out, settle_s=0.1):
        pass


def test_an_atomic_write_to_s3_is_one_upload_without_a_copy_and_a_failed_one_leaves_nothing(s3_bucket,
                                                                                           monkeypatch):
    """S3 makes an object visible only once its upload (single PUT, or multipart upload) is
    complete, so a shard goes up once, under its own name: no temporary object, no server-side
    copy (which would double the requests and bytes of every shard)."""
    fs, _ = storage.filesystem(s3_bucket)
    calls = []
    call_s3 = fs._call_s3

    async def recorded(method, *args, **kwargs):
        calls.append(method if isinstance(method, str) else getattr(method, "__name__", str(method)))
        return await call_s3(method, *args, **kwargs)

    monkeypatch.setattr(fs, "_call_s3", recorded)
    storage.write_bytes_atomic(f"{s3_bucket}/atomic/part-00000.parquet", memoryview(b"x" * 1000))
    assert storage.read_bytes(f"{s3_bucket}/atomic/part-00000.parquet") == b"x" * 1000
    assert not any("copy" in c.lower() for c in calls) and sum("put_object" in c for c in calls) == 1, calls

    async def failing(method, *args, **kwargs):
        raise ConnectionError("network gone mid-upload")

    monkeypatch.setattr(fs, "_call_s3", failing)
    with pytest.raises(ConnectionError):
        storage.write_bytes_atomic(f"{s3_bucket}/atomic/part-00001.parquet", b"y" * 1000)
    monkeypatch.setattr(fs, "_call_s3", call_s3)
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/atomic", detail=False)] == ["part-00000.parquet"]


@pytest.mark.slow
def test_a_parquet_listing_on_s3_embeds_the_images_it_names_in_its_order(ray_cluster, s3_bucket, checkpoint):
    """`--images listing.parquet`: the way to a gallery too large to list in the driver. The
    rows follow the listing's order, relative keys resolve next to the listing, the listing's
    ids and person ids are kept, and each image's embedding is the model's on its pixels."""
    import pyarrow as pa

    rng = np.random.default_rng(3)
    names = [f"cam{i % 2}/{i:03d}.jpg" for i in range(6)]
    fs, bucket = storage.filesystem(s3_bucket)
    fs.pipe({f"{bucket}/listed/imgs/{n}": _jpeg(Image.fromarray(rng.integers(0, 255, (96, 32, 3), dtype=np.uint8)))
             for n in names})
    order = [4, 0, 5, 2, 1, 3]
    buf = io.BytesIO()
    pq.write_table(pa.table({"image_uri": [f"imgs/{names[i]}" if i % 2 else f"{s3_bucket}/listed/imgs/{names[i]}"
                                           for i in order],
                             "image_id": [f"id{i}" for i in order], "person_id": [100 + i for i in order]}), buf)
    storage.write_bytes_atomic(f"{s3_bucket}/listed/listing.parquet", buf.getvalue())

    listed = embed(EmbedConfig(checkpoint=checkpoint, images=f"{s3_bucket}/listed/listing.parquet",
                               out=f"{s3_bucket}/emb-listed", rows_per_shard=4, batch_size=4))["gallery"]
    assert listed["rows"] == 6 and listed["source"].endswith("listing.parquet")
    a = pq.read_table(f"{bucket}/emb-listed/gallery", filesystem=fs)
    assert a.column("image_id").to_pylist() == [f"id{i}" for i in order]
    assert a.column("person_id").to_pylist() == [100 + i for i in order]
    uris = a.column("image_uri").to_pylist()
    assert uris == [f"{s3_bucket}/listed/imgs/{names[i]}" for i in order]

    from tpr_ray.model.checkpoint import load_method
    from tpr_ray.io.images import decode_image, resize_uint8
    from tpr_ray.model.encode import encode_images

    method, _ = load_method(checkpoint)
    pixels = np.stack([resize_uint8(decode_image(storage.read_bytes(u)), (384, 128)) for u in uris])
    np.testing.assert_allclose(np.array(a.column("embedding").to_pylist()),
                               encode_images(method, pixels, torch.device("cpu")), rtol=0, atol=1e-5)


def test_two_writers_racing_for_a_free_output_on_s3_cannot_both_take_it(s3_bucket):
    """S3's conditional write (If-None-Match) makes taking a free lease one atomic step."""
    from tests.test_fault_tolerance import race_two_fresh_writers

    assert race_two_fresh_writers(f"{s3_bucket}/raced") == ["held", "refused"]
