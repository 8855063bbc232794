"""The train stage, run as DVC runs it on a tiny prepared set: every model, optimiser and loss
trains; the checkpoint carries what is needed to use it and the settings that made it; the
same seed gives the same weights; the device and precision are the machine's, never assumed."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from subprocess import CompletedProcess

import numpy as np
import pandas as pd
import pytest
import torch
from ruamel.yaml import YAML
from torch.utils.flop_counter import FlopCounterMode

from conftest import AUGMENTED_PARAMS, TINY_CLASSES, TINY_PARAMS, Project, finished, prepare_tiny_set
from datamaker import make_image_folder, write_params
from stages.datasets import PreparedWriter, load_split
from stages.errors import StageError
from stages.hardware import cpu_has_native_bf16, resolve_compute
from stages.models import ConvNet, LeNet, ScatterNet, as_unit_floats, build_model, load_checkpoint
from stages.params import load_params
from stages.image_sets import ImageSet, in_memory
from stages.train import FeatureSet, Flips, create_model, features_once, image_side, measure, weight_average

CURVES = ("train/loss", "train/accuracy", "lr", "test/loss", "test/accuracy")
NATIVE_PRECISION = "bf16" if cpu_has_native_bf16() else "fp32"

# Train runs besides trained_project's (the default preset: convnet, muon, cross-entropy, precision auto, 30 images
# and 60 augmented copies, batches of 16), each in its own folder.
RUNS = {
    "same-params": {},
    # 6 images and no augmented copies, all in one batch; and the lenet preset (no widths), adam, fp32
    "smaller-than-a-batch": {"train.preset": "lenet", "train.model": None, "train.widths": None,
                             "train.optimizer": "adam", "train.lr": 0.001, "train.batch_size": 512,
                             "train.precision": "fp32"},
    "rmsprop-mse": {"train.optimizer": "rmsprop", "train.lr": 0.001, "train.loss": "mse",
                    "train.label_smoothing": 0.0},
    "sgd": {"train.optimizer": "sgd", "train.lr": 0.2, "train.momentum": 0.9, "train.weight_decay": 0.0001},
    "cuda": {"train.device": "cuda"},
    # the default preset keeps an average of the weights (ema_decay 0.9); 0 keeps the last step's
    "last-weights": {"train.ema_decay": 0},
    # the airbench94 preset (Muon, frozen BatchNorm scales, alternating flips, whitening bias
    # trained one epoch of two) on tiny widths, with progressive resizing from 10 pixels
    "airbench94": {"train.preset": "airbench94", "train.widths": [8, 16, 16], "train.epochs": 2,
                   "train.batch_size": 16, "train.whiten_bias_epochs": 1, "train.resize_from": 10,
                   "train.resize_epochs": 1},
}


def write_no_copies(augmented) -> None:
    """What augment writes for `copies: 0` (see test_augment): meta.json alone."""
    with PreparedWriter(augmented) as writer:
        writer.commit({"copies": 0, "policy": "none", "count": 0})


@pytest.fixture(scope="module")
def runs(augmented_project, tmp_path_factory) -> dict[str, tuple[Project, CompletedProcess]]:
    """Every run of RUNS, all at once: they are independent, and each spends most of its time
    importing torch."""
    root = tmp_path_factory.mktemp("runs")

    def train(name: str) -> tuple[Project, CompletedProcess]:
        if name == "smaller-than-a-batch":
            project = prepare_tiny_set(root / name, per_class=2, test_per_class=1, overrides=RUNS[name])
            write_no_copies(project.augmented)
        else:
            project = augmented_project.copy(root / name, "data")
            project.write_params({**AUGMENTED_PARAMS, **RUNS[name]})
        return project, project.train()

    names = [name for name in RUNS if name != "cuda" or not torch.cuda.is_available()]
    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(train, names)))


def summary_of(project: Project) -> dict:
    return json.loads((project.reports / "train" / "metrics.json").read_text())


def curve(project: Project, name: str) -> pd.DataFrame:
    return pd.read_csv(project.reports / "train" / "plots" / "metrics" / f"{name}.tsv", sep="\t")


# --- what a run writes ----------------------------------------------------------------------


def test_the_checkpoint_loads_with_weights_only_and_carries_the_settings_that_made_it(trained_project):
    checkpoint = torch.load(trained_project.model, weights_only=True)

    assert checkpoint["architecture"] == "convnet"
    assert checkpoint["classes"] == list(TINY_CLASSES)
    assert checkpoint["image_size"] == 16
    params = load_params(trained_project.root / "params.yaml")
    # What train read, and nothing else: the other sections do not re-run it.
    assert checkpoint["params"] == {"seed": params.seed, "train": params.train.model_dump(mode="json")}
    assert checkpoint["compute"] == {"device": "cpu", "precision": NATIVE_PRECISION}
    normalization = checkpoint["normalization"]
    assert len(normalization["mean"]) == len(normalization["std"]) == 3
    assert all(0 < std for std in normalization["std"])
    assert all(isinstance(tensor, torch.Tensor) for tensor in checkpoint["state_dict"].values())


def test_load_checkpoint_gives_a_model_in_eval_mode_that_classifies_the_test_images(trained_project):
    model, description = load_checkpoint(trained_project.model)

    test = load_split(trained_project.prepared, "test")
    images = torch.from_numpy(np.array(test.images)).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        logits = model(images)
    assert not model.training
    assert logits.shape == (len(test.labels), len(TINY_CLASSES))
    assert torch.isfinite(logits).all()
    assert "state_dict" not in description and description["classes"] == list(TINY_CLASSES)
    saved = torch.load(trained_project.model, weights_only=True)["state_dict"]
    assert all(torch.equal(tensor, saved[name]) for name, tensor in model.state_dict().items())


def test_the_summary_has_the_time_speed_device_and_precision_of_the_run(trained_project):
    summary = summary_of(trained_project)

    assert summary["train_seconds"] > 0
    assert summary["images_per_second"] > 0
    assert (summary["device"], summary["precision"], summary["threads"]) == ("cpu", NATIVE_PRECISION, 1)
    assert summary["train_images"] == 30 + 60, "the prepared images and augment's copies"


def test_the_summary_counts_the_flops_of_training_forward_and_backward_for_every_image_seen(runs):
    project = finished(runs, "smaller-than-a-batch")  # lenet and Adam: no matmul outside the network
    model, description = load_checkpoint(project.model)
    summary = summary_of(project)

    side = description["image_size"]
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, side, side))
    forward = counter.get_total_flops()
    images_seen = summary["train_images"] * description["params"]["train"]["epochs"]
    # The backward computes the weights' gradients (a forward's worth) and the inputs' (another), but not the
    # images' own: between two and three forwards in all.
    assert 2 * forward * images_seen < summary["train_flops"] < 3 * forward * images_seen


def test_each_curve_has_one_row_per_epoch(trained_project):
    epochs = TINY_PARAMS["train.epochs"]

    for name in CURVES:
        rows = curve(trained_project, name)
        assert rows["step"].tolist() == list(range(epochs)), name
        assert rows[name.split("/")[-1]].map(math.isfinite).all(), name


def test_the_same_seed_gives_identical_weights(trained_project, runs):
    again = finished(runs, "same-params")

    first = torch.load(trained_project.model, weights_only=True)["state_dict"]
    second = torch.load(again.model, weights_only=True)["state_dict"]
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


# --- models, optimisers, losses -------------------------------------------------------------


def test_a_set_smaller_than_one_batch_trains(runs):
    project = finished(runs, "smaller-than-a-batch")

    assert summary_of(project)["train_images"] == 6
    assert curve(project, "train/loss")["step"].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("run", "model", "optimizer", "loss"),
    [
        ("smaller-than-a-batch", "lenet", "adam", "cross_entropy"),
        ("rmsprop-mse", "convnet", "rmsprop", "mse"),
    ],
)
def test_each_model_optimizer_and_loss_trains(runs, run, model, optimizer, loss):
    project = finished(runs, run)

    checkpoint = torch.load(project.model, weights_only=True)
    settings = checkpoint["params"]["train"]
    assert (checkpoint["architecture"], settings["optimizer"], settings["loss"]) == (model, optimizer, loss)
    assert curve(project, "train/loss")["loss"].map(math.isfinite).all()


def test_the_default_preset_trains_convnet_with_muon_and_cross_entropy(trained_project):
    settings = torch.load(trained_project.model, weights_only=True)["params"]["train"]

    assert (settings["model"], settings["optimizer"], settings["loss"]) == ("convnet", "muon", "cross_entropy")
    assert curve(trained_project, "train/loss")["loss"].map(math.isfinite).all()


def test_sgd_trains_convnet(runs):
    project = finished(runs, "sgd")

    assert torch.load(project.model, weights_only=True)["params"]["train"]["optimizer"] == "sgd"
    assert curve(project, "train/loss")["loss"].map(math.isfinite).all()


@pytest.mark.parametrize(("model", "smallest"), [("lenet", LeNet.MIN_IMAGE_SIZE), ("convnet", ConvNet.MIN_IMAGE_SIZE),
                                                  ("scatternet", ScatterNet.MIN_IMAGE_SIZE)])
def test_each_model_runs_at_its_smallest_image_size_and_refuses_one_pixel_less(model, smallest):
    network = build_model(model, 3, smallest, [8, 16, 16], [0.5] * 3, [0.25] * 3)

    assert network(torch.rand(2, 3, smallest, smallest)).shape == (2, 3)
    with pytest.raises(StageError, match=rf"train.model {model} needs data.image_size ≥ {smallest}"):
        build_model(model, 3, smallest - 1, [8, 16, 16], [0.5] * 3, [0.25] * 3)


@pytest.mark.parametrize("side", [4, 30, 33])
def test_scatternet_takes_any_side_from_its_smallest(side):
    network = build_model("scatternet", 3, side, None, [0.5] * 3, [0.25] * 3)

    assert network(torch.rand(2, 3, side, side)).shape == (2, 3)


def test_scatternet_trains_on_its_own_features_computed_once(tmp_path):
    model = build_model("scatternet", 3, 16, None, [0.5] * 3, [0.25] * 3).eval()
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    sets = ImageSet(images, labels), ImageSet(images[:2], labels[:2])
    settings = load_params(write_params(tmp_path, {**TINY_PARAMS, "train.preset": "private", "train.widths": None})).train

    train_features, test_features = features_once(model, *sets, settings)

    assert isinstance(train_features, FeatureSet) and (train_features.count, test_features.count) == (6, 2)
    # What the classifier trains on is what the whole model computes, but for the features' float16 rounding.
    (features, _), = train_features.batches([torch.arange(6)])
    with torch.no_grad():
        torch.testing.assert_close(model.network.classifier(features), model(as_unit_floats(images)), rtol=0, atol=1e-2)
    # A recipe that augments draws new images each epoch, and features that do not fit the budget are not kept.
    for changed in ({"flip": "random"}, {"translate": 2}, {"memory_budget": 1000}):
        assert features_once(model, *sets, settings.model_copy(update=changed)) == sets


def test_normalisation_is_measured_on_the_whole_training_set_not_its_first_images(tmp_path):
    # Prepared image folders are sorted by class: here the first half black, the second white.
    count = 20_001
    images = torch.zeros(count, 3, 16, 16, dtype=torch.uint8)
    images[count // 2 :] = 255
    settings = load_params(write_params(tmp_path, {**TINY_PARAMS, "train.preset": "lenet", "train.widths": None})).train

    model = create_model(settings, ["black", "white"], ImageSet(images, torch.zeros(count, dtype=torch.int64)))

    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.5] * 3, abs=0.01)


# --- device and precision -------------------------------------------------------------------


def test_precision_auto_is_bf16_exactly_where_the_cpu_runs_it_natively(trained_project):
    assert load_params(trained_project.root / "params.yaml").train.precision == "auto"

    assert summary_of(trained_project)["precision"] == NATIVE_PRECISION


def test_precision_fp32_is_used_when_asked(runs):
    project = finished(runs, "smaller-than-a-batch")

    assert summary_of(project)["precision"] == "fp32"
    assert torch.load(project.model, weights_only=True)["compute"]["precision"] == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_device_cuda_without_a_gpu_fails_naming_train_device(runs):
    project, result = runs["cuda"]

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: train.device is cuda" in result.stderr
    assert not project.model.exists()


def test_the_lenet_preset_trains_and_its_checkpoint_loads_without_widths(runs):
    project = finished(runs, "smaller-than-a-batch")

    model, description = load_checkpoint(project.model)

    assert (description["architecture"], description["widths"]) == ("lenet", None)
    assert description["params"]["train"]["preset"] == "lenet"
    recipe = YAML(typ="safe", pure=True).load(project.reports / "train" / "params.yaml")  # DVCLive's log_params
    assert (recipe["preset"], recipe["model"]) == ("lenet", "lenet")
    assert isinstance(model.network, LeNet)


# --- the airbench94 recipe: Muon, frozen BatchNorm scales, alternating flips, resizing ----------


def test_the_muon_preset_trains_and_saves_plain_conv_weights(runs):
    project = finished(runs, "airbench94")

    model, description = load_checkpoint(project.model)

    assert description["params"]["train"]["optimizer"] == "muon"
    convs = [layer for layer in model.modules() if isinstance(layer, torch.nn.Conv2d)]
    assert all(conv.weight.ndim == 4 for conv in convs)
    assert curve(project, "train/loss")["loss"].map(math.isfinite).all()


def test_muon_keeps_each_conv_filter_bank_at_norm_sqrt_of_its_filters(runs):
    model, _ = load_checkpoint(finished(runs, "airbench94").model)

    # renormalised before each step, then moved by one lr-sized orthogonal step, last of all at lr ~0
    for conv in [layer for layer in model.network.body.modules() if isinstance(layer, torch.nn.Conv2d)]:
        assert conv.weight.norm().item() == pytest.approx(len(conv.weight) ** 0.5, rel=0.05)


def test_frozen_batchnorm_scales_stay_at_one_and_use_the_recipes_momentum(runs):
    model, description = load_checkpoint(finished(runs, "airbench94").model)

    norms = [layer for layer in model.modules() if isinstance(layer, torch.nn.BatchNorm2d)]
    assert norms and all(torch.equal(norm.weight, torch.ones_like(norm.weight)) for norm in norms)
    assert description["params"]["train"]["batchnorm_momentum"] == 0.4


def test_the_weight_average_changes_what_is_kept_not_how_training_goes(trained_project, runs):
    averaged, last = trained_project, finished(runs, "last-weights")

    assert load_checkpoint(averaged.model)[1]["params"]["train"]["ema_decay"] == 0.9
    pd.testing.assert_frame_equal(curve(averaged, "train/loss"), curve(last, "train/loss"))
    assert not torch.equal(load_checkpoint(averaged.model)[0].network.head.weight,
                           load_checkpoint(last.model)[0].network.head.weight)


@pytest.mark.parametrize("run", ["averaged", "last-weights"])
def test_the_last_test_accuracy_logged_is_the_saved_models(trained_project, runs, run):
    project = trained_project if run == "averaged" else finished(runs, run)
    model, description = load_checkpoint(project.model)
    compute = resolve_compute("cpu", description["compute"]["precision"])
    test = load_split(project.prepared, "test")
    test_set = in_memory(test.images, test.labels, compute.device)

    _, accuracy = measure(model, test_set, compute, lambda logits, labels: logits.sum(),
                          description["params"]["train"]["batch_size"])

    assert accuracy == curve(project, "test/accuracy")["accuracy"].iloc[-1]


def test_the_weight_average_averages_batchnorm_statistics_too():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    average = weight_average(model, 0.75)
    for value in (1.0, 5.0):  # the weights after a first step, then after a second
        with torch.no_grad():
            model[0].weight.fill_(value)
            model[1].running_mean.fill_(value)
            model[1].num_batches_tracked += 7
        average.update_parameters(model)

    # 0.75 of the first and 0.25 of the second: 0.75 + 1.25
    assert torch.equal(average.module[0].weight, torch.full((2, 2), 2.0))
    assert torch.equal(average.module[1].running_mean, torch.full((2,), 2.0))
    assert torch.equal(average.module[1].num_batches_tracked, model[1].num_batches_tracked)
    assert weight_average(model, 0) is None


def test_alternate_flips_mirror_each_image_every_other_epoch():
    images = torch.arange(6 * 4, dtype=torch.float32).view(6, 1, 2, 2)
    flips = Flips("alternate", len(images), torch.Generator().manual_seed(0))
    everything = torch.arange(len(images))

    mirrored = [[torch.equal(out, image.flip(-1)) for out, image in zip(flips.apply(images, everything, epoch), images)]
                for epoch in (1, 2, 3)]

    assert mirrored[0] == mirrored[2]
    assert mirrored[1] == [not flipped for flipped in mirrored[0]]


@pytest.mark.parametrize(("epoch", "side"), [(1, 16), (2, 20), (3, 24), (4, 28), (5, 32), (9, 32)])
def test_progressive_resizing_grows_the_side_linearly_back_to_full_size(tmp_path, epoch, side):
    settings = load_params(write_params(tmp_path, {"train.resize_from": 16, "train.resize_epochs": 4})).train

    assert image_side(settings, epoch, 32) == side


def test_resizing_below_the_models_smallest_image_is_refused(project):
    make_image_folder(project.root / "images", per_class=2, test_per_class=1, size=(16, 16))
    project.write_params({**TINY_PARAMS, "data.source": "images", "train.resize_from": 8, "train.resize_epochs": 1})
    assert project.download().returncode == 0 and project.augment().returncode == 0

    result = project.train()

    assert result.returncode == 1
    assert "error: train.resize_from is 8, but train.model convnet needs images of side ≥ 9" in result.stderr
    assert not project.model.exists()
