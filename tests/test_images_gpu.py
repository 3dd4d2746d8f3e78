"""Decoding on the model's device: the CPU fallback is the CPU path exactly, and the GPU path
(a fake nvJPEG: torchvision's CPU decoder behind the same seam) agrees within TOLERANCE."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tpr_ray.io import gpu_decode

from tpr_ray.io import images
SIZE = (96, 32)


def _textured(rng, width, height) -> Image.Image:
    small = rng.integers(0, 255, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR), dtype=np.float32)
    return Image.fromarray(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))


def _blobs() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    for name, (w, h) in {"crop_small": (40, 110), "crop": (60, 170), "crop_wide": (100, 250)}.items():
        buf = io.BytesIO()
        _textured(rng, w, h).save(buf, "JPEG", quality=90)
        out[name] = buf.getvalue()
    buf = io.BytesIO()
    _textured(rng, 50, 120).save(buf, "PNG")
    out["png"] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # to be rotated on decode, which nvJPEG through torchvision does not do
    for name, img, extra in [("rotated", _textured(rng, 60, 170), {"exif": exif}),
                             ("cmyk", _textured(rng, 60, 170).convert("CMYK"), {})]:
        buf = io.BytesIO()
        img.save(buf, "JPEG", **extra)
        out[name] = buf.getvalue()
    out["truncated"] = out["crop"][: len(out["crop"]) // 2]
    out["text"] = b"not an image at all"
    return out


def _cpu_path(blobs, size=SIZE):
    pixels, reasons = [], []
    for b in blobs:
        try:
            pixels.append(images.decode_pixels(b, size))
            reasons.append("")
        except images.UnreadableImage as exc:
            pixels.append(np.zeros((*size, 3), np.uint8))
            reasons.append(exc.reason)
    return np.stack(pixels), reasons


def test_on_cpu_it_is_the_cpu_path_exactly():
    blobs = list(_blobs().values())
    pixels, reasons = gpu_decode.decode_on_device(blobs, SIZE, torch.device("cpu"))
    expected, expected_reasons = _cpu_path(blobs)
    np.testing.assert_array_equal(pixels.numpy(), expected)
    assert list(reasons) == expected_reasons and sum(bool(r) for r in reasons) == 2 and len(reasons) == 8


@pytest.fixture
def fake_nvjpeg(monkeypatch):
    """torchvision's CPU JPEG decoder behind the device seam; records what it was given."""
    from torchvision.io import ImageReadMode, decode_jpeg

    seen = []

    def fake(tensors, device):
        seen.append(len(tensors))
        return decode_jpeg(tensors, mode=ImageReadMode.RGB)  # like CUDA's: no EXIF rotation

    monkeypatch.setattr(gpu_decode, "_device_decode", fake)
    return seen


def test_gpu_path_agrees_with_the_cpu_path_within_tolerance(fake_nvjpeg):
    named = _blobs()
    blobs = list(named.values())
    size = (128, 48)  # under half of every crop: the CPU path decodes at full scale (no JPEG draft)
    pixels, reasons = gpu_decode.decode_on_device(blobs, size, torch.device("cpu"), use_gpu=True)
    expected, expected_reasons = _cpu_path(blobs, size)
    assert fake_nvjpeg == [3]  # the three plain JPEGs went to the device in one batch; PNG, rotated, CMYK
    # and broken ones did not
    assert list(reasons) == expected_reasons
    for i, name in enumerate(named):
        diff = np.abs(pixels[i].numpy().astype(int) - expected[i].astype(int))
        if name.startswith("crop"):
            assert diff.mean() <= gpu_decode.TOLERANCE["mean"] and diff.max() <= gpu_decode.TOLERANCE["max"], name
            assert diff.max() > 0  # really the other decoder, not the CPU one
        else:
            assert diff.max() == 0, name  # decided and decoded by the CPU path


def test_a_batch_the_device_refuses_is_retried_one_by_one(monkeypatch):
    named = _blobs()
    calls = []

    def picky(tensors, device):
        calls.append(len(tensors))
        if len(tensors) > 1:
            raise RuntimeError("nvjpeg: unsupported in a batch")
        from torchvision.io import ImageReadMode, decode_jpeg
        return decode_jpeg(tensors, mode=ImageReadMode.RGB)

    monkeypatch.setattr(gpu_decode, "_device_decode", picky)
    blobs = [named["crop"], named["crop_wide"]]
    pixels, reasons = gpu_decode.decode_on_device(blobs, SIZE, torch.device("cpu"), use_gpu=True)
    assert calls == [2, 1, 1] and list(reasons) == ["", ""]
    assert pixels.shape == (2, *SIZE, 3) and pixels.float().mean() > 10


def test_an_image_over_the_pixel_limit_never_reaches_the_device(monkeypatch, fake_nvjpeg):
    monkeypatch.setattr(images, "MAX_PIXELS", 50 * 120)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 120)
    named = _blobs()
    _, reasons = gpu_decode.decode_on_device([named["crop"], named["crop_small"]], SIZE, torch.device("cpu"),
                                             use_gpu=True)
    assert fake_nvjpeg == [1] and "TooManyPixels" in reasons[0] and reasons[1] == ""


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tests.helpers import save_tiny_checkpoint
    from tpr_ray.model.checkpoint import read_config

    path = save_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "checkpoint"), seed=1, num_classes=5)
    return path, tuple(read_config(path)["backbone"]["image_size"])


def test_the_actor_embeds_fetched_bytes_as_the_cpu_stage_pixels(tiny_checkpoint, tmp_path, monkeypatch):
    """fetch_batch + decode in the actor == decode_batch + actor, rejects included; then the same
    through the (fake) device decoder within tolerance of the embeddings."""
    from tpr_ray.embedding.pipeline import Embedder

    checkpoint, size = tiny_checkpoint
    named = _blobs()
    for name, data in named.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder").mkdir()  # not an image: a reject in either stage
    batch = {"image_uri": np.array([str(tmp_path / n) for n in named] + [str(tmp_path / "folder")], dtype=object)}
    actor = Embedder(checkpoint, "gallery", size)
    cpu = actor(images.decode_batch(dict(batch), size))
    fetched = images.fetch_batch(dict(batch), size)
    assert "pixels" not in fetched and fetched["reject_reason"][-1].startswith("IsADirectoryError")
    here = actor(fetched)
    assert list(here["reject_reason"]) == list(cpu["reject_reason"]) and "image_bytes" not in here
    assert [bool(r) for r in cpu["reject_reason"]] == [False] * 6 + [True] * 3
    np.testing.assert_array_equal(here["embedding"], cpu["embedding"])

    monkeypatch.setattr(gpu_decode, "gpu_decode_available", lambda device: True)
    from torchvision.io import ImageReadMode, decode_jpeg
    monkeypatch.setattr(gpu_decode, "_device_decode", lambda t, d: decode_jpeg(t, mode=ImageReadMode.RGB))
    fake = actor(images.fetch_batch(dict(batch), size))
    assert list(fake["reject_reason"]) == list(cpu["reject_reason"])
    ok = ~np.isnan(cpu["embedding"][:, 0])
    assert np.isnan(fake["embedding"][~ok]).all()
    cosine = (fake["embedding"][ok] * cpu["embedding"][ok]).sum(1)
    assert cosine.min() > 0.99


def test_a_cpu_model_actor_gets_the_node_cores_not_rays_fractional_share(tiny_checkpoint, monkeypatch):
    import ray

    from tpr_ray.embedding import pipeline as embed
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 16.0}},
                                               {"Alive": True, "Resources": {"CPU": 8.0}},
                                               {"Alive": False, "Resources": {"CPU": 64.0}}])
    assert [embed._cpu_threads_per_actor(a) for a in (1, 2, 3, 4, 40)] == [8, 8, 4, 4, 1]
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    embed.Embedder(tiny_checkpoint[0], "gallery", tiny_checkpoint[1], cpu_threads=6)
    embed.Embedder(tiny_checkpoint[0], "gallery", tiny_checkpoint[1])
    assert calls == [6]
