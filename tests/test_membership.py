"""The membership-inference audit (stages/membership.py): a model made to memorise its training images
gives them away, one that never saw the images does not; the figures are those of the ROC curve."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.hardware import resolve_compute
from stages.membership import audit_sample, loss_threshold_attack, losses
from stages.models import as_model_input, build_model

SIDE, CLASSES = 32, 10
COMPUTE = resolve_compute("cpu", "fp32")


def noise_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of noise with random labels: nothing to learn but the images themselves."""
    generator = np.random.default_rng(seed)
    return (generator.integers(0, 256, (count, SIDE, SIDE, 3), dtype=np.uint8),
            generator.integers(0, CLASSES, count).astype(np.int64))


def lenet_trained_on(images: np.ndarray, labels: np.ndarray, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("lenet", CLASSES, SIDE, None, [0.5] * 3, [0.25] * 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, targets = as_model_input(images, COMPUTE.device), torch.from_numpy(labels)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model.eval()


def audit(model, members: tuple[np.ndarray, np.ndarray], others: tuple[np.ndarray, np.ndarray]) -> dict:
    everyone = np.arange(len(members[1]))
    figures, _ = loss_threshold_attack(losses(model, *members, everyone, COMPUTE, batch_size=50),
                                       losses(model, *others, np.arange(len(others[1])), COMPUTE, batch_size=50))
    return figures


def test_a_model_that_memorised_its_training_images_gives_them_away():
    members, others = noise_images(100, seed=1), noise_images(100, seed=2)
    model = lenet_trained_on(*members, steps=80)

    figures = audit(model, members, others)

    assert figures["mia_auc"] > 0.9
    assert figures["mia_tpr_at_1pct_fpr"] > 0.5  # many members named with hardly any false alarm


def test_a_model_that_never_saw_the_images_scores_near_chance():
    # Trained on other images: the two sets audited are alike to it, "members" or not.
    model = lenet_trained_on(*noise_images(100, seed=3), steps=80)

    figures = audit(model, noise_images(500, seed=1), noise_images(500, seed=2))

    assert figures["mia_auc"] == pytest.approx(0.5, abs=0.06)  # 500 a side: the AUC's spread is ~0.02
    assert figures["mia_tpr_at_1pct_fpr"] < 0.06


def test_the_figures_are_read_off_the_roc_curve_of_the_losses():
    # Members 0.1..1.0, others 0.55..1.45: a threshold between 0.5 and 0.55 finds half the members with no
    # false positive, the next one already calls a tenth of the others members. The AUC is the share of
    # (member, other) pairs in which the member has the lower loss.
    member_losses = np.linspace(0.1, 1.0, 10)
    other_losses = np.linspace(0.55, 1.45, 10)

    figures, roc = loss_threshold_attack(member_losses, other_losses)

    pairs = (member_losses[:, None] < other_losses[None, :]).mean()
    assert figures["mia_auc"] == pytest.approx(pairs)
    assert figures["mia_tpr_at_1pct_fpr"] == figures["mia_tpr_at_0_1pct_fpr"] == 0.5
    assert roc.iloc[0].tolist() == [0.0, 0.0, 0.0]  # no image called a member: a loss below 0
    assert roc.iloc[-1][["false_positive_rate", "true_positive_rate"]].tolist() == [1.0, 1.0]
    assert roc["false_positive_rate"].is_monotonic_increasing and roc["true_positive_rate"].is_monotonic_increasing


def test_the_audit_asks_about_as_many_training_as_test_images_drawn_with_the_seed():
    members, non_members = audit_sample(train_count=1000, test_count=300, per_side=10_000, seed=0)
    assert len(members) == len(non_members) == 300
    assert len(set(members)) == 300 and members.max() < 1000 and np.all(np.diff(members) > 0)

    capped = audit_sample(1000, 300, per_side=50, seed=0)
    assert [len(part) for part in capped] == [50, 50]
    assert all(np.array_equal(a, b) for a, b in zip(capped, audit_sample(1000, 300, per_side=50, seed=0)))
    assert not np.array_equal(capped[0], audit_sample(1000, 300, per_side=50, seed=1)[0])
