"""Differentially private training (stages/privacy.py): the ε the project reports against a second accountant,
a private train and evaluate run on tiny data, Poisson batches, and every refusal with its message."""

from __future__ import annotations

import json

import pytest
import torch

from flows.publish import privacy_rows
from stages.report import guarantee
from stages.architectures import FAMILIES, family_of, is_torchvision, module_of
from stages.errors import StageError
from stages.params import ParamsError, load_params
from stages.privacy import (PUBLIC_MEAN, Budget, PrivateSteps, check_per_image_gradients, epsilon_spent,
                            noise_multiplier_for, poisson_batches)
from stages.models import build_model, load_checkpoint
from conftest import TINY_PARAMS, prepare_tiny_set
from datamaker import write_params

# CIFAR-10's 50,000 images in expected batches of 4,096 for 20 epochs' worth of steps (244).
Q, STEPS, DELTA = 4096 / 50_000, 244, 1e-5
# 24 px: convnet's last maps 2x2, as GroupNorm needs more than one value per group (32 px: 3x3).
PRIVATE_PARAMS = {**TINY_PARAMS, "data.image_size": 24, "train.preset": "private", "train.widths": None,
                  "train.batch_size": 8,
                  "train.epochs": 2, "train.delta": 1e-3}


def test_the_noise_for_a_budget_spends_it_by_both_accountants():
    # The noise multiplier for ε = 8 by each accountant, and what the other says that noise spends: RDP is
    # an upper bound on the exact ε, PRV a numerical estimate of it, so RDP's ε is the larger, by a few percent.
    rdp_noise = noise_multiplier_for(8.0, DELTA, Q, STEPS, "rdp")
    prv_noise = noise_multiplier_for(8.0, DELTA, Q, STEPS, "prv")

    assert rdp_noise == pytest.approx(1.119, abs=0.01)
    assert prv_noise == pytest.approx(1.060, abs=0.01)
    assert epsilon_spent(rdp_noise, Q, STEPS, DELTA, "rdp") == pytest.approx(8.0, abs=0.1)
    assert epsilon_spent(prv_noise, Q, STEPS, DELTA, "prv") == pytest.approx(8.0, abs=0.1)
    by_prv = epsilon_spent(rdp_noise, Q, STEPS, DELTA, "prv")
    assert 0.85 * 8.0 < by_prv < 8.0  # the same noise, counted more tightly


def test_poisson_batches_draw_each_image_by_chance_every_step():
    generator = torch.Generator().manual_seed(0)
    drawn = poisson_batches(1000, 0.05, 400, generator)

    sizes = torch.tensor([len(batch) for batch in drawn], dtype=torch.float)
    assert len(drawn) == 400
    assert sizes.mean() == pytest.approx(50, abs=2)  # q x images
    assert sizes.std() == pytest.approx((1000 * 0.05 * 0.95) ** 0.5, rel=0.2)  # binomial: sizes vary
    counts = torch.bincount(torch.cat(drawn), minlength=1000).float()
    assert counts.mean() == pytest.approx(20, abs=1)  # every image about q x steps times
    assert all(len(batch.unique()) == len(batch) for batch in drawn)


def tiny_private_steps(batch: int = 4) -> tuple[torch.nn.Module, PrivateSteps]:
    torch.manual_seed(0)
    model = build_model("convnet", 3, 24, [8, 8, 8], PUBLIC_MEAN, [0.25] * 3, private=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    budget = Budget(target_epsilon=4.0, delta=1e-3, max_grad_norm=1.0, accountant="rdp", sample_rate=batch / 40,
                    steps=3)
    return model, PrivateSteps(model, optimizer, budget, images=40, noise_seed=1)


def test_an_empty_poisson_batch_is_a_step_of_noise_that_counts():
    model, private = tiny_private_steps()
    before = [parameter.detach().clone() for parameter in model.parameters()]

    private.step(0, backward_chunk=lambda start, stop: pytest.fail("no image to run"))

    assert private.steps_taken == 1
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters()))  # the noise moved it


def test_a_batch_larger_than_a_chunk_steps_once_with_every_image_clipped():
    model, private = tiny_private_steps()
    private.chunk = 3  # 7 images: chunks of 3, 3 and 1, then one step
    images, labels = torch.rand(7, 3, 24, 24), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    chunks = []

    def backward_chunk(start: int, stop: int) -> None:
        chunks.append((start, stop))
        torch.nn.functional.cross_entropy(model(images[start:stop]), labels[start:stop], reduction="sum").backward()

    private.step(7, backward_chunk)

    assert chunks == [(0, 3), (3, 6), (6, 7)]
    assert private.steps_taken == 1
    assert private.epsilon < 4.0


def test_a_private_model_has_groupnorm_where_batchnorm_was():
    model = build_model("convnet", 3, 16, [8, 16, 48], PUBLIC_MEAN, [0.25] * 3, private=True)

    kinds = {type(layer).__name__ for layer in model.modules()}
    assert "GroupNorm" in kinds and "BatchNorm2d" not in kinds
    # At least 8 channels a group, as many groups as that allows: not one channel normalised alone.
    groups = sorted({(layer.num_channels, layer.num_groups) for layer in model.modules()
                     if isinstance(layer, torch.nn.GroupNorm)})
    assert groups == [(8, 1), (16, 2), (48, 6)]


@pytest.fixture(scope="module")
def private_project(tmp_path_factory):
    """Preset private (scatternet) on 30 tiny training images (12 test), trained, evaluated and compressed."""
    project = prepare_tiny_set(tmp_path_factory.mktemp("private"), per_class=10, test_per_class=4,
                               overrides=PRIVATE_PARAMS)
    for stage in (project.augment, project.train, project.evaluate, project.compress):
        result = stage()
        assert result.returncode == 0, result.stderr
    return project


def test_a_private_run_reports_what_it_spent(private_project):
    train_summary = json.loads((private_project.reports / "train" / "metrics.json").read_text())
    metrics = json.loads((private_project.reports / "metrics.json").read_text())
    model, description = load_checkpoint(private_project.model)

    privacy = description["privacy"]
    assert 0 < privacy["epsilon"] <= 8.0 and privacy["delta"] == 1e-3
    # 30 images in expected batches of 8: 4 steps an epoch, 2 epochs, each counted as it ran.
    assert privacy["steps"] == 8 and privacy["sample_rate"] == pytest.approx(8 / 30)
    assert train_summary["epsilon"] == metrics["epsilon"] == privacy["epsilon"]
    assert metrics["delta"] == 1e-3
    assert {"mia_auc", "mia_tpr_at_1pct_fpr"} <= set(metrics)
    # Nothing measured on the training images: ImageNet's published statistics, GroupNorm.
    assert description["normalization"]["mean"] == pytest.approx(PUBLIC_MEAN)
    assert not any(isinstance(layer, torch.nn.BatchNorm2d) for layer in model.modules())


def test_a_private_run_is_reproducible(private_project, tmp_path):
    again = private_project.copy(tmp_path, "params.yaml", "data")

    result = again.train()

    assert result.returncode == 0, result.stderr
    assert "scattering features of the 30 training and 12 test images computed once" in result.stderr
    first, second = load_checkpoint(private_project.model)[0], load_checkpoint(again.model)[0]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_with_little_noise_a_private_run_learns_the_training_images(private_project, tmp_path):
    # ε = 50 over batches of 24 leaves little noise (RDP: PRV's search for so little noise takes minutes): what is
    # left is DP-SGD's clipped per-image gradients, which must carry the signal (train once fed Opacus
    # channels_last tensors, and most convolutions got none), through GroupNorms that keep what a channel
    # found (with one channel a group, as Opacus makes them, it stayed at chance). The convnet: its many
    # convolutions and GroupNorms are where both went wrong.
    project = private_project.copy(tmp_path, "data")
    project.write_params({**PRIVATE_PARAMS, "data.source": "images", "train.target_epsilon": 50,
                          "train.accountant": "rdp", "train.batch_size": 24, "train.epochs": 12, "train.lr": 0.5,
                          "train.model": "convnet", "train.widths": [8, 16, 16], "train.momentum": 0.0,
                          "train.max_grad_norm": 1.0})

    result = project.train()

    assert result.returncode == 0, result.stderr
    summary = json.loads((project.reports / "train" / "metrics.json").read_text())
    assert summary["train"]["accuracy"] > 0.55 and summary["train"]["loss"] < 0.8, summary  # chance: 1/3, 1.1


def test_a_private_scatternet_is_compressed_but_for_int8(private_project):
    table = json.loads((private_project.reports / "compression.json").read_text())

    assert table["int8"]["skipped"].startswith("int8 does not apply to scatternet: int8's TorchScript file cannot "
                                               "hold kymatio's scattering")
    # Its scattering runs in float32 in the half-precision copies, as kymatio's FFTs need.
    assert all(0 <= table[variant]["accuracy"] <= 1 for variant in ("fp32", "pruned", "bf16", "exported"))


def test_per_image_gradients_that_are_not_autograds_are_refused(monkeypatch):
    # Opacus 1.6's conv grad sampler on channels_last activations (why stages/privacy.MEMORY_FORMAT is the
    # default layout). Should a later Opacus get them right, this fails: train may then go channels_last.
    monkeypatch.setattr("stages.privacy.MEMORY_FORMAT", torch.channels_last)
    model = build_model("convnet", 3, 24, [8, 16, 16], PUBLIC_MEAN, [0.25] * 3, private=True)
    model = model.to(memory_format=torch.channels_last)

    with pytest.raises(StageError, match=r"train.model convnet cannot train privately: Opacus' per-image gradients of "
                                         r"network\.\S+ are not autograd's \(relative error"):
        check_per_image_gradients(model, "convnet", 24)


def test_offline_copies_are_refused_in_a_private_run(private_project, tmp_path):
    project = private_project.copy(tmp_path, "params.yaml", "data/prepared")
    project.write_params({**PRIVATE_PARAMS, "augment.copies": 1, "augment.policy": "trivialaugment"})
    assert project.augment().returncode == 0

    result = project.train()

    assert result.returncode == 1
    assert "augment made 30 offline copies" in result.stderr and "set augment.copies to 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not project.model.exists()


@pytest.mark.parametrize("overrides, message", [
    ({"train.delta": 0.05}, "train.delta is 0.05, not below 1 / 30 training images (0.0333)"),
])
def test_what_a_private_run_cannot_take_is_refused_at_train(private_project, tmp_path, overrides, message):
    project = private_project.copy(tmp_path, "params.yaml", "data")
    project.write_params({**PRIVATE_PARAMS, **overrides})

    result = project.train()

    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not project.model.exists()


# One network of each family, at 32 px (MaxViT: 224, inside the model), and whether Opacus computes its per-image
# gradients: what the table says.
FAMILY_MEMBERS = ["lenet", "convnet", "scatternet", "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "googlenet",
                  "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
                  "resnet18", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "vgg11_bn", "vit_b_16"]


def test_every_family_is_covered_once():
    assert sorted({module_of(name) for name in FAMILY_MEMBERS if is_torchvision(name)}) == sorted(FAMILIES)


@pytest.mark.parametrize("name", FAMILY_MEMBERS)
def test_the_table_says_which_families_train_privately_as_opacus_finds(name):
    widths = [16, 32, 32] if name == "convnet" else None
    try:
        model = build_model(name, 3, 32, widths, PUBLIC_MEAN, [0.25] * 3, private=True)
        check_per_image_gradients(model, name, 32)
        refused = None
    except StageError as error:
        refused = str(error)

    why = family_of(name).private
    if why is None:
        assert refused is None
    else:
        assert refused is not None and refused.startswith(f"train.model {name} cannot train privately")


def test_a_family_that_cannot_train_privately_is_refused_by_params(tmp_path):
    path = write_params(tmp_path, {"train.preset": "private", "train.model": "resnet18", "train.widths": "none"})

    with pytest.raises(ParamsError, match="train.model resnet18 cannot train privately: its forward changes the "
                                          "output of a layer Opacus hooks in place"):
        load_params(path)


def test_the_report_and_the_prefect_summary_show_the_budget_beside_the_metrics(private_project):
    metrics = json.loads((private_project.reports / "metrics.json").read_text())
    privacy = load_checkpoint(private_project.model)[1]["privacy"]

    assert f"with differential privacy: ε = {privacy['epsilon']:.3g} at δ = 0.001" in guarantee(privacy)
    assert privacy_rows(metrics, None)[0] == f"| epsilon | {metrics['epsilon']:.4g} | – | |"
    assert guarantee(None) == "without a privacy guarantee (ε = ∞)"
    assert privacy_rows({"epsilon": None, "delta": None}, metrics) == [
        f"| epsilon | ∞ (not private) | {metrics['epsilon']:.4g} | |", "| delta | – | 0.001 | |"]
