"""python -m bench, smoke-sized: the tutorial baseline and one preset (twice) on a tiny generated
image archive, each trained for one epoch, and the pipeline's decode and no-op `dvc repro` times
from a scratch DVC project; a rerun skips the finished rows; another CPU's file is refused; several
seeds and process counts give a row each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from ruamel.yaml import YAML

from bench.pipeline import preset_names, read_params
from conftest import ONE_THREAD, TINY_CLASSES, stage_environment
from datamaker import PROJECT_ROOT, make_image_folder, make_tar_gz

# Overrides that make the preset's run take a second: 16 px (the tutorial reads the 20 px files as they are).
SMOKE_SETTINGS = ["data.image_size=16", "train.epochs=1", "train.widths=[8,16,16]", "train.device=cpu",
                  "train.threads=1"]


def run_bench(images: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The benchmark run from the folder holding `images` and `out`, both given as relative paths,
    as the README's command gives them, by this interpreter's path with its folder off PATH: as
    `.venv/bin/python -m bench` without the environment activated, whose stages must still run on it."""
    settings = [argument for setting in SMOKE_SETTINGS for argument in ("--set", setting)]
    interpreter_folder = str(Path(sys.executable).parent)
    path = os.pathsep.join(folder for folder in os.environ["PATH"].split(os.pathsep) if folder != interpreter_folder)
    return subprocess.run(
        [sys.executable, "-m", "bench", "--images", images.name, "--out", out.name, "--presets", "default",
         "--params", str(PROJECT_ROOT / "params.yaml"), "--tutorial-epochs", "1", "--matmul-side", "256", *settings,
         *extra],
        cwd=out.parent, env=stage_environment({**ONE_THREAD, "PATH": path}), capture_output=True, text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def benchmarked(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """A finished smoke benchmark: (images archive, output folder, the run)."""
    root = tmp_path_factory.mktemp("bench")
    folder = make_image_folder(root / "images", classes=TINY_CLASSES, per_class=8, test_per_class=4, size=(20, 20))
    archive = make_tar_gz(folder, root / "images.tar.gz", wrap="tiny")
    out = root / "out"
    return archive, out, run_bench(archive, out, "--repeat", "default")


def test_tutorial_and_preset_rows_are_written_with_sane_figures(benchmarked):
    _, out, result = benchmarked
    assert result.returncode == 0, result.stderr
    rows = pd.read_csv(out / "results.csv").set_index("name")
    assert list(rows.index) == ["tutorial", "default", "default-repeat"]
    assert rows["accuracy"].between(0, 1).all()
    assert 0 <= rows.loc["default", "accuracy_tta"] <= 1
    assert (rows["train_seconds"] > 0).all() and (rows["images_per_second"] > 0).all()
    assert rows.loc["tutorial", "ratio_to_T"] == 1
    assert rows.loc["default", "ratio_to_T"] == pytest.approx(
        rows.loc["default", "train_seconds"] / rows.loc["tutorial", "train_seconds"], rel=0.01)
    assert (rows["peak_memory_mb"] > 50).all()  # a Python process with torch loaded
    assert rows["cpu_model"].nunique() == 1 and rows.loc["default", "device"] == "cpu"
    assert rows.loc["tutorial", "precision"] == "fp32" and rows.loc["default", "threads"] == 1
    assert rows.loc["default", ["seed", "processes"]].tolist() == [0, 1] and rows.loc["default", "eval_seconds"] > 0
    assert rows.loc["default", ["allreduce_seconds", "allreduce_share"]].isna().all()  # one process: no all-reduce
    # Training's FLOPs as train counted them, per second, and as a share of the matmul rate measured in the run.
    trained = json.loads((out / "runs" / "default" / "reports" / "train" / "metrics.json").read_text())
    peak = json.loads((out / "peak.json").read_text())
    assert trained["train_flops"] > 0 and peak["matmul_side"] == 256 and peak["fp32_flops_per_second"] > 0
    assert rows.loc["default", "train_tflop"] == pytest.approx(trained["train_flops"] / 1e12, rel=1e-3)
    rate = trained["train_flops"] / rows.loc["default", "train_seconds"]
    assert rows.loc["default", "tflops"] == pytest.approx(rate / 1e12, rel=0.01)
    precision = rows.loc["default", "precision"]  # bf16 where the CPU runs it natively, and its matmul was timed
    assert rows.loc["default", "peak_share"] == pytest.approx(rate / peak[f"{precision}_flops_per_second"], rel=0.01)
    assert rows.loc["tutorial", ["train_tflop", "peak_share"]].isna().all()
    markdown = (out / "results.md").read_text()
    assert "T = **" in markdown and "| default " in markdown and "The machine's matmul rate" in markdown
    assert (out / "accuracy_vs_time.png").read_bytes().startswith(b"\x89PNG")


def test_a_preset_run_twice_gives_the_same_accuracies_and_the_table_says_so(benchmarked):
    _, out, _ = benchmarked
    rows = pd.read_csv(out / "results.csv").set_index("name")

    assert rows.loc["default", ["accuracy", "accuracy_tta"]].tolist() == \
        rows.loc["default-repeat", ["accuracy", "accuracy_tta"]].tolist()
    assert "`default` run twice gave identical accuracies" in (out / "results.md").read_text()


def test_the_pipeline_figures_come_from_a_real_dvc_repro_and_its_no_op_rerun(benchmarked):
    _, out, _ = benchmarked
    pipeline = json.loads((out / "pipeline.json").read_text())

    assert pipeline["decoded_images"] == len(TINY_CLASSES) * (8 + 4)
    assert 0 < pipeline["decode_seconds"] and 0 < pipeline["noop_repro_seconds"] < 30
    scratch = out / "runs" / "pipeline"
    assert (scratch / "dvc.lock").is_file() and (scratch / "models" / "model.pt").is_file()
    assert "a no-op `dvc repro` (nothing changed)" in (out / "results.md").read_text()
    rows = pd.read_csv(out / "results.csv")
    assert (rows.loc[rows["name"] != "tutorial", "load_seconds"] > 0).all()


def test_a_rerun_skips_finished_rows(benchmarked):
    archive, out, _ = benchmarked
    before = (out / "results.csv").read_text()
    result = run_bench(archive, out)
    assert result.returncode == 0, result.stderr
    assert "tutorial: done before" in result.stderr and "default: done before" in result.stderr
    assert "[default train]" not in result.stderr
    assert (out / "results.csv").read_text() == before


def copy_of_results(benchmarked, tmp_path: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    """A folder beside a link to the archive holding the benchmark's results.csv with columns changed or dropped,
    and a link to its cache: the archive is extracted and decoded once for the whole module."""
    archive, out, _ = benchmarked
    other = tmp_path / "other"
    other.mkdir()
    (tmp_path / archive.name).symlink_to(archive)
    (other / "cache").symlink_to(out / "cache")
    rows = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""]).drop(columns=list(drop))
    for column, change in changes.items():
        rows[column] = change(rows[column])
    rows.to_csv(other / "results.csv", index=False)
    return other


@pytest.mark.parametrize("column, value, named", [("cpu_model", "Some Other CPU", "Some Other CPU"),
                                                   ("cpu_flags", "avx2 amx_bf16", "(avx2 amx_bf16)")],
                         ids=["cpu-name", "same-name-other-flags"])
def test_rows_of_another_cpu_are_refused_and_kept(benchmarked, tmp_path, column, value, named):
    archive = benchmarked[0]
    other = copy_of_results(benchmarked, tmp_path, **{column: lambda values: value})
    result = run_bench(archive, other)
    assert result.returncode != 0
    assert named in result.stderr and "--fresh" in result.stderr
    assert pd.read_csv(other / "results.csv")[column].eq(value).all()
    assert not (other / "runs").exists()  # refused before any work


def test_rows_are_not_added_when_t_has_changed_since_the_file_was_started(benchmarked, tmp_path):
    archive = benchmarked[0]
    other = copy_of_results(benchmarked, tmp_path, train_seconds=lambda seconds: seconds * 10)
    before = (other / "results.csv").read_text()

    result = run_bench(archive, other, "--presets", "lenet")

    assert result.returncode != 0
    assert "T is " in result.stderr and "more than --t-tolerance 5 %" in result.stderr
    assert (other / "results.csv").read_text() == before
    assert not (other / "runs" / "lenet").exists()


def test_a_private_preset_gives_a_row_per_epsilon_of_its_frontier_in_one_process(benchmarked, tmp_path):
    archive = benchmarked[0]
    other = copy_of_results(benchmarked, tmp_path)

    # The smoke's widths are convnet's; the private preset trains scatternet. T of a second is noisy.
    result = run_bench(archive, other, "--presets", "private", "--epsilons", "8,3", "--set", "train.widths=null",
                       "--set", "train.batch_size=8", "--t-tolerance", "10", "--no-pipeline", "--processes", "1,2")

    assert result.returncode == 0, result.stderr
    assert "T now" in result.stderr
    assert "skipped, private presets train in one process only: private-eps8-2proc, private-eps3-2proc" in result.stderr
    rows = pd.read_csv(other / "results.csv").set_index("name")
    assert list(rows.index[-2:]) == ["private-eps8", "private-eps3"]
    assert rows.loc["private-eps8", "epsilon"] == pytest.approx(8, rel=0.02)
    assert rows.loc["private-eps3", "epsilon"] == pytest.approx(3, rel=0.02)
    assert rows.loc["default", "epsilon"] != rows.loc["default", "epsilon"]  # NaN: not private


def test_a_private_preset_in_several_processes_only_is_refused_before_any_work(benchmarked, tmp_path):
    archive = benchmarked[0]
    other = copy_of_results(benchmarked, tmp_path)

    result = run_bench(archive, other, "--presets", "private", "--epsilons", "8", "--processes", "2")

    assert result.returncode != 0
    assert "error: nothing to run: private-eps8-2proc would train a private preset in several processes" \
        in result.stderr and "add 1 to --processes" in result.stderr
    assert not (other / "runs").exists()


def test_several_seeds_give_a_row_each_and_their_mean_and_deviation(benchmarked, tmp_path):
    archive = benchmarked[0]
    other = copy_of_results(benchmarked, tmp_path)

    result = run_bench(archive, other, "--seeds", "0,1", "--t-tolerance", "10", "--no-pipeline")

    assert result.returncode == 0, result.stderr
    rows = pd.read_csv(other / "results.csv").set_index("name")
    seeded = rows.loc[["default-seed0", "default-seed1"]]
    assert list(rows.index) == ["tutorial", "default", "default-repeat", "default-seed0", "default-seed1"]
    assert seeded["seed"].tolist() == [0, 1]
    assert [read_params(other / "runs" / name / "params.yaml")["seed"] for name in seeded.index] == [0, 1]
    summary = [line for line in (other / "results.md").read_text().splitlines() if line.startswith("| default ")
               and "±" in line]
    accuracy = seeded["accuracy"]
    assert len(summary) == 1 and "| 0, 1 " in summary[0]
    assert f"{accuracy.mean():.4g} ± {accuracy.std():.2g}" in summary[0]


# What train's DVCLive summary and evaluate's metrics gave columns for after the first results.csv files.
COLUMNS_ADDED_LATER = ("seed", "processes", "eval_seconds", "allreduce_seconds", "allreduce_share", "parameters",
                       "batch_size", "train_tflop", "tflops", "peak_share")


def test_two_processes_give_a_2proc_row_and_a_file_from_before_the_columns_resumes(benchmarked, tmp_path):
    archive = benchmarked[0]
    other = copy_of_results(benchmarked, tmp_path, drop=COLUMNS_ADDED_LATER)

    result = run_bench(archive, other, "--processes", "1,2", "--t-tolerance", "10", "--no-pipeline")

    assert result.returncode == 0, result.stderr
    assert "default: done before" in result.stderr
    rows = pd.read_csv(other / "results.csv").set_index("name")
    assert list(rows.index) == ["tutorial", "default", "default-repeat", "default-2proc"]
    assert rows.loc["default", COLUMNS_ADDED_LATER].isna().all()  # the old rows as they were
    trained = json.loads((other / "runs" / "default-2proc" / "reports" / "train" / "metrics.json").read_text())
    assert trained["processes"] == 2 and rows.loc["default-2proc", "processes"] == 2
    assert rows.loc["default-2proc", "eval_seconds"] > 0
    for column in ("allreduce_seconds", "allreduce_share", "parameters"):  # train's
        assert rows.loc["default-2proc", column] == pytest.approx(trained[column])
    recipe = YAML(typ="safe", pure=True).load(other / "runs" / "default-2proc" / "reports" / "train" / "params.yaml")
    assert rows.loc["default-2proc", "batch_size"] == recipe["batch_size"]
    # The scaling table: the one-process row's step time against the ring all-reduce of 4 bytes a parameter.
    markdown = (other / "results.md").read_text()
    assert "Scaling to N machines like this one" in markdown
    step = recipe["batch_size"] / rows.loc["default", "images_per_second"]
    gradient_bytes = 4 * trained["parameters"]
    two_at_10_gbit = step / (step / 2 + gradient_bytes / 1.25e9)
    scaling = markdown.split("Scaling to N machines")[1]
    (line,) = [line for line in scaling.splitlines() if line.startswith("| default ")]
    assert f"{two_at_10_gbit:.1f}x" in line.split("|")[6]


def test_by_default_every_preset_that_trains_from_scratch_is_benchmarked():
    names = preset_names(read_params(PROJECT_ROOT / "params.yaml"))

    assert {"lenet", "fast", "default", "accurate", "airbench94"} <= set(names)
    assert "finetune" not in names  # starts from downloaded weights: not a training-time peer, nor offline
    assert "private" not in names  # one row per ε, hours each on a CPU: asked for by name


def run_step_speed(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.step_speed", "--params", str(PROJECT_ROOT / "params.yaml"),
                           *arguments], cwd=PROJECT_ROOT, env=stage_environment(ONE_THREAD), capture_output=True,
                          text=True, timeout=120)


def test_step_speed_times_the_train_stages_step_at_each_side():
    run = run_step_speed("--preset", "default", "--set", "train.batch_size=16", "--set", "train.widths=[8,16,16]",
                         "--set", "train.threads=1", "--set", "train.device=cpu", "--sides", "16,32", "--steps", "2",
                         "--modes", "eager")

    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("default: convnet [8, 16, 16], batch 16, cpu")
    assert [line.split(":")[0].split() for line in lines[1:]] == [["eager", "side", "16"], ["eager", "side", "32"]]
    assert all(float(line.split(",")[-1].split()[0]) > 0 for line in lines[1:])  # images/s


@pytest.mark.parametrize(("arguments", "message"), [
    (["--preset", "lenet", "--sides", "16"], "error: --sides: lenet takes images of data.image_size only (32)"),
    (["--preset", "fast", "--sides", "4"], "error: --sides: convnet needs images of side ≥ 9, not 4"),
    (["--modes", "eager,jit"], "--modes: jit is not one of eager, compile"),
])
def test_step_speed_refuses_sides_the_model_cannot_take_and_unknown_modes(arguments, message):
    run = run_step_speed(*arguments)

    assert run.returncode != 0
    assert message in run.stderr
