"""The headline metrics: what evaluate writes to reports/metrics.json, what the report and the
retraining flow's summary show, in this order, and under these names."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score

# The key in reports/metrics.json (fractions in 0-1, top level, so `dvc exp show` columns stay put) and
# how a page names it.
HEADLINE = {
    "accuracy": "accuracy",
    "precision_macro": "macro precision",
    "recall_macro": "macro recall",
    "f1_macro": "macro F1",
    "precision_weighted": "weighted precision",
    "recall_weighted": "weighted recall",
    "f1_weighted": "weighted F1",
}

# What a private run spent (stages/privacy.py), always in reports/metrics.json: null for a run without a guarantee.
PRIVACY = {
    "epsilon": "privacy budget ε spent",
    "delta": "at δ",
}


def privacy_metrics(privacy: dict | None) -> dict:
    """The PRIVACY keys from what train recorded in the checkpoint (None: not private, so null)."""
    return {key: (privacy or {}).get(key) for key in PRIVACY}


def epsilon_of(metrics: dict) -> float:
    """The ε a model guarantees: infinite without a guarantee (null, or an older metrics.json without the key)."""
    epsilon = metrics.get("epsilon")
    return float("inf") if epsilon is None else float(epsilon)


def headline_metrics(labels: np.ndarray, predicted: np.ndarray, report: dict) -> dict:
    """The HEADLINE values from scikit-learn's accuracy and its `classification_report(output_dict=True)`."""
    metrics = {"accuracy": accuracy_score(labels, predicted)}
    for key in list(HEADLINE)[1:]:
        name, average = key.split("_")
        metrics[key] = report[f"{average} avg"]["f1-score" if name == "f1" else name]
    return {key: round(float(value), 6) for key, value in metrics.items()}
