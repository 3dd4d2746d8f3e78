"""Drawing a synthetic person: background, figure, occluder, lighting, sensor noise.

Rendering is a pure function of (person, style spec, pose, noise stream); every per-image
choice is in the :class:`Pose`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from tpr_ray.data.synth.people import Person
    from tpr_ray.data.synth.styles import StyleSpec

HEIGHT, WIDTH = 384, 128
HAIR_RGB = {"black": (20, 18, 18), "brown": (90, 55, 30), "blonde": (215, 185, 110), "grey": (165, 165, 165)}
SKIN_RGB = ((236, 200, 170), (212, 166, 130), (172, 122, 90), (120, 85, 60))
LONG_SLEEVES = ("jacket", "coat", "shirt", "sweater")


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


def random_pose(spec: StyleSpec, rng) -> Pose:
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


def draw_person(person: Person, spec: StyleSpec, pose: Pose, rng) -> Image.Image:
    """A 384x128 RGB image of `person`: background, figure, occluder, then lighting and noise."""
    image = Image.fromarray(spec.background(rng))
    draw = ImageDraw.Draw(image)
    _draw_figure(draw, person, spec.palette, pose)
    if pose.occluder is not None:
        draw.rectangle(pose.occluder, fill=pose.occluder_rgb)
    pixels = np.asarray(image, dtype=np.float32) * pose.brightness * np.asarray(pose.tint, dtype=np.float32)
    pixels = np.clip(pixels + _sensor_noise(rng, spec.noise), 0, 255).astype(np.uint8)
    if pose.flip:
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    image = Image.fromarray(pixels)
    if spec.downscale > 1:  # far-away CCTV crops: upscaled from a lower resolution
        small = (WIDTH // spec.downscale, HEIGHT // spec.downscale)
        image = image.resize(small, Image.BILINEAR).resize((WIDTH, HEIGHT), Image.BILINEAR)
    return image


def _sensor_noise(rng, std: float) -> np.ndarray:
    """Uniform noise in 2x2 blocks, like an upscaled low-resolution camera crop.

    Blocks rather than per-pixel noise keep PNG files small and fast to encode, and integer
    draws are several times faster than Gaussian ones.
    """
    half = round(std * math.sqrt(3))
    noise = rng.integers(-half, half + 1, (HEIGHT // 2, WIDTH // 2, 3), dtype=np.int16)
    return noise.repeat(2, axis=0).repeat(2, axis=1)


# Backgrounds: the scene behind the person, built from one row or one column and broadcast (fast).


def plain_wall(rng) -> np.ndarray:
    """A flat wall with a soft shadow towards the ground."""
    pixels = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    ys = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]
    pixels[:] = rng.uniform(90, 200, 3) * (1.0 - 0.25 * ys)
    return pixels


def indoor(rng) -> np.ndarray:
    """Striped wall panels above a darker floor."""
    pixels = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    wall_a, wall_b, floor = (rng.uniform(120, 220, 3) for _ in range(3))
    stripes = (np.arange(WIDTH) // int(rng.integers(8, 26)) % 2 == 0)[None, :, None]
    pixels[:] = np.where(stripes, wall_a, wall_b)
    pixels[int(rng.uniform(0.72, 0.85) * HEIGHT):] = floor * 0.7
    return pixels


def outdoor(rng) -> np.ndarray:
    """Sky fading into the ground."""
    pixels = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    ys = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]
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
