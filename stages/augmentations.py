"""Augmentations on whole batches of tensors: cheap enough to run on the fly in train.

They follow airbench's way: one tensor op per batch, not a PIL transform per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch (N, C, H, W) left to right."""
    return flip_chosen(images, torch.rand(len(images), generator=generator) < 0.5)


def flip_chosen(images: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Mirror the images (N, C, H, W) where the boolean `chosen` (N,) is true, left to right."""
    return torch.where(chosen.to(images.device)[:, None, None, None], images.flip(-1), images)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `padding` pixels in x and y, filling the border by reflection."""
    if padding == 0:
        return images
    height, width = images.shape[-2:]
    padded = F.pad(images, (padding,) * 4, mode="reflect" if padding < min(height, width) else "replicate")
    shifts_x = torch.randint(0, 2 * padding + 1, (len(images),), generator=generator).to(images.device)
    shifts_y = torch.randint(0, 2 * padding + 1, (len(images),), generator=generator).to(images.device)
    # One slice per possible shift instead of one per image: 2 * (2p + 1) ops for the batch.
    columns = torch.empty_like(padded[..., :width])
    for shift in range(2 * padding + 1):
        chosen = shifts_x == shift
        columns[chosen] = padded[chosen, ..., shift : shift + width]
    cropped = torch.empty_like(images)
    for shift in range(2 * padding + 1):
        chosen = shifts_y == shift
        cropped[chosen] = columns[chosen, ..., shift : shift + height, :]
    return cropped
