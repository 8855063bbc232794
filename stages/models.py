"""The networks `train.model` names, and how a trained one is saved and loaded.

A checkpoint is a plain dict of tensors, strings and numbers, loadable with
`torch.load(weights_only=True)`: nothing in it is unpickled as code.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from stages.errors import StageError
from stages.outputs import atomic_path
from stages.params import TORCHVISION_MODELS


def as_images_nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 images, in memory or memory-mapped, as the (N, 3, H, W) uint8 tensor the models'
    inputs are made from. NHWC bytes viewed as NCHW are exactly torch's channels_last layout: no copy of
    an array in memory (one is made of a read-only memory map), and the convolutions' fastest CPU path."""
    return torch.from_numpy(np.require(images, requirements=("C_CONTIGUOUS", "WRITEABLE"))).permute(0, 3, 1, 2)


def as_unit_floats(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, 3, H, W) uint8 → the floats in [0, 1] every model here takes."""
    return images.to(dtype).div_(255)


def as_model_input(images: np.ndarray, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """(N, H, W, 3) uint8 images → (N, 3, H, W) floats in [0, 1] on `device`: what a Classifier takes."""
    return as_unit_floats(as_images_nchw(images).to(device), dtype)


class Normalize(nn.Module):
    """Images in [0, 1] → per-channel standardised; the statistics travel with the weights."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


class LeNet(nn.Module):
    """The classic PyTorch tutorial network: conv 6/16, fully connected 120/84."""

    MIN_IMAGE_SIZE = 16  # two 5x5 convolutions and two halvings leave at least one pixel

    def __init__(self, num_classes: int, image_size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


# airbench's: a tiny eps keeps BatchNorm a pure standardisation (its scales may be frozen at 1).
BATCHNORM_EPS = 1e-12


def conv_block(channels_in: int, channels_out: int) -> nn.Sequential:
    """conv → max-pool → BN → GELU → conv → BN → GELU: the airbench block, one resolution halving."""
    return nn.Sequential(
        identity_initialised_conv(channels_in, channels_out),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(channels_out, eps=BATCHNORM_EPS),
        nn.GELU(),
        identity_initialised_conv(channels_out, channels_out),
        nn.BatchNorm2d(channels_out, eps=BATCHNORM_EPS),
        nn.GELU(),
    )


def identity_initialised_conv(channels_in: int, channels_out: int) -> nn.Conv2d:
    """A 3x3 conv whose first `channels_in` filters start as the identity (Dirac), the rest random:
    as airbench does, so that at initialisation each block passes its input through."""
    conv = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(channels_in, channels_out)])
    return conv


class ConvNet(nn.Module):
    """A fast CIFAR network in the shape of airbench (Jordan, 2024): a frozen 2x2 patch-whitening
    layer fitted to the training images, three conv blocks, global max-pool, a linear head."""

    WHITENING_PATCH = 2
    MIN_IMAGE_SIZE = 9  # the 2x2 whitening takes one pixel, then three halvings must leave one

    def __init__(self, num_classes: int, widths: list[int]):
        super().__init__()
        whitened = 2 * 3 * self.WHITENING_PATCH**2  # each eigenvector and its negation
        self.whiten = nn.Conv2d(3, whitened, self.WHITENING_PATCH, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.body = nn.Sequential(
            nn.GELU(),
            conv_block(whitened, widths[0]),
            conv_block(widths[0], widths[1]),
            conv_block(widths[1], widths[2]),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        # As airbench94 (Muon variant): unit-variance head weights, logits scaled down by the
        # width, which keeps early softmax outputs soft whatever the width.
        with torch.no_grad():
            self.head.weight.div_(self.head.weight.std())
        self.logit_scale = 1 / widths[2]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.whiten(images))) * self.logit_scale

    @torch.no_grad()
    def fit_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the first layer to the ZCA-like whitening of 2x2 patches of `images` (N, 3, H, W), normalised."""
        patches = images.float().unfold(2, self.WHITENING_PATCH, 1).unfold(3, self.WHITENING_PATCH, 1)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * self.WHITENING_PATCH**2)
        patches = patches - patches.mean(dim=0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).flip(0)
        filters = filters.reshape(-1, 3, self.WHITENING_PATCH, self.WHITENING_PATCH)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()


class Classifier(nn.Module):
    """Normalisation followed by the network: takes float images in [0, 1], (N, 3, H, W)."""

    def __init__(self, network: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalize(images))


# Below this side, torchvision's ImageNet networks lose their stem's downsampling (see below).
SMALL_IMAGE_SIDE = 64


def resnet_for_small_images(network: nn.Module) -> None:
    # As the CIFAR ResNets (He et al., 2016, section 4.2): the first stage sees the image at full
    # resolution, so neither the stem's stride nor its max-pool. The 7x7 kernel stays, so that
    # ImageNet weights load unchanged.
    network.conv1.stride = (1, 1)
    network.maxpool = nn.Identity()


def mobilenet_for_small_images(network: nn.Module) -> None:
    # The stem and the first block each halve the image: without both, 32 px ends in 4x4 maps, not 1x1.
    network.features[0][0].stride = (1, 1)
    network.features[1].block[0][0].stride = (1, 1)


SMALL_IMAGE_ADAPTATIONS = {"resnet18": resnet_for_small_images, "mobilenet_v3_small": mobilenet_for_small_images}


def torchvision_network(architecture: str, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's network with a head for `num_classes`; its downsampling cut on images under 64 px."""
    network = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
    if image_size < SMALL_IMAGE_SIDE:
        SMALL_IMAGE_ADAPTATIONS[architecture](network)
    return network


def build_model(architecture: str, num_classes: int, image_size: int, widths: list[int] | None,
                mean: list[float], std: list[float]) -> Classifier:
    if architecture in TORCHVISION_MODELS:
        return Classifier(torchvision_network(architecture, num_classes, image_size), mean, std)
    if architecture not in ("lenet", "convnet"):
        raise ValueError(f"unknown architecture {architecture!r}")
    # A StageError: data.image_size and train.model are each valid alone, and the stage reports
    # the pair in one line instead of a traceback (from deep in the max-pools for convnet).
    smallest = smallest_image_side(architecture)
    if image_size < smallest:
        raise StageError(f"train.model {architecture} needs data.image_size ≥ {smallest} (got {image_size})")
    network = LeNet(num_classes, image_size) if architecture == "lenet" else ConvNet(num_classes, widths)
    return Classifier(network, mean, std)


def smallest_image_side(architecture: str) -> int:
    """The smallest images `architecture` takes; torchvision's, cut for small images and ending in an
    adaptive pool, take any."""
    return {"lenet": LeNet.MIN_IMAGE_SIZE, "convnet": ConvNet.MIN_IMAGE_SIZE}.get(architecture, 1)


def why_torch_refused(error: Exception) -> str:
    """torch.load's refusal in a few words. Its own message for a file that would run code advises loading
    it with weights_only=False, which is what must not be done with a file from outside."""
    code = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if code:
        return f"it would run {code.group(1)} when unpickled; nothing of it was run"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line[:200]}"


def save_checkpoint(path: Path, model: Classifier, description: dict) -> None:
    """Save weights plus what is needed to use them (see `load_checkpoint`), atomically."""
    checkpoint = {**description, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_path(path) as partial:
        torch.save(checkpoint, partial)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """The model in eval mode and its description (classes, image_size, normalization, params, ...).

    A model file may come from anywhere (a download, a colleague, a replaced champion): it is read with
    `weights_only`, so that nothing in it runs as code, and anything but a checkpoint of this pipeline
    is refused in one line naming the file."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike for a file it refuses
        raise StageError(f"{path} is not a model checkpoint this pipeline can load ({why_torch_refused(error)}); "
                         "give a models/model.pt that stage train wrote") from None
    try:
        model = build_model(
            checkpoint["architecture"], len(checkpoint["classes"]), checkpoint["image_size"],
            checkpoint["widths"], checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"],
        )
        model.load_state_dict(checkpoint.pop("state_dict"))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise StageError(f"{path} is a PyTorch file but not a checkpoint of this pipeline ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200] if str(error) else ''}); give a models/model.pt that "
                         "stage train wrote") from None
    return model.eval(), checkpoint
