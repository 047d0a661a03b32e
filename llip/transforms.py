"""Image preprocessing without torchvision (which would pull a CUDA torch): PIL resizing and cropping.

Evaluation: resize the shorter side to S (bicubic), centre crop S x S. Training: RandomResizedCrop to S x S
with scale (0.9, 1.0) and aspect ratio (3/4, 4/3) (docs/design.md section 2), bicubic. Both end with the OpenAI CLIP
mean/std normalisation and give a float32 tensor ``[3, S, S]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_MEAN = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
_STD = torch.tensor(OPENAI_STD).view(3, 1, 1)


def to_pil(image) -> Image.Image:
    """An RGB PIL image from a PIL image (any mode) or a uint8 array ``[H, W, 3]`` / ``[H, W]`` (numpy or torch)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 [H, W, 3] (0-255), got dtype {image.dtype}")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3):
            return Image.fromarray(image).convert("RGB")
        raise ValueError(f"image arrays must have shape [H, W, 3] or [H, W], got {list(image.shape)}")
    raise TypeError(f"expected a PIL.Image or a uint8 array [H, W, 3], got {type(image).__name__}")


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size`` (bicubic), keeping the aspect ratio."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
    return img.resize(new, Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int, height: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """A crop box ``(left, top, w, h)`` covering a random fraction in ``scale`` of the area with an aspect ratio
    drawn log-uniformly from ``ratio``; after 10 failed draws, the largest centred crop within ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def normalize(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, H, W]``, scaled to [0, 1] then normalised with the OpenAI mean/std."""
    x = np.asarray(img).transpose(2, 0, 1).astype(np.float32, order="C")  # [3, H, W], one copy
    # In place on the one float copy: the same float32 operations, in the same order, as (x / 255 - mean) / std.
    return torch.from_numpy(x).div_(255.0).sub_(_MEAN).div_(_STD)


class ImageTransform:
    """``transform(image) -> float32 [3, S, S]``; ``train=True`` uses RandomResizedCrop, else resize + centre crop.
    The crop draws from ``transform(image, generator=g)``'s generator, else the one given at construction, else
    torch's global RNG (which DataLoader seeds per worker); ``takes_generator`` tells
    :func:`~llip.data.datasets.seeded_call` to pass one per sample."""

    takes_generator = True

    def __init__(
        self,
        image_size: int,
        train: bool,
        scale=(0.9, 1.0),
        ratio=(3 / 4, 4 / 3),
        generator: torch.Generator | None = None,
    ):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
        self.image_size, self.train, self.scale, self.ratio, self.generator = image_size, train, scale, ratio, generator

    def __call__(self, image, generator: torch.Generator | None = None) -> torch.Tensor:
        img = to_pil(image)
        S = self.image_size
        if self.train:
            generator = generator if generator is not None else self.generator
            left, top, w, h = random_resized_crop_box(*img.size, self.scale, self.ratio, generator)
            img = img.resize((S, S), Image.BICUBIC, box=(left, top, left + w, top + h))
        else:
            img = center_crop(resize_shorter(img, S), S)
        return normalize(img)

    def __repr__(self) -> str:
        mode = f"RandomResizedCrop(scale={self.scale}, ratio={self.ratio})" if self.train else "Resize+CenterCrop"
        return f"ImageTransform({self.image_size}, {mode}, OpenAI mean/std)"


def image_transform(image_size: int, train: bool) -> ImageTransform:
    """The preprocessing of the model's ``image_size``: see :class:`ImageTransform`."""
    return ImageTransform(image_size, train)
