"""Where the model looked: Grad-CAM heat maps for the predicted class, drawn over the images.

Grad-CAM (Selvaraju et al., 2017) weighs the feature maps of the last convolution by the gradient
of the class's score, keeps the positive evidence, and scales the coarse map up to the image.
Captum computes it (`LayerGradCam`, `LayerAttribution.interpolate`) and blends it over the image
(`visualize_image_attr`). Used by `python -m stages.predict --explain` and by the report.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # before captum's visualisation imports pyplot: files, never windows

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, visualization
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import nn

from stages import architectures
from stages.errors import StageError
from stages.models import as_model_input

HEAT_MAP_COLOURS = "jet"  # Grad-CAM's usual colours: red is where the evidence is strongest
PAIR_INCHES = (3.2, 1.75)  # one image beside its heat map, with a line of caption above


def last_conv_layer(model: nn.Module) -> nn.Conv2d:
    """The last convolution: its feature maps are the finest that still see whole objects."""
    convolutions = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise StageError(f"{type(model).__name__} has no convolution layer for Grad-CAM to explain")
    return convolutions[-1]


def heat_maps(model: nn.Module, images: np.ndarray, targets: Sequence[int]) -> tuple[np.ndarray, str]:
    """Heat maps (N, H, W) of the evidence for each image's target class, and the method's name: Grad-CAM on
    the layer its architecture names (stages/architectures.py); integrated gradients for a transformer,
    whose only convolution, its patch embedding, has no feature map that sees objects."""
    layer = explained_layer_of(model)
    if layer is None:
        return integrated_gradients(model, images, targets), INTEGRATED_GRADIENTS
    return grad_cam(model, images, targets, layer), GRAD_CAM


def explanation_method(model: nn.Module) -> str:
    """The name of the method `heat_maps` uses for this model, in words."""
    return INTEGRATED_GRADIENTS if explained_layer_of(model) is None else GRAD_CAM


GRAD_CAM = "Grad-CAM (Captum's LayerGradCam on the last convolution of the network's features)"
INTEGRATED_GRADIENTS = ("integrated gradients (Captum's IntegratedGradients from a black image, Sundararajan et al., "
                        "2017): a transformer has no feature map for Grad-CAM")
INTEGRATION_STEPS = 16


def explained_layer_of(model: nn.Module) -> nn.Module | None:
    """The layer Grad-CAM explains: as the architecture says for the pipeline's models, else the last convolution."""
    architecture = getattr(model, "architecture", None)
    if architecture is None:
        return last_conv_layer(model)
    return architectures.explained_layer(model.network, architectures.family_of(architecture), model.head)


def grad_cam(model: nn.Module, images: np.ndarray, targets: Sequence[int], layer: nn.Module | None = None
             ) -> np.ndarray:
    """Heat maps (N, H, W), 0 where nothing speaks for the class, for (N, H, W, 3) uint8 images and one
    target class each."""
    # Grad-CAM needs gradients, also when the caller runs in inference mode or without grad.
    with torch.inference_mode(False), torch.enable_grad():
        inputs = as_model_input(images)
        maps = LayerGradCam(model, layer or last_conv_layer(model)).attribute(
            inputs, target=torch.as_tensor(list(targets)), relu_attributions=True)
        maps = LayerAttribution.interpolate(maps, tuple(inputs.shape[-2:]), interpolate_mode="bilinear")
    return maps[:, 0].detach().numpy()


def integrated_gradients(model: nn.Module, images: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Heat maps (N, H, W): each pixel's positive share of the class's score, summed over its channels."""
    with torch.inference_mode(False), torch.enable_grad():
        inputs = as_model_input(images)
        attributions = IntegratedGradients(model).attribute(inputs, target=torch.as_tensor(list(targets)),
                                                           n_steps=INTEGRATION_STEPS, internal_batch_size=len(inputs))
    return attributions.sum(dim=1).clamp_min(0).detach().numpy()


def draw_explanation(figure: Figure, image_axes: Axes, heat_axes: Axes, image: np.ndarray, heat_map: np.ndarray,
                     caption: str, colour: str = "black") -> None:
    """The (H, W, 3) uint8 image on the left, its heat map blended over it on the right, the caption above."""
    for axes in (image_axes, heat_axes):
        axes.set_xticks([]), axes.set_yticks([])
    image_axes.imshow(image)
    image_axes.set_title(caption, fontsize=8, loc="left", color=colour)
    if heat_map.max() > 0:
        visualization.visualize_image_attr(heat_map[..., None], image / 255, method="blended_heat_map",
                                           sign="positive", cmap=HEAT_MAP_COLOURS, alpha_overlay=0.5,
                                           plt_fig_axis=(figure, heat_axes), use_pyplot=False)
    else:
        # Captum's normalisation divides by the map's largest value: a map with no positive
        # evidence anywhere is said in words instead.
        heat_axes.imshow(image)
        heat_axes.set_xlabel("no positive evidence", fontsize=7)


def explanation_grid_png(images: np.ndarray, heat_maps: np.ndarray, captions: Sequence[str],
                         colours: Sequence[str] | None = None, pairs_per_row: int = 4,
                         pair_inches: tuple[float, float] = PAIR_INCHES) -> bytes:
    """A grid of image / heat-map pairs, `pairs_per_row` side by side, as PNG bytes."""
    rows = max(1, -(-len(images) // pairs_per_row))
    figure = Figure(figsize=(pair_inches[0] * pairs_per_row, pair_inches[1] * rows), layout="constrained")
    axes = np.array(figure.subplots(rows, 2 * pairs_per_row, squeeze=False))
    for axis in axes.flat:
        axis.set_axis_off()
    for index, (image, heat_map, caption) in enumerate(zip(images, heat_maps, captions)):
        row, column = divmod(index, pairs_per_row)
        image_axes, heat_axes = axes[row, 2 * column], axes[row, 2 * column + 1]
        image_axes.set_axis_on(), heat_axes.set_axis_on()
        colour = colours[index] if colours else "black"
        draw_explanation(figure, image_axes, heat_axes, image, heat_map, caption, colour)
    return png_bytes(figure)


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" tag: the bytes then depend on the data and not on matplotlib's version.
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()
