"""Decoding and resizing images on the CPU, with nothing heavier than Pillow and numpy.

Kept free of torch so the decode stage of an embedding job (many small Ray tasks) starts
fast and stays small in memory; the model side lives in `transforms.py`.

Two kinds of failure are kept apart, here only (`load_pixels`; the embedding job, its GPU
decoder and training's pre-check all go through it). A file that does not exist, or bytes that
are not a readable image (unidentified, truncated, zero bytes, over the pixel limit), are a
property of the input: :class:`UnreadableImage`, and the row becomes a recorded reject. Bytes
that could not be fetched now (permissions or an expired token, network, throttling, timeouts,
any other OS error of the store), or a decode that ran out of memory, say nothing about the
image: :class:`ImageReadError` is raised, Ray retries the task, and if it keeps failing the job
stops without committing the row's shard.
"""

from __future__ import annotations

import io
import logging
import re
import time

import numpy as np
from PIL import Image, ImageOps

from tpr_ray.io import storage
log = logging.getLogger(__name__)

# The most pixels an image may have *as decoded* (after the JPEG draft reduction); above it
# the image is rejected as a decompression bomb. 32 Mpx holds an 8K UHD frame (33.2 M < 2**25).
# Pillow's own check only raises above twice its limit (and only warns between), so the limit
# is enforced here; Pillow's is set to the same value so that the worst cases are refused at
# ``Image.open``, before any pixel is decoded (which also refuses JPEGs declaring over 2x the
# limit even though their draft would be small: a person-crop gallery has none).
MAX_PIXELS = 1 << 25
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# Decoding one RGBA image at the limit peaks at about 12 bytes per pixel (measured: source,
# white background, composite, RGB result); declared with room: 16 bytes per pixel.
DECODE_BYTES_PER_PIXEL = 16

# In-task retries of a fetch, before the task fails and Ray retries it elsewhere.
FETCH_ATTEMPTS = 3
FETCH_BACKOFF_S = 0.5


class ImageReadError(Exception):
    """An image could not be fetched (or decoded for lack of memory) now; not a bad image."""

    def __init__(self, uri: str, reason: str):
        super().__init__(uri, reason)
        self.uri, self.reason = uri, reason

    def __str__(self) -> str:
        return f"{READ_ERROR_PATTERN} {self.uri}: {self.reason}"


READ_ERROR_PATTERN = "could not read"  # how Ray Data's retry setting recognises an ImageReadError


def decode_memory_bytes(batch_size: int, image_size) -> int:
    """Logical memory to declare per decode task: one image at the pixel limit being decoded,
    plus the batch's resized uint8 output and its copy on the way out."""
    h, w = image_size
    return DECODE_BYTES_PER_PIXEL * Image.MAX_IMAGE_PIXELS + 2 * batch_size * h * w * 3


def fetch_bytes(uri: str) -> bytes:
    """The file's bytes, retried with exponential backoff; :class:`ImageReadError` if it keeps failing.

    A file that does not exist is a fault too, never a reject: a path mounted on one node only,
    an object not yet visible or a key the credentials cannot list all look like this, and a
    reject would drop the image from the gallery for good. A directory is the input's fault:
    :class:`UnreadableImage` at once."""
    attempts, backoff_s = FETCH_ATTEMPTS, FETCH_BACKOFF_S
    for attempt in range(attempts):
        try:
            return storage.read_bytes(uri)
        except IsADirectoryError as exc:
            raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any other failure to fetch is "not now", never "bad image"
            reason = f"{type(exc).__name__}: {exc}"[:500]
            if attempt + 1 == attempts:
                raise ImageReadError(uri, reason) from None
            log.warning("fetching %s failed (%s); retrying", uri, reason)
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


class UnreadableImage(ValueError):
    """The input is not a readable image (a directory, not an image, truncated, too many pixels):
    a property of the data, recorded as a reject with :attr:`reason`, never retried."""

    def __init__(self, reason: str):
        super().__init__(reason[:500])
        self.reason = reason[:500]


def load_pixels(uri: str, image_size, out: np.ndarray | None = None) -> np.ndarray:
    """Fetch, decode and resize one image to ``image_size`` (H, W): HxWx3 uint8 (written into ``out``
    when given). The one classification of failures, shared by embedding and training's check:
    :class:`UnreadableImage` when the input is at fault, :class:`ImageReadError` when it could not
    be read now (fetch faults after retries, or no memory to decode)."""
    return decode_pixels(fetch_bytes(uri), image_size, out, uri=uri)


def decode_pixels(data: bytes, image_size, out: np.ndarray | None = None, *, uri: str = "") -> np.ndarray:
    """:func:`load_pixels` on bytes already fetched."""
    h, w = image_size
    try:
        return resize_uint8(decode_image(data, (h, w)), (h, w), out)
    except MemoryError:
        raise ImageReadError(uri, "out of memory while decoding") from None
    except Exception as exc:  # noqa: BLE001 - bytes in hand: whatever fails is the image's fault
        # Pillow names the in-memory buffer ("<_io.BytesIO object at 0x...>"): noise in a reject record.
        message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc))
        raise UnreadableImage(f"{type(exc).__name__}: {message}") from None


def plain_header(data: bytes) -> bool:
    """True when the header (read without decoding a pixel) declares an RGB or grey image within
    the pixel limit and without an EXIF rotation: one that a plain JPEG decoder gets right."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return (img.mode in ("RGB", "L") and img.width * img.height <= MAX_PIXELS
                    and img.getexif().get(ORIENTATION_TAG, 1) == 1)
    except Exception:  # noqa: BLE001 - the full decode will say what is wrong
        return False


ORIENTATION_TAG = 0x0112


class TooManyPixels(ValueError):
    """The image is larger than :data:`MAX_PIXELS` as decoded."""


def decode_image(data: bytes, target_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode bytes into an RGB image (palette, grey, RGBA, CMYK and 16-bit included).

    With ``target_size`` (H, W), JPEGs are decoded at the smallest power-of-two reduction
    that is still at least that large: decoding a large photo at 1/8 scale is several times
    cheaper than decoding it whole and resizing (the usual CPU bottleneck of bulk embedding).
    """
    img = Image.open(io.BytesIO(data))
    if target_size is not None and img.format == "JPEG":
        img.draft("RGB", (target_size[1], target_size[0]))
    if img.width * img.height > Image.MAX_IMAGE_PIXELS:
        raise TooManyPixels(f"{img.width}x{img.height} pixels is over the limit of {Image.MAX_IMAGE_PIXELS}")
    img.load()
    ImageOps.exif_transpose(img, in_place=True)  # in place: the usual no-rotation case costs no copy
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(arr / max(arr.max(), 1.0) * 255.0, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_uint8(img: Image.Image, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Resize to ``size`` (H, W) with bicubic filtering, as CLIP does; returns HxWx3 uint8, written
    into ``out`` when given (one copy, straight into the batch)."""
    h, w = size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BICUBIC)
    if out is None:
        return np.array(img, dtype=np.uint8)  # a writable copy: torch refuses read-only arrays
    out[...] = np.asarray(img)
    return out


def decode_batch(batch: dict, image_size) -> dict:
    """Ray Data stage: fetch, decode and resize each image.

    Images that are not readable carry a reject reason instead of pixels; a fetch that keeps
    failing, or a decode out of memory, raises :class:`ImageReadError` for the whole batch.
    """
    h, w = image_size
    pixels = np.zeros((len(batch["image_uri"]), h, w, 3), dtype=np.uint8)
    reasons = []
    for i, uri in enumerate(batch["image_uri"]):
        try:
            load_pixels(uri, (h, w), out=pixels[i])
            reasons.append("")
        except UnreadableImage as exc:
            reasons.append(exc.reason)
    return {**batch, "pixels": pixels, "reject_reason": np.array(reasons, dtype=object)}


def fetch_batch(batch: dict, image_size) -> dict:
    """Ray Data stage when the model's GPU decodes (see :mod:`tpr_ray.io.gpu_decode`): fetch only,
    and ship the encoded bytes, several times smaller than the pixels, to the actor.

    A directory carries its reject reason here; the decoder decides about the rest."""
    del image_size  # the actor resizes; kept so both stages take the same arguments
    blobs, reasons = [], []
    for uri in batch["image_uri"]:
        try:
            blobs.append(fetch_bytes(uri))
            reasons.append("")
        except UnreadableImage as exc:
            blobs.append(b"")
            reasons.append(exc.reason)
    return {**batch, "image_bytes": np.array(blobs, dtype=object), "reject_reason": np.array(reasons, dtype=object)}
