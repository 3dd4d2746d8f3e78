"""Synthetic pedestrian datasets in the real on-disk formats, so everything runs without the real data.

Each identity is a set of visible attributes (gender, hair, garments and their colours,
shoes, bag). Images draw those attributes as a simple figure; captions name them. The text
therefore truly describes the image and a model can learn the task. The three styles are
separate domains: their own colour shades, backgrounds, lighting, vocabulary and sentence
shapes, so cross-dataset evaluation has a real gap to measure.

Everything is derived from (seed, style, person, image) through numpy's SeedSequence, so a
seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import re
from dataclasses import dataclass

import numpy as np
from fsspec.core import url_to_fs
from PIL import Image, ImageDraw

from tpr_ray.errors import ConfigError

log = logging.getLogger(__name__)

STYLES = ("cuhk", "icfg", "rstp")
HEIGHT, WIDTH = 384, 128

COLOURS = ("black", "white", "grey", "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown")
HAIR_COLOURS = ("black", "brown", "blonde", "grey")
UPPER_TYPES = ("t-shirt", "jacket", "coat", "shirt", "sweater", "dress")
LOWER_TYPES = ("trousers", "jeans", "shorts", "skirt")
BAG_TYPES = (None, "backpack", "handbag", "shoulder bag")
LONG_SLEEVES = ("jacket", "coat", "shirt", "sweater")

# The same colour name is a different shade in each domain (saturated, muted, washed out).
PALETTES = {
    "cuhk": {"black": (25, 25, 28), "white": (235, 235, 230), "grey": (128, 128, 128), "red": (200, 30, 35),
             "blue": (35, 70, 190), "green": (40, 150, 60), "yellow": (230, 210, 40), "orange": (240, 130, 30),
             "purple": (120, 50, 160), "pink": (240, 150, 190), "brown": (120, 75, 40)},
    "icfg": {"black": (40, 36, 40), "white": (245, 240, 228), "grey": (150, 150, 155), "red": (165, 25, 45),
             "blue": (30, 45, 120), "green": (70, 110, 60), "yellow": (215, 180, 60), "orange": (210, 105, 45),
             "purple": (95, 55, 120), "pink": (225, 130, 160), "brown": (140, 95, 60)},
    "rstp": {"black": (50, 50, 55), "white": (225, 228, 235), "grey": (110, 115, 120), "red": (215, 55, 50),
             "blue": (60, 110, 200), "green": (60, 170, 90), "yellow": (240, 225, 80), "orange": (250, 150, 60),
             "purple": (150, 80, 180), "pink": (250, 170, 200), "brown": (105, 70, 45)},
}
HAIR_RGB = {"black": (20, 18, 18), "brown": (90, 55, 30), "blonde": (215, 185, 110), "grey": (165, 165, 165)}
SKIN_RGB = ((236, 200, 170), (212, 166, 130), (172, 122, 90), (120, 85, 60))


@dataclass(frozen=True)
class StyleSpec:
    """What makes a domain: dataset shape, file naming and the look of its images."""

    annotation_file: str
    first_id: int
    split_fractions: dict  # split -> share of identities
    images_per_id: tuple[int, int]  # inclusive range
    captions_per_image: int
    image_ext: str
    background: str
    brightness: tuple[float, float]
    tint: tuple[float, float, float]
    noise: float
    occlusion: float  # probability per image


SPECS = {
    "cuhk": StyleSpec("reid_raw.json", 1, {"train": 0.846, "val": 0.077, "test": 0.077}, (3, 4), 2, "png",
                      "plain", (0.88, 1.12), (1.0, 1.0, 1.0), 10.0, 0.10),
    "icfg": StyleSpec("ICFG-PEDES.json", 0, {"train": 0.756, "test": 0.244}, (6, 10), 1, "jpg",
                      "indoor", (0.85, 1.05), (1.05, 1.0, 0.9), 4.0, 0.15),
    "rstp": StyleSpec("data_captions.json", 0, {"train": 0.90, "val": 0.05, "test": 0.05}, (5, 5), 2, "jpg",
                      "outdoor", (0.95, 1.15), (0.95, 1.0, 1.06), 7.0, 0.20),
}


# ---------------------------------------------------------------------------------------
# Identities


@dataclass(frozen=True)
class Person:
    person_id: int
    split: str
    gender: str  # man / woman
    hair_length: str  # short / long
    hair_colour: str
    upper: str
    upper_colour: str
    lower: str | None  # None with a dress
    lower_colour: str | None
    shoes_colour: str
    bag: str | None
    bag_colour: str | None
    skin: int

    def looks(self) -> tuple:
        """Everything a caption can say; two identities should not share it."""
        return (self.gender, self.hair_length, self.hair_colour, self.upper, self.upper_colour,
                self.lower, self.lower_colour, self.shoes_colour, self.bag, self.bag_colour)


def split_sizes(style: str, n_ids: int) -> dict:
    """Identities per split, in the real dataset's proportions but at least 2 per split."""
    fractions = _spec(style).split_fractions
    sizes = {split: max(2, round(share * n_ids)) for split, share in fractions.items() if split != "train"}
    sizes = {"train": n_ids - sum(sizes.values()), **sizes}
    if sizes["train"] < 2:
        minimum = 2 + 2 * (len(fractions) - 1)
        raise ConfigError(f"{style} needs at least {minimum} identities (2 per split), got {n_ids}")
    return sizes


def make_identities(style: str, n_ids: int, seed: int) -> list[Person]:
    """The dataset's identities in id order (train, then val, then test), all distinct."""
    splits = [split for split, n in split_sizes(style, n_ids).items() for _ in range(n)]
    rng = _rng(seed, style, "identities")
    people, seen = [], set()
    for index, split in enumerate(splits):
        for _ in range(100):
            person = _sample_person(rng, _spec(style).first_id + index, split)
            if person.looks() not in seen:
                break
        seen.add(person.looks())
        people.append(person)
    return people


def _sample_person(rng, person_id: int, split: str) -> Person:
    woman = rng.random() < 0.5
    hair_length = "long" if rng.random() < (0.8 if woman else 0.1) else "short"
    upper = _pick(rng, UPPER_TYPES if woman else UPPER_TYPES[:-1])
    upper_colour = _pick(rng, COLOURS)
    lower = None if upper == "dress" else _pick(rng, LOWER_TYPES if woman else LOWER_TYPES[:-1])
    # A lower garment of the torso's colour would blur the two attributes together.
    lower_colour = None if lower is None else _pick(rng, [c for c in COLOURS if c != upper_colour])
    bag = _pick(rng, BAG_TYPES)
    return Person(
        person_id=person_id, split=split, gender="woman" if woman else "man", hair_length=hair_length,
        hair_colour=HAIR_COLOURS[rng.choice(4, p=[0.5, 0.25, 0.15, 0.1])], upper=upper,
        upper_colour=upper_colour, lower=lower, lower_colour=lower_colour, shoes_colour=_pick(rng, COLOURS),
        bag=bag, bag_colour=None if bag is None else _pick(rng, COLOURS), skin=int(rng.integers(len(SKIN_RGB))),
    )


_PURPOSES = ("identities", "counts", "images")


def _rng(seed: int, style: str, purpose: str, *indices: int):
    """An independent random stream per (seed, style, purpose, indices).

    The purpose tag matters: SeedSequence treats [1, 2] and [1, 2, 0] alike, so streams
    told apart only by an extra trailing index could coincide.
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng([seed, STYLES.index(style), _PURPOSES.index(purpose), *indices])


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _spec(style: str) -> StyleSpec:
    if style not in SPECS:
        raise ConfigError(f"unknown synthetic style {style!r}; choose one of {', '.join(STYLES)}")
    return SPECS[style]


# ---------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class Pose:
    """Per-image variation; rendering is a pure function of (person, style, pose, noise rng)."""

    cx: float  # horizontal centre of the figure
    top: float  # y of the top of the head
    unit: float  # figure height in pixels
    arms: tuple[float, float]  # outward angle from vertical, degrees (left, right)
    legs: tuple[float, float]
    flip: bool
    brightness: float
    tint: tuple[float, float, float]
    occluder: tuple[int, int, int, int] | None = None
    occluder_rgb: tuple[int, int, int] = (90, 90, 90)

    def torso_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): a box that only the upper garment covers (straps aside)."""
        u = self.unit
        box = (self.cx - 0.04 * u, self.top + 0.24 * u, self.cx + 0.04 * u, self.top + 0.44 * u)
        if self.flip:
            box = (WIDTH - box[2], box[1], WIDTH - box[0], box[3])
        return tuple(int(round(v)) for v in box)


def random_pose(style: str, rng) -> Pose:
    spec = _spec(style)
    unit = 330 * rng.uniform(0.85, 1.05)
    occluder = None
    if rng.random() < spec.occlusion:
        # Occluders (a car bonnet, a pole) cover legs or an edge, never the whole torso.
        if rng.random() < 0.5:
            occluder = (0, int(rng.uniform(0.72, 0.86) * HEIGHT), WIDTH, HEIGHT)
        else:
            width = int(rng.uniform(14, 34))
            occluder = (0, 0, width, HEIGHT) if rng.random() < 0.5 else (WIDTH - width, 0, WIDTH, HEIGHT)
    return Pose(
        cx=WIDTH / 2 + rng.uniform(-12, 12),
        top=(HEIGHT - unit) / 2 + rng.uniform(-8, 8),
        unit=unit,
        arms=(rng.uniform(4, 20), rng.uniform(4, 20)),
        legs=(rng.uniform(1, 9), rng.uniform(1, 9)),
        flip=bool(rng.random() < 0.5),
        brightness=rng.uniform(*spec.brightness),
        tint=tuple(t * rng.uniform(0.97, 1.03) for t in spec.tint),
        occluder=occluder,
        occluder_rgb=tuple(int(v) for v in rng.integers(40, 160, 3)),
    )


def render_person(person: Person, style: str, pose: Pose, rng) -> Image.Image:
    """A 384x128 RGB image of `person`: background, figure, occluder, then lighting and noise."""
    spec = _spec(style)
    image = Image.fromarray(_background(spec.background, rng))
    draw = ImageDraw.Draw(image)
    _draw_figure(draw, person, PALETTES[style], pose)
    if pose.occluder is not None:
        draw.rectangle(pose.occluder, fill=pose.occluder_rgb)
    pixels = np.asarray(image, dtype=np.float32) * pose.brightness * np.asarray(pose.tint, dtype=np.float32)
    pixels = np.clip(pixels + _sensor_noise(rng, spec.noise), 0, 255).astype(np.uint8)
    if pose.flip:
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    image = Image.fromarray(pixels)
    if style == "rstp":  # far-away CCTV crops: upscaled from a lower resolution
        image = image.resize((WIDTH // 2, HEIGHT // 2), Image.BILINEAR).resize((WIDTH, HEIGHT), Image.BILINEAR)
    return image


def _sensor_noise(rng, std: float) -> np.ndarray:
    """Uniform noise in 2x2 blocks, like an upscaled low-resolution camera crop.

    Blocks rather than per-pixel noise keep PNG files small and fast to encode, and integer
    draws are several times faster than Gaussian ones.
    """
    half = round(std * math.sqrt(3))
    noise = rng.integers(-half, half + 1, (HEIGHT // 2, WIDTH // 2, 3), dtype=np.int16)
    return noise.repeat(2, axis=0).repeat(2, axis=1)


def _background(kind: str, rng) -> np.ndarray:
    """The scene behind the person, built from one row or one column and broadcast (fast)."""
    pixels = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    ys = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]
    if kind == "plain":  # a flat wall with a soft shadow towards the ground
        pixels[:] = rng.uniform(90, 200, 3) * (1.0 - 0.25 * ys)
    elif kind == "indoor":  # striped wall panels above a darker floor
        wall_a, wall_b, floor = (rng.uniform(120, 220, 3) for _ in range(3))
        stripes = (np.arange(WIDTH) // int(rng.integers(8, 26)) % 2 == 0)[None, :, None]
        pixels[:] = np.where(stripes, wall_a, wall_b)
        pixels[int(rng.uniform(0.72, 0.85) * HEIGHT):] = floor * 0.7
    else:  # outdoor: sky fading into the ground
        sky = rng.uniform([150, 170, 190], [210, 225, 250])
        ground = rng.uniform([70, 80, 60], [140, 140, 120])
        weight = np.clip((ys - rng.uniform(0.3, 0.6)) * 4 + 0.5, 0, 1)
        pixels[:] = sky * (1 - weight) + ground * weight
    return pixels


def _draw_figure(draw: ImageDraw.ImageDraw, p: Person, palette: dict, pose: Pose) -> None:
    """Paint back to front: long hair, backpack, legs, arms, torso, head, straps."""
    u, cx, top = pose.unit, pose.cx, pose.top

    def y(f):  # fraction of the figure's height to a pixel row
        return top + f * u

    skin, upper = SKIN_RGB[p.skin], palette[p.upper_colour]
    lower = palette[p.lower_colour] if p.lower else skin
    bag = palette[p.bag_colour] if p.bag else None
    if p.hair_length == "long":
        draw.rectangle((cx - 0.07 * u, y(0.07), cx + 0.07 * u, y(0.25)), fill=HAIR_RGB[p.hair_colour])
    if p.bag == "backpack":
        draw.rectangle((cx, y(0.19), cx + 0.12 * u, y(0.42)), fill=bag)

    leg_width = int(0.05 * u)
    bare_legs = p.lower in (None, "skirt", "shorts")
    for side, angle in zip((-1, 1), pose.legs):
        hip = (cx + side * 0.035 * u, y(0.52))
        ankle = _limb_end(hip, side, angle, 0.41 * u)
        draw.line((hip, ankle), fill=skin if bare_legs else lower, width=leg_width)
        if p.lower == "shorts":
            draw.line((hip, _limb_end(hip, side, angle, 0.16 * u)), fill=lower, width=leg_width)
        draw.ellipse((ankle[0] - 0.035 * u, ankle[1] - 0.012 * u, ankle[0] + 0.035 * u, ankle[1] + 0.025 * u),
                     fill=palette[p.shoes_colour])
    if p.lower:  # hips in the lower garment's colour; a skirt flares to the knee
        hem, flare = (0.7, 0.1) if p.lower == "skirt" else (0.58, 0.07)
        draw.polygon([(cx - 0.07 * u, y(0.48)), (cx + 0.07 * u, y(0.48)), (cx + flare * u, y(hem)),
                      (cx - flare * u, y(hem))], fill=lower)

    arm_width, sleeve = int(0.045 * u), (1.0 if p.upper in LONG_SLEEVES else 0.35)
    for side, angle in zip((-1, 1), pose.arms):
        shoulder = (cx + side * 0.085 * u, y(0.185))
        hand = _limb_end(shoulder, side, angle, 0.3 * u)
        draw.line((shoulder, hand), fill=skin, width=arm_width)
        draw.line((shoulder, _limb_end(shoulder, side, angle, sleeve * 0.27 * u)), fill=upper, width=arm_width)
        draw.ellipse((hand[0] - 0.022 * u, hand[1] - 0.022 * u, hand[0] + 0.022 * u, hand[1] + 0.022 * u), fill=skin)
        if p.bag == "handbag" and side == 1:
            draw.rectangle((hand[0] - 0.04 * u, hand[1], hand[0] + 0.04 * u, hand[1] + 0.08 * u), fill=bag)

    hem, flare = {"coat": (0.68, 0.09), "dress": (0.72, 0.12)}.get(p.upper, (0.5, 0.07))
    draw.polygon([(cx - 0.085 * u, y(0.16)), (cx + 0.085 * u, y(0.16)), (cx + flare * u, y(hem)),
                  (cx - flare * u, y(hem))], fill=upper)
    draw.rectangle((cx - 0.02 * u, y(0.12), cx + 0.02 * u, y(0.165)), fill=skin)
    head = (cx - 0.055 * u, y(0.015), cx + 0.055 * u, y(0.135))
    draw.ellipse(head, fill=skin)
    draw.pieslice((head[0] - 2, head[1] - 3, head[2] + 2, head[3]), 180, 360, fill=HAIR_RGB[p.hair_colour])

    strap = max(2, int(0.012 * u))
    if p.bag == "backpack":
        for side in (-1, 1):
            draw.line(((cx + side * 0.06 * u, y(0.16)), (cx + side * 0.06 * u, y(0.36))), fill=bag, width=strap)
    elif p.bag == "shoulder bag":
        draw.line(((cx - 0.06 * u, y(0.16)), (cx + 0.1 * u, y(0.47))), fill=bag, width=strap)
        draw.rectangle((cx + 0.07 * u, y(0.44), cx + 0.15 * u, y(0.54)), fill=bag)


def _limb_end(start, side: int, angle_deg: float, length: float) -> tuple[float, float]:
    angle = math.radians(angle_deg)
    return start[0] + side * math.sin(angle) * length, start[1] + math.cos(angle) * length


# ---------------------------------------------------------------------------------------
# Captions

# Each domain has its own words; the first entry of a list is the plainest one.
VOCAB = {
    "cuhk": {
        "man": ("man", "male", "guy"), "woman": ("woman", "lady", "female", "girl"),
        "colours": {c: (c,) for c in COLOURS} | {"grey": ("grey", "gray")},
        "hair": {"black": ("black",), "brown": ("brown",), "blonde": ("blonde", "blond"), "grey": ("grey", "gray")},
        "short": ("short",), "long": ("long",),
        "t-shirt": ("t-shirt", "short sleeved shirt"), "jacket": ("jacket",), "coat": ("coat", "long coat"),
        "shirt": ("shirt", "long sleeved shirt"), "sweater": ("sweater",), "dress": ("dress",),
        "trousers": ("pants", "trousers"), "jeans": ("jeans",), "shorts": ("shorts",), "skirt": ("skirt",),
        "shoes": ("shoes", "sneakers"), "backpack": ("backpack",), "handbag": ("handbag", "purse"),
        "shoulder bag": ("shoulder bag", "bag over the shoulder"),
    },
    "icfg": {
        "man": ("gentleman", "young man"), "woman": ("lady", "young woman"),
        "colours": {"black": ("jet-black", "ebony"), "white": ("ivory", "off-white"),
                    "grey": ("heather-grey", "ash-grey"),
                    "red": ("crimson", "scarlet"), "blue": ("navy", "cobalt"), "green": ("olive", "forest-green"),
                    "yellow": ("mustard", "golden"), "orange": ("burnt-orange", "rust"), "purple": ("plum", "violet"),
                    "pink": ("rose", "blush-pink"), "brown": ("camel", "tan")},
        "hair": {"black": ("jet-black", "raven"), "brown": ("chestnut", "auburn"), "blonde": ("golden-blonde", "honey"),
                 "grey": ("silver", "salt-and-pepper")},
        "short": ("cropped", "neatly trimmed"), "long": ("flowing", "shoulder-length"),
        "t-shirt": ("crew-neck tee", "short-sleeved tee"), "jacket": ("bomber jacket", "zip-up jacket"),
        "coat": ("overcoat", "trench coat"), "shirt": ("button-down shirt", "collared shirt"),
        "sweater": ("knit pullover", "cable-knit sweater"), "dress": ("midi dress", "knee-length dress"),
        "trousers": ("tailored slacks", "chinos"), "jeans": ("denim jeans", "straight-leg denims"),
        "shorts": ("bermuda shorts", "knee-length shorts"), "skirt": ("pleated skirt", "a-line skirt"),
        "shoes": ("leather loafers", "low-top sneakers"), "backpack": ("rucksack", "daypack"),
        "handbag": ("tote", "clutch"), "shoulder bag": ("crossbody bag", "satchel"),
    },
    "rstp": {
        "man": ("boy", "male pedestrian"), "woman": ("girl", "female pedestrian"),
        "colours": {"black": ("black", "dark"), "white": ("white", "snow-white"), "grey": ("gray", "silver-gray"),
                    "red": ("red", "bright red"), "blue": ("sky-blue", "light blue"), "green": ("green", "grass-green"),
                    "yellow": ("yellow", "lemon"), "orange": ("orange", "tangerine"), "purple": ("violet", "lilac"),
                    "pink": ("pink", "light pink"), "brown": ("coffee", "brown")},
        "hair": {"black": ("black", "dark"), "brown": ("brown", "dark brown"), "blonde": ("yellow", "blond"),
                 "grey": ("gray", "white")},
        "short": ("short",), "long": ("long",),
        "t-shirt": ("tee", "short-sleeve top"), "jacket": ("windbreaker", "jacket"), "coat": ("long coat", "parka"),
        "shirt": ("shirt", "long-sleeve top"), "sweater": ("jumper", "knit top"), "dress": ("dress", "frock"),
        "trousers": ("pants", "long pants"), "jeans": ("jeans", "denim pants"), "shorts": ("shorts", "short pants"),
        "skirt": ("skirt", "knee skirt"), "shoes": ("trainers", "flats"), "backpack": ("schoolbag", "backpack"),
        "handbag": ("hand bag", "small bag"), "shoulder bag": ("side bag", "sling bag"),
    },
}


def colour_words(style: str, colour: str) -> tuple[str, ...]:
    """The words `style` may use for a clothing colour (for tests and inspection)."""
    return VOCAB[style]["colours"][colour]


@dataclass
class _Phrases:
    noun: str
    pron: str
    poss: str
    hair: str | None
    upper: str
    lower: str | None
    shoes: str | None
    bag: str | None

    def outfit(self, rng) -> list[str]:
        items = [x for x in (self.upper, self.lower, self.shoes) if x]
        if rng.random() < 0.3:  # word-order variety: not always top to bottom
            items = [items[i] for i in rng.permutation(len(items))]
        return items


def describe(person: Person, style: str, rng) -> str:
    """One caption: most attributes (0-2 of hair, lower, shoes, bag left out), in the style's voice."""
    words = VOCAB[style]
    optional = ["hair", "shoes"] + (["lower"] if person.lower else []) + (["bag"] if person.bag else [])
    n_drop = min(len(optional), int(rng.choice(3, p=[0.4, 0.4, 0.2])))
    dropped = {optional[i] for i in rng.choice(len(optional), n_drop, replace=False)}

    def colour(name):
        return _pick(rng, words["colours"][name])

    def garment(colour_name, kind):
        return _with_article(f"{colour(colour_name)} {_pick(rng, words[kind])}")

    man = person.gender == "man"
    hair = f"{_pick(rng, words[person.hair_length])} {_pick(rng, words['hair'][person.hair_colour])} hair"
    phrases = _Phrases(
        noun=_pick(rng, words[person.gender]), pron="he" if man else "she", poss="his" if man else "her",
        hair=None if "hair" in dropped else hair,
        upper=garment(person.upper_colour, person.upper),
        lower=None if "lower" in dropped or not person.lower else garment(person.lower_colour, person.lower),
        shoes=None if "shoes" in dropped else _shoes(garment(person.shoes_colour, "shoes"), style, rng),
        bag=None if "bag" in dropped or not person.bag else garment(person.bag_colour, person.bag),
    )
    return {"cuhk": _cuhk_caption, "icfg": _icfg_caption, "rstp": _rstp_caption}[style](phrases, rng)


def _shoes(phrase: str, style: str, rng) -> str:
    """CUHK-PEDES annotators often wrote 'a pair of ... shoes'."""
    return f"a pair of {phrase}" if style == "cuhk" and rng.random() < 0.5 else phrase


def _cuhk_caption(p: _Phrases, rng) -> str:
    """Plain, long descriptive sentences: 'The man is wearing ... He has ...'."""
    outfit = _and(p.outfit(rng))
    variant = int(rng.integers(3))
    if variant == 0:
        parts = [f"the {p.noun} is wearing {outfit}"]
        parts += [f"{p.pron} has {p.hair}"] if p.hair else []
        parts += [f"{p.pron} is carrying {p.bag}"] if p.bag else []
        return " ".join(_sentence(s) for s in parts)
    if variant == 1:
        who = f"a {p.noun} with {p.hair}" if p.hair else f"a {p.noun}"
        return _sentence(f"{who} is wearing {outfit}" + (f" and is carrying {p.bag}" if p.bag else ""))
    parts = [f"this {p.noun} wears {outfit}" + (f" and has {p.hair}" if p.hair else "")]
    parts += [f"{p.pron} also carries {p.bag}"] if p.bag else []
    return " ".join(_sentence(s) for s in parts)


def _icfg_caption(p: _Phrases, rng) -> str:
    """Long, detailed, fashion-magazine wording with sleeve details."""
    sleeves = " with long sleeves" if rng.random() < 0.5 and not p.upper.endswith(("tee", "dress")) else ""
    upper = p.upper + sleeves
    variant = int(rng.integers(3))
    if variant == 0:
        text = f"the {p.noun}" + (f" has {p.hair} and" if p.hair else "") + f" is dressed in {upper}"
        text += f" paired with {p.lower}" if p.lower else ""
        text += f", with {p.shoes} on {p.poss} feet" if p.shoes else ""
        parts = [text] + ([f"{p.pron} carries {p.bag} as an accessory"] if p.bag else [])
    elif variant == 1:
        text = f"a {p.noun}" + (f" with {p.hair}" if p.hair else "") + f", wearing {upper}"
        text += f" teamed with {p.lower}" if p.lower else ""
        text += f" and finished off with {p.shoes}" if p.shoes else ""
        text += f", accessorised with {p.bag}" if p.bag else ""
        parts = [text, "the overall look is smart and coordinated"]
    else:
        text = f"dressed in {_and([x for x in (upper, p.lower) if x])}, this {p.noun}"
        text += f" styles {p.poss} {p.hair} casually" if p.hair else " strolls along"
        text += f" and steps out in {p.shoes}" if p.shoes else ""
        parts = [text] + ([f"{p.pron} is holding {p.bag}"] if p.bag else [])
    return " ".join(_sentence(s) for s in parts)


def _rstp_caption(p: _Phrases, rng) -> str:
    """Short, clipped descriptions with everyday words."""
    variant = int(rng.integers(3))
    if variant == 0:
        parts = [f"a {p.noun} in {_and([x for x in (p.upper, p.lower) if x])}"]
        parts += [f"{p.shoes}"] if p.shoes else []
        parts += [f"with {p.bag}"] if p.bag else []
        parts += [f"{p.hair}"] if p.hair else []
        return _sentence(", ".join(parts))
    if variant == 1:
        parts = [f"{p.noun} with {p.hair}" if p.hair else p.noun, _and(p.outfit(rng))]
        return _sentence(", ".join(parts + ([p.bag] if p.bag else [])))
    text = f"the {p.noun} wears {_and(p.outfit(rng))}" + (f" and has {p.hair}" if p.hair else "")
    return _sentence(text + (f", carrying {p.bag}" if p.bag else ""))


def _with_article(phrase: str) -> str:
    """'a red coat', 'an ivory tote', but plurals ('blue jeans', 'white shoes') take none."""
    last = phrase.split()[-1]
    if last.endswith("s") and not last.endswith("ss"):
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


# ---------------------------------------------------------------------------------------
# File naming and writing

# The real release mixes PNG crops (CUHK01, CUHK03) with JPEG ones (the rest).
CUHK_SOURCES = ("CUHK01", "CUHK03", "Market", "test_query", "train_query")


def _image_path(style: str, person: Person, k: int, rng) -> str:
    """A path in the style of the real dataset's file names, unique per (person, k)."""
    pid, ext = person.person_id, _spec(style).image_ext
    if style == "cuhk":
        source = CUHK_SOURCES[(pid - 1) % len(CUHK_SOURCES)]
        ext = "png" if source.startswith("CUHK") else "jpg"
        return f"{source}/{pid:04d}{k + 1:03d}.{ext}"
    camera, frame = int(rng.integers(1, 16)), 30 * k + int(rng.integers(30))
    if style == "icfg":
        folder = "train" if person.split == "train" else "test"
        month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
        when = f"{month:02d}{day:02d}{_pick(rng, ('morning', 'noon', 'afternoon'))}"
        return f"{folder}/{pid:04d}/{pid:04d}_{k:03d}_{camera:02d}_{when}_{frame:04d}_{k}.{ext}"
    return f"{pid:04d}_c{camera}_{frame:04d}.{ext}"


def _entry(style: str, person: Person, path: str, captions: list[str]) -> dict:
    if style == "rstp":
        return {"id": person.person_id, "img_path": path, "captions": captions, "split": person.split}
    return {"split": person.split, "captions": captions, "file_path": path,
            "processed_tokens": [_tokens(c) for c in captions], "id": person.person_id}


def _encode(image: Image.Image, ext: str) -> bytes:
    buffer = io.BytesIO()
    if ext == "png":
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
    spec = _spec(style)
    fs, root = url_to_fs(out_dir)
    if fs.exists(root) and fs.ls(root):
        raise ConfigError(f"output folder {out_dir} is not empty; choose a new one")
    entries, made_dirs = [], set()
    for index, person in enumerate(make_identities(style, n_ids, seed)):
        n_images = int(_rng(seed, style, "counts", index).integers(spec.images_per_id[0], spec.images_per_id[1] + 1))
        for k in range(n_images):
            rng = _rng(seed, style, "images", index, k)
            image = render_person(person, style, random_pose(style, rng), rng)
            path = _image_path(style, person, k, rng)
            captions = [describe(person, style, rng) for _ in range(spec.captions_per_image)]
            target = posixpath.join(root, "imgs", path)
            folder = posixpath.dirname(target)
            if folder not in made_dirs:
                fs.makedirs(folder, exist_ok=True)
                made_dirs.add(folder)
            fs.pipe_file(target, _encode(image, path.rsplit(".", 1)[1]))
            entries.append(_entry(style, person, path, captions))
    fs.pipe_file(posixpath.join(root, spec.annotation_file), json.dumps(entries).encode())
    log.info("wrote %d %s images of %d identities to %s", len(entries), style, n_ids, out_dir)
    return out_dir
