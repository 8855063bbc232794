"""Every classifier of torchvision's registry, as stages/architectures.py meets it: each builds for small
images with a head for the data set's classes; one of each family trains a step with the train stage's
own code, is saved, loaded back with weights_only and classifies and explains images; ImageNet weights
come from a torch cache the test writes (no network)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from datamaker import image_bytes, write_params
from stages import architectures
from stages.explain import GRAD_CAM, INTEGRATED_GRADIENTS, heat_maps
from stages.hardware import resolve_compute
from stages.models import as_images_nchw, build_model, head_parameters, load_checkpoint, save_checkpoint
from stages.params import load_params
from stages.predict import PixelLimit, classify
from stages.pretrained import load_initial_weights
from stages.image_sets import ImageSet
from stages.train import create_model, describe_run, loss_function, make_optimizers, make_schedules, train_step

CLASSES = ["cat", "dog", "owl"]
SIDE = 32  # CIFAR's
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]

# One of each family torchvision builds (the eight, and the smallest of each other family).
ONE_OF_EACH_FAMILY = {
    "alexnet": "alexnet", "convnext": "convnext_tiny", "densenet": "densenet121", "efficientnet": "efficientnet_b0",
    "googlenet": "googlenet", "inception": "inception_v3", "maxvit": "maxvit_t", "mnasnet": "mnasnet0_5",
    "mobilenetv2": "mobilenet_v2", "mobilenetv3": "mobilenet_v3_small", "regnet": "regnet_x_400mf",
    "resnet": "resnet50", "shufflenetv2": "shufflenet_v2_x0_5", "squeezenet": "squeezenet1_1", "swin_transformer": "swin_t",
    "vgg": "vgg11_bn", "vision_transformer": "vit_b_16",
}


def test_every_family_of_the_registry_is_in_the_table_and_has_a_model_here():
    families = {architectures.module_of(name) for name in architectures.torchvision_models()}

    assert families == set(architectures.FAMILIES)  # a family torchvision adds fails here, not in a run
    assert set(ONE_OF_EACH_FAMILY) == families
    assert all(architectures.module_of(name) == family for family, name in ONE_OF_EACH_FAMILY.items())


def on_meta_unless_the_builder_computes(name: str) -> torch.device:
    # RegNet's builders compute the block widths with tensors (.tolist()), which the meta device cannot give.
    return torch.device("cpu") if architectures.module_of(name) == "regnet" else torch.device("meta")


@pytest.mark.parametrize("name", architectures.torchvision_models())
def test_every_registry_classifier_builds_for_small_images_with_a_head_for_the_classes(name):
    device = on_meta_unless_the_builder_computes(name)
    with device:
        model = build_model(name, len(CLASSES), SIDE, None, MEAN, STD).eval()
        with torch.no_grad():
            logits = model(torch.zeros(2, 3, SIDE, SIDE))

    assert logits.shape == (2, len(CLASSES))
    state = model.network.state_dict()
    assert model.head and model.head <= set(state)
    assert all(len(CLASSES) in state[key].shape for key in model.head)  # the head follows the number of classes
    family = architectures.family_of(name)
    if not family.attention:
        assert architectures.explained_layer(model.network, family, model.head) is not None


@pytest.mark.parametrize("name, side, features", [("vgg11_bn", 32, 512), ("vgg11_bn", 100, 512 * 3**2),
                                                  ("alexnet", 64, 256)])
def test_vgg_and_alexnet_under_their_pooled_grid_read_each_feature_once_computing_what_torchvision_does(
        name, side, features):
    # At 32 px VGG's 1x1 maps would be copied into its 7x7 grid, each feature 49 times over (see
    # fold_copied_features): folded, the first linear layer reads each once, and ImageNet's weights give
    # the very outputs torchvision's own network gives.
    torch.manual_seed(0)
    published = torchvision.models.get_model(name, weights=None).eval()
    network = architectures.torchvision_network(name, 1000, side).eval()

    network.load_state_dict(architectures.fit_imagenet_weights(name, network, published.state_dict()))

    assert architectures.first_linear(network)[1].in_features == features
    images = torch.rand(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(network(images), published(images), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnets_from_scratch_start_each_residual_block_as_the_identity(name):
    network = architectures.torchvision_network(name, len(CLASSES), SIDE)

    last_norms = [block.bn3 if hasattr(block, "bn3") else block.bn2
                  for stage in (network.layer1, network.layer2, network.layer3, network.layer4) for block in stage]
    assert all(torch.count_nonzero(norm.weight) == 0 for norm in last_norms)


def training_settings(tmp_path, name: str):
    """The finetune preset for `name` from scratch, as `dvc exp run -S train.preset=finetune
    -S train.model=NAME -S train.weights=random` sets it."""
    path = write_params(tmp_path, {"train.preset": "finetune", "train.model": name, "train.weights": "random",
                                   "train.freeze_epochs": 0, "train.batch_size": 4})
    return load_params(path)


def tiny_images(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images, each class its own colour plus noise, and their labels."""
    generator = np.random.default_rng(seed)
    labels = np.arange(count) % len(CLASSES)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    images = colours[labels][:, None, None, :] + generator.integers(-40, 40, (count, SIDE, SIDE, 3))
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)


@pytest.mark.parametrize("name", ONE_OF_EACH_FAMILY.values())
def test_one_of_each_family_trains_a_step_saves_loads_with_weights_only_and_predicts(tmp_path, name):
    params = training_settings(tmp_path, name)
    images, labels = tiny_images(4)
    train_set = ImageSet(as_images_nchw(images), torch.from_numpy(labels))
    torch.manual_seed(0)
    model = create_model(params.train, CLASSES, train_set).to(memory_format=torch.channels_last)
    compute = resolve_compute("cpu", "fp32")
    optimizers = make_optimizers(model, params.train)
    schedules = make_schedules(optimizers, params.train, steps_per_epoch=1)
    head_before = [parameter.detach().clone() for parameter in head_parameters(model)]

    model.train()
    loss, logits = train_step(model, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255,
                              train_set.labels, compute, optimizers, schedules,
                              loss_function(params.train, len(CLASSES)), architectures.family_of(name).aux_weight)
    assert math.isfinite(loss.item()) and logits.shape == (4, len(CLASSES))
    assert any(not torch.equal(before, after) for before, after in zip(head_before, head_parameters(model)))

    path = tmp_path / "model.pt"
    save_checkpoint(path, model, describe_run(model, CLASSES, SIDE, params, compute, summary={}))
    loaded, description = load_checkpoint(path)  # torch.load(weights_only=True) inside
    assert description["architecture"] == name
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key

    files = []
    for index, image in enumerate(images[:2]):
        files.append(tmp_path / f"{index}.png")
        files[-1].write_bytes(image_bytes(image))
    # Pillow's own limit: decode_image sets Image.MAX_IMAGE_PIXELS to the limit it is given, in this process too.
    predictions = classify(loaded, files, SIDE, PixelLimit(Image.MAX_IMAGE_PIXELS, "--max-image-pixels"), batch_size=2)
    assert not predictions.failures and len(predictions.probabilities) == 2
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(images[:2]).permute(0, 3, 1, 2).float() / 255).softmax(dim=1)
    np.testing.assert_allclose(np.stack(predictions.probabilities), expected.numpy(), atol=1e-5)

    maps, method = heat_maps(loaded, images[:1], [0])  # integrated gradients: 16 passes an image
    assert maps.shape == (1, SIDE, SIDE)
    # After one step from scratch, an eval-mode MNASNet overflows (BatchNorm's running statistics are still
    # their initial ones): its heat maps are then NaN too, never an error.
    assert np.isfinite(maps).all() == np.isfinite(expected[:1].numpy()).all()
    assert method == (INTEGRATED_GRADIENTS if architectures.family_of(name).attention else GRAD_CAM)


def imagenet_state(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A state dict as torchvision publishes for `name` (1000 classes, its native input), random here."""
    torch.manual_seed(seed)
    options = {"init_weights": False} if name == "inception_v3" else {}  # torchvision's own, not slow scipy's
    return torchvision.models.get_model(name, weights=None, **options).state_dict()


def into_torch_cache(name: str, state: dict, torch_home) -> None:
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(state, checkpoints / url.rsplit("/", 1)[1])


@pytest.mark.parametrize("name", ["vit_b_16", "inception_v3", "squeezenet1_1", "vgg11_bn"])
def test_imagenet_weights_load_from_torchs_cache_fitted_to_small_images_with_a_new_head(tmp_path, monkeypatch, name):
    # vit_b_16: position embeddings interpolated to 2x2 patches; inception_v3: built without its auxiliary
    # classifier under 299 px, so those weights are left out; squeezenet1_1: a convolution for a head;
    # vgg11_bn: a head of three linear layers, the last replaced.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    published = imagenet_state(name)
    into_torch_cache(name, published, tmp_path / "torch")
    model = build_model(name, len(CLASSES), SIDE, None, MEAN, STD)

    source = load_initial_weights(model, name, "imagenet")

    assert source["file"].startswith(str(tmp_path / "torch"))
    state = model.network.state_dict()
    assert set(source["new"]) == model.head  # only the head stays new
    for key, tensor in state.items():
        if key in model.head or key not in published:
            continue
        if tensor.shape == published[key].shape:
            assert torch.equal(tensor, published[key]), key
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, SIDE, SIDE)).shape == (2, len(CLASSES))

