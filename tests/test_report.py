"""The report stage, run as DVC runs it, on a tiny but real set of every earlier stage's outputs."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from ruamel.yaml import YAML
from selenium.webdriver.common.by import By
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from bench.processes import stage_command
from stages.datasets import checksum_arrays
from stages.models import build_model, save_checkpoint
from stages.params import load_params
from stages.report import git_state, learning_curves_png, params_drift, read_history

PROJECT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "cat", "fish & chips"]  # the "&" checks that names are escaped in HTML
IMAGE_SIZE = 16  # the smallest lenet takes
PICTURES = ("confusion.png", "learning_curves.png", "misclassified.png", "explained_classes.png",
            "explained_mistakes.png", "membership_roc.png")
OUTPUTS = ("report.md", "report.html", *PICTURES)
CHAMPION_ACCURACY = 0.8  # this run's is 25/30


# --- the earlier stages' outputs, written by hand in their documented formats ---------------


def write_params(project: Path) -> dict:
    """The project's params.yaml, switched to the tiny lenet the fixture trains; returns it resolved."""
    yaml = YAML()
    params = yaml.load((PROJECT / "params.yaml").read_text())
    params["data"]["image_size"] = IMAGE_SIZE
    params["train"]["preset"] = "lenet"
    with open(project / "params.yaml", "w") as file:
        yaml.dump(params, file)
    return load_params(project / "params.yaml").model_dump(mode="json")


def write_prepared(prepared: Path, rng: np.random.Generator) -> None:
    prepared.mkdir(parents=True)
    for split, count in (("train", 12), ("test", 30)):
        images = rng.integers(0, 256, (count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)  # (N, H, W, 3)
        np.save(prepared / f"{split}_images.npy", images)
        np.save(prepared / f"{split}_labels.npy", np.arange(count, dtype=np.int64) % len(CLASSES))
    meta = {
        "source": "../shared/datasets/tiny.tar.gz", "source_kind": "image-folder archive", "classes": CLASSES,
        "image_size": IMAGE_SIZE, "made_test_split": False, "skipped": [], "counts": {"train": 12, "test": 30},
        "data_sha256": checksum_arrays(prepared), "source_sha256": "ab" * 32,
    }
    (prepared / "meta.json").write_text(json.dumps(meta))


def write_upstream_reports(reports: Path, rng: np.random.Generator) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "download.json").write_text(json.dumps(
        {"download_seconds": 1.5, "train_images": 12, "test_images": 30, "skipped_images": 0}))
    (reports / "augment.json").write_text(json.dumps(
        {"augment_seconds": 0.25, "augmented_images": 0}))
    Image.fromarray(rng.integers(0, 256, (34, 34, 3), dtype=np.uint8)).save(reports / "augment_preview.png")


def write_training(model_path: Path, live: Path, params: dict) -> None:
    """DVCLive's per-epoch TSVs and summary, and a real checkpoint; test curves only at the last epoch."""
    epochs = params["train"]["epochs"]
    summary = {"train_seconds": 3.2, "images_per_second": 37.5, "device": "cpu", "precision": "fp32",
               "threads": 2, "train_images": 12}
    curves = live / "plots" / "metrics"
    for name, values in {
        "train/loss": np.linspace(1.1, 0.4, epochs),
        "train/accuracy": np.linspace(0.3, 0.9, epochs),
        "lr": np.linspace(0.2, 0.0, epochs),
        "test/loss": [0.5],
        "test/accuracy": [0.8333],
    }.items():
        steps = range(epochs - len(values), epochs)
        (curves / name).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"step": steps, Path(name).name: values}).to_csv(curves / f"{name}.tsv", sep="\t", index=False)
    (live / "metrics.json").write_text(json.dumps(
        {"step": epochs - 1, "train": {"loss": 0.4, "accuracy": 0.9}, "lr": 0.0,
         "test": {"loss": 0.5, "accuracy": 0.8333}, **summary}))

    model = build_model("lenet", len(CLASSES), IMAGE_SIZE, [8, 8, 8], [0.5] * 3, [0.25] * 3)
    description = {
        "architecture": "lenet", "widths": [8, 8, 8], "classes": CLASSES, "image_size": IMAGE_SIZE,
        "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "params": params,
        "compute": {"device": "cpu", "precision": "fp32"}, "summary": summary, "torch_version": "2.x-test",
    }
    save_checkpoint(model_path, model, description)


def write_evaluation(reports: Path) -> None:
    """30 test images: airplane always right, cat often taken for fish & chips, which is right but once."""
    actual = ["airplane"] * 10 + ["cat"] * 10 + ["fish & chips"] * 10
    predicted = ["airplane"] * 10 + ["cat"] * 6 + ["fish & chips"] * 4 + ["fish & chips"] * 9 + ["airplane"]
    pd.DataFrame({"image": range(30), "actual": actual, "predicted": predicted, "confidence": 0.7}).to_csv(
        reports / "predictions.csv", index=False)
    precision, recall, f1, support = precision_recall_fscore_support(actual, predicted, labels=CLASSES)
    pd.DataFrame({"class": CLASSES, "precision": precision, "recall": recall, "f1": f1, "support": support}).to_csv(
        reports / "per_class.csv", index=False)
    macro = precision_recall_fscore_support(actual, predicted, average="macro")
    weighted = precision_recall_fscore_support(actual, predicted, average="weighted")
    (reports / "metrics.json").write_text(json.dumps({
        "accuracy": accuracy_score(actual, predicted),
        "precision_macro": macro[0], "recall_macro": macro[1], "f1_macro": macro[2],
        "precision_weighted": weighted[0], "recall_weighted": weighted[1], "f1_weighted": weighted[2],
        "test_images": 30, "eval_seconds": 0.75,
        "mia_auc": 0.625, "mia_tpr_at_1pct_fpr": 0.1, "mia_tpr_at_0_1pct_fpr": 0.05, "mia_images": 20,
    }))
    pd.DataFrame({"false_positive_rate": [0, 0, 0.5, 1], "true_positive_rate": [0, 0.1, 0.75, 1],
                  "loss_threshold": [0, 0.2, 1.1, 3.0]}).to_csv(reports / "membership_roc.csv", index=False)


def write_compression(reports: Path) -> None:
    """compress's table and metrics for an fp32 reference and an int8 variant."""
    pd.DataFrame({
        "variant": ["fp32", "int8"], "file": ["models/model.pt", "models/compressed/int8.torchscript.pt"],
        "format": ["checkpoint", "TorchScript"], "precision": ["fp32", "int8"], "backend": ["eager", "x86"],
        "size_bytes": [2_400_000, 640_000], "sparsity": [0.0, 0.0], "accuracy": [0.8, 0.7667],
        "latency_ms": [4.0, 1.0], "images_per_second": [900.0, 3600.0], "batch_size": [256, 256], "threads": [1, 1],
        "size_ratio": [1.0, 0.2667], "speedup": [1.0, 4.0], "accuracy_change": [0.0, -0.0333], "skipped": ["", ""],
    }).to_csv(reports / "compression.csv", index=False)
    (reports / "compression.json").write_text(json.dumps({
        "cpu": "Tiny CPU 3000", "threads": 1, "int8_backend": "x86",
        "fp32": {"accuracy": 0.8}, "int8": {"accuracy": 0.7667},
    }))


def make_project(root: Path) -> Path:
    rng = np.random.default_rng(0)
    params = write_params(root)
    write_prepared(root / "data" / "prepared", rng)
    write_upstream_reports(root / "reports", rng)
    write_training(root / "models" / "model.pt", root / "reports" / "train", params)
    write_evaluation(root / "reports")
    write_compression(root / "reports")
    return root


def run_report(project: Path, **env: str) -> subprocess.CompletedProcess:
    _python, *args = stage_command("report")
    command = [sys.executable, *args]
    environment = {**os.environ, "PYTHONPATH": str(PROJECT), "GIT_CEILING_DIRECTORIES": str(project.parent), **env}
    return subprocess.run(command, cwd=project, env=environment, capture_output=True, text=True, timeout=120)


def git(project: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=project, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> Path:
    """A project committed to git with an earlier run's metrics, one tracked file changed since, and a champion;
    reported inside a DVC experiment."""
    project = make_project(tmp_path_factory.mktemp("project"))
    metrics = project / "reports" / "metrics.json"
    this_run = metrics.read_text()
    metrics.write_text(json.dumps({**json.loads(this_run), "accuracy": 0.9}))  # the last commit's run
    (project / "notes.txt").write_text("first\n")
    git(project, "init", "-q")
    git(project, "add", "params.yaml", "notes.txt", "reports/metrics.json")
    git(project, "commit", "-q", "-m", "tiny project")
    metrics.write_text(this_run)
    (project / "models" / "champion").mkdir()
    (project / "models" / "champion" / "metrics.json").write_text(json.dumps({"accuracy": CHAMPION_ACCURACY}))
    result = run_report(project, DVC_EXP_NAME="tiny-exp")
    assert result.returncode == 0, result.stderr
    return project


# --- the reports ---------------------------------------------------------------------------


def test_both_reports_and_both_pictures_are_written(reported: Path):
    for name in OUTPUTS:
        assert (reported / "reports" / name).stat().st_size > 0, name
    for name in PICTURES:
        assert (reported / "reports" / name).read_bytes().startswith(b"\x89PNG")


def test_html_is_self_contained_with_every_picture_embedded(reported: Path):
    page = (reported / "reports" / "report.html").read_text()
    targets = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page, flags=re.IGNORECASE)
    images = re.findall(r"<img\b[^>]*>", page, flags=re.IGNORECASE)
    assert len(images) == len(PICTURES) + 1  # and the augmentation preview
    assert targets and all(target.startswith("data:image/png;base64,") for target in targets)
    assert re.findall(r"<script\b[^>]*>", page, flags=re.IGNORECASE) == ["<script>"]  # inline, nothing fetched
    assert "<link" not in page.lower() and "url(" not in page


def test_html_names_every_class_escaped_and_the_accuracy(reported: Path):
    page = (reported / "reports" / "report.html").read_text()
    for name in CLASSES:
        assert html.escape(name) in page
    assert "fish & chips" not in page
    assert "83.33%" in page  # 25 of 30 right


def test_markdown_has_the_per_class_table_weakest_first_and_links_the_pictures(reported: Path):
    markdown = (reported / "reports" / "report.md").read_text()
    per_class = markdown.split("## Per class")[1].split("\n## ")[0]
    rows = [line for line in per_class.splitlines() if line.startswith("|") and "---" not in line]
    assert rows[0].split("|")[1].strip() == "class"
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["cat", "fish & chips", "airplane"]
    assert "](confusion.png)" in markdown
    assert "](learning_curves.png)" in markdown
    assert "](augment_preview.png)" in markdown
    assert "83.33%" in markdown


def test_reports_show_params_and_provenance(reported: Path):
    markdown = (reported / "reports" / "report.md").read_text()
    assert "model: lenet" in markdown and "image_size: 16" in markdown  # the params, as YAML
    assert git(reported, "rev-parse", "HEAD") in markdown
    assert "1 tracked file(s) with uncommitted changes" in markdown
    assert "tiny-exp" in markdown
    prepared_meta = json.loads((reported / "data" / "prepared" / "meta.json").read_text())
    assert prepared_meta["data_sha256"] in markdown and prepared_meta["source_sha256"] in markdown
    for library in ("torch", "torchvision", "numpy", "scikit-learn", "dvc", "dvclive"):
        assert f"| {library} " in markdown
    assert "Warning" not in markdown  # the checkpoint was trained with these very params


def test_headline_metrics_are_set_beside_the_champion_and_the_last_commit(reported: Path):
    markdown = (reported / "reports" / "report.md").read_text()
    headline = markdown.split("## Headline")[1].split("\n## ")[0]
    accuracy = next(line for line in headline.splitlines() if line.startswith("| accuracy"))

    assert [cell.strip() for cell in accuracy.split("|")[1:-1]] == [
        "accuracy", "83.33%", "80.00%", "+3.33 pp", "90.00%", "-6.67 pp"]
    header = next(line for line in headline.splitlines() if line.startswith("| metric"))
    assert [cell.strip() for cell in header.split("|")[1:-1]] == [
        "metric", "this run", "champion", "vs champion", "last commit", "vs last commit"]
    macro_f1 = next(line for line in headline.splitlines() if line.startswith("| macro F1"))
    assert macro_f1.split("|")[3].strip() == "–"  # the champion's file has no macro F1


def test_mistakes_are_shown_most_confident_first_and_explained(reported: Path):
    markdown = (reported / "reports" / "report.md").read_text()

    assert "5 of the 5 misclassified test images, the most confident first." in markdown
    assert "](misclassified.png)" in markdown
    explanations = markdown.split("## Explanations")[1].split("\n## ")[0]
    assert "Grad-CAM" in explanations
    assert "](explained_classes.png)" in explanations and "](explained_mistakes.png)" in explanations


def test_the_privacy_section_shows_the_membership_audit_and_its_roc_curve(reported: Path):
    markdown = (reported / "reports" / "report.md").read_text()
    section = markdown.split("## Privacy: what the model gives away about its training images")[1].split("\n## ")[0]

    rows = dict(tuple(cell.strip() for cell in line.split("|")[1:3]) for line in section.splitlines()
                if line.startswith("|"))
    assert rows["membership-inference ROC AUC"] == "0.625"
    assert rows["true positives at 1 % false positives"] == "10.00%"
    assert rows["true positives at 0.1 % false positives"] == "5.00%"
    assert "of 20 training images and as many test images" in section and "](membership_roc.png)" in section


def test_the_compression_table_names_the_backend_and_the_machine(reported: Path):
    markdown = (reported / "reports" / "report.md").read_text()
    section = markdown.split("## Compressed variants")[1].split("\n## ")[0]
    int8 = next(line for line in section.splitlines() if line.startswith("| int8"))

    assert [cell.strip() for cell in int8.split("|")[1:-1]] == [
        "int8", "TorchScript", "int8", "x86", "0.64 MB", "27%", "0%", "76.67%", "-3.33 pp", "1.000 ms", "4.00×",
        "3600"]
    assert "Tiny CPU 3000 with 1 thread(s)" in section and "median of 50 single-image runs" in section


# --- in a real browser ----------------------------------------------------------------------

def full_page_screenshot(driver, path: Path) -> None:
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                             "clip": clip})
    path.write_bytes(base64.b64decode(shot["data"]))


def test_the_html_report_shows_every_picture_and_runs_its_script_without_error(reported: Path, browser, tmp_path):
    browser.get((reported / "reports" / "report.html").as_uri())
    pictures = browser.execute_script(
        "return Array.from(document.images).map((image) => [image.alt, image.complete && image.naturalWidth > 0])")
    screenshot = tmp_path / "report.png"
    full_page_screenshot(browser, screenshot)
    print(f"screenshot of the report: {screenshot}")

    assert len(pictures) == len(PICTURES) + 1
    assert [alt for alt, shown in pictures if not shown] == []  # no broken image
    header = browser.find_element(By.XPATH, "//table[contains(@class, 'sortable')]//th[text()='recall']")
    header.click()
    header.click()  # the second click sorts descending
    classes_shown = browser.execute_script(
        "return Array.from(document.querySelector('table.sortable').tBodies[0].rows)"
        ".map((row) => row.cells[0].textContent)")
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []  # no script error
    assert classes_shown == ["airplane", "fish & chips", "cat"]  # recall 100 %, 90 %, 60 %; weakest F1 first before
    with Image.open(screenshot) as shot:
        assert shot.width >= 1200 and shot.height > 3000  # the whole page, not the window


# --- failures ------------------------------------------------------------------------------


def test_missing_inputs_are_named_with_their_stages_and_nothing_is_written(tmp_path: Path):
    project = make_project(tmp_path)
    (project / "models" / "model.pt").unlink()
    (project / "reports" / "per_class.csv").unlink()
    (project / "reports" / "compression.csv").unlink()
    before = sorted(path for path in project.rglob("*"))

    result = run_report(project)

    assert result.returncode == 1
    assert "models/model.pt (written by stage train)" in result.stderr
    assert "reports/per_class.csv (written by stage evaluate)" in result.stderr
    assert "reports/compression.csv (written by stage compress)" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(path for path in project.rglob("*")) == before  # no report, no picture, no .part file


def test_predictions_of_another_test_split_are_refused(tmp_path: Path):
    project = make_project(tmp_path)
    predictions = pd.read_csv(project / "reports" / "predictions.csv")
    predictions.head(20).to_csv(project / "reports" / "predictions.csv", index=False)

    result = run_report(project)

    assert result.returncode == 1
    assert ("reports/predictions.csv does not hold one row per test image of the prepared data (30 images); "
            "run stage evaluate again") in result.stderr
    assert not (project / "reports" / "report.html").exists()


# --- pieces, in process --------------------------------------------------------------------


def test_learning_curves_are_drawn_when_train_logged_no_test_curves(tmp_path: Path):
    curves = tmp_path / "metrics"
    (curves / "train").mkdir(parents=True)
    for name in ("train/loss", "train/accuracy", "lr"):
        table = pd.DataFrame({"step": [0, 1], Path(name).name: [0.5, 0.25]})
        table.to_csv(curves / f"{name}.tsv", sep="\t", index=False)

    history = read_history(curves)

    assert sorted(history) == ["lr", "train/accuracy", "train/loss"]
    assert list(history["train/loss"].index) == [1, 2]  # epochs, counted from 1
    assert learning_curves_png(history).startswith(b"\x89PNG")


def test_a_folder_without_a_commit_is_reported_as_such(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_state()["git commit"].startswith("none (")
    git(tmp_path, "init", "-q")
    assert git_state() == {"git commit": "none (no commit yet)"}


def test_params_changed_since_training_are_named():
    trained = load_params(PROJECT / "params.yaml").model_dump(mode="json")
    current = json.loads(json.dumps(trained))
    current["train"]["epochs"] = trained["train"]["epochs"] + 1
    current["evaluate"]["tta"] = "none"  # read after training: not a drift

    assert params_drift(current, trained) == [
        f"train.epochs was {trained['train']['epochs']}, is {trained['train']['epochs'] + 1}"
    ]
