"""The membership-inference audit: how much a trained model gives away about which images it trained on.

An attacker who can query the model and holds images like the training set's asks, for one image,
"was it in the training set?". The loss-threshold attack (Yeom et al., 2018) answers from the model's loss
on the image and its label: a model fits its training images better than images it never saw, so the lower
the loss, the likelier a member. It is scored over a balanced set, as many training images (members) as
held-out test images (non-members), drawn with `seed`: ROC AUC (0.5: the losses tell members from the
others no better than a coin) and the true-positive rate at 1 % and 0.1 % false positives, which say whether
some members are identified with confidence, what an average like the AUC hides (Carlini et al., 2022).

Per-example calibration (LiRA, Carlini et al., 2022; Watson et al., 2022) needs reference models trained
with and without each image: many trainings of the model for one audit, out of reach of a CPU pipeline.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve

from stages.hardware import Compute
from stages.models import Classifier, as_model_input

# The audit's figures in reports/metrics.json and how a page names them.
AUDIT = {
    "mia_auc": "membership-inference ROC AUC",
    "mia_tpr_at_1pct_fpr": "true positives at 1 % false positives",
    "mia_tpr_at_0_1pct_fpr": "true positives at 0.1 % false positives",
}
FALSE_POSITIVE_RATES = {"mia_tpr_at_1pct_fpr": 0.01, "mia_tpr_at_0_1pct_fpr": 0.001}


def audit_sample(train_count: int, test_count: int, per_side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices of the training and test images the audit asks about: as many of each, at most `per_side`."""
    size = min(train_count, test_count, per_side)
    generator = np.random.default_rng(seed)
    members = np.sort(generator.choice(train_count, size, replace=False))
    non_members = np.sort(generator.choice(test_count, size, replace=False))
    return members, non_members


@torch.inference_mode()
def losses(model: Classifier, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, compute: Compute,
           batch_size: int) -> np.ndarray:
    """The model's cross-entropy loss on each image `indices` picks, read from the memory map in slices."""
    result = []
    for start in range(0, len(indices), batch_size):
        chosen = indices[start : start + batch_size]
        batch = as_model_input(images[chosen], compute.device)
        with compute.autocast():
            logits = model(batch).float()
        result.append(F.cross_entropy(logits, torch.from_numpy(labels[chosen]).to(logits.device),
                                      reduction="none").cpu().numpy())
    return np.concatenate(result) if result else np.zeros(0, dtype=np.float32)


def loss_threshold_attack(member_losses: np.ndarray, non_member_losses: np.ndarray) -> tuple[dict, pd.DataFrame]:
    """The attack's figures (AUDIT's keys) and its ROC curve (false and true positive rates, the loss threshold)."""
    is_member = np.concatenate([np.ones(len(member_losses)), np.zeros(len(non_member_losses))])
    score = -np.concatenate([member_losses, non_member_losses]).astype(np.float64)  # lower loss: likelier member
    false_positives, true_positives, thresholds = roc_curve(is_member, score)
    figures = {"mia_auc": roc_auc_score(is_member, score)}
    for key, rate in FALSE_POSITIVE_RATES.items():
        # The best the attacker does without exceeding that false-positive rate.
        figures[key] = true_positives[false_positives <= rate].max()
    # The first point calls no image a member: roc_curve's threshold there is infinite, a loss below 0.
    roc = pd.DataFrame({"false_positive_rate": false_positives, "true_positive_rate": true_positives,
                        "loss_threshold": np.where(np.isfinite(thresholds), -thresholds, 0.0)})
    return {key: round(float(value), 6) for key, value in figures.items()}, roc.round(6)
