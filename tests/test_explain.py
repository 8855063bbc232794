"""Grad-CAM heat maps (Captum) and their drawings: the evidence is found where it lies."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from stages.datasets import load_split
from stages.errors import StageError
from stages.explain import PAIR_INCHES, explanation_grid_png, grad_cam, last_conv_layer
from stages.models import load_checkpoint

SIZE = 16


def red_detector() -> nn.Module:
    """Class 1's score rises with the red pixels, class 0's falls; the feature map is half the image's size."""
    detector = nn.Conv2d(3, 1, 1)
    classifier = nn.Linear(1, 2)
    with torch.no_grad():
        detector.weight.copy_(torch.tensor([1.0, -0.5, -0.5]).view(1, 3, 1, 1))
        detector.bias.zero_()
        classifier.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        classifier.bias.zero_()
    return nn.Sequential(detector, nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), classifier).eval()


def red_square_at_top_left() -> np.ndarray:
    image = np.zeros((1, SIZE, SIZE, 3), dtype=np.uint8)  # (N, H, W, 3)
    image[0, :4, :4, 0] = 255
    return image


def test_the_heat_map_for_a_class_lies_on_the_pixels_that_raise_its_score():
    heat_map = grad_cam(red_detector(), red_square_at_top_left(), [1])[0]

    assert heat_map.shape == (SIZE, SIZE)  # the half-size map interpolated up to the image
    assert np.unravel_index(heat_map.argmax(), heat_map.shape) < (4, 4)
    assert heat_map[:4, :4].mean() > 0 and heat_map[8:, 8:].max() == 0


def test_a_class_with_no_evidence_gets_an_empty_map_and_is_still_drawn():
    image = red_square_at_top_left()
    heat_map = grad_cam(red_detector(), image, [0])

    assert heat_map.max() == 0  # the red square only speaks against class 0
    png = explanation_grid_png(image, heat_map, ["class 0: 10%"], pairs_per_row=1)
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_the_last_convolution_is_explained_whatever_the_network():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 5, 3), nn.ReLU()), nn.Flatten())
    assert last_conv_layer(model) is model[1][0]

    with pytest.raises(StageError, match="Sequential has no convolution layer for Grad-CAM to explain"):
        last_conv_layer(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))


def test_a_trained_model_gets_one_finite_non_negative_map_per_image(trained_project):
    model, description = load_checkpoint(trained_project.model)
    images = np.array(load_split(trained_project.prepared, "test").images[:6])
    predicted = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).argmax(dim=1).tolist()

    with torch.inference_mode():  # as a caller that classified in inference mode would call it
        heat_maps = grad_cam(model, images, predicted)

    assert heat_maps.shape == (6, description["image_size"], description["image_size"])
    assert (heat_maps >= 0).all() and np.isfinite(heat_maps).all()


def test_a_grid_places_every_pair_and_leaves_the_rest_blank():
    images = np.repeat(red_square_at_top_left(), 5, axis=0)
    heat_maps = grad_cam(red_detector(), images, [1] * 5)

    png = explanation_grid_png(images, heat_maps, [f"image {n}" for n in range(5)], pairs_per_row=2)

    pair_width, pair_height = (round(100 * inches) for inches in PAIR_INCHES)  # at 100 dpi
    assert Image.open(io.BytesIO(png)).size == (2 * pair_width, 3 * pair_height)  # three rows of two pairs
