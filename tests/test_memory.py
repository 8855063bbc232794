"""Sets larger than train.memory_budget: streamed from the memory maps with the same batches, so the same
metrics and weights; a budget too small for one batch, and a missing or truncated prepared array, each
stopped in one line saying what to do."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import AUGMENTED_PARAMS, Project
from stages.models import load_checkpoint

# The tiny set's train split, its two augmented copies and the test split: 102 images of 16x16x3 bytes,
# 78 KiB in all; one batch of 16 is 12,288 bytes, and one worker keeps two ready beside the one training.
STREAMED = {"train.memory_budget": 40_000}
ONE_BATCH_WITH_ONE_WORKER = 3 * 16 * 16 * 16 * 3
TIMINGS = ("load_seconds", "train_seconds", "images_per_second")


@pytest.fixture(scope="module")
def runs(augmented_project, tmp_path_factory) -> dict:
    settings = {
        "in-memory": {},
        "streamed-one-worker": {**STREAMED, "train.loader_workers": 1},
        "streamed-no-worker": {**STREAMED, "train.loader_workers": 0},
    }
    root = tmp_path_factory.mktemp("memory")

    def train(name: str):
        project = augmented_project.copy(root / name, "data")
        project.write_params({**AUGMENTED_PARAMS, **settings[name]})
        return project, project.train()

    with ThreadPoolExecutor(len(settings)) as pool:
        return dict(zip(settings, pool.map(train, settings)))


def finished(runs: dict, name: str) -> tuple[Project, str]:
    project, result = runs[name]
    assert result.returncode == 0, result.stderr
    return project, result.stderr


def metrics_without_timings(project: Project) -> dict:
    metrics = json.loads((project.reports / "train" / "metrics.json").read_text())
    return {key: value for key, value in metrics.items() if key not in TIMINGS}


@pytest.mark.parametrize("streamed", ["streamed-one-worker", "streamed-no-worker"])
def test_a_set_over_the_budget_is_streamed_with_the_same_batches_metrics_and_weights(runs, streamed):
    in_memory, memory_log = finished(runs, "in-memory")
    project, log = finished(runs, streamed)

    assert "the images in memory" in memory_log
    workers = 1 if streamed == "streamed-one-worker" else 0
    assert f"streaming the images from their memory maps with {workers} loader worker(s)" in log
    assert metrics_without_timings(project) == metrics_without_timings(in_memory)
    streamed_state = load_checkpoint(project.model)[0].state_dict()
    for name, tensor in load_checkpoint(in_memory.model)[0].state_dict().items():
        assert torch.equal(streamed_state[name], tensor), name


def last_error(result) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_budget_too_small_for_one_batch_is_refused_naming_the_smallest_that_works(augmented_project, tmp_path):
    project = augmented_project.copy(tmp_path, "data")
    project.write_params({**AUGMENTED_PARAMS, "train.memory_budget": 1000, "train.loader_workers": 1})

    message = last_error(project.train())

    assert message.startswith("error: train.memory_budget is 1000 bytes, too small for one batch: train.batch_size "
                              "16 images of 16x16x3 bytes each, 3 batches in flight with 1 loader worker(s)")
    assert f"set train.memory_budget to at least {ONE_BATCH_WITH_ONE_WORKER} (or auto)" in message
    assert not project.model.exists()


@pytest.mark.parametrize(("budget", "accepted"), [("4GiB", 4 * 2**30), ("512MB", 512 * 10**6), (123456, 123456)])
def test_a_budget_is_bytes_with_or_without_a_unit(augmented_project, tmp_path, budget, accepted):
    from stages.params import load_params

    project = augmented_project.copy(tmp_path, "params.yaml")
    assert load_params(project.write_params({"train.memory_budget": budget})).train.memory_budget == accepted


def test_a_budget_that_is_not_bytes_is_refused_by_params_validation(augmented_project, tmp_path):
    project = augmented_project.copy(tmp_path, "params.yaml", "data")
    project.write_params({"train.memory_budget": "lots"})

    message = project.train().stderr

    assert "train.memory_budget" in message and "'lots'" in message and "Traceback" not in message


@pytest.mark.parametrize("damage", ["missing", "truncated"])
@pytest.mark.parametrize(("stage", "array"), [("train", "train_images.npy"), ("train", "test_labels.npy"),
                                              ("evaluate", "test_images.npy")])
def test_a_missing_or_truncated_prepared_array_says_to_run_download_again(trained_project, tmp_path, stage, array,
                                                                           damage):
    project = trained_project.copy(tmp_path, "params.yaml", "data", "models")
    path = project.prepared / array
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    message = last_error(project.run_stage(stage))

    problem = "is missing" if damage == "missing" else "is truncated or damaged"
    assert message.startswith(f"error: {path.relative_to(project.root)} {problem}")
    assert message.endswith("run `dvc repro -f download` to write it again")


def test_streaming_keeps_a_set_out_of_the_training_processes_memory(tmp_path):
    """78 MB of prepared images (1,600 at 128 px), trained on for an epoch in memory and streamed with
    train.memory_budget 8 MiB: the streamed run's peak anonymous memory (its loader worker's included) is
    lower by most of the set's size. Measured as bench.memory measures it."""
    from bench.memory import generate_folder, run_measured, scratch_project
    from bench.pipeline import apply_overrides, params_for_preset, read_params
    from bench.processes import PROJECT_ROOT

    images = generate_folder(tmp_path / "images", classes=8, per_class=200, size=(128, 128))
    params = apply_overrides(params_for_preset(read_params(PROJECT_ROOT / "params.yaml"), "lenet", {}), {
        "data.source": str(images), "data.image_size": 128, "augment.copies": 0, "train.epochs": 1,
        "train.batch_size": 8, "train.test_each_epoch": False, "train.device": "cpu", "train.loader_workers": 1})
    prepared = scratch_project(tmp_path / "prepared", params)
    for stage in ("download", "augment"):
        run_measured(stage, prepared)
    set_bytes = sum(path.stat().st_size for path in (prepared / "data" / "prepared").glob("*_images.npy"))
    peaks = {}
    for budget in ("auto", "8MiB"):
        project = scratch_project(tmp_path / budget, apply_overrides(params, {"train.memory_budget": budget}))
        (project / "data").symlink_to(prepared / "data")
        peaks[budget] = run_measured("train", project)["peak_anonymous_mib"] * 2**20
        (project / "data").unlink()

    assert set_bytes > 70e6
    assert peaks["8MiB"] < peaks["auto"] - 0.6 * set_bytes, (peaks, set_bytes)
