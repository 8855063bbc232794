"""Training in several processes (stages/distributed.py): torch's elastic launcher starts the ranks, gloo on
the CPU keeps them in step, rank 0 alone writes; a failing or killed rank stops the job with its message;
two "machines" meet over the loopback; bad settings are refused before anything starts.

Every launch here meets on 127.0.0.1, at a port the rendezvous store picks itself or a free one asked for.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from bench.processes import stage_command
from conftest import ONE_THREAD, TINY_PARAMS, Project, prepare_tiny_set, stage_environment
from datamaker import PROJECT_ROOT, write_params
from test_flows import make_repo
from test_kills import kill_when, leftovers
from test_pipeline import run, set_params, stages_run

# A recipe that learns the tiny colour classes within a few epochs in one process or two (sgd: the
# default preset's label smoothing and weight average need more steps than a tiny set has).
LEARNS = {"train.optimizer": "sgd", "train.lr": 0.2, "train.momentum": 0.9, "train.weight_decay": 0.0001,
          "train.ema_decay": 0, "train.label_smoothing": 0.0, "train.epochs": 6, "train.batch_size": 24}
COLOURS = {**TINY_PARAMS, "data.source": "images", **LEARNS}
STOPPED_WITHIN_SECONDS = 10


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *arguments]


def with_params(project: Project, **overrides) -> Project:
    """The colours project's params, with dotted overrides ("train.processes": 2, or as keywords)."""
    project.write_params({**COLOURS, **overrides})
    return project


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Project:
    """120 training and 30 test images of three colour classes, prepared and (without copies) augmented."""
    project = prepare_tiny_set(tmp_path_factory.mktemp("colours"), per_class=40, test_per_class=10, overrides=LEARNS)
    assert project.augment().returncode == 0
    return project


@pytest.fixture(scope="module")
def one_and_two(colours, tmp_path_factory) -> dict[int, tuple[Project, subprocess.CompletedProcess]]:
    """The same recipe on the same data in one process and in two; the temporary folder each run had, kept
    apart to see what rank 1 left in it."""
    runs = {}
    for processes in (1, 2):
        project = with_params(colours.copy(tmp_path_factory.mktemp(f"processes{processes}"), "data"),
                              **{"train.processes": processes})
        temporary = project.root / "tmp"
        temporary.mkdir()
        runs[processes] = project, project.run_stage("train", env={"TMPDIR": str(temporary)})
    return runs


def summary_of(project: Project) -> dict:
    return json.loads((project.reports / "train" / "metrics.json").read_text())


def last(project: Project, curve: str) -> float:
    lines = (project.reports / "train" / "plots" / "metrics" / f"{curve}.tsv").read_text().split()
    return float(lines[-1])


# --- what the ranks do in each step --------------------------------------------------------


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> list[dict]:
    """tests/distributed_probe.py trained under torchrun in 2 processes: what each rank saw."""
    folder = tmp_path_factory.mktemp("probe")
    params = write_params(folder, {"train.widths": [8, 16, 16], "train.epochs": 2, "train.batch_size": 16,
                                   "train.device": "cpu", "train.precision": "fp32", "train.test_each_epoch": False})
    result = subprocess.run(torchrun("--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
                                     "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1",
                                     f"--log-dir={folder / 'logs'}", str(PROJECT_ROOT / "tests" / "distributed_probe.py"), str(params), str(folder)),
                            cwd=folder, env=stage_environment(ONE_THREAD), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return [torch.load(folder / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def test_every_step_the_ranks_take_disjoint_shares_that_make_the_whole_batch(probed):
    first, second = (rank["shares"] for rank in probed)
    assert len(first) == len(second) > 2
    epoch_steps = len(first) // 2  # two epochs of 90 images in batches of 16
    for epoch in range(2):
        covered = []
        for a, b in zip(first[epoch * epoch_steps:(epoch + 1) * epoch_steps],
                        second[epoch * epoch_steps:(epoch + 1) * epoch_steps]):
            assert not set(a.tolist()) & set(b.tolist())
            assert abs(len(a) - len(b)) <= 1
            covered += a.tolist() + b.tolist()
        assert sorted(covered) == list(range(90))  # each image once an epoch, in batches the ranks split


def test_the_local_gradients_differ_and_every_rank_applies_their_average(probed):
    first, second = probed
    assert len(first["local"]) == len(second["local"]) == len(first["reduced"]) > 2
    for step, (mine, theirs) in enumerate(zip(first["local"], second["local"])):
        assert not torch.equal(mine, theirs), step  # each rank's own images
        assert torch.equal(first["reduced"][step], second["reduced"][step])
        assert torch.allclose(first["reduced"][step], (mine + theirs) / 2, rtol=1e-5, atol=1e-7)
    assert len(first["applied"]) == len(second["applied"]) > 2
    for mine, theirs in zip(first["applied"], second["applied"]):
        assert torch.equal(mine, theirs)


def test_every_rank_ends_with_the_same_weights_after_muon(probed):
    first, second = probed
    assert first["weights"].keys() == second["weights"].keys()
    for name, weight in first["weights"].items():
        assert torch.equal(weight, second["weights"][name]), name


def test_whitening_and_the_first_epochs_flips_are_the_same_on_every_rank(probed):
    first, second = probed
    assert torch.equal(first["whitening"], second["whitening"])
    assert torch.equal(first["first_flips"], second["first_flips"])


# --- the stage in two processes ------------------------------------------------------------


def test_two_processes_learn_as_one_does_and_only_rank_0_writes(one_and_two):
    (one, one_run), (two, two_run) = one_and_two[1], one_and_two[2]
    assert one_run.returncode == 0, one_run.stderr
    assert two_run.returncode == 0, two_run.stderr
    assert "all 2 ranks end with the same weights" in two_run.stderr
    assert two_run.stderr.count("epoch 1/6") == 1  # rank 1 logs nothing
    assert "Traceback" not in two_run.stderr

    summary = summary_of(two)
    assert summary["processes"] == 2 and summary_of(one)["processes"] == 1
    assert 0 < summary["allreduce_seconds"] < 1 and 0 < summary["allreduce_share"]
    assert last(two, "test/accuracy") >= 0.9 and last(one, "test/accuracy") >= 0.9
    assert abs(last(two, "test/accuracy") - last(one, "test/accuracy")) <= 0.1
    assert abs(last(two, "train/loss") - last(one, "train/loss")) <= 0.15 * last(one, "train/loss")

    written = sorted(path.relative_to(two.root).as_posix() for folder in ("models", "reports/train")
                     for path in (two.root / folder).rglob("*") if path.is_file())
    assert written == sorted(path.relative_to(one.root).as_posix() for folder in ("models", "reports/train")
                             for path in (one.root / folder).rglob("*") if path.is_file())
    assert list((two.root / "tmp").iterdir()) == []  # rank 1's DVCLive folder went


def test_one_process_starts_no_launcher(one_and_two):
    _, one_run = one_and_two[1]
    assert "launching" not in one_run.stderr
    assert "in each of" not in one_run.stderr


# --- failures ------------------------------------------------------------------------------


def test_an_error_in_one_rank_stops_the_job_with_that_ranks_message(colours, tmp_path):
    project = with_params(colours.copy(tmp_path / "project", "data"), **{"train.processes": 2})
    # A fault in rank 1 alone, raised from the loss as a real one (out of memory, a bad batch) would be:
    # sitecustomize runs at start-up in every Python process that has this folder on its path.
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch.nn.functional as F\n"
        "    def broken(*args, **kwargs):\n"
        "        raise RuntimeError('rank 1 ran out of something')\n"
        "    F.cross_entropy = broken\n")
    started = time.monotonic()
    result = project.run_stage("train", env={"PYTHONPATH": f"{PROJECT_ROOT}{os.pathsep}{faults}"})

    assert result.returncode == 1
    assert time.monotonic() - started < 90
    assert result.stderr.splitlines()[-1] == ("error: RuntimeError: rank 1 ran out of something (rank 1 of 2 failed "
                                              "first; the other ranks were stopped)")
    # An unexpected error is a bug: its rank's traceback is shown, once; rank 0, which lost its peer, is quiet.
    assert result.stderr.count("Traceback") == 1
    assert "[rank0]" not in result.stderr
    assert not project.model.exists()
    assert not (project.reports / "train").exists()


def test_a_rank_killed_stops_the_job_within_seconds_and_leaves_nothing_finished(colours, tmp_path):
    project = with_params(colours.copy(tmp_path / "project", "data"), **{"train.processes": 2, "train.epochs": 400})
    _python, _dash_m, module, *args = stage_command("train")
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=project.root, env=stage_environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "epoch 2/400" in line:
            break
    (rank,) = [child for child in psutil.Process(process.pid).children(recursive=True)
               if child.environ().get("RANK") == "1"]
    rank.kill()
    killed = time.monotonic()
    output = process.stdout.read()
    process.wait(timeout=60)

    assert time.monotonic() - killed < STOPPED_WITHIN_SECONDS
    assert process.returncode == 1
    assert "rank 1 of 2 was killed by SIGKILL; the other ranks were stopped" in output
    assert not project.model.exists()
    assert not (project.reports / "train").exists()
    assert not ranks_in(project.root)


def ranks_in(repo: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "cwd", "status"]):
        if (process.info["cwd"] == str(repo) and process.info["status"] != psutil.STATUS_ZOMBIE
                and "stages.train" in " ".join(process.info["cmdline"] or [])):
            found.append(process)
    return found


def test_a_killed_dvc_repro_ends_every_rank_and_the_next_repro_recovers_then_does_nothing(tmp_path):
    repo = make_repo(tmp_path)
    set_params(repo, {"train": {"processes": 2, "epochs": 60, "batch_size": 8}})
    run(["git", "commit", "-qam", "two processes"], repo)

    # SIGKILL to dvc's process group: the launcher goes with it; its ranks, in sessions of their own, follow it.
    # (`dvc repro train`: the stages after it add nothing here but minutes.)
    kill_when(repo, ["dvc", "repro", "train"], "train: epoch 2/")
    deadline = time.monotonic() + STOPPED_WITHIN_SECONDS
    while ranks_in(repo) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ranks_in(repo), [process.cmdline() for process in ranks_in(repo)]
    assert "train" in json.loads(run(["dvc", "status", "--json"], repo).stdout)
    assert not (repo / "models/model.pt").exists()  # a hidden .part folder may stay, for the next run to remove

    set_params(repo, {"train": {"epochs": 2}})
    finished = run(["dvc", "repro", "train"], repo)
    assert stages_run(finished.stdout) == ["train"], finished.stdout
    assert json.loads((repo / "reports/train/metrics.json").read_text())["processes"] == 2
    again = run(["dvc", "repro", "train"], repo)
    assert stages_run(again.stdout) == [], again.stdout
    assert leftovers(repo) == []


# --- several machines ----------------------------------------------------------------------


def test_two_nodes_meet_over_the_loopback_and_one_of_them_writes(colours, tmp_path):
    """Two "machines": two copies of the project, one started by `python -m stages.train` with train.nodes 2
    and train.rendezvous, the other by torchrun by hand, one process each."""
    endpoint = f"127.0.0.1:{free_port()}"
    first = with_params(colours.copy(tmp_path / "first", "data"),
                        **{"train.nodes": 2, "train.rendezvous": endpoint, "train.epochs": 2})
    second = with_params(colours.copy(tmp_path / "second", "data"), **{"train.epochs": 2})
    _python, _dash_m, _module, *stage = stage_command("train")
    by_params = subprocess.Popen([sys.executable, "-m", "stages.train", *stage], cwd=first.root,
                                 env=stage_environment(ONE_THREAD), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    by_hand = subprocess.run(torchrun("--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                                      f"--rdzv-endpoint={endpoint}", "--rdzv-id=stages.train",
                                      "--local-addr=127.0.0.1", f"--log-dir={tmp_path / 'logs'}", "-m",
                                      "stages.train", *stage),
                             cwd=second.root, env=stage_environment(ONE_THREAD), capture_output=True, text=True,
                             timeout=300)
    output, _ = by_params.communicate(timeout=300)

    assert by_params.returncode == 0, output
    assert by_hand.returncode == 0, by_hand.stdout + by_hand.stderr
    writer, silent = (first, second) if first.model.exists() else (second, first)
    assert summary_of(writer)["processes"] == 2
    assert not silent.model.exists()
    assert not (silent.reports / "train").exists()


# --- bad settings --------------------------------------------------------------------------


def test_more_processes_than_a_batch_has_images_is_refused_before_any_starts(colours, tmp_path):
    project = with_params(colours.copy(tmp_path / "project", "data"), **{"train.processes": 25})

    result = project.run_stage("train")

    assert result.returncode == 1
    assert "train.processes: 25 processes in all, but the 120 training images in batches of train.batch_size 24 " \
           "give batches of 24 images, less than one a process: use at most 24 processes" in result.stderr
    assert "launching" not in result.stderr


def test_a_rendezvous_nobody_comes_to_fails_with_a_message_after_its_timeout(colours, tmp_path, closed_port):
    project = with_params(colours.copy(tmp_path / "project", "data"),
                          **{"train.nodes": 2, "train.rendezvous": f"127.0.0.1:{closed_port}",
                             "train.rendezvous_timeout": 3})
    started = time.monotonic()
    result = project.run_stage("train")

    assert time.monotonic() - started < 60
    assert result.returncode == 1
    assert f"train.rendezvous 127.0.0.1:{closed_port}: the 2 nodes did not meet within train.rendezvous_timeout 3 s" \
        in result.stderr
    assert "Traceback" not in result.stderr
    assert not project.model.exists()


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"train.processes": 0}, "train.processes: must be greater than or equal to 1 (got 0)"),
    ({"train.nodes": 2}, "train.nodes is 2, so train.rendezvous must say where they meet"),
    ({"train.processes": 2, "train.preset": "private", **{f"train.{key}": None for key in (
        "optimizer", "lr", "epochs", "batch_size", "model", "widths", "ema_decay", "label_smoothing", "momentum",
        "weight_decay")}}, "with a private run (train.target_epsilon 8.0): its accounting assumes one process"),
], ids=["processes-0", "nodes-without-rendezvous", "private"])
def test_settings_that_cannot_run_in_several_processes_are_refused(colours, tmp_path, overrides, expected):
    project = with_params(colours.copy(tmp_path / "project", "data"), **overrides)

    result = project.run_stage("train")

    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
