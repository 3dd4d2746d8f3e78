"""Synthetic datasets: real formats, real proportions, deterministic, and text that matches the pixels."""

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tpr_ray.data import read_dataset, split_stats
from tpr_ray.data.synth import (
    SPECS,
    STYLES,
    Pose,
    colour_words,
    describe,
    make_identities,
    render_person,
    split_sizes,
    synthesize,
)
from tpr_ray.errors import ConfigError

EXPECTED_SHARES = {
    "cuhk": {"train": 0.846, "val": 0.077, "test": 0.077},
    "icfg": {"train": 0.756, "test": 0.244},
    "rstp": {"train": 0.90, "val": 0.05, "test": 0.05},
}
CAPTIONS_PER_IMAGE = {"cuhk": 2, "icfg": 1, "rstp": 2}
PALETTES = {style: SPECS[style].palette for style in STYLES}
N_IDS = 100


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One 100-identity dataset per style, with how long each took to write."""
    built = {}
    for style in STYLES:
        out = tmp_path_factory.mktemp(style) / "data"
        start = time.perf_counter()
        synthesize(style, N_IDS, 0, str(out))
        built[style] = (out, time.perf_counter() - start)
    return built


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_fast_enough(datasets):
    for style, (_, seconds) in datasets.items():
        assert seconds < 10, f"{style} took {seconds:.1f} s for {N_IDS} identities"


@pytest.mark.parametrize("style", STYLES)
def test_reader_reads_it_back_with_real_proportions(datasets, style):
    table = read_dataset(str(datasets[style][0]))
    assert table.column("dataset").to_pylist()[0] == style
    stats = split_stats(table)
    assert set(stats) == set(EXPECTED_SHARES[style])
    for split, share in EXPECTED_SHARES[style].items():
        assert abs(stats[split]["ids"] / N_IDS - share) < 0.02
    lengths = {len(c) for c in table.column("captions").to_pylist()}
    assert lengths == {CAPTIONS_PER_IMAGE[style]}
    low, high = SPECS[style].images_per_id
    per_id = np.unique(table.column("person_id").to_numpy(), return_counts=True)[1]
    assert per_id.min() >= low and per_id.max() <= high


def test_real_file_layout(datasets):
    cuhk, icfg, rstp = (datasets[s][0] for s in STYLES)
    assert (cuhk / "reid_raw.json").exists() and (icfg / "ICFG-PEDES.json").exists()
    assert (rstp / "data_captions.json").exists()
    first = read_dataset(str(cuhk)).to_pylist()[0]
    assert first["person_id"] == 1 and first["image_id"] == "CUHK01/0001001.png"
    assert read_dataset(str(icfg)).column("image_id")[0].as_py().startswith("train/0000/0000_000_")
    assert read_dataset(str(rstp)).column("image_id")[0].as_py().startswith("0000_c")
    image = Image.open(cuhk / "imgs" / first["image_id"])
    assert image.size == (128, 384) and image.mode == "RGB"


def test_same_seed_same_bytes_other_seed_other_people(tmp_path):
    paths = [tmp_path / name for name in ("a", "b")]
    for path in paths:
        synthesize("rstp", 6, 7, str(path))
    assert tree_hash(paths[0]) == tree_hash(paths[1])
    ours = [p.looks() for p in make_identities("rstp", 6, 7)]
    theirs = [p.looks() for p in make_identities("rstp", 6, 8)]
    assert ours != theirs


def test_identities_are_distinct_and_small_sets_have_every_split():
    people = make_identities("cuhk", 300, 0)
    assert len({p.looks() for p in people}) == 300
    assert split_sizes("cuhk", 6) == {"train": 2, "val": 2, "test": 2}
    assert split_sizes("icfg", 4) == {"train": 2, "test": 2}
    with pytest.raises(ConfigError, match="at least 6"):
        split_sizes("rstp", 5)


@pytest.mark.parametrize("style", STYLES)
def test_captions_mention_the_upper_colour(datasets, style):
    people = {p.person_id: p for p in make_identities(style, N_IDS, 0)}
    for row in read_dataset(str(datasets[style][0])).to_pylist():
        words = colour_words(style, people[row["person_id"]].upper_colour)
        for caption in row["captions"]:
            assert any(word in caption for word in words), caption


def neutral_pose(**changes) -> Pose:
    pose = dict(cx=64.0, top=25.0, unit=330.0, arms=(10.0, 10.0), legs=(5.0, 5.0), flip=False,
                brightness=1.0, tint=(1.0, 1.0, 1.0))
    return Pose(**{**pose, **changes})


@pytest.mark.parametrize("style", STYLES)
def test_torso_is_drawn_in_the_palette_colour(style):
    rng = np.random.default_rng(0)
    for person in make_identities(style, 20, 1):
        for flip in (False, True):
            pose = neutral_pose(flip=flip, cx=58.0)
            pixels = np.asarray(render_person(person, style, pose, rng), dtype=float)
            x0, y0, x1, y1 = pose.torso_box()
            median = np.median(pixels[y0:y1, x0:x1].reshape(-1, 3), axis=0)  # a bag strap may cross the box
            assert np.abs(median - PALETTES[style][person.upper_colour]).max() < 12, (person, median)


def nearest_colour(rgb, palette) -> str:
    return min(palette, key=lambda name: np.sum((np.asarray(palette[name]) - rgb) ** 2))


@pytest.mark.parametrize("style", STYLES)
def test_written_images_show_the_described_upper_colour(datasets, style):
    """In the files themselves (jitter, lighting, flips, occluders and all) the torso has the caption's colour."""
    root, _ = datasets[style]
    people = {p.person_id: p for p in make_identities(style, N_IDS, 0)}
    rows = read_dataset(str(root)).to_pylist()
    hits = 0
    for row in rows:
        pixels = np.asarray(Image.open(root / "imgs" / row["image_id"]), dtype=float)
        centre = np.median(pixels[120:170, 59:69].reshape(-1, 3), axis=0)  # always inside the torso
        hits += nearest_colour(centre, PALETTES[style]) == people[row["person_id"]].upper_colour
    assert hits / len(rows) > 0.85


def test_styles_are_different_domains():
    person = make_identities("cuhk", 10, 0)[0]
    torsos = {}
    for style in STYLES:
        pose = neutral_pose()
        pixels = np.asarray(render_person(person, style, pose, np.random.default_rng(0)), dtype=float)
        x0, y0, x1, y1 = pose.torso_box()
        torsos[style] = pixels[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
    for a, b in (("cuhk", "icfg"), ("cuhk", "rstp"), ("icfg", "rstp")):
        assert np.abs(torsos[a] - torsos[b]).max() > 10, (a, b, person.upper_colour)

    vocab = {}
    for style in STYLES:
        rng = np.random.default_rng(0)
        people = make_identities(style, 60, 0)
        vocab[style] = {w for p in people for _ in range(3) for w in describe(p, style, rng).lower().split()}
    for a, b in (("cuhk", "icfg"), ("cuhk", "rstp"), ("icfg", "rstp")):
        overlap = len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b])
        assert overlap < 0.6, (a, b, overlap)
    lengths = {s: np.mean([len(describe(p, s, np.random.default_rng(1)).split()) for p in make_identities(s, 60, 0)])
               for s in STYLES}
    assert lengths["icfg"] > lengths["cuhk"] > lengths["rstp"]


def test_out_dir_must_be_new_or_empty(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        synthesize("cuhk", 6, 0, str(tmp_path))
    with pytest.raises(ConfigError, match="unknown synthetic style"):
        synthesize("market", 6, 0, str(tmp_path / "new"))


def test_a_fourth_style_is_one_record(tmp_path, monkeypatch):
    """A night-time CUHK-format domain: only a StyleSpec, written and read back by the usual code."""
    import dataclasses

    from tpr_ray.data.synth import render, styles

    dark = {name: tuple(v // 3 for v in rgb) for name, rgb in SPECS["cuhk"].palette.items()}
    night = dataclasses.replace(SPECS["cuhk"], name="night", stream=3, palette=dark, background=render.outdoor,
                                brightness=(0.5, 0.6), images_per_id=(2, 2), captions_per_image=1,
                                caption=SPECS["rstp"].caption)
    monkeypatch.setitem(styles.SPECS, "night", night)
    synthesize("night", 8, 0, str(tmp_path / "night"))
    table = read_dataset(str(tmp_path / "night"))
    assert (tmp_path / "night" / "reid_raw.json").exists() and table.column("dataset")[0].as_py() == "cuhk"
    assert table.num_rows == 16 and {len(c) for c in table.column("captions").to_pylist()} == {1}
    cuhk = read_dataset(str(datasets_cuhk(tmp_path)))
    night_pixels = np.asarray(Image.open(tmp_path / "night" / "imgs" / table.column("image_id")[0].as_py()))
    day_pixels = np.asarray(Image.open(tmp_path / "cuhk" / "imgs" / cuhk.column("image_id")[0].as_py()))
    assert night_pixels.mean() < day_pixels.mean() - 30


def datasets_cuhk(tmp_path):
    synthesize("cuhk", 8, 0, str(tmp_path / "cuhk"))
    return tmp_path / "cuhk"


def test_the_writer_uses_the_readers_format_descriptions(tmp_path, monkeypatch):
    """Rename RSTPReid's annotation file and path field in its format description: the writer follows."""
    import dataclasses

    from tpr_ray.data import formats

    changed = dataclasses.replace(formats.FORMATS["rstp"], annotation_files=("captions_v2.json",),
                                  path_field="image_path")
    monkeypatch.setitem(formats.FORMATS, "rstp", changed)
    synthesize("rstp", 6, 0, str(tmp_path / "r"))
    entries = __import__("json").loads((tmp_path / "r" / "captions_v2.json").read_text())
    assert list(entries[0]) == ["id", "image_path", "captions", "split"]
    assert read_dataset(str(tmp_path / "r")).num_rows == 30
