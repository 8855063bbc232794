"""Champion/challenger: the best model found so far, kept in models/champion/ with its metrics and
provenance, replaced only by a run that beats it on one metric by a margin.

models/champion/ holds model.pt (the checkpoint, as train wrote it), metrics.json (evaluate's),
per_class.csv and provenance.json (git commit, experiment, params, data checksum, flow run).
With DVC's model registry (flows/registry.py) the folder is a cache of the registered champion,
written by `install`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from stages.metrics import epsilon_of
from stages.outputs import partial_folder

CHAMPION = Path("models/champion")
# Copied from the workspace into the champion folder: what `predict` needs and what it scored.
CHAMPION_FILES = {"model.pt": "models/model.pt", "metrics.json": "reports/metrics.json",
                  "per_class.csv": "reports/per_class.csv"}


@dataclass(frozen=True)
class Decision:
    """Whether a challenger replaces the champion, and why, in one sentence."""

    promote: bool
    reason: str
    metric: str
    challenger: float
    champion: float | None


def champion_folder(project: Path) -> Path:
    """The champion's folder, repairing a promotion that a crash interrupted (see `promote`): between its two
    renames the previous champion is put back; after them, what was left of it is removed."""
    folder = project / CHAMPION
    previous = folder.with_name(".champion.previous")
    if not folder.exists() and previous.exists():
        os.rename(previous, folder)
    elif previous.exists():  # the new champion is in place; a kill cut short the removal of the old one
        shutil.rmtree(previous)
    return folder


def champion_metrics(project: Path) -> dict | None:
    """The champion's metrics.json, or None when there is no champion yet."""
    metrics = champion_folder(project) / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.exists() else None


def decide(challenger: dict, champion: dict | None, metric: str, margin: float,
           max_epsilon: float | None = None) -> Decision:
    """Promote when there is no champion, or when the challenger's metric exceeds the champion's by more than margin;
    never a challenger whose privacy budget ε is above max_epsilon (a model trained without a guarantee: ε = ∞)."""
    if metric not in challenger:
        raise KeyError(f"promotion metric {metric!r} is not in reports/metrics.json (it has {', '.join(challenger)})")
    score = float(challenger[metric])
    best = float(champion[metric]) if champion is not None else None
    epsilon = epsilon_of(challenger)
    if max_epsilon is not None and epsilon > max_epsilon:
        spent = "no privacy guarantee (ε = ∞)" if epsilon == float("inf") else f"ε {epsilon:g}"
        return Decision(False, f"this run has {spent}, above max_epsilon {max_epsilon:g}: never promoted",
                        metric, score, best)
    if champion is None:
        return Decision(True, f"no champion yet: this run's {metric} {score:.4f} becomes the first", metric, score, None)
    if score > best + margin:
        return Decision(True, f"{metric} {score:.4f} beats the champion's {best:.4f} by more than {margin:g}",
                        metric, score, best)
    return Decision(False, f"{metric} {score:.4f} does not beat the champion's {best:.4f} by more than {margin:g}: "
                           "the champion stays", metric, score, best)


def promote(project: Path, provenance: dict) -> Path:
    """Make the workspace's model, metrics and provenance the champion, never leaving half of one."""
    return install(project, {name: project / source for name, source in CHAMPION_FILES.items()}, provenance)


def install(project: Path, files: dict[str, Path | bytes], provenance: dict) -> Path:
    """Make these files (a path to copy, or the bytes) and provenance the champion, never leaving half of one.

    The new champion is written complete in a hidden folder beside the old, then swapped in with
    two renames; a crash between them leaves the old champion complete under
    .champion.previous, which `champion_folder` puts back.
    """
    folder = champion_folder(project)
    staging = partial_folder(folder)  # and the staging folders of promotions killed midway, removed
    staging.chmod(0o755)  # made private; the champion is not
    try:
        for name, source in files.items():
            if isinstance(source, bytes):
                (staging / name).write_bytes(source)
            else:
                shutil.copy2(source, staging / name)
        (staging / "provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
        # Weights are not for git: the folder ignores itself (and DVC's experiments leave it alone).
        (staging / ".gitignore").write_text("*\n")
        sync_folder(staging)
        previous = folder.with_name(".champion.previous")
        if folder.exists():
            os.rename(folder, previous)
        os.rename(staging, folder)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def sync_folder(folder: Path) -> None:
    """Flush the folder's files to disk before it is renamed into place (a rename can reach the disk first)."""
    for path in folder.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())
