"""What the code knows about each architecture `train.model` names, in one table.

The project's own `lenet`, `convnet` and `scatternet`, and every classifier of torchvision's registry
(`torchvision.models.list_models(module=torchvision.models)`): torchvision's names are never listed
here. Its models are told apart by family, the module torchvision builds them in (`resnet` holds
ResNet, ResNeXt and Wide ResNet), and each family says how it meets small images, which of its layers
Grad-CAM explains, whether int8 quantisation applies, and what its auxiliary classifiers weigh in the loss.
Params validation, train, evaluate, compress, report, predict and the bench read it from here.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import interpolate_embeddings

PROJECT_MODELS = ("lenet", "convnet", "scatternet")
# Below this side, the stems that downsample most (a strided 7x7 conv and a max-pool) stop downsampling.
SMALL_IMAGE_SIDE = 64


@dataclass(frozen=True)
class Family:
    """How the networks of one family meet this pipeline."""

    title: str  # as the README names it
    min_side: int = 1  # images smaller than this are resized up to it inside the model
    side_multiple: int = 1  # the network takes sides that are multiples of this only (windows): resized up to one
    cut_stem: Callable[[nn.Module], None] | None = None  # under SMALL_IMAGE_SIDE: the stem stops downsampling
    batchnorm: bool = True  # has BatchNorm layers (train.batchnorm_momentum, frozen_batchnorm_scale apply)
    batchnorm_momentum: float | None = None  # used instead of the network's own unless train.batchnorm_momentum is set
    aux_weight: float = 0.0  # the auxiliary classifiers' share of the training loss
    aux_modules: tuple[str, ...] = ()  # their branches, which Grad-CAM leaves out
    attention: bool = False  # a transformer: explained by integrated gradients, Grad-CAM has no feature map to use
    int8: str | None = None  # why static int8 quantisation does not apply, or None when it does
    pooled_grid: int = 0  # the classifier reads the last feature maps average-pooled to this fixed grid
    private: str | None = None  # why a private run (DP-SGD, stages/privacy.py) cannot train it, or None when it can
    one_side: bool = False  # its layers are sized for data.image_size: it takes no other (no progressive resizing)


def cut_resnet_stem(network: nn.Module) -> None:
    # As the CIFAR ResNets (He et al., 2016, section 4.2): the first stage sees the image at full
    # resolution, so neither the stem's stride nor its max-pool. The 7x7 kernel stays, so that
    # ImageNet weights still load unchanged.
    network.conv1.stride = (1, 1)
    network.maxpool = nn.Identity()


def cut_densenet_stem(network: nn.Module) -> None:
    # The same stem as ResNet's, cut the same way (as the CIFAR DenseNets, Huang et al., 2017).
    network.features.conv0.stride = (1, 1)
    network.features.pool0 = nn.Identity()


def cut_mobilenet_v3_stem(network: nn.Module) -> None:
    # The stem and the first block each halve the image: without both, 32 px ends in 4x4 maps, not 1x1.
    network.features[0][0].stride = (1, 1)
    network.features[1].block[0][0].stride = (1, 1)


def first_linear(network: nn.Module) -> tuple[int, nn.Linear]:
    """The classifier's first linear layer (VGG's and AlexNet's take the pooled grid) and its index there."""
    return next((index, layer) for index, layer in enumerate(network.classifier) if isinstance(layer, nn.Linear))


def pooling_matrix(side: int, grid: int) -> torch.Tensor:
    """Adaptive average pooling of a side x side map to grid x grid, as a (grid², side²) matrix."""
    basis = torch.eye(side * side).view(side * side, 1, side, side)
    return nn.functional.adaptive_avg_pool2d(basis, grid).view(side * side, grid * grid).T


def fold_pooled_weight(weight: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """A first linear layer's weight (outputs, channels x grid²), made to read the side x side maps directly:
    each input's weights summed over the grid cells the pooling spreads it to."""
    outputs = weight.shape[0]
    by_cell = weight.reshape(outputs, -1, grid * grid)
    return (by_cell @ pooling_matrix(side, grid).to(weight)).reshape(outputs, -1)


def fold_copied_features(network: nn.Module, grid: int, input_side: int) -> None:
    # VGG and AlexNet pool their last feature maps to a fixed grid (7x7, 6x6) for the first linear layer.
    # Maps smaller than the grid (VGG's are 1x1 at 32 px) are copied into several cells, 49 times at 32 px,
    # and that layer then learns each feature's weight 49 times over: a 49 times larger learning rate
    # (measured: vgg11_bn from scratch at SGD's 0.01 went from loss 2.6 to 7.2 in two steps and ended at
    # 14 %). The pooling is folded into the layer: the maps pooled to their own size, copying nothing,
    # and the layer's weights summed over the cells each feature went to. The same function, ImageNet's
    # weights folded alike (fit_imagenet_weights).
    with torch.no_grad():
        maps = network.features(torch.zeros(1, 3, input_side, input_side, device=network.classifier[-1].weight.device))
    side = maps.shape[-1]
    if side >= grid:
        return
    index, layer = first_linear(network)
    folded = nn.Linear(layer.in_features * side**2 // grid**2, layer.out_features, device=layer.weight.device)
    with torch.no_grad():
        folded.weight.copy_(fold_pooled_weight(layer.weight, grid, side))
        folded.bias.copy_(layer.bias)
    network.classifier[index] = folded
    network.avgpool = nn.AdaptiveAvgPool2d((side, side))


# Why Opacus cannot compute the per-image gradients of some families (measured: tests/test_privacy.py).
IN_PLACE = ("its forward changes the output of a layer Opacus hooks in place (the residual sum, in-place ReLUs), "
            "which autograd refuses")
BUFFERS = "its attention layers keep buffers beside trainable parameters, which Opacus does not support"

NOT_TRACEABLE = ("int8's TorchScript file cannot hold kymatio's scattering (torch.jit.trace fails on its deprecated "
                 "attributes: NameError in kymatio 0.3)")
CHANNELS_LAST_MEAN = ("its quantised global mean cannot take the channels_last tensors its int8 convolutions give "
                      "(torch.ao FX, measured: 'required rank 4 tensor to use channels_last format')")

# The families of torchvision's classifiers, by the module that builds them; the minimum sides were
# measured with each family's smallest member (tests/test_architectures.py checks every member).
FAMILIES = {
    "alexnet": Family("AlexNet", min_side=63, pooled_grid=6),
    "convnext": Family("ConvNeXt", min_side=32, batchnorm=False,
                       private="its stochastic depth draws random numbers inside the vmap Opacus runs its blocks in"),
    "densenet": Family("DenseNet", cut_stem=cut_densenet_stem, private=IN_PLACE),
    "efficientnet": Family("EfficientNet (v1, v2)"),
    # GoogLeNet's auxiliary classifiers weigh 0.3 each, as in its paper (Szegedy et al., 2015).
    "googlenet": Family("GoogLeNet", min_side=16, aux_weight=0.3, aux_modules=("aux1", "aux2"), private=IN_PLACE),
    # Inception v3's auxiliary classifier needs 17x17 maps, which only its native 299 px give: it is
    # built with it from 299 px (weighing 0.4, as PyTorch's fine-tuning tutorial), without below.
    "inception": Family("Inception v3", min_side=75, aux_weight=0.4, aux_modules=("AuxLogits",), private=IN_PLACE),
    "maxvit": Family("MaxViT", side_multiple=224, attention=True, private=BUFFERS),
    # MNASNet's BatchNorm momentum, 0.0003 (TensorFlow's decay 0.9997), is made for ImageNet's long runs: in
    # a short one the running statistics stay near their initial values, and in eval mode the network
    # diverges (measured: infinite activations after one step from scratch). PyTorch's default instead.
    "mnasnet": Family("MNASNet", batchnorm_momentum=0.1, int8=CHANNELS_LAST_MEAN),
    "mobilenetv2": Family("MobileNet v2"),
    "mobilenetv3": Family("MobileNet v3", cut_stem=cut_mobilenet_v3_stem, private=IN_PLACE),
    "regnet": Family("RegNet"),
    "resnet": Family("ResNet, ResNeXt, Wide ResNet", cut_stem=cut_resnet_stem, private=IN_PLACE),
    "shufflenetv2": Family("ShuffleNet v2", int8=CHANNELS_LAST_MEAN),
    "squeezenet": Family("SqueezeNet", min_side=24),
    "swin_transformer": Family("Swin Transformer (v1, v2)", batchnorm=False, attention=True, private=BUFFERS),
    "vgg": Family("VGG", min_side=32, pooled_grid=7),
    # Built for the image side (rounded up to whole patches): its position embeddings, and ImageNet's, are
    # interpolated to that many patches.
    "vision_transformer": Family("Vision Transformer", batchnorm=False, attention=True),
}
PROJECT_FAMILIES = {
    "lenet": Family("LeNet (the PyTorch tutorial's)", batchnorm=False, one_side=True),
    "convnet": Family("conv net (airbench)"),
    "scatternet": Family("ScatterNet (Tramèr & Boneh)", batchnorm=False, one_side=True, int8=NOT_TRACEABLE),
}
INCEPTION_NATIVE_SIDE = 299


@cache
def torchvision_models() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def known_models() -> tuple[str, ...]:
    return PROJECT_MODELS + torchvision_models()


def is_torchvision(name: str) -> bool:
    return name in torchvision_models()


def unknown_model_message(name: str) -> str:
    close = difflib.get_close_matches(name, known_models(), n=3, cutoff=0.6)
    suggestion = f"; did you mean {' or '.join(close)}?" if close else ""
    return (f"must be lenet, convnet, scatternet or a classifier of torchvision's registry (torchvision.models.list_models(), "
            f"{len(torchvision_models())} names: resnet50, vgg16_bn, inception_v3, vit_b_16, ...){suggestion}")


def module_of(name: str) -> str:
    """The torchvision module that builds `name` (its family)."""
    return torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[1]


def family_of(name: str) -> Family:
    return PROJECT_FAMILIES[name] if name in PROJECT_FAMILIES else FAMILIES[module_of(name)]


def private_families() -> str:
    """The families a private run trains, in words."""
    return ", ".join(family.title for family in (*PROJECT_FAMILIES.values(), *FAMILIES.values())
                     if family.private is None)


def uses_batchnorm(name: str) -> bool:
    return name in known_models() and family_of(name).batchnorm


def takes_one_side(name: str) -> bool:
    return name in known_models() and family_of(name).one_side


# --- building ---------------------------------------------------------------------------------


def builder_options(name: str, image_size: int) -> dict:
    """The builder's keyword arguments besides num_classes, for this image size."""
    family = module_of(name)
    if family == "vision_transformer":
        return {"image_size": vit_side(name, image_size)}
    if family == "inception":
        return {"aux_logits": image_size >= INCEPTION_NATIVE_SIDE, "init_weights": True}
    if family == "googlenet":
        return {"aux_logits": True, "init_weights": True}
    if family == "resnet":
        # From scratch, each residual block starts as the identity (Goyal et al., 2017; a torchvision
        # builder option): else ResNet-50's pooled features start with norms ~48 at 32 px (ResNet-18's ~20)
        # and the finetune preset's head rate diverges (measured: loss 5.9 over the first epoch, 10.6 %
        # after it). ImageNet weights overwrite what it sets.
        return {"zero_init_residual": True}
    return {}


def vit_side(name: str, image_size: int) -> int:
    """The side a Vision Transformer is built for: the image's, rounded up to whole patches."""
    with torch.device("meta"):
        patch = torchvision.models.get_model(name, weights=None).patch_size
    return math.ceil(image_size / patch) * patch


def torchvision_network(name: str, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's network with a head for `num_classes`, its stem cut for small images where its family says."""
    network = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                           **builder_options(name, image_size))
    family = family_of(name)
    if family.cut_stem is not None and image_size < SMALL_IMAGE_SIDE:
        family.cut_stem(network)
    if family.pooled_grid:
        fold_copied_features(network, family.pooled_grid, input_side(name, image_size))
    return network


def input_side(name: str, image_size: int) -> int:
    """The side the network is given: the image's, resized up inside the model where the family needs more."""
    family = family_of(name)
    if is_torchvision(name) and module_of(name) == "vision_transformer":
        return vit_side(name, image_size)
    side = max(image_size, family.min_side)
    return math.ceil(side / family.side_multiple) * family.side_multiple


def fit_imagenet_weights(name: str, network: nn.Module, state: dict) -> dict:
    """torchvision's published state dict, made to fit the network as built here."""
    family = module_of(name)
    if family == "vision_transformer":
        # Position embeddings for another number of patches: interpolated, as torchvision does for
        # fine-tuning at other resolutions.
        return interpolate_embeddings(network.image_size, network.patch_size, state)
    grid = family_of(name).pooled_grid
    if grid and network.avgpool.output_size != (grid, grid):
        # Folded for small images (fold_copied_features): the first linear layer's weights are folded alike.
        index, layer = first_linear(network)
        key, side = f"classifier.{index}.weight", network.avgpool.output_size[0]
        published = state.get(key)
        if published is not None and published.shape == (layer.out_features, layer.in_features * grid**2 // side**2):
            return {**state, key: fold_pooled_weight(published, grid, side)}
        return state
    if family == "inception" and network.AuxLogits is None:
        return {key: value for key, value in state.items() if not key.startswith("AuxLogits.")}
    if family in ("inception", "googlenet"):
        # Those weights were trained on images scaled to [-1, 1]: with ImageNet's normalisation, the network
        # converts its input back, as torchvision's builders switch on when they load them.
        network.transform_input = True
    return state


# Channels a private network's GroupNorm normalises together, at least. Opacus' ModuleValidator.fix makes
# min(32, channels) groups, one channel each up to 32 channels: normalising a channel alone over the few
# positions of a small map erases what it found (measured: the private convnet stayed at chance on tiny
# images, it learned with 8 or 16 channels a group; Wu & He's GroupNorm paper works with 16).
CHANNELS_PER_GROUP = 8


def group_count(channels: int) -> int:
    """The most groups that divide `channels` with CHANNELS_PER_GROUP or more in each (1 for few channels)."""
    return max((groups for groups in range(1, channels + 1)
                if channels % groups == 0 and channels // groups >= CHANNELS_PER_GROUP), default=1)


def private_network(network: nn.Module) -> nn.Module:
    """The network as a private run trains it (stages/privacy.py): BatchNorm, which mixes the images of a batch,
    replaced by GroupNorm (group_count), what else Opacus' ModuleValidator.fix can fix soundly, and in-place
    activations made out of place (Opacus hooks the layer before each, and autograd refuses a hooked output
    changed in place). ValueError naming the layers Opacus finds no sound replacement for."""
    from opacus.validators import ModuleValidator  # ~1 s of imports (SciPy), for private models only

    for parent in list(network.modules()):
        for name, layer in parent.named_children():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                # eps: airbench's 1e-12 suits a batch's statistics, not one image's group of few values.
                setattr(parent, name, nn.GroupNorm(group_count(layer.num_features), layer.num_features,
                                                   eps=max(layer.eps, 1e-5), affine=layer.affine))
    fixed = ModuleValidator.fix(network)
    for layer in fixed.modules():
        if getattr(layer, "inplace", False):
            layer.inplace = False
    problems = ModuleValidator.validate(fixed, strict=False)
    if problems:
        raise ValueError("; ".join(str(problem).strip().splitlines()[0][:300] for problem in problems[:3]))
    return fixed


# --- what the network is made of --------------------------------------------------------------


def head_names(network: nn.Module, probe: nn.Module) -> set[str]:
    """The state-dict names of the head: the tensors whose shape follows the number of classes, found by
    comparing the network with a `probe` built alike for one class more (the auxiliary heads included)."""
    probe_shapes = {name: tensor.shape for name, tensor in probe.state_dict().items()}
    return {name for name, tensor in network.state_dict().items() if probe_shapes.get(name) != tensor.shape}


def explained_layer(network: nn.Module, family: Family, head: set[str]) -> nn.Module | None:
    """The layer Grad-CAM explains: the last convolution outside the head and the auxiliary branches, whose
    feature maps are the finest that still see whole objects; None for transformers."""
    if family.attention:
        return None
    skipped = tuple(f"{module}." for module in family.aux_modules)
    head_modules = {name.rsplit(".", 1)[0] for name in head}
    convolutions = [module for name, module in network.named_modules() if isinstance(module, nn.Conv2d)
                    and not f"{name}.".startswith(skipped) and name not in head_modules]
    return convolutions[-1] if convolutions else None


def main_and_auxiliary(outputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits, and the auxiliary classifiers' (GoogLeNet and Inception v3 return them in training)."""
    if isinstance(outputs, torch.Tensor):
        return outputs, []
    main, *auxiliary = outputs
    return main, [logits for logits in auxiliary if logits is not None]
