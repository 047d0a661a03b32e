"""Image preprocessing: output shape and dtype, exact normalisation, centre crop position, RandomResizedCrop
bounds, determinism with a generator, and clear errors for bad inputs."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import llip
from llip.transforms import OPENAI_MEAN, OPENAI_STD, ImageTransform, random_resized_crop_box


def expected_normalised(arr: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("source", ["pil", "array", "gray_array", "rgba_pil"])
def test_shape_dtype_and_constant_colour(train, source):
    # A constant image stays constant through any resize/crop, so the output is exactly its normalised colour.
    colour = np.array([200, 30, 90], dtype=np.uint8)
    arr = np.broadcast_to(colour, (45, 70, 3)).copy()
    if source == "pil":
        image = Image.fromarray(arr)
    elif source == "array":
        image = arr
    elif source == "gray_array":
        arr = np.full((45, 70), 77, dtype=np.uint8)
        image = arr
        arr = np.stack([arr] * 3, axis=-1)
    else:
        image = Image.fromarray(arr).convert("RGBA")
    out = llip.image_transform(32, train=train)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected_normalised(arr[:32, :32]), rtol=0, atol=1e-6)


def test_eval_crops_the_centre():
    # A 32 x 64 image needs no resize at size 32; the centre crop is columns 16..47.
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
    out = llip.image_transform(32, train=False)(arr)
    torch.testing.assert_close(out, expected_normalised(arr[:, 16:48]), rtol=0, atol=1e-6)


def test_eval_resizes_shorter_side():
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = 255  # left half white: after resizing to 32 x 64 and cropping columns 16..47, half is white
    out = llip.image_transform(32, train=False)(arr)
    white = (out[0] > 0).float().mean(dim=0)  # per column
    assert white[:14].min() == 1 and white[18:].max() == 0


def test_random_resized_crop_box_bounds():
    g = torch.Generator().manual_seed(0)
    for width, height in ((64, 64), (60, 70), (300, 257)):  # shapes where crops of >= 90% area fit the ratios
        for _ in range(200):
            left, top, w, h = random_resized_crop_box(width, height, generator=g)
            assert left >= 0 and top >= 0 and left + w <= width and top + h <= height
            # w and h are rounded to ints, which moves area and ratio a little from the drawn values
            assert 0.9 - 2 / min(w, h) <= w * h / (width * height) <= 1.0
            assert 3 / 4 - 1 / h <= w / h <= 4 / 3 + 1 / h


def test_random_crop_fallback_for_extreme_aspect():
    # A 200 x 10 strip: no crop of >= 90% area has a ratio within [3/4, 4/3]: take the centred max-ratio crop.
    left, top, w, h = random_resized_crop_box(200, 10, generator=torch.Generator().manual_seed(0))
    assert (w, h) == (13, 10) and left == (200 - 13) // 2 and top == 0
    assert math.isclose(w / h, 1.3, rel_tol=0.05)


def test_train_transform_is_random_and_seedable():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    a = ImageTransform(32, train=True, generator=torch.Generator().manual_seed(3))(arr)
    b = ImageTransform(32, train=True, generator=torch.Generator().manual_seed(3))(arr)
    t = ImageTransform(32, train=True, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, t(arr)) for _ in range(5))


def test_bad_inputs():
    t = llip.image_transform(32, train=False)
    with pytest.raises(TypeError, match="uint8"):
        t(np.zeros((40, 40, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        t(np.zeros((40, 40, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match="PIL.Image"):
        t("image.png")
    with pytest.raises(ValueError, match="image_size"):
        llip.image_transform(0, train=True)
