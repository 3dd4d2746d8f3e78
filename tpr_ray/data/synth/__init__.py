"""Synthetic pedestrian datasets in the real on-disk formats, so everything runs without the real data.

Images draw an identity's attributes as a simple figure and captions name them, so a
model can learn the task. The styles (:mod:`.styles`, one record each) are separate
domains: their own colour shades, backgrounds, lighting, vocabulary and sentence shapes,
so cross-dataset evaluation has a real gap to measure. :mod:`.people` makes identities and
captions, :mod:`.render` draws them, :mod:`.grammar` words them, and :func:`synthesize`
writes a dataset through the format descriptions of :mod:`tpr_ray.data.formats`.

Everything is derived from (seed, style, person, image) through numpy's SeedSequence, so a
seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath

from fsspec.core import url_to_fs
from PIL import Image

from tpr_ray.data.formats import FORMATS
from tpr_ray.data.synth.grammar import tokens
from tpr_ray.data.synth.people import Person, colour_words, describe, make_identities, split_sizes, stream
from tpr_ray.data.synth.render import HEIGHT, WIDTH, Pose, draw_person
from tpr_ray.data.synth.render import random_pose as _random_pose
from tpr_ray.data.synth.styles import SPECS, STYLES, StyleSpec, get_spec
from tpr_ray.data.uris import IMAGE_FOLDER
from tpr_ray.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["HEIGHT", "SPECS", "STYLES", "WIDTH", "Person", "Pose", "StyleSpec", "colour_words", "describe",
           "make_identities", "random_pose", "render_person", "split_sizes", "synthesize"]


def render_person(person: Person, style: str, pose: Pose, rng) -> Image.Image:
    """A 384x128 RGB image of `person` in `style`'s look."""
    return draw_person(person, get_spec(style), pose, rng)


def random_pose(style: str, rng) -> Pose:
    return _random_pose(get_spec(style), rng)


def annotation_entry(spec: StyleSpec, person: Person, path: str, captions: list[str]) -> dict:
    """One entry of the annotation file, with the format's field names in the real file's order."""
    path_field = FORMATS[spec.format].path_field
    values = {"id": person.person_id, "path": path, "captions": captions, "split": person.split}
    if "processed_tokens" in spec.entry_keys:
        values["processed_tokens"] = [tokens(c) for c in captions]
    return {(path_field if key == "path" else key): values[key] for key in spec.entry_keys}


def _encode(image: Image.Image, path: str) -> bytes:
    buffer = io.BytesIO()
    if path.endswith(".png"):
        image.save(buffer, "PNG", compress_level=1)
    else:
        image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def synthesize(style: str, n_ids: int, seed: int, out_dir: str) -> str:
    """Write a `style` dataset of `n_ids` identities to `out_dir` (path or URI); return `out_dir`.

    The folder looks exactly like the real one: the annotation JSON at its root and the
    images under `imgs/`. `out_dir` must be new or empty, so stale files of an earlier run
    can never mix in.
    """
    spec = get_spec(style)
    fs, root = url_to_fs(out_dir)
    if fs.exists(root) and fs.ls(root):
        raise ConfigError(f"output folder {out_dir} is not empty; choose a new one")
    entries, made_dirs = [], set()
    low, high = spec.images_per_id
    for index, person in enumerate(make_identities(style, n_ids, seed)):
        n_images = int(stream(seed, spec, "counts", index).integers(low, high + 1))
        for k in range(n_images):
            rng = stream(seed, spec, "images", index, k)
            image = draw_person(person, spec, _random_pose(spec, rng), rng)
            path = spec.image_name(person, k, rng)
            captions = [describe(person, style, rng) for _ in range(spec.captions_per_image)]
            target = posixpath.join(root, IMAGE_FOLDER, path)
            folder = posixpath.dirname(target)
            if folder not in made_dirs:
                fs.makedirs(folder, exist_ok=True)
                made_dirs.add(folder)
            fs.pipe_file(target, _encode(image, path))
            entries.append(annotation_entry(spec, person, path, captions))
    # Written last: a folder without it is an interrupted run (the demo and crosseval rely on that).
    annotation_file = FORMATS[spec.format].annotation_files[0]
    fs.pipe_file(posixpath.join(root, annotation_file), json.dumps(entries).encode())
    log.info("wrote %d %s images of %d identities to %s", len(entries), style, n_ids, out_dir)
    return out_dir
