"""One classification of image failures, shared by the embedding job and training's pre-check,
and the decode stage's output pinned to a plain Pillow reference."""

import errno
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from tpr_ray.io import images

from tpr_ray.io import storage
from tpr_ray.errors import DataError
from tpr_ray.training.inputs import find_unreadable_images

SIZE = (24, 8)


def _jpeg(size=(40, 90), **save) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", **save)
    return buf.getvalue()


def _embed_outcome(uri):
    try:
        out = images.decode_batch({"image_uri": np.array([uri], dtype=object)}, SIZE)
    except images.ImageReadError:
        return "fault"
    return "reject" if out["reject_reason"][0] else "ok"


def _train_outcome(uri):
    try:
        return "reject" if find_unreadable_images([uri], SIZE, threads=1) else "ok"
    except DataError:
        return "fault"


@pytest.mark.parametrize("case, expected", [
    ("good", "ok"), ("truncated", "reject"), ("empty", "reject"), ("text", "reject"), ("missing", "fault"),
    ("directory", "reject"), ("denied", "fault"), ("oom", "fault"),
])
def test_embedding_and_training_classify_every_failure_alike(tmp_path, monkeypatch, case, expected):
    monkeypatch.setattr(images, "FETCH_BACKOFF_S", 0.0)
    uri = str(tmp_path / "a.jpg")
    data = _jpeg()
    contents = {"good": data, "truncated": data[: len(data) // 2], "empty": b"", "text": b"not an image",
                "denied": data, "oom": data}
    if case in contents:
        (tmp_path / "a.jpg").write_bytes(contents[case])
    if case == "directory":
        (tmp_path / "a.jpg").mkdir()
    if case == "denied":
        def denied(uri):
            raise PermissionError(errno.EACCES, "Access Denied (403)")
        monkeypatch.setattr(storage, "read_bytes", denied)
    if case == "oom":
        def oom(data, target_size=None):
            raise MemoryError()
        monkeypatch.setattr(images, "decode_image", oom)
    assert (_embed_outcome(uri), _train_outcome(uri)) == (expected, expected)


def test_a_missing_file_is_retried_then_stops_the_batch_never_a_reject(tmp_path, monkeypatch):
    """A path that exists on another node only (or an object not visible yet) must not leave
    the gallery as a reject: it is retried, then the batch fails naming the file."""
    monkeypatch.setattr(images, "FETCH_BACKOFF_S", 0.0)
    calls = []
    real = storage.read_bytes

    def counting(uri):
        calls.append(uri)
        return real(uri)

    monkeypatch.setattr(storage, "read_bytes", counting)
    gone = str(tmp_path / "gone.jpg")
    with pytest.raises(images.ImageReadError, match="gone.jpg"):
        images.decode_batch({"image_uri": np.array([gone], dtype=object)}, SIZE)
    assert len(calls) == images.FETCH_ATTEMPTS


def _reference(data: bytes, size) -> np.ndarray:
    """Plain Pillow, every step copying: what the decode stage computed before it avoided copies."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("RGB", (size[1], size[0]))
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P"):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return np.array(img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC))


def _variants() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (300, 100, 3), dtype=np.uint8))
    out = {"jpeg": _jpeg((100, 300)), "big_jpeg": _jpeg((400, 1200))}
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the stored pixels are transposed on decode
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", exif=exif)
    out["jpeg_rotated"] = buf.getvalue()
    for name, img in {"png_rgba": rgb.convert("RGBA"), "png_grey": rgb.convert("L"), "png_palette": rgb.convert("P")}.items():
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out[name] = buf.getvalue()
    return out


@pytest.mark.parametrize("name", sorted(_variants()))
def test_decode_stage_output_equals_a_plain_pillow_reference(tmp_path, name):
    data = _variants()[name]
    (tmp_path / "x").write_bytes(data)
    size = (96, 32)
    out = images.decode_batch({"image_uri": np.array([str(tmp_path / "x")], dtype=object)}, size)
    assert out["reject_reason"][0] == ""
    np.testing.assert_array_equal(out["pixels"][0], _reference(data, size))
    if name == "jpeg_rotated":  # the EXIF rotation was applied: the 100x300 photo now lies on its side
        assert Image.open(io.BytesIO(data)).size == (100, 300)
        assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (300, 100)
