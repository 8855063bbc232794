"""The networks `train.model` names, and how a trained one is saved and loaded.

A checkpoint is a plain dict of tensors, strings and numbers, loadable with
`torch.load(weights_only=True)`: nothing in it is unpickled as code.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages import architectures
from stages.errors import StageError
from stages.outputs import atomic_path


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


class Scattering(nn.Module):
    """The scattering transform of Bruna & Mallat (2013) as kymatio computes it: each colour channel filtered
    with Morlet wavelets at 2 scales and 8 angles, their moduli filtered again, all averaged over 4x4 pixels.
    Nothing in it is learned: (N, 3, H, W) → (N, 243, H // 4, W // 4)."""

    SCALES = 2  # J: the averaging spans 2**J pixels
    ANGLES = 8  # L
    CHANNELS = 3 * 81  # per colour: the average, 16 first-order and 64 second-order coefficients (J=2, L=8)

    def __init__(self, side: int):
        super().__init__()
        # Not `kymatio.torch`: it imports kymatio's 3-D scattering too, which needs SciPy's sph_harm (gone in 1.17).
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

        self.transform = ScatteringTorch2D(J=self.SCALES, shape=(side, side), L=self.ANGLES)
        self.side = side // 2**self.SCALES

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the model's dtype (compress's bf16 and fp16 copies): its FFTs take no half
        # precision. kymatio wants the default memory layout.
        self.transform.float()
        coefficients = self.transform(images.float().contiguous())
        return coefficients.flatten(1, 2).to(images.dtype)


class ScatterNet(nn.Module):
    """Tramèr & Boneh's ScatterNet+linear (2021, "Differentially private learning needs better features"): the
    fixed scattering features, GroupNorm without parameters (27 groups of 9 channels, theirs), and one linear
    layer. Features that are not learned cost no privacy, and DP-SGD trains a linear model on them far better
    than a CNN from pixels (their CIFAR-10: 67 % at ε = 3; their ScatterNet+CNN, 69 %, learned slower here:
    58 % after 15 epochs at ε = 8, the linear one 64 % after 27 in the same time)."""

    GROUPS = 27
    MIN_IMAGE_SIZE = 4  # the scattering averages over 4x4 pixels: one must be left

    def __init__(self, num_classes: int, image_size: int):
        super().__init__()
        self.features = Scattering(image_size)
        self.classifier = nn.Sequential(
            nn.GroupNorm(self.GROUPS, Scattering.CHANNELS, affine=False),
            nn.Flatten(), nn.Linear(Scattering.CHANNELS * self.features.side**2, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class Classifier(nn.Module):
    """Normalisation followed by the network: takes float images in [0, 1], (N, 3, H, W). Where the network
    needs larger images (or one fixed side) than the data's, they are resized to `input_side` in between."""

    def __init__(self, network: nn.Module, mean: list[float], std: list[float], input_side: int | None = None):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.resize = Resize(input_side) if input_side else nn.Identity()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(self.resize(self.normalize(images)))


class Resize(nn.Module):
    """Bilinear resizing to `side` x `side` (no condition on the input's shape, so FX and torch.export trace it)."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images, size=(self.side, self.side), mode="bilinear", align_corners=False)


def build_network(architecture: str, num_classes: int, image_size: int, widths: list[int] | None) -> nn.Module:
    if architectures.is_torchvision(architecture):
        return architectures.torchvision_network(architecture, num_classes, image_size)
    if architecture not in architectures.PROJECT_MODELS:
        raise ValueError(f"unknown architecture {architecture!r}")  # params validation names the accepted ones
    # A StageError: data.image_size and train.model are each valid alone, and the stage reports
    # the pair in one line instead of a traceback (from deep in the max-pools for convnet).
    smallest = smallest_image_side(architecture)
    if image_size < smallest:
        raise StageError(f"train.model {architecture} needs data.image_size ≥ {smallest} (got {image_size})")
    if architecture == "scatternet":
        return ScatterNet(num_classes, image_size)
    return LeNet(num_classes, image_size) if architecture == "lenet" else ConvNet(num_classes, widths)


def build_model(architecture: str, num_classes: int, image_size: int, widths: list[int] | None,
                mean: list[float], std: list[float], private: bool = False) -> Classifier:
    """The model train fits; `private`: the variant a private run trains (architectures.private_network)."""
    network = build_network(architecture, num_classes, image_size, widths)
    # The head is found before a private run's changes, which replace normalisation and attention layers only.
    head = head_names(architecture, num_classes, image_size, widths, network)
    if private:
        try:
            network = architectures.private_network(network)
        except ValueError as error:
            raise StageError(f"train.model {architecture} cannot train privately: {error}") from None
    side = architectures.input_side(architecture, image_size) if architectures.is_torchvision(architecture) else None
    needs_resize = side is not None and (side != image_size or architectures.family_of(architecture).attention)
    model = Classifier(network, mean, std, side if needs_resize else None)
    model.architecture = architecture
    model.head = head
    return model


def head_names(architecture: str, num_classes: int, image_size: int, widths: list[int] | None,
               network: nn.Module) -> set[str]:
    """The network's head, as its state-dict names (architectures.head_names): compared with the same network
    built for one class more, on the meta device where the builder allows it (RegNet computes its widths
    with tensors, so it is built on the CPU)."""
    try:
        with torch.device("meta"):
            probe = build_network(architecture, num_classes + 1, image_size, widths)
    except NotImplementedError:
        probe = build_network(architecture, num_classes + 1, image_size, widths)
    return architectures.head_names(network, probe)


def head_parameters(model: Classifier) -> list[nn.Parameter]:
    """The parameters of the network's head (and auxiliary heads): what is new when weights for other classes load."""
    return [parameter for name, parameter in model.network.named_parameters() if name in model.head]


def smallest_image_side(architecture: str) -> int:
    """The smallest images `architecture` takes: the project's two refuse smaller ones; torchvision's
    take any, resized inside the model where their family needs more."""
    return {"lenet": LeNet.MIN_IMAGE_SIZE, "convnet": ConvNet.MIN_IMAGE_SIZE,
            "scatternet": ScatterNet.MIN_IMAGE_SIZE}.get(architecture, 1)


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
    state = model.state_dict()
    for name, tensor in state.items():  # in place: the dict's _metadata (module versions, MNASNet's) is kept
        state[name] = tensor.detach().cpu()
    checkpoint = {**description, "state_dict": state}
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
            private=checkpoint.get("privacy") is not None,
        )
        model.load_state_dict(checkpoint.pop("state_dict"))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise StageError(f"{path} is a PyTorch file but not a checkpoint of this pipeline ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200] if str(error) else ''}); give a models/model.pt that "
                         "stage train wrote") from None
    return model.eval(), checkpoint
