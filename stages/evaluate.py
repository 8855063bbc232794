"""Stage 4, evaluate: score the trained model on the test split with scikit-learn's metrics.

    python -m stages.evaluate models/model.pt data/prepared --metrics reports/metrics.json \
        --per-class reports/per_class.csv --predictions reports/predictions.csv --roc reports/membership_roc.csv

Writes the headline metrics (stages/metrics.py), the per-class report, and one
`image,actual,predicted,confidence` row per test image: DVC draws the confusion matrix from it,
the report picks its mistakes from it. Then audits what the model gives away about its training
images (stages/membership.py): the figures join the metrics, the ROC curve is --roc.
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, classification_report

from stages.datasets import Split, load_meta, load_split
from stages.errors import StageError, run_stage
from stages.hardware import Compute, resolve_compute, return_freed_memory
from stages.membership import audit_sample, loss_threshold_attack, losses
from stages.metrics import headline_metrics, privacy_metrics
from stages.models import Classifier, as_model_input, load_checkpoint
from stages.outputs import atomic_path, write_json
from stages.params import EvaluateParams, load_params

log = logging.getLogger("evaluate")


def main() -> None:
    args = parse_args()
    params = load_params()
    settings, seed = params.evaluate, params.seed
    return_freed_memory()  # the test split is read in batches, whatever its size
    model, description = load_checkpoint(args.model)
    trained_with = description["params"]["train"]
    compute = resolve_compute(trained_with["device"], trained_with["precision"])
    model = model.to(compute.device, memory_format=torch.channels_last)
    test = load_split(args.prepared, "test")
    classes = description["classes"]
    if classes != load_meta(args.prepared)["classes"]:
        raise StageError(f"{args.model} was trained on other classes than {args.prepared} holds; run train again")

    log.info("scoring %d test images, test-time augmentation %s%s", len(test.labels), settings.tta,
             f" on the {settings.tta_share:.0%} least confident" if settings.tta != "none" and settings.tta_share < 1 else "")
    started = time.perf_counter()
    probabilities = predict(model, test.images, compute, settings.batch_size, settings.tta, settings.tta_share)
    eval_seconds = time.perf_counter() - started
    predicted = probabilities.argmax(axis=1)

    report = classification_report(test.labels, predicted, labels=range(len(classes)), target_names=classes,
                                   output_dict=True, zero_division=0)
    log.info("accuracy %.4f on %d test images (%s, %.1f s)", accuracy_score(test.labels, predicted),
             len(test.labels), compute.describe(), eval_seconds)

    audit, roc = audit_membership(model, load_split(args.prepared, "train"), test, compute, settings, seed)
    metrics = headline_metrics(test.labels, predicted, report) | privacy_metrics(description.get("privacy")) | {
        "test_images": len(test.labels), "eval_seconds": round(eval_seconds, 2),
    } | audit
    write_json(args.metrics, metrics)
    write_csv(args.per_class, per_class_table(report, classes))
    write_csv(args.predictions, prediction_table(test.labels, predicted, probabilities, classes))
    write_csv(args.roc, roc)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the trained model (from train)")
    parser.add_argument("prepared", help="the prepared data set (from download)")
    parser.add_argument("--metrics", default="reports/metrics.json")
    parser.add_argument("--per-class", default="reports/per_class.csv")
    parser.add_argument("--predictions", default="reports/predictions.csv")
    parser.add_argument("--roc", default="reports/membership_roc.csv", help="the membership-inference ROC curve")
    return parser.parse_args()


def audit_membership(model: Classifier, train: Split, test: Split, compute: Compute, settings: EvaluateParams,
                     seed: int) -> tuple[dict, pd.DataFrame]:
    """The loss-threshold attack on as many training as test images (evaluate.audit_images at most)."""
    members, non_members = audit_sample(len(train.labels), len(test.labels), settings.audit_images, seed)
    started = time.perf_counter()
    member_losses = losses(model, train.images, train.labels, members, compute, settings.batch_size)
    non_member_losses = losses(model, test.images, test.labels, non_members, compute, settings.batch_size)
    figures, roc = loss_threshold_attack(member_losses, non_member_losses)
    log.info("membership inference on %d training and %d test images: ROC AUC %.4f, %.2f%% of members found at "
             "1%% false positives (%.1f s)", len(members), len(non_members), figures["mia_auc"],
             100 * figures["mia_tpr_at_1pct_fpr"], time.perf_counter() - started)
    return figures | {"mia_images": len(members)}, roc


@torch.inference_mode()
def predict(model: Classifier, images: np.ndarray, compute: Compute, batch_size: int, tta: str, tta_share: float = 1.0
            ) -> np.ndarray:
    """Class probabilities (N, classes) for (N, H, W, 3) uint8 images. With `evaluate.tta_share` below 1, one
    plain pass first, then the test-time augmentation for the least confident share of the images alone
    (hiverge's cifar10-speedrun): confident answers rarely change under it, and the passes cost a fraction."""
    if tta == "none" or tta_share >= 1:
        return probabilities_of(model, images, compute, batch_size, tta)
    probabilities = probabilities_of(model, images, compute, batch_size, "none")
    doubtful = least_confident(probabilities, tta_share)
    probabilities[doubtful] = probabilities_of(model, images, compute, batch_size, tta, doubtful)
    return probabilities


def probabilities_of(model: Classifier, images: np.ndarray, compute: Compute, batch_size: int, tta: str,
                     chosen: np.ndarray | None = None) -> np.ndarray:
    """Of all the images, or of those `chosen` (indices), read from the memory map in slices."""
    chosen = np.arange(len(images)) if chosen is None else chosen
    outputs = []
    for start in range(0, len(chosen), batch_size):
        batch = as_model_input(images[chosen[start : start + batch_size]], compute.device)
        with compute.autocast():
            logits = logits_with_tta(model, batch, tta)
        outputs.append(logits.float().softmax(dim=1).cpu().numpy())
    return np.concatenate(outputs)


def least_confident(probabilities: np.ndarray, share: float) -> np.ndarray:
    """The indices, in order, of the `share` of rows whose top probability is lowest (at least one row)."""
    count = max(1, math.ceil(share * len(probabilities)))
    return np.sort(np.argsort(probabilities.max(axis=1), kind="stable")[:count])


def logits_with_tta(model: Classifier, images: torch.Tensor, tta: str) -> torch.Tensor:
    """`evaluate.tta`: none; flip (the mean logits of an image and its mirror: a mirrored image is
    as likely as the original); flip_translate, airbench's: half the flip's, plus a quarter each of
    the flip's on the image shifted one pixel up-left and one down-right (6 passes)."""
    if tta == "none":
        return model(images).float()
    mirrored = mean_over_mirror(model, images)
    if tta == "flip":
        return mirrored
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :height, :width], padded[..., 2:, 2:]]
    return 0.5 * mirrored + 0.25 * sum(mean_over_mirror(model, view) for view in shifted)


def mean_over_mirror(model: Classifier, images: torch.Tensor) -> torch.Tensor:
    return (model(images).float() + model(images.flip(-1)).float()) / 2


def per_class_table(report: dict, classes: list[str]) -> pd.DataFrame:
    rows = [{"class": name, "precision": report[name]["precision"], "recall": report[name]["recall"],
             "f1": report[name]["f1-score"], "support": int(report[name]["support"])} for name in classes]
    return pd.DataFrame(rows).round(6)


def prediction_table(labels: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> pd.DataFrame:
    names = np.array(classes, dtype=object)
    return pd.DataFrame({
        "image": np.arange(len(labels)),
        "actual": names[labels],
        "predicted": names[predicted],
        "confidence": probabilities.max(axis=1).round(6),
    })


def write_csv(path: str, table: pd.DataFrame) -> None:
    with atomic_path(path) as partial:
        table.to_csv(partial, index=False)


if __name__ == "__main__":
    run_stage(main)
