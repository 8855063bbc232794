"""The batch augmentations train applies on every batch (and augment's preview shows): each image
is its original translated or mirrored, drawn from the generator it is given."""

from __future__ import annotations

import pytest
import torch

from stages.augmentations import random_crop, random_flip

SIZE = 16


def ramps(count: int, size: int = SIZE) -> torch.Tensor:
    """(count, 3, size, size) float images whose every pixel of a channel has its own value."""
    positions = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size)
    channels = torch.arange(3, dtype=torch.float32).view(1, 3, 1, 1) * size * size
    offsets = torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1) * 3 * size * size
    return positions + channels + offsets


def translated(image: torch.Tensor, dy: int, dx: int, border: str) -> torch.Tensor:
    """image (3, H, W) moved so that pixel (y, x) shows (y + dy, x + dx), the border reflected or replicated."""
    height, width = image.shape[-2:]
    rows, columns = torch.arange(height) + dy, torch.arange(width) + dx
    if border == "reflect":
        rows, columns = reflect(rows, height), reflect(columns, width)
    else:
        rows, columns = rows.clamp(0, height - 1), columns.clamp(0, width - 1)
    return image[:, rows][:, :, columns]


def reflect(indices: torch.Tensor, length: int) -> torch.Tensor:
    indices = indices.abs()
    return torch.where(indices >= length, 2 * (length - 1) - indices, indices)


def shift_of(cropped: torch.Tensor, original: torch.Tensor, padding: int, border: str) -> tuple[int, int] | None:
    """The (dy, dx) within ±padding that turns original into cropped, or None if there is none."""
    for dy in range(-padding, padding + 1):
        for dx in range(-padding, padding + 1):
            if torch.equal(translated(original, dy, dx, border), cropped):
                return dy, dx
    return None


def test_random_crop_with_padding_0_returns_the_images_unchanged():
    images = ramps(8)

    assert torch.equal(random_crop(images, 0, torch.Generator().manual_seed(0)), images)


@pytest.mark.parametrize(
    ("size", "padding", "border"),
    [(SIZE, 2, "reflect"), (SIZE, 4, "reflect"), (4, 4, "replicate")],  # reflection cannot reach past the image
    ids=["padding-2", "padding-4", "padding-as-large-as-the-image"],
)
def test_random_crop_translates_each_image_by_at_most_padding_pixels_in_x_and_y(size, padding, border):
    images = ramps(64, size)

    cropped = random_crop(images, padding, torch.Generator().manual_seed(0))

    assert cropped.shape == images.shape
    shifts = [shift_of(crop, image, padding, border) for crop, image in zip(cropped, images)]
    assert None not in shifts, "every image is a translation of its original"
    assert len(set(shifts)) > 5, "images are shifted independently"
    assert any(dy != dx for dy, dx in shifts), "x and y are drawn independently"


def test_random_crop_is_the_same_for_the_same_generator_seed_only():
    images = ramps(32)

    first, again, other = (random_crop(images, 3, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_random_flip_mirrors_about_half_the_images_and_leaves_the_others_untouched():
    images = torch.rand(200, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    flipped = random_flip(images, torch.Generator().manual_seed(0))

    assert flipped.shape == images.shape
    mirrored = [torch.equal(out, image.flip(-1)) for out, image in zip(flipped, images)]
    untouched = [torch.equal(out, image) for out, image in zip(flipped, images)]
    assert all(m != u for m, u in zip(mirrored, untouched)), "each image is either mirrored or untouched"
    assert 70 <= sum(mirrored) <= 130


def test_random_flip_is_the_same_for_the_same_generator_seed_only():
    images = ramps(32)

    first, again, other = (random_flip(images, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)
