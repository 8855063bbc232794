"""The whole pipeline through DVC itself, on a tiny generated image-folder data set.

A copy of the project becomes a fresh git repository; `dvc repro`, `dvc exp run` and a queued
sweep run for real, as a user would run them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from bench.processes import stage_command
from datamaker import make_image_folder, make_tar_gz
from test_stage_declarations import imported_project_files

PROJECT = Path(__file__).resolve().parents[1]
STAGES = list(YAML(typ="safe", pure=True).load(PROJECT / "dvc.yaml")["stages"])  # in the order they run

# Small enough to run every stage in seconds on 2 cores, big enough to exercise everything.
TINY_PARAMS = {
    "data": {"source": "../images.tar.gz", "image_size": 16, "test_fraction": 0.25},
    "augment": {"preview_images": 4},
    "train": {"widths": [8, 16, 16], "epochs": 2, "batch_size": 16, "lr": 0.05},
    "evaluate": {"batch_size": 64},
    "compress": {"batch_size": 64, "latency_repeats": 3},
}


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    # `python` in dvc.yaml's commands must be this interpreter, the one with the project installed.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def stages_run(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def set_params(repo: Path, overrides: dict) -> None:
    yaml = YAML()  # round-trip, keeps the comments as a user's edit would
    params = yaml.load(repo / "params.yaml")
    for section, values in overrides.items():
        params[section].update(values)
    yaml.dump(params, repo / "params.yaml")


def project_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=PROJECT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [name for name in listed if not name.startswith(("tests/", "data/", "models/", "reports/"))
            and (PROJECT / name).is_file()]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A committed copy of the project whose data source lies outside it, after one `dvc repro`."""
    workdir = tmp_path_factory.mktemp("pipeline")
    images = make_image_folder(workdir / "images", classes=("circle", "square", "stripes"), per_class=16,
                               split_test=False, size=(20, 20))
    make_tar_gz(images, workdir / "images.tar.gz", wrap="images")
    repo = workdir / "repo"
    for name in project_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / name, repo / name)
    set_params(repo, TINY_PARAMS)
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "config", "user.email", "tests@example.com"], repo)
    run(["git", "config", "user.name", "Tests"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "project"], repo)

    repro = run(["dvc", "repro"], repo)
    assert stages_run(repro.stdout) == list(STAGES), repro.stdout
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline results"], repo)
    return repo


def reset_workspace(repo: Path) -> None:
    run(["git", "reset", "-q", "--hard"], repo)
    run(["dvc", "checkout", "--force"], repo)


def test_repro_writes_metrics_tables_plots_and_both_reports(repo: Path):
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
        assert 0 <= metrics[key] <= 1
    per_class = list(csv.DictReader((repo / "reports/per_class.csv").open()))
    assert [row["class"] for row in per_class] == ["circle", "square", "stripes"]
    predictions = list(csv.DictReader((repo / "reports/predictions.csv").open()))
    assert len(predictions) == metrics["test_images"] == 12
    assert {"actual", "predicted"} <= set(predictions[0])
    train_metrics = json.loads((repo / "reports/train/metrics.json").read_text())
    for key in ("train_seconds", "images_per_second", "device", "precision"):
        assert key in train_metrics
    assert len((repo / "reports/train/plots/metrics/test/accuracy.tsv").read_text().splitlines()) == 1 + 2
    for report in ("report.md", "report.html", "augment_preview.png", "confusion.png", "learning_curves.png",
                   "misclassified.png", "explained_classes.png", "explained_mistakes.png", "membership_roc.png"):
        assert (repo / "reports" / report).stat().st_size > 0
    compression = list(csv.DictReader((repo / "reports/compression.csv").open()))
    assert [row["variant"] for row in compression] == ["fp32", "int8", "pruned", "bf16", "exported"]
    shown = run(["dvc", "metrics", "show", "--json"], repo).stdout
    assert "train_seconds" in shown and "f1_macro" in shown and "int8_backend" in shown and "mia_auc" in shown


def test_every_declared_plot_renders_with_data(repo: Path):
    declared = [next(iter(plot)) for plot in YAML(typ="safe", pure=True).load(repo / "dvc.yaml")["plots"]]
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)
    assert not shown.get("errors"), shown["errors"]
    for plot in declared:
        (rendered,) = shown["data"][plot]
        assert rendered["content"]["data"]["values"], f"plot {plot!r} has no data"


# Runs a stage as `python -m` would, recording which sections of params.yaml it reads: load_params
# is wrapped before the stage module imports it. Reading `train` reads `presets` too (train is
# resolved against its preset); a whole dump reads every section.
TRACE_PARAMS = """
import json, runpy, sys
import stages.params

read = set()

class Traced:
    def __init__(self, params):
        self._params = params

    def __getattr__(self, name):
        fields = type(self._params).model_fields
        read.update(fields if name.startswith("model_dump") else {name} & set(fields))
        return getattr(self._params, name)

real_load_params = stages.params.load_params
stages.params.load_params = lambda *args, **kwargs: Traced(real_load_params(*args, **kwargs))
out, module, *sys.argv[1:] = sys.argv[1:]
sys.argv[0] = module
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    sections = read | ({"presets"} if "train" in read else set())
    open(out, "w").write(json.dumps(sorted(sections)))
"""


def test_every_stage_declares_the_params_sections_it_reads(repo: Path, tmp_path: Path):
    # In a copy beside the repo (its data source, ../images.tar.gz, is found there too), so that the
    # repo's own outputs stay as `dvc repro` wrote them.
    traced = repo.parent / "traced"
    shutil.copytree(repo, traced, ignore=shutil.ignore_patterns(".git", ".dvc"))
    declared = YAML(typ="safe", pure=True).load(repo / "dvc.yaml")["stages"]
    problems = []
    for stage in STAGES:
        _python, _dash_m, module, *args = stage_command(stage)
        sections = tmp_path / f"{stage}.json"
        run([sys.executable, "-c", TRACE_PARAMS, str(sections), module, *args], traced)
        read, listed = set(json.loads(sections.read_text())), set(declared[stage].get("params", []))
        problems += [f"stage {stage} reads params section {name!r} but dvc.yaml does not declare it"
                     for name in sorted(read - listed)]
        problems += [f"stage {stage} declares params section {name!r} but does not read it"
                     for name in sorted(listed - read)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", ["stages/models.py", "stages/pretrained.py", "stages/params.py",
                                    "stages/datasets.py"])
def test_editing_a_module_makes_dvc_status_name_every_stage_that_imports_it(repo: Path, module: str):
    importers = {stage for stage in STAGES if PROJECT / module in imported_project_files(stage_command(stage)[2])}
    with open(repo / module, "a") as file:
        file.write("# edited\n")
    try:
        status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
    finally:
        run(["git", "checkout", "--", module], repo)
    assert set(status) == importers, status
    assert all({"changed deps": {module: "modified"}} in changes for changes in status.values())


def test_second_repro_does_nothing(repo: Path):
    started = time.perf_counter()
    again = run(["dvc", "repro"], repo)
    assert stages_run(again.stdout) == []
    assert "Data and pipelines are up to date" in again.stdout
    assert run(["git", "status", "--porcelain"], repo).stdout == ""
    assert time.perf_counter() - started < 30


def test_exp_run_with_another_optimizer_reruns_train_onwards_only(repo: Path):
    result = run(["dvc", "exp", "run", "-n", "adam", "-S", "train.optimizer=adam", "-S", "train.lr=0.003"], repo)
    assert stages_run(result.stdout) == ["train", "evaluate", "compress", "report"]
    reset_workspace(repo)


def test_exp_run_with_augmented_copies_reruns_augment_onwards_only(repo: Path):
    result = run(["dvc", "exp", "run", "-n", "copies", "-S", "augment.copies=1", "-S", "augment.policy=trivialaugment"], repo)
    assert stages_run(result.stdout) == ["augment", "train", "evaluate", "compress", "report"]
    reset_workspace(repo)


def test_a_typo_in_a_section_reruns_its_stage_and_is_refused(repo: Path):
    set_params(repo, {"augment": {"flips": True}})
    result = run(["dvc", "repro"], repo, check=False)
    assert result.returncode != 0
    assert "augment.flips: unknown key" in result.stdout + result.stderr
    reset_workspace(repo)


@pytest.mark.parametrize("switched", [["-S", "train.model=lenet"],
                                      ["-S", "train.model=resnet18", "-S", "train.optimizer=sgd"]],
                         ids=["lenet", "resnet18-sgd"])
def test_a_model_switched_alone_is_refused_with_a_fix_that_works_as_typed(repo: Path, switched: list[str]):
    refused = run(["dvc", "exp", "run", *switched, "train"], repo, check=False)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Traceback" not in output
    (fix,) = [line for line in output.splitlines() if line.strip().startswith("fix, checked")]
    typed = fix.split("`")[1].split()
    reset_workspace(repo)

    fixed = run(["dvc", "exp", "run", *switched, *typed, "train"], repo)
    assert stages_run(fixed.stdout) == ["train"]
    model = switched[1].split("=")[1]
    assert f"training {model}" in fixed.stdout + fixed.stderr
    reset_workspace(repo)


def test_exp_show_compares_the_experiments(repo: Path):
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    experiments = {exp["name"]: exp for baseline in shown for exp in baseline.get("experiments") or [] for exp in exp["revs"]}
    assert {"adam", "copies"} <= set(experiments)
    adam = experiments["adam"]["data"]
    assert adam["params"]["params.yaml"]["data"]["train"]["optimizer"] == "adam"
    assert "accuracy" in adam["metrics"]["reports/metrics.json"]["data"]
    assert "accuracy" in adam["metrics"]["reports/compression.json"]["data"]["int8"]
    # The recipe that ran, preset resolved, is listed among the params, and the metrics are results only.
    recipe = adam["params"]["reports/train/params.yaml"]["data"]
    assert (recipe["preset"], recipe["optimizer"], recipe["epochs"]) == ("default", "adam", 2)
    assert not [name for name in adam["metrics"] if "recipe" in name or "params" in name]


def test_plots_diff_between_two_experiments_renders_every_plot_without_error(repo: Path):
    diffed = json.loads(run(["dvc", "plots", "diff", "adam", "copies", "--json"], repo).stdout)
    assert not diffed.get("errors"), diffed["errors"]
    declared = [next(iter(plot)) for plot in YAML(typ="safe", pure=True).load(repo / "dvc.yaml")["plots"]]
    for plot in declared:
        values = [value for rendered in diffed["data"][plot] for value in rendered["content"]["data"]["values"]]
        revisions = {value["rev"] for value in values}
        assert revisions == {"adam", "copies"}, plot


def test_queued_sweep_with_a_relative_source_outside_the_project_runs(repo: Path):
    # image_size changes what download makes, so each queued run decodes ../images.tar.gz
    # from DVC's temporary copy under .dvc/tmp/exps/.
    run(["dvc", "exp", "run", "--queue", "-S", "data.image_size=12,20"], repo)
    run(["dvc", "queue", "start"], repo)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert status.count("Success") == 2, status + "\n" + run(["dvc", "queue", "logs", "--help"], repo).stdout
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    sizes = {exp["data"]["params"]["params.yaml"]["data"]["data"]["image_size"]
             for baseline in shown for exp in baseline.get("experiments") or [] for exp in exp["revs"]
             if exp["data"]["metrics"]}
    assert {12, 20} <= sizes
