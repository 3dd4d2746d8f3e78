import io

import numpy as np
import pytest
from PIL import Image

from tpr_ray.errors import ConfigError, DataError
from tpr_ray.embedding.inputs import gallery_rows, list_images, query_rows
from tpr_ray.io.images import decode_image, resize_uint8


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_prefix_listing_is_sorted_recursive_and_keeps_only_images(tmp_path):
    for name in ["b/2.jpg", "a/1.PNG", "a/notes.txt", "c/d/3.jpeg"]:
        touch(tmp_path / "g" / name)
    table = list_images(str(tmp_path / "g"))
    assert table.column("image_id").to_pylist() == ["a/1.PNG", "b/2.jpg", "c/d/3.jpeg"]
    assert table.column("image_uri").to_pylist()[0] == str(tmp_path / "g" / "a" / "1.PNG")
    assert table.column("person_id").null_count == 3


def test_glob_listing_ids_are_relative_to_the_fixed_part(tmp_path):
    for name in ["cam1/x.jpg", "cam2/y.jpg", "cam2/y.png"]:
        touch(tmp_path / "g" / name)
    table = list_images(str(tmp_path / "g" / "**" / "*.jpg"))
    assert table.column("image_id").to_pylist() == ["cam1/x.jpg", "cam2/y.jpg"]


def test_empty_listing_and_ambiguous_source_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        list_images(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no such folder"):
        list_images(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="either"):
        gallery_rows(data="x", images="y")


def test_query_rows_number_captions_in_manifest_order():
    import pyarrow as pa
    images = pa.table({"image_id": ["a", "b"], "person_id": [3, 4], "captions": [["c1", "c2"], ["c3"]]})
    q = query_rows(images)
    assert q.column("query_id").to_pylist() == [0, 1, 2]
    assert q.column("image_id").to_pylist() == ["a", "a", "b"]
    assert q.column("person_id").to_pylist() == [3, 3, 4]
    assert q.column("caption").to_pylist() == ["c1", "c2", "c3"]


def test_large_jpeg_is_decoded_reduced_but_never_below_the_target():
    buf = io.BytesIO()
    Image.new("RGB", (4000, 12000), (10, 200, 30)).save(buf, "JPEG")
    img = decode_image(buf.getvalue(), (384, 128))
    assert img.size[0] >= 128 and img.size[1] >= 384 and img.size[0] < 4000
    pixels = resize_uint8(img, (384, 128))
    assert pixels.shape == (384, 128, 3)
    assert np.abs(pixels.reshape(-1, 3).mean(0) - [10, 200, 30]).max() < 3


def _png_bytes(size, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def test_unreadable_bytes_are_rejects_with_a_reason(tmp_path):
    from tpr_ray.io.images import decode_batch

    good = _png_bytes((20, 40))
    files = {"zero.png": b"", "garbage.jpg": b"not an image" * 10, "truncated.png": good[: len(good) // 2],
             "good.png": good}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = decode_batch({"image_uri": np.array([str(tmp_path / n) for n in files], dtype=object)}, (8, 4))
    reasons = dict(zip(files, out["reject_reason"]))
    assert reasons["good.png"] == "" and all(reasons[n] for n in files if n != "good.png")


def test_a_fetch_that_keeps_failing_stops_the_batch_instead_of_rejecting(tmp_path, monkeypatch):
    from tpr_ray.io import images
    from tpr_ray.io import storage
    (tmp_path / "a.png").write_bytes(_png_bytes((20, 40)))
    calls = []

    def forbidden(uri):
        calls.append(uri)
        raise PermissionError("403 Forbidden: the security token included in the request is expired")

    monkeypatch.setattr(storage, "read_bytes", forbidden)
    monkeypatch.setattr(images, "FETCH_BACKOFF_S", 0.0)
    uri = str(tmp_path / "a.png")
    with pytest.raises(images.ImageReadError, match="403") as err:
        images.decode_batch({"image_uri": np.array([uri], dtype=object)}, (8, 4))
    assert err.value.uri == uri and len(calls) == images.FETCH_ATTEMPTS
    import pickle  # Ray ships the error from the worker to the driver and matches retry_exceptions on it
    again = pickle.loads(pickle.dumps(err.value))
    assert isinstance(again, images.ImageReadError) and again.uri == uri and "403" in str(again)


def test_a_fetch_that_recovers_is_retried_with_backoff(tmp_path, monkeypatch):
    from tpr_ray.io import images
    from tpr_ray.io import storage
    (tmp_path / "a.png").write_bytes(_png_bytes((20, 40)))
    real, failures = storage.read_bytes, [OSError("connection reset"), TimeoutError("read timed out")]

    def flaky(uri):
        if failures:
            raise failures.pop(0)
        return real(uri)

    monkeypatch.setattr(storage, "read_bytes", flaky)
    monkeypatch.setattr(images, "FETCH_BACKOFF_S", 0.0)
    out = images.decode_batch({"image_uri": np.array([str(tmp_path / "a.png")], dtype=object)}, (8, 4))
    assert list(out["reject_reason"]) == [""]


def test_running_out_of_memory_while_decoding_is_not_a_reject(tmp_path, monkeypatch):
    from tpr_ray.io import images
    (tmp_path / "a.png").write_bytes(_png_bytes((20, 40)))

    def oom(data, target_size=None):
        raise MemoryError()

    monkeypatch.setattr(images, "decode_image", oom)
    with pytest.raises(images.ImageReadError, match="memory"):
        images.decode_batch({"image_uri": np.array([str(tmp_path / "a.png")], dtype=object)}, (8, 4))


def test_pixel_limit_holds_at_the_limit_not_at_twice_it(monkeypatch):
    # Pillow only raises above 2x MAX_IMAGE_PIXELS (and warns between): 1.2x must already be refused.
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ValueError, match="over the limit"):
            decode_image(_png_bytes((40, 30)))
        assert decode_image(_png_bytes((40, 25))).size == (40, 25)  # exactly at the limit is fine


def test_a_large_jpeg_is_judged_by_its_decoded_size(monkeypatch):
    # 48 Mpx declared, drafted to 1/8 (0.75 Mpx) for a 384x128 target: under a 30 Mpx limit
    # that the declared size is over (Pillow itself only warns below twice its limit)
    import warnings

    buf = io.BytesIO()
    Image.new("RGB", (4000, 12000), (10, 200, 30)).save(buf, "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert decode_image(buf.getvalue(), (384, 128)).size[0] < 4000
        with pytest.raises(ValueError, match="over the limit"):
            decode_image(buf.getvalue())  # without a target it is decoded whole


def test_declared_decode_memory_covers_an_image_at_the_limit(tmp_path):
    # The peak memory of decoding one RGBA PNG at the pixel limit (measured in a fresh process)
    # must fit in what the decode stage declares to Ray. Limit scaled down to 4 Mpx to stay cheap.
    import subprocess
    import sys

    pattern = (np.arange(2048 * 2048 * 4, dtype=np.uint32) % 251).astype(np.uint8).reshape(2048, 2048, 4)
    Image.fromarray(pattern, "RGBA").save(tmp_path / "big.png")  # not constant: untouched zero pages cost nothing
    del pattern
    # VmHWM (peak resident memory of this process image; ru_maxrss would carry pytest's over exec)
    code = f"""
from PIL import Image
from tpr_ray.io import images
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
Image.MAX_IMAGE_PIXELS = 2048 * 2048
before = hwm()
out = images.decode_batch({{"image_uri": [{str(tmp_path / "big.png")!r}]}}, (384, 128))
assert list(out["reject_reason"]) == [""], out["reject_reason"]
print(hwm() - before, images.decode_memory_bytes(1, (384, 128)))
"""
    peak, declared = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout.split())
    assert 0 < peak <= declared, (peak, declared)


def _listing(where, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), where)
    return str(where)


def test_a_listing_file_streams_its_rows_in_order_with_defaults_and_relative_paths(tmp_path):
    import pyarrow as pa

    from tpr_ray.embedding.inputs import check_listing, is_listing, listing_batches

    uris = ["s3://b/crops/a.jpg", "/abs/b.jpg", "rel/c.jpg", "d.jpg", "gs://x/e.png"]
    listing = _listing(tmp_path / "listing.parquet", image_uri=uris, note=["ignored"] * 5)
    assert is_listing(listing) and not is_listing(str(tmp_path / "*.parquet")) and check_listing(listing) == 5
    batches = list(listing_batches(listing, batch_rows=2))
    assert [b.num_rows for b in batches] == [2, 2, 1]  # streamed, never the whole file
    table = pa.Table.from_batches(batches)
    expected = ["s3://b/crops/a.jpg", "/abs/b.jpg", f"{tmp_path}/rel/c.jpg", f"{tmp_path}/d.jpg", "gs://x/e.png"]
    assert table.column("image_uri").to_pylist() == expected
    assert table.column("image_id").to_pylist() == expected  # no image_id column: the URI is the id
    assert table.column("person_id").null_count == 5

    with_ids = _listing(tmp_path / "ids.parquet", image_id=["x", "y", None],
                        person_id=pa.array([7, None, 8], pa.int32()),
                        image_uri=["s3://b/1.jpg", "s3://b/2.jpg", "s3://b/3.jpg"])
    table = pa.Table.from_batches(list(listing_batches(with_ids)))
    assert table.column("image_id").to_pylist() == ["x", "y", "s3://b/3.jpg"]  # a missing id: the URI, as above
    assert table.column("person_id").to_pylist() == [7, None, 8]
    assert table.schema.field("person_id").type == pa.int64()


def test_a_bad_listing_file_is_an_error_naming_the_file_row_and_field(tmp_path):
    import pyarrow as pa

    from tpr_ray.embedding.inputs import check_listing, listing_batches

    no_uri = _listing(tmp_path / "no_uri.parquet", path=["a.jpg"])
    with pytest.raises(DataError, match=r"no_uri.parquet.*field 'image_uri'.*needs an image_uri column"):
        check_listing(no_uri)
    ints = _listing(tmp_path / "ints.parquet", image_uri=["a.jpg"], person_id=["seven"])
    with pytest.raises(DataError, match=r"ints.parquet.*field 'person_id'.*expected an integer"):
        check_listing(ints)
    holes = _listing(tmp_path / "holes.parquet", image_uri=pa.array(["a.jpg", "b.jpg", "c.jpg", None, ""]))
    with pytest.raises(DataError, match=r"holes.parquet, entry row 3, field 'image_uri': no image URI"):
        list(listing_batches(holes, batch_rows=2))
    with pytest.raises(DataError, match="no such listing file"):
        check_listing(str(tmp_path / "missing.parquet"))
