"""The built-in dataset: procedurally drawn shapes with several captions per image (no download).

Every image holds 1-4 objects, each a (shape, colour, size, position); its captions each describe a different
subset or aspect of the scene ("a small red circle", "a blue square left of a green triangle", "three shapes"),
which is the caption diversity Llip is built for: one image embedding cannot match all of them equally well, a
caption-conditioned one can.

Everything is a pure function of ``(split, n)``: scene ``n`` of split ``"train"`` is always the same picture with
the same captions, so runs, resumes and ranks agree without storing anything. Splits draw from disjoint seeds.
Images are drawn directly at the model's resolution (uint8 ``[S, S, 3]``), a few hundred microseconds each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
COLOUR_NAMES = tuple(COLOURS)
COUNT_WORDS = ("one shape", "two shapes", "three shapes", "four shapes")
MAX_OBJECTS = 4
BACKGROUND = (30, 30, 34)
# Radii as fractions of the image side; the gap between the ranges keeps "small" and "large" unambiguous.
SMALL_RADIUS = (0.09, 0.13)
LARGE_RADIUS = (0.16, 0.22)
# Per-split seed offsets: train and validation scenes never coincide.
SPLIT_SEEDS = {"train": 0x5EED_0001, "val": 0x5EED_0002}

# Zero-shot tasks over the attributes: (label function, classnames, prompt templates).
ZERO_SHOT_TEMPLATES = {
    "colour": ("a large {} shape", "a big {} object", "a picture of a large {} thing"),
    "shape": ("a large {}", "a big {} shape", "a picture of a large {}"),
    "count": ("{}", "a picture of {}", "an image with {}"),
}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    large: bool
    radius: float  # fraction of the image side
    x: float  # centre, fraction of the side, 0 = left
    y: float  # centre, 0 = top


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    captions: tuple[str, ...]

    @property
    def largest(self) -> Obj:
        return max(self.objects, key=lambda o: o.radius)

    def labels(self) -> dict[str, int]:
        """Zero-shot labels: colour and shape of the largest object, number of objects (0-based class ids)."""
        big = self.largest
        return {
            "colour": COLOUR_NAMES.index(big.colour),
            "shape": SHAPES.index(big.shape),
            "count": len(self.objects) - 1,
        }


def _rng(split: str, n: int) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    if n < 0:
        raise ValueError(f"scene index must be >= 0, got {n}")
    return np.random.default_rng([SPLIT_SEEDS[split], n])


def make_scene(split: str, n: int) -> Scene:
    """The objects and captions of scene ``n`` of ``split`` (deterministic)."""
    rng = _rng(split, n)
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    # One object per cell of a 2x2 grid (jittered inside it) so objects never overlap and relations are clear.
    cells = rng.permutation(4)[:count]
    objects = []
    for i, cell in enumerate(cells):
        # The first object is always large, so "the largest object" exists and is well separated.
        large = True if i == 0 else bool(rng.random() < 0.4)
        lo, hi = LARGE_RADIUS if large else SMALL_RADIUS
        if i == 0:
            lo = hi - 0.04  # the first object is the largest: in [0.18, 0.22]
        elif large:
            hi = objects[0].radius - 0.01  # other large objects stay visibly smaller than it (>= 0.16)
        radius = float(rng.uniform(lo, hi))
        cx, cy = (cell % 2) * 0.5 + 0.25, (cell // 2) * 0.5 + 0.25
        jitter = 0.25 - radius - 0.01
        x = cx + float(rng.uniform(-jitter, jitter))
        y = cy + float(rng.uniform(-jitter, jitter))
        objects.append(
            Obj(SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOURS))], large, radius, x, y)
        )
    return Scene(tuple(objects), _captions(objects, rng))


def _describe(o: Obj, with_size: bool = True) -> str:
    return f"{'large' if o.large else 'small'} {o.colour} {o.shape}" if with_size else f"{o.colour} {o.shape}"


def object_caption(o: Obj) -> str:
    """The caption that describes one object alone ("a small red circle"): every scene has one per object."""
    return f"a {_describe(o)}"


def _captions(objects: list[Obj], rng: np.random.Generator) -> tuple[str, ...]:
    """Several captions, each about a different aspect: single objects, a spatial relation, the count,
    the set of colours."""
    caps = [object_caption(o) for o in objects]
    # A spatial relation between two objects that the words tell apart (never "a red circle left of a red circle").
    pairs = [
        (a, b) for ia, a in enumerate(objects) for b in objects[ia + 1 :] if (a.colour, a.shape) != (b.colour, b.shape)
    ]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        if abs(a.x - b.x) >= abs(a.y - b.y):
            left, right = (a, b) if a.x < b.x else (b, a)
            caps.append(f"a {_describe(left, False)} left of a {_describe(right, False)}")
        else:
            top, bottom = (a, b) if a.y < b.y else (b, a)
            caps.append(f"a {_describe(top, False)} above a {_describe(bottom, False)}")
    caps.append(COUNT_WORDS[len(objects) - 1])
    colours = sorted({o.colour for o in objects}, key=COLOUR_NAMES.index)
    if len(colours) >= 2:
        caps.append(", ".join(colours[:-1]) + f" and {colours[-1]} shapes")
    return tuple(dict.fromkeys(caps))  # identical objects give identical captions: keep one


def render(scene: Scene, size: int) -> np.ndarray:
    """Draw ``scene`` -> uint8 ``[size, size, 3]``."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * size, o.y * size, o.radius * size
        colour = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif o.shape == "square":
            s = r * 0.85  # same visual area class as the circle
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=colour)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    return np.asarray(img)


def caption_choice(seed: int, epoch: int, n: int, n_captions: int) -> int:
    """Which of scene ``n``'s captions a training step uses: a pure function of (seed, epoch, n)."""
    return int(np.random.default_rng([seed, epoch, n, 0xCA9]).integers(n_captions))


def zero_shot_tasks() -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """``task -> (classnames, templates)``; labels come from :meth:`Scene.labels`."""
    return {
        "colour": (list(COLOUR_NAMES), ZERO_SHOT_TEMPLATES["colour"]),
        "shape": (list(SHAPES), ZERO_SHOT_TEMPLATES["shape"]),
        "count": (list(COUNT_WORDS), ZERO_SHOT_TEMPLATES["count"]),
    }


def eval_set(image_size: int, transform, tokenizer, n_images: int = 500, split: str = "val") -> dict:
    """Validation scenes ``0 .. n_images-1`` with every caption, for zero-shot and retrieval evaluation.

    Returns ``images [N,3,S,S]`` float32, ``tokens [M,L]`` int64 (all captions of all images), ``captions``
    (M strings), ``caption_to_image [M]`` int64, ``labels`` ``{task: [N] int64}`` for :func:`zero_shot_tasks`.
    """
    import torch

    scenes = [make_scene(split, n) for n in range(n_images)]
    images = torch.stack([transform(render(s, image_size)) for s in scenes])
    captions = [c for s in scenes for c in s.captions]
    owner = [i for i, s in enumerate(scenes) for _ in s.captions]
    labels = {task: torch.tensor([s.labels()[task] for s in scenes]) for task in ZERO_SHOT_TEMPLATES}
    return {
        "images": images,
        "tokens": tokenizer(captions),
        "captions": captions,
        "caption_to_image": torch.tensor(owner, dtype=torch.int64),
        "labels": labels,
    }
