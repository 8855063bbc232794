"""Stage 5, report: gather what the earlier stages wrote into one page to read, in Markdown and HTML.

    python -m stages.report --prepared data/prepared --model models/model.pt --reports reports \\
        --champion models/champion/metrics.json --markdown reports/report.md --html reports/report.html

Reads params.yaml (shown whole), data/prepared (meta.json and the test images), the model and,
under --reports, download.json, augment.json, augment_preview.png, train/ (DVCLive), metrics.json,
per_class.csv, predictions.csv, compression.csv, compression.json and membership_roc.csv. The headline metrics are
set beside the champion's (--champion, when there is one) and the last commit's
reports/metrics.json (when git has one). Writes the two reports plus the pictures beside them
(confusion.png, learning_curves.png, misclassified.png, explained_classes.png,
explained_mistakes.png, membership_roc.png); the Markdown links the pictures, the HTML embeds them and its one
inline script (sorting the per-class table), so that report.html is one self-contained file.
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib.metadata
import io
import json
import logging
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: the stage draws files, never windows

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from ruamel.yaml import YAML
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

from stages.datasets import load_split
from stages.errors import StageError, run_stage
from stages.explain import explanation_grid_png, explanation_method, heat_maps
from stages.hardware import cpu_model_name
from stages.membership import AUDIT
from stages.metrics import HEADLINE, PRIVACY, epsilon_of
from stages.models import Classifier, load_checkpoint
from stages.outputs import atomic_path
from stages.params import AugmentParams, CompressParams, EvaluateParams, Params, load_params

log = logging.getLogger("report")

LIBRARIES = ("torch", "torchvision", "numpy", "scikit-learn", "dvc", "dvclive")
HISTORY = ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr")
# Past this many classes the counts no longer fit in the confusion matrix's cells.
MAX_CLASSES_WITH_COUNTS = 30
COMPRESSION_FIGURES = ["size_bytes", "sparsity", "accuracy", "latency_ms", "images_per_second", "size_ratio",
                       "speedup", "accuracy_change"]
COMPRESSION_COLUMNS = ["variant", "format", "precision", "backend", *COMPRESSION_FIGURES, "skipped"]
RIGHT, WRONG = "#1a7f37", "#cf222e"  # caption colours of right and wrong predictions
MISCLASSIFIED_PER_ROW = 8


@dataclass(frozen=True)
class Picture:
    title: str
    path: Path  # where the Markdown finds it
    png: bytes  # what the HTML embeds


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Sortable:
    """A table the HTML report sorts by the column clicked; the Markdown shows it as it is."""

    table: pd.DataFrame


# A section's blocks: a paragraph (str), a table, a picture or a code listing; each renderer
# below knows how to write each kind, so both reports say the same thing.
Block = str | pd.DataFrame | Sortable | Picture | Code


@dataclass(frozen=True)
class Section:
    title: str
    blocks: list[Block]


def main() -> None:
    args = parse_args()
    params = load_params()
    settings = params.report
    inputs = locate_inputs(Path(args.prepared), Path(args.model), Path(args.reports))

    meta = read_json(inputs["meta"])
    download = read_json(inputs["download"])
    augment = read_json(inputs["augment"])
    model, trained = load_checkpoint(inputs["model"])  # and its description: architecture, params, ...
    train_summary = read_json(inputs["train_summary"])
    metrics = read_json(inputs["metrics"])
    per_class = read_csv(inputs["per_class"], ["class", "precision", "recall", "f1", "support"], "evaluate")
    predictions = read_csv(inputs["predictions"], ["image", "actual", "predicted", "confidence"], "evaluate")
    history = read_history(inputs["history"])
    compression = read_csv(inputs["compression"], COMPRESSION_COLUMNS, "compress")
    compression_summary = read_json(inputs["compression_summary"])
    roc = read_csv(inputs["membership_roc"], ["false_positive_rate", "true_positive_rate"], "evaluate")
    test_images = load_split(args.prepared, "test").images  # (N, H, W, 3) uint8, memory-mapped
    check_predictions_match(predictions, len(test_images), inputs["predictions"])
    earlier = earlier_metrics(Path(args.champion), inputs["metrics"])

    reports = Path(args.reports)
    classes = meta["classes"]
    log.info("drawing the pictures: confusion matrix, learning curves, mistakes, explanations")
    confusion = Picture("Confusion matrix", reports / "confusion.png", confusion_png(predictions, classes))
    curves = Picture("Learning curves", reports / "learning_curves.png", learning_curves_png(history))
    membership = Picture("Membership inference: the loss-threshold attack's ROC curve", reports / "membership_roc.png",
                         membership_roc_png(roc, metrics["mia_auc"]))
    preview = Picture("Augmented training samples", inputs["preview"], inputs["preview"].read_bytes())
    mistakes = most_confident_mistakes(predictions)
    grid = Picture("Misclassified test images, most confident first: actual → predicted, confidence",
                   reports / "misclassified.png",
                   misclassified_png(test_images, mistakes.head(settings.misclassified_grid)))
    by_class = Picture("Evidence for the predicted class: the first test images of each class",
                       reports / "explained_classes.png",
                       explanations_png(model, test_images, first_of_each_class(predictions, classes,
                                                                                settings.explained_per_class),
                                        classes, pairs_per_row=settings.explained_per_class))
    confident_wrong = Picture("Evidence for the predicted class: the most confident mistakes",
                              reports / "explained_mistakes.png",
                              explanations_png(model, test_images, mistakes.head(settings.explained_mistakes),
                                               classes, pairs_per_row=4))

    title = f"{trained['architecture']} on {Path(meta['source']).name}"
    sections = [
        headline_section(metrics, params.evaluate, trained, train_summary, earlier),
        per_class_section(per_class),
        confusion_section(confusion, predictions),
        mistakes_section(grid, mistakes, settings.misclassified_grid),
        explanations_section(by_class, confident_wrong, settings.explained_per_class, settings.explained_mistakes,
                             explanation_method(model)),
        compression_section(compression, compression_summary, params.compress),
        privacy_section(membership, metrics, trained.get("privacy")),
        learning_curves_section(curves, train_summary),
        data_section(meta, download, augment, params.augment, preview),
        params_section(params, trained["params"]),
        provenance_section(meta, trained, train_summary),
        wall_times_section(download, augment, train_summary, metrics),
    ]

    # Everything is drawn and rendered before the first write, so a failure leaves no new file.
    markdown_path, html_path = Path(args.markdown), Path(args.html)
    for picture in (confusion, curves, grid, by_class, confident_wrong, membership):
        write_output(picture.path, picture.png)
    write_output(markdown_path, render_markdown(title, sections, markdown_path.parent).encode())
    write_output(html_path, render_html(title, sections).encode())
    log.info("wrote %s and %s: test accuracy %.2f%%", markdown_path, html_path, 100 * metrics["accuracy"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", default="data/prepared", help="the prepared data set (from download)")
    parser.add_argument("--model", default="models/model.pt", help="the trained model (from train)")
    parser.add_argument("--reports", default="reports", help="the folder earlier stages wrote their reports to")
    parser.add_argument("--champion", default="models/champion/metrics.json",
                        help="the champion's metrics to compare with, when there is a champion (see flows/champion.py)")
    parser.add_argument("--markdown", default="reports/report.md", help="the Markdown report to write")
    parser.add_argument("--html", default="reports/report.html", help="the self-contained HTML report to write")
    return parser.parse_args()


# --- inputs --------------------------------------------------------------------------------


def locate_inputs(prepared: Path, model: Path, reports: Path) -> dict[str, Path]:
    """Every input's path; raise StageError naming each missing one and the stage that writes it."""
    live = reports / "train"
    inputs = {
        "meta": (prepared / "meta.json", "download"),
        "download": (reports / "download.json", "download"),
        "augment": (reports / "augment.json", "augment"),
        "preview": (reports / "augment_preview.png", "augment"),
        "model": (model, "train"),
        "train_summary": (live / "metrics.json", "train"),
        "metrics": (reports / "metrics.json", "evaluate"),
        "per_class": (reports / "per_class.csv", "evaluate"),
        "predictions": (reports / "predictions.csv", "evaluate"),
        "test_images": (prepared / "test_images.npy", "download"),
        "compression": (reports / "compression.csv", "compress"),
        "compression_summary": (reports / "compression.json", "compress"),
        "membership_roc": (reports / "membership_roc.csv", "evaluate"),
    }
    # The test curves are optional (train.test_each_epoch); these three are logged every epoch.
    for name in ("train/loss", "train/accuracy", "lr"):
        inputs[name] = (live / "plots" / "metrics" / f"{name}.tsv", "train")
    missing = [f"{path} (written by stage {stage})" for path, stage in inputs.values() if not path.is_file()]
    if missing:
        raise StageError("missing input; run the earlier stages first (`dvc repro report` runs what is needed):"
                         + "".join(f"\n  - {line}" for line in missing))
    return {name: path for name, (path, _) in inputs.items()} | {"history": live / "plots" / "metrics"}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StageError(f"{path} is not valid JSON ({error}); run the stage that writes it again") from None


def read_csv(path: Path, columns: list[str], stage: str) -> pd.DataFrame:
    # Class names stay strings: pandas would otherwise read a class "1" as a number and a
    # class "None" or "NA" as missing.
    table = pd.read_csv(path, dtype={"class": str, "image": str, "actual": str, "predicted": str},
                        keep_default_na=False)
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise StageError(f"{path} lacks the column(s) {', '.join(missing)}; stage {stage} writes "
                         f"{', '.join(columns)}: run it again")
    return table


def read_history(folder: Path) -> dict[str, pd.Series]:
    """Each metric DVCLive logged per epoch, indexed by epoch from 1; the test ones may be absent."""
    history = {}
    for name in HISTORY:
        path = folder / f"{name}.tsv"
        if path.is_file():
            table = pd.read_csv(path, sep="\t")
            # DVCLive counts steps from 0, one step per epoch; its value column is the file's stem.
            history[name] = table.set_index(table["step"] + 1)[path.stem].rename_axis("epoch")
    return history


def check_predictions_match(predictions: pd.DataFrame, test_count: int, path: Path) -> None:
    """predictions.csv must hold one row per image of the prepared test split, in its order."""
    if list(predictions["image"]) != [str(index) for index in range(test_count)]:
        raise StageError(f"{path} does not hold one row per test image of the prepared data ({test_count} "
                         "images); run stage evaluate again")


def earlier_metrics(champion: Path, metrics_path: Path) -> dict[str, dict]:
    """The metrics to set this run's beside, by name: the champion's and the last commit's, where there are any."""
    earlier = {}
    if champion.is_file():
        earlier["champion"] = read_json(champion)
    committed = committed_json(metrics_path)
    if committed is not None:
        earlier["last commit"] = committed
    return earlier


def committed_json(path: Path) -> dict | None:
    """The JSON file as git's HEAD holds it; None outside git, before a first commit or when HEAD lacks it."""
    try:
        shown = subprocess.run(["git", "show", f"HEAD:./{os.path.relpath(path)}"], capture_output=True, text=True)
    except OSError:
        return None
    if shown.returncode != 0:
        return None
    try:
        return json.loads(shown.stdout)
    except json.JSONDecodeError:
        return None


def most_confident_mistakes(predictions: pd.DataFrame) -> pd.DataFrame:
    mistakes = predictions[predictions["actual"] != predictions["predicted"]]
    return mistakes.sort_values("confidence", ascending=False, kind="stable")


def first_of_each_class(predictions: pd.DataFrame, classes: list[str], count: int) -> pd.DataFrame:
    """The first `count` test images of each class, class by class, right or wrong."""
    return pd.concat([predictions[predictions["actual"] == name].head(count) for name in classes])


# --- pictures ------------------------------------------------------------------------------


def confusion_png(predictions: pd.DataFrame, classes: list[str]) -> bytes:
    """Counts in the cells; colours by each row's share, so a rare class's mistakes show as much as a common one's."""
    unknown = sorted((set(predictions["actual"]) | set(predictions["predicted"])) - set(classes))
    if unknown:
        raise StageError(f"predictions.csv names classes the data set does not have: {', '.join(unknown)}; "
                         "run stage evaluate again")
    counts = confusion_matrix(predictions["actual"], predictions["predicted"], labels=classes)
    row_share = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    side = min(max(5.0, 0.5 * len(classes)), 24.0)
    figure = Figure(figsize=(side + 1.5, side), layout="constrained")
    axes = figure.add_subplot()
    display = ConfusionMatrixDisplay(row_share, display_labels=classes)
    display.plot(ax=axes, cmap="Blues", xticks_rotation=45, include_values=len(classes) <= MAX_CLASSES_WITH_COUNTS,
                 im_kw={"vmin": 0, "vmax": 1})
    if display.text_ is not None:
        for text, count in zip(display.text_.flat, counts.flat):
            text.set_text(str(count))
    axes.set(xlabel="predicted", ylabel="actual", title="Test images: counts, coloured by share of the row")
    return png_bytes(figure)


def learning_curves_png(history: dict[str, pd.Series]) -> bytes:
    figure = Figure(figsize=(13, 3.8), layout="constrained")
    loss_axes, accuracy_axes, lr_axes = figure.subplots(1, 3)
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        for split in ("train", "test"):
            if f"{split}/{metric}" in history:
                series = history[f"{split}/{metric}"]
                axes.plot(series.index, series.to_numpy(), marker="o", label=split)
        axes.set(title=metric, xlabel="epoch")
        axes.legend()
    accuracy_axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    lr_axes.plot(history["lr"].index, history["lr"].to_numpy(), marker="o")
    lr_axes.set(title="learning rate (start of epoch)", xlabel="epoch")
    for axes in (loss_axes, accuracy_axes, lr_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    return png_bytes(figure)


def membership_roc_png(roc: pd.DataFrame, auc: float) -> bytes:
    figure = Figure(figsize=(4.6, 4.2), layout="constrained")
    axes = figure.subplots()
    axes.plot(roc["false_positive_rate"], roc["true_positive_rate"], label=f"loss threshold, AUC {auc:.3f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance (no leakage)")
    axes.set(xlabel="false positives (test images called members)", ylabel="true positives (members found)")
    axes.xaxis.set_major_formatter(PercentFormatter(1.0))
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    return png_bytes(figure)


def caption(row) -> tuple[str, str]:
    """What a picture of one prediction says above it, and in which colour."""
    if row.actual == row.predicted:
        return f"{row.actual} {row.confidence:.0%}", RIGHT
    return f"{row.actual} → {row.predicted} {row.confidence:.0%}", WRONG


def misclassified_png(images: np.ndarray, mistakes: pd.DataFrame) -> bytes:
    """The mistakes' test images in a grid, each captioned actual → predicted and the confidence."""
    rows = max(1, -(-len(mistakes) // MISCLASSIFIED_PER_ROW))
    figure = Figure(figsize=(1.6 * MISCLASSIFIED_PER_ROW, 1.75 * rows), layout="constrained")
    axes = np.array(figure.subplots(rows, MISCLASSIFIED_PER_ROW, squeeze=False))
    for axis in axes.flat:
        axis.set_axis_off()
    for axis, row in zip(axes.flat, mistakes.itertuples()):
        text, colour = caption(row)
        axis.imshow(images[int(row.image)])
        axis.set_title(text, fontsize=7, color=colour)
    return png_bytes(figure)


def explanations_png(model: Classifier, images: np.ndarray, chosen: pd.DataFrame, classes: list[str],
                     pairs_per_row: int) -> bytes:
    """Each chosen test image beside its heat map (stages/explain.py) for the class the model predicted."""
    pictures = np.stack([images[int(index)] for index in chosen["image"]]) if len(chosen) else np.empty((0,))
    maps = heat_maps(model, pictures, [classes.index(name) for name in chosen["predicted"]])[0] if len(chosen) else []
    captions, colours = zip(*(caption(row) for row in chosen.itertuples())) if len(chosen) else ((), ())
    # One class per row when a few images per class are asked for, rows of four otherwise.
    return explanation_grid_png(pictures, maps, captions, colours,
                                pairs_per_row=pairs_per_row if 2 <= pairs_per_row <= 6 else 4)


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" tag: the bytes then depend on the data and not on matplotlib's version.
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


# --- sections ------------------------------------------------------------------------------


def headline_section(metrics: dict, scoring: EvaluateParams, trained: dict, train_summary: dict,
                     earlier: dict[str, dict]) -> Section:
    tta = "no test-time augmentation" if scoring.tta == "none" else f"test-time augmentation: {scoring.tta}"
    if scoring.tta != "none" and scoring.tta_share < 1:
        tta += f" on the {scoring.tta_share:.0%} least confident"
    table = pd.DataFrame({"metric": list(HEADLINE.values()), "this run": [f"{metrics[key]:.2%}" for key in HEADLINE]})
    for name, other in earlier.items():
        table[name] = [f"{other[key]:.2%}" if key in other else "–" for key in HEADLINE]
        table[f"vs {name}"] = [f"{100 * (metrics[key] - other[key]):+.2f} pp" if key in other else "–"
                               for key in HEADLINE]
    epochs = trained["params"]["train"]["epochs"]
    summary = (f"{metrics['test_images']} test images, {tta}. Model {trained['architecture']}, trained "
               f"{epochs} epochs on {train_summary['train_images']} images, {guarantee(trained.get('privacy'))}.")
    compared = (f"Compared with the {' and the '.join(earlier)} (pp: percentage points)." if earlier else
                "No champion and no committed reports/metrics.json to compare with yet.")
    return Section("Headline", [summary, table, compared])


def per_class_section(per_class: pd.DataFrame) -> Section:
    table = per_class.sort_values("f1", kind="stable")[["class", "precision", "recall", "f1", "support"]]
    table[["precision", "recall", "f1"]] = table[["precision", "recall", "f1"]].map("{:.1%}".format)
    return Section("Per class, weakest first", [Sortable(table)])


def confusion_section(picture: Picture, predictions: pd.DataFrame) -> Section:
    mistakes = predictions[predictions["actual"] != predictions["predicted"]]
    top = mistakes.value_counts(["actual", "predicted"], sort=True).head(5).rename("images").reset_index()
    blocks: list[Block] = [picture, "Rows are the actual classes, columns the predicted ones."]
    if len(top):
        blocks += ["The most frequent mistakes:", top]
    return Section("Confusion matrix", blocks)


def mistakes_section(picture: Picture, mistakes: pd.DataFrame, shown: int) -> Section:
    if mistakes.empty:
        return Section("Misclassified examples", ["No test image is misclassified."])
    return Section("Misclassified examples", [
        f"{min(shown, len(mistakes))} of the {len(mistakes)} misclassified test images, the most confident first.",
        picture,
    ])


def explanations_section(by_class: Picture, mistakes: Picture, per_class: int, mistake_count: int, method: str
                         ) -> Section:
    blocks: list[Block] = [
        f"Heat maps by {method}: red is where the evidence for the predicted class is strongest. Captions: the "
        "actual class, → the predicted one when it differs, the confidence.",
    ]
    if per_class:
        blocks.append(by_class)
    if mistake_count:
        blocks.append(mistakes)
    return Section("Explanations", blocks)


def compression_section(compression: pd.DataFrame, summary: dict, settings: CompressParams) -> Section:
    # A skipped variant's figures are empty cells, which make their columns text: numbers again for the rest.
    measured = compression[compression["skipped"] == ""].copy()
    for column in COMPRESSION_FIGURES:
        measured[column] = pd.to_numeric(measured[column])
    table = pd.DataFrame({
        "variant": measured["variant"],
        "format": measured["format"],
        "precision": measured["precision"],
        "backend": measured["backend"],
        "file size": measured["size_bytes"].map(file_size),
        "vs fp32": measured["size_ratio"].map("{:.0%}".format),
        "zero weights": measured["sparsity"].map("{:.0%}".format),
        "accuracy": measured["accuracy"].map("{:.2%}".format),
        "accuracy change": (100 * measured["accuracy_change"]).map("{:+.2f} pp".format),
        "latency, batch 1": measured["latency_ms"].map("{:.3f} ms".format),
        "speedup": measured["speedup"].map("{:.2f}×".format),
        "images/s": measured["images_per_second"].map("{:.0f}".format),
    })
    skipped = [f"Variant {row.variant} skipped: {row.skipped}." for row in compression.itertuples() if row.skipped]
    how = (f"Measured by stage compress on {summary['cpu']} with {summary['threads']} thread(s): latency is the "
           f"median of {settings.latency_repeats} single-image runs, images/s the throughput over the test split "
           f"at batch {settings.batch_size}, accuracy without test-time augmentation. The int8 backend is the "
           f"one this machine's torch offered ({summary['int8_backend']}): timings compare only within one machine.")
    return Section("Compressed variants", [table, *skipped, how])


def guarantee(privacy: dict | None) -> str:
    """The privacy guarantee a model was trained with, in words."""
    if privacy is None:
        return "without a privacy guarantee (ε = ∞)"
    return (f"with differential privacy: ε = {privacy['epsilon']:.3g} at δ = {privacy['delta']:g} (DP-SGD: "
            f"{privacy['steps']} steps of Poisson batches, each image drawn with probability {privacy['sample_rate']:.4g}, "
            f"its gradient clipped to {privacy['max_grad_norm']:g}, noise multiplier {privacy['noise_multiplier']:.4g}, "
            f"{privacy['accountant'].upper()} accountant)")


def privacy_section(picture: Picture, metrics: dict, privacy: dict | None) -> Section:
    epsilon = epsilon_of(metrics)
    budget = {PRIVACY["epsilon"]: "∞ (not private)" if epsilon == float("inf") else f"{epsilon:.3g}",
              PRIVACY["delta"]: "–" if metrics.get("delta") is None else f"{metrics['delta']:g}"}
    audit = {AUDIT[key]: f"{metrics[key]:.3f}" if key == "mia_auc" else f"{metrics[key]:.2%}" for key in AUDIT}
    table = pd.DataFrame({"figure": [*budget, *audit], "this run": [*budget.values(), *audit.values()]})
    how = (f"An attacker who holds the model asks of {metrics['mia_images']} training images and as many test images "
           "whether each was in the training set, calling it a member when the model's loss on it is below a "
           "threshold (Yeom et al., 2018); the curve is every threshold. An AUC of 0.5 and true-positive rates no "
           "higher than the false-positive ones mean the losses give nothing away. The model was trained "
           f"{guarantee(privacy)}: ε bounds what any attack can learn about one image, the audit measures one attack.")
    return Section("Privacy: what the model gives away about its training images", [table, picture, how])


def file_size(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def learning_curves_section(picture: Picture, train_summary: dict) -> Section:
    last = (f"Last epoch: train loss {train_summary['train']['loss']:.4f}, "
            f"accuracy {train_summary['train']['accuracy']:.2%}")
    if "test" in train_summary:
        last += f"; test loss {train_summary['test']['loss']:.4f}, accuracy {train_summary['test']['accuracy']:.2%}"
    speed = (f"{train_summary['train_seconds']:.1f} s of training, {train_summary['images_per_second']:.0f} "
             f"images/s on {train_summary['device']} ({train_summary['precision']}).")
    return Section("Learning curves", [picture, last + ".", speed])


def data_section(meta: dict, download: dict, augment: dict, settings: AugmentParams, preview: Picture) -> Section:
    facts = {
        "source": f"{meta['source']} ({meta['source_kind']})",
        "classes": f"{len(meta['classes'])}: {', '.join(meta['classes'])}",
        "image size": f"{meta['image_size']} × {meta['image_size']}",
        "train images": download["train_images"],
        "test images": download["test_images"],
        "skipped images": download["skipped_images"],
        "augmentation policy": settings.policy,
        "augmented copies": f"{settings.copies} per image, {augment['augmented_images']} images",
    }
    if meta["made_test_split"]:
        facts["test images"] = f"{download['test_images']} (split off the training images by download)"
    return Section("Data and augmentation", [facts_table(facts), preview])


def params_section(params: Params, trained_params: dict) -> Section:
    current = params.model_dump(mode="json")
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # keep params.yaml's order
    listing = io.StringIO()
    yaml.dump(current, listing)
    blocks: list[Block] = [Code(listing.getvalue())]
    drift = params_drift(current, trained_params)
    if drift:
        blocks.insert(0, "Warning: the model was trained with other values than params.yaml now holds "
                         "(run `dvc repro` to bring them in line): " + "; ".join(drift) + ".")
    return Section("Params", blocks)


def params_drift(current: dict, trained: dict) -> list[str]:
    """The keys the model was trained with that params.yaml now sets otherwise."""
    sections = ("seed", "train")  # what train read, and the checkpoint keeps
    now = pd.json_normalize({key: current[key] for key in sections}).iloc[0].to_dict()
    then = pd.json_normalize({key: trained.get(key) for key in sections}).iloc[0].to_dict()
    return [f"{key} was {then.get(key)!r}, is {value!r}" for key, value in now.items() if then.get(key) != value]


def provenance_section(meta: dict, trained: dict, train_summary: dict) -> Section:
    facts = git_state()
    if os.environ.get("DVC_EXP_NAME"):
        facts["DVC experiment"] = os.environ["DVC_EXP_NAME"]
    facts["data sha256"] = meta["data_sha256"]
    if "source_sha256" in meta:
        facts["source sha256"] = meta["source_sha256"]
    if "source_md5" in meta:
        facts["source MD5 (official archive)"] = meta["source_md5"]
    facts["training device"] = (f"{train_summary['device']}, {train_summary['precision']}, "
                                f"{train_summary['threads']} threads, torch {trained['torch_version']}")
    facts["CPU"] = cpu_model_name()
    facts |= library_versions()
    return Section("Provenance", [facts_table(facts)])


def wall_times_section(download: dict, augment: dict, train_summary: dict, metrics: dict) -> Section:
    seconds = pd.Series({
        "download": download["download_seconds"],
        "augment": augment["augment_seconds"],
        "train": train_summary["train_seconds"],
        "evaluate": metrics["eval_seconds"],
    })
    seconds["total"] = seconds.sum()
    table = seconds.map("{:.2f}".format).rename("seconds").rename_axis("stage").reset_index()
    return Section("Wall times", [table])


def facts_table(facts: dict) -> pd.DataFrame:
    return pd.DataFrame({"item": list(facts), "value": [str(value) for value in facts.values()]})


def git_state() -> dict[str, str]:
    """HEAD's commit and whether tracked files differ from it; or why there is no commit to name."""
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "HEAD"], capture_output=True, text=True)
    except OSError:
        return {"git commit": "none (git is not installed)"}
    if head.returncode != 0:
        reason = head.stderr.strip().splitlines()[0] if head.stderr.strip() else "no commit yet"
        return {"git commit": f"none ({reason})"}
    # Untracked files are left out: DVC's outputs and scratch files are untracked by design.
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    changed_files = len(changed.stdout.splitlines())
    work_tree = f"{changed_files} tracked file(s) with uncommitted changes" if changed_files else "clean"
    return {"git commit": head.stdout.strip(), "work tree": work_tree}


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# --- rendering -----------------------------------------------------------------------------


def render_markdown(title: str, sections: list[Section], folder: Path) -> str:
    """The report as Markdown; pictures are linked relative to `folder`, where the file goes."""
    parts = [f"# Report: {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        parts += [markdown_block(block, folder) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def markdown_block(block: Block, folder: Path) -> str:
    if isinstance(block, Sortable):
        block = block.table
    if isinstance(block, pd.DataFrame):
        return block.to_markdown(index=False)
    if isinstance(block, Picture):
        link = quote(Path(os.path.relpath(block.path, folder)).as_posix())
        return f"![{block.title}]({link})"
    if isinstance(block, Code):
        return f"```yaml\n{block.text}```"
    return block


STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 62rem;
       margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { padding: .25rem .8rem; border-bottom: 1px solid #e3e3e3; text-align: left; }
th { background: #f4f4f4; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; }
figure { margin: 1rem 0; }
figcaption { color: #666; font-size: .9rem; }
pre { background: #f6f8fa; padding: .8rem 1rem; border-radius: 4px; overflow-x: auto; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #aaa; }
table.sortable th[data-order="ascending"]::after { content: " \\2191"; color: #222; }
table.sortable th[data-order="descending"]::after { content: " \\2193"; color: #222; }
"""

# Sorts a table.sortable by the column whose header is clicked, numbers as numbers ("91.2%" too),
# again to reverse. Inline, like the style, so the report stays one file.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach((table) => {
  const headers = Array.from(table.tHead.rows[0].cells);
  headers.forEach((header, column) => header.addEventListener("click", () => {
    const rows = Array.from(table.tBodies[0].rows);
    const text = (row) => row.cells[column].textContent.trim();
    const numeric = rows.every((row) => !Number.isNaN(parseFloat(text(row))));
    const ascending = header.dataset.order !== "ascending";
    rows.sort((a, b) => {
      const order = numeric ? parseFloat(text(a)) - parseFloat(text(b)) : text(a).localeCompare(text(b));
      return ascending ? order : -order;
    });
    headers.forEach((other) => delete other.dataset.order);
    header.dataset.order = ascending ? "ascending" : "descending";
    table.tBodies[0].append(...rows);
  }));
});
"""


def render_html(title: str, sections: list[Section]) -> str:
    """The report as one HTML file: pictures embedded as data URIs, style and script inline."""
    body = [f"<h1>Report: {html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [html_block(block) for block in section.blocks]
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>Report: {html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + f"\n<script>{SORT_SCRIPT}</script>\n</body>\n</html>\n")


def html_block(block: Block) -> str:
    if isinstance(block, Sortable):
        hint = "<p class=\"hint\">Click a column's name to sort by it.</p>"
        return hint + block.table.to_html(index=False, border=0, escape=True, classes="sortable")
    if isinstance(block, pd.DataFrame):
        return block.to_html(index=False, border=0, escape=True)
    if isinstance(block, Picture):
        data = base64.b64encode(block.png).decode("ascii")
        caption = html.escape(block.title)
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>")
    if isinstance(block, Code):
        return f"<pre><code>{html.escape(block.text)}</code></pre>"
    return f"<p>{html.escape(block)}</p>"


# --- output --------------------------------------------------------------------------------


def write_output(path: Path, content: bytes) -> None:
    with atomic_path(path) as partial:
        partial.write_bytes(content)


if __name__ == "__main__":
    run_stage(main)
