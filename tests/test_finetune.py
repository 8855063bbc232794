"""torchvision's architectures in the train stage: from scratch on small images, fine-tuned from a
weights file the test writes itself (as a user downloads one once), torchvision's cache used
without the network, and each bad weights source refused with what to do about it."""

from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision

from conftest import AUGMENTED_PARAMS, TINY_CLASSES, Project
from stages.models import load_checkpoint
from stages.params import COMPRESSED_VARIANTS

# The finetune preset (resnet18, sgd, a head lr, one frozen epoch) on the tiny set.
FINETUNE = {**AUGMENTED_PARAMS, "train.preset": "finetune", "train.widths": None, "train.batch_size": 30}
IMAGENET_STD = [0.229, 0.224, 0.225]


def torchvision_weights(architecture: str, path: Path, seed: int = 1) -> dict[str, torch.Tensor]:
    """What a user downloads: the architecture's ImageNet-shaped state dict (1000 classes), random here."""
    torch.manual_seed(seed)
    state = torchvision.models.get_model(architecture, weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def trained_copy(augmented_project: Project, root: Path, overrides: dict, env: dict | None = None):
    project = augmented_project.copy(root, "data")
    project.write_params({**FINETUNE, **overrides})
    return project, project.run_stage("train", env=env)


def backbone_of(state: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in state.items() if not name.startswith(head)}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("downloads") / "resnet18-weights.pth"
    return path, torchvision_weights("resnet18", path)


@pytest.fixture(scope="module")
def finetuned(augmented_project, weights_file, tmp_path_factory) -> dict:
    """Runs from the weights file (one epoch frozen, then one or none trained whole) and from scratch."""
    path, _ = weights_file
    runs = {
        "frozen": {"train.weights": str(path), "train.epochs": 1, "train.freeze_epochs": 1},
        "frozen-then-whole": {"train.weights": str(path), "train.epochs": 2, "train.freeze_epochs": 1},
        "resnet18-from-scratch": {"train.weights": "random", "train.freeze_epochs": 0},
        "mobilenet_v3_small-from-scratch": {"train.model": "mobilenet_v3_small", "train.weights": "random",
                                            "train.freeze_epochs": 0},
    }
    root = tmp_path_factory.mktemp("finetuned")
    with ThreadPoolExecutor(len(runs)) as pool:
        results = pool.map(lambda name: trained_copy(augmented_project, root / name, runs[name]), runs)
    return dict(zip(runs, results))


def finished_run(finetuned: dict, name: str) -> Project:
    project, result = finetuned[name]
    assert result.returncode == 0, result.stderr
    return project


@pytest.mark.parametrize("architecture", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_architectures_train_from_scratch_on_small_images_and_load_back(finetuned, architecture):
    project = finished_run(finetuned, f"{architecture}-from-scratch")
    model, description = load_checkpoint(project.model)

    assert description["architecture"] == architecture
    assert description["initial_weights"] is None
    assert isinstance(model.network, getattr(torchvision.models, type(model.network).__name__))
    # 16-px images: the stem's downsampling is cut, so the last maps are not below one pixel
    strides = [layer.stride for layer in model.network.modules() if isinstance(layer, torch.nn.Conv2d)][:2]
    assert strides[0] == (1, 1)
    with torch.no_grad():
        logits = model(torch.rand(4, 3, 16, 16))
    assert logits.shape == (4, len(TINY_CLASSES)) and torch.isfinite(logits).all()
    result = project.evaluate()
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("architecture", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_architectures_compress_into_every_variant(finetuned, architecture):
    project = finished_run(finetuned, f"{architecture}-from-scratch")
    project.write_params({**FINETUNE, "train.model": architecture, "compress.variants": list(COMPRESSED_VARIANTS)})

    result = project.compress()

    assert result.returncode == 0, result.stderr
    table = pd.read_csv(project.reports / "compression.csv").set_index("variant")
    assert list(table.index) == ["fp32", *COMPRESSED_VARIANTS]
    assert table.loc["int8", "size_bytes"] < table.loc["fp32", "size_bytes"] / 3


def test_a_frozen_backbone_stays_as_loaded_while_the_new_head_learns(finetuned, weights_file):
    path, loaded = weights_file
    project = finished_run(finetuned, "frozen")
    checkpoint = torch.load(project.model, weights_only=True)
    state = {name.removeprefix("network."): tensor for name, tensor in checkpoint["state_dict"].items()}

    backbone = backbone_of(loaded, "fc.")
    assert all(torch.equal(state[name], tensor) for name, tensor in backbone.items()), \
        "a frozen backbone changed (weights or BatchNorm statistics)"
    assert state["fc.weight"].shape == (len(TINY_CLASSES), 512)  # a new head for these classes
    # torchvision's weights expect ImageNet's normalisation, and get it
    assert checkpoint["normalization"]["std"] == pytest.approx(IMAGENET_STD)
    assert checkpoint["initial_weights"] == {
        "source": str(path), "file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "new": ["fc.weight", "fc.bias"]}


def test_after_its_frozen_epochs_the_backbone_trains_too(finetuned, weights_file):
    _, loaded = weights_file
    project = finished_run(finetuned, "frozen-then-whole")
    state = {name.removeprefix("network."): tensor
             for name, tensor in torch.load(project.model, weights_only=True)["state_dict"].items()}

    changed = [name for name, tensor in backbone_of(loaded, "fc.").items()
               if tensor.is_floating_point() and not torch.equal(state[name], tensor)]
    assert "conv1.weight" in changed and "layer4.1.conv2.weight" in changed


def test_a_model_this_pipeline_trained_can_be_trained_on_with_its_normalisation(trained_project, tmp_path):
    project = trained_project.copy(tmp_path / "again", "data")
    project.write_params({**AUGMENTED_PARAMS, "train.weights": str(trained_project.model), "train.freeze_epochs": 2})
    result = project.train()
    assert result.returncode == 0, result.stderr

    before = torch.load(trained_project.model, weights_only=True)
    after = torch.load(project.model, weights_only=True)
    held = [name for name in before["state_dict"] if not name.startswith("network.head.")]
    assert all(torch.equal(before["state_dict"][name], after["state_dict"][name]) for name in held)
    assert not torch.equal(before["state_dict"]["network.head.weight"], after["state_dict"]["network.head.weight"])
    assert after["normalization"] == before["normalization"]
    assert after["initial_weights"]["new"] == []  # same classes: the head goes on from where it was


def test_imagenet_weights_come_from_torchvisions_cache_without_the_network(augmented_project, tmp_path,
                                                                            closed_port):
    torch_home = tmp_path / "torch-home"
    cached = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # torchvision's name for them
    torchvision_weights("resnet18", cached)
    no_network = {"TORCH_HOME": str(torch_home), "https_proxy": f"http://127.0.0.1:{closed_port}"}

    project, result = trained_copy(augmented_project, tmp_path / "project",
                                   {"train.weights": "imagenet", "train.epochs": 1}, env=no_network)

    assert result.returncode == 0, result.stderr
    assert load_checkpoint(project.model)[1]["initial_weights"]["file"] == str(cached)


def test_missing_imagenet_weights_without_the_network_say_which_file_to_place_where(augmented_project, tmp_path,
                                                                                     closed_port):
    torch_home = tmp_path / "torch-home"
    no_network = {"TORCH_HOME": str(torch_home), "https_proxy": f"http://127.0.0.1:{closed_port}"}

    project, result = trained_copy(augmented_project, tmp_path / "project", {"train.weights": "imagenet"},
                                   env=no_network)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: train.weights: torchvision's ImageNet weights for resnet18")
    assert "Download https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert f"place it at {torch_home / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'}" in message
    assert not project.model.exists()
    assert not any((torch_home / "hub" / "checkpoints").iterdir())  # no half-downloaded file left


def write_text_file(path: Path) -> None:
    path.write_text("not weights\n")


def write_mobilenet_weights(path: Path) -> None:
    torchvision_weights("mobilenet_v3_small", path)


def write_a_list(path: Path) -> None:
    torch.save([torch.zeros(3)], path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, r"train.weights: \S+weights.pth not found; give the path of a weights file"),
        (write_text_file, r"train.weights: \S+weights.pth is not a PyTorch weights file \(.*\); expected a state dict"),
        (write_a_list, r"train.weights: \S+weights.pth holds a list, not a state dict"),
        (write_mobilenet_weights, r"train.weights: \S+weights.pth does not fit train.model resnet18 \(missing: "
                                  r"conv1.weight, .*; not in the model: features.0.0.weight, .*\); give weights of a "
                                  r"resnet18"),
    ],
    ids=["missing-file", "not-torch", "not-a-state-dict", "another-architecture"],
)
def test_a_bad_weights_file_is_refused_naming_it_and_what_would_do(augmented_project, tmp_path, make, message):
    path = tmp_path / "weights.pth"
    if make:
        make(path)

    project, result = trained_copy(augmented_project, tmp_path / "project", {"train.weights": str(path)})

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.match(f"error: {message}", errors[0]), result.stderr
    assert not project.model.exists()
