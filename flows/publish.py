"""What a retraining run publishes as Prefect artifacts, read from the files evaluate and report
wrote (so the numbers are those of `dvc metrics show`).

Each key is stable: every run adds a new version under it, and the UI's Artifacts page shows its
history. Keys may hold only lowercase letters, digits and dashes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.champion import Decision
from stages.membership import AUDIT
from stages.metrics import HEADLINE, PRIVACY, epsilon_of

PER_CLASS_KEY = "retrain-per-class"  # table: reports/per_class.csv
SUMMARY_KEY = "retrain-summary"  # markdown: reports/metrics.json against the champion, the promotion decision
REPORT_KEY = "retrain-report"  # link: reports/report.html

def read_metrics(project: Path) -> dict:
    return json.loads((project / "reports/metrics.json").read_text())


def publish_per_class(project: Path) -> None:
    """scikit-learn's per-class precision, recall, F1 and support, one row per class."""
    table = pd.read_csv(project / "reports/per_class.csv")
    create_table_artifact(table.to_dict(orient="records"), key=PER_CLASS_KEY,
                          description="Per-class precision, recall, F1 and support on the test split (reports/per_class.csv)")


def summary_markdown(metrics: dict, champion: dict | None, decision: Decision, about: dict) -> str:
    """The headline metrics and the membership-inference audit's beside the champion's (before this run's
    promotion), and the decision."""
    verdict = "promoted to champion" if decision.promote else "champion stays"
    lines = [f"# Retraining: {decision.metric} {decision.challenger:.4f}, {verdict}", ""]
    lines += [f"- **{name}**: {value}" for name, value in about.items()]
    lines += ["", "| metric | this run | champion | change |", "|---|---:|---:|---:|"]
    for name in [*HEADLINE, *AUDIT]:
        if name not in metrics:
            continue
        best = champion.get(name) if champion else None
        change = f"{metrics[name] - best:+.6f}" if best is not None else "–"
        lines.append(f"| {name} | {metrics[name]:.6f} | {'–' if best is None else f'{best:.6f}'} | {change} |")
    lines += privacy_rows(metrics, champion)
    lines += ["", f"**Promotion** on `{decision.metric}`: {decision.reason}.", "",
              f"Test images: {metrics.get('test_images', '?')}; the mia_ figures, a membership-inference attack on "
              f"{metrics.get('mia_images', '?')} training and as many test images (0.5 AUC: no leakage). Numbers "
              "from `reports/metrics.json` (as `dvc metrics show`)."]
    return "\n".join(lines) + "\n"


def privacy_rows(metrics: dict, champion: dict | None) -> list[str]:
    """ε and δ beside the metrics: ∞ and – for a model trained without a privacy guarantee."""
    def shown(figures: dict | None, key: str) -> str:
        if figures is None:
            return "–"
        if key == "epsilon":
            epsilon = epsilon_of(figures)
            return "∞ (not private)" if epsilon == float("inf") else f"{epsilon:.4g}"
        return "–" if figures.get(key) is None else f"{figures[key]:g}"

    return [f"| {key} | {shown(metrics, key)} | {shown(champion, key)} | |" for key in PRIVACY]


def publish_summary(markdown: str) -> None:
    create_markdown_artifact(markdown, key=SUMMARY_KEY,
                             description="Headline metrics, change against the champion, promotion decision")


def publish_report_link(project: Path, experiment: str | None) -> None:
    """A pointer to the self-contained HTML report; a file:// link, since it lives beside the project."""
    report = (project / "reports/report.html").resolve()
    label = f"report.html ({experiment})" if experiment else "report.html"
    create_link_artifact(report.as_uri(), link_text=label, key=REPORT_KEY,
                         description=f"The run's full report: {report}")
