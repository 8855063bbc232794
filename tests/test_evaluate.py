"""The evaluate stage, run as DVC runs it on the tiny trained project, with each test-time
augmentation (none, flip, flip_translate): headline metrics, a per-class table and one prediction per test image,
all telling the same story."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
from sklearn.metrics import precision_recall_fscore_support

from conftest import AUGMENTED_PARAMS, TINY_CLASSES, Project
from stages.datasets import load_split

TTA = ("flip_translate", "flip", "none")
HEADLINE = [f"{name}_{average}" for average in ("macro", "weighted") for name in ("precision", "recall", "f1")]


@pytest.fixture(scope="module")
def evaluations(trained_project, tmp_path_factory) -> dict[str, tuple[Project, subprocess.CompletedProcess]]:
    """evaluate run on a copy of trained_project for each evaluate.tta, both at once."""
    root = tmp_path_factory.mktemp("evaluations")

    def evaluate(tta: str) -> tuple[Project, subprocess.CompletedProcess]:
        project = trained_project.copy(root / tta, "data/prepared", "models")
        project.write_params({**AUGMENTED_PARAMS, "evaluate.tta": tta})
        return project, project.evaluate()

    with ThreadPoolExecutor(len(TTA)) as pool:
        return dict(zip(TTA, pool.map(evaluate, TTA)))


@pytest.fixture(scope="module")
def evaluated_in_part(trained_project, tmp_path_factory) -> Project:
    """evaluate with flip_translate on the least confident half of the test images alone."""
    project = trained_project.copy(tmp_path_factory.mktemp("in-part") / "project", "data/prepared", "models")
    project.write_params({**AUGMENTED_PARAMS, "evaluate.tta": "flip_translate", "evaluate.tta_share": 0.5})
    result = project.evaluate()
    assert result.returncode == 0, result.stderr
    return project


@pytest.fixture(params=TTA, ids=[f"tta-{tta}" for tta in TTA])
def evaluated(request, evaluations) -> Project:
    """The project evaluated with each evaluate.tta in turn, which finished without error."""
    project, result = evaluations[request.param]
    assert result.returncode == 0, result.stderr
    return project


def metrics_of(project: Project) -> dict:
    return json.loads((project.reports / "metrics.json").read_text())


def predictions_of(project: Project) -> pd.DataFrame:
    return pd.read_csv(project.reports / "predictions.csv")


def test_headline_metrics_are_fractions_at_the_top_level(evaluated):
    metrics = metrics_of(evaluated)

    for name in ["accuracy", *HEADLINE]:
        assert isinstance(metrics[name], float), name
        assert 0 <= metrics[name] <= 1, name
    assert metrics["test_images"] == 12
    assert "tta" not in metrics  # evaluate.tta is a param: `dvc exp show` lists it among them, not the results


def test_the_membership_audit_asks_about_as_many_training_as_test_images_and_draws_its_roc_curve(evaluated):
    metrics = metrics_of(evaluated)
    roc = pd.read_csv(evaluated.reports / "membership_roc.csv")

    assert metrics["mia_images"] == 12  # all the test images, and as many of the training images
    assert 0 <= metrics["mia_tpr_at_0_1pct_fpr"] <= metrics["mia_tpr_at_1pct_fpr"] <= 1
    assert 0 <= metrics["mia_auc"] <= 1
    assert roc.columns.tolist() == ["false_positive_rate", "true_positive_rate", "loss_threshold"]
    assert roc.iloc[0, :2].tolist() == [0, 0] and roc.iloc[-1, :2].tolist() == [1, 1]
    assert roc["false_positive_rate"].is_monotonic_increasing and roc["true_positive_rate"].is_monotonic_increasing


def test_accuracy_is_the_share_of_predictions_that_name_the_actual_class(evaluated):
    predictions = predictions_of(evaluated)

    share = (predictions["actual"] == predictions["predicted"]).mean()
    assert metrics_of(evaluated)["accuracy"] == pytest.approx(share, abs=1e-6)


def test_macro_and_weighted_metrics_agree_with_the_predictions(evaluated):
    predictions, metrics = predictions_of(evaluated), metrics_of(evaluated)

    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            predictions["actual"], predictions["predicted"], labels=list(TINY_CLASSES), average=average,
            zero_division=0,
        )
        expected = {f"precision_{average}": precision, f"recall_{average}": recall, f"f1_{average}": f1}
        assert {name: metrics[name] for name in expected} == pytest.approx(expected, abs=1e-6)


def test_the_per_class_table_has_one_row_per_class_whose_supports_sum_to_the_test_size(evaluated):
    table = pd.read_csv(evaluated.reports / "per_class.csv")

    assert table.columns.tolist() == ["class", "precision", "recall", "f1", "support"]
    assert table["class"].tolist() == list(TINY_CLASSES)
    assert table["support"].tolist() == [4, 4, 4]
    assert table["support"].sum() == metrics_of(evaluated)["test_images"]
    assert table[["precision", "recall", "f1"]].stack().between(0, 1).all()


def test_predictions_name_the_actual_and_predicted_class_of_every_test_image_in_order(evaluated):
    predictions = predictions_of(evaluated)

    test_labels = load_split(evaluated.prepared, "test").labels
    assert predictions.columns.tolist() == ["image", "actual", "predicted", "confidence"]
    assert predictions["image"].tolist() == list(range(len(test_labels)))
    assert predictions["actual"].tolist() == [TINY_CLASSES[label] for label in test_labels]
    assert set(predictions["predicted"]) <= set(TINY_CLASSES)
    # The winning class's probability, at least 1/classes (written rounded to 6 decimals).
    assert predictions["confidence"].between(round(1 / len(TINY_CLASSES), 6), 1).all()


def test_a_tta_share_augments_the_least_confident_images_alone_and_keeps_the_plain_answer_of_the_others(
        evaluated_in_part, evaluations):
    plain, augmented = (predictions_of(evaluations[tta][0]) for tta in ("none", "flip_translate"))
    in_part = predictions_of(evaluated_in_part)

    doubtful = plain["confidence"].rank(method="first") <= len(plain) / 2  # the least confident half
    assert doubtful.sum() == 6
    for chosen, source in ((doubtful, augmented), (~doubtful, plain)):
        assert in_part.loc[chosen, "predicted"].tolist() == source.loc[chosen, "predicted"].tolist()
        assert in_part.loc[chosen, "confidence"].tolist() == pytest.approx(source.loc[chosen, "confidence"].tolist(),
                                                                          abs=1e-3)
    assert metrics_of(evaluated_in_part)["accuracy"] == pytest.approx(
        (in_part["actual"] == in_part["predicted"]).mean(), abs=1e-6)
