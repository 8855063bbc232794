"""The retraining flow against a real Prefect API (prefect_test_harness) and the real DVC pipeline,
on a tiny generated image set in a committed copy of the project, as tests/test_pipeline.py does.

The flow runs in this process; DVC and the stages run as subprocesses in the copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, FlowRunFilter,
                                            FlowRunFilterId, LogFilter, LogFilterFlowRunId)
from prefect.settings import PREFECT_HOME, temporary_settings
from prefect.testing.utilities import prefect_test_harness
from ruamel.yaml import YAML

from datamaker import make_image_folder, make_tar_gz
from flows import champion, locks
from flows.publish import PER_CLASS_KEY, REPORT_KEY, SUMMARY_KEY
from flows.retrain import retrain
from flows.serve import deployment_config, serve_options

PROJECT = Path(__file__).resolve().parents[1]
ARTIFACT_KEYS = (PER_CLASS_KEY, SUMMARY_KEY, REPORT_KEY)
# Small enough for the whole pipeline in ~30 s on 2 busy cores.
TINY_PARAMS = {
    "data": {"source": "../images.tar.gz", "image_size": 16, "test_fraction": 0.25},
    "augment": {"preview_images": 4},
    "train": {"widths": [8, 16, 16], "epochs": 2, "batch_size": 16, "lr": 0.05, "threads": 1},
    "evaluate": {"batch_size": 64},
    "compress": {"batch_size": 64, "latency_repeats": 3},
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def make_repo(workdir: Path) -> Path:
    """A committed copy of the project (flows and Prefect configuration included) whose tiny
    generated data source, ../images.tar.gz, lies outside it; nothing reproduced yet."""
    images = make_image_folder(workdir / "images", classes=("circle", "square", "stripes"), per_class=16,
                               split_test=False, size=(20, 20))
    make_tar_gz(images, workdir / "images.tar.gz", wrap="images")
    repo = workdir / "repo"
    for name in git(PROJECT, "ls-files", "--cached", "--others", "--exclude-standard").split():
        if not name.startswith(("tests/", "data/", "models/", "reports/")) and (PROJECT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, repo / name)
    yaml = YAML()  # round-trip, as a user's edit
    params = yaml.load(repo / "params.yaml")
    for section, values in TINY_PARAMS.items():
        params[section].update(values)
    yaml.dump(params, repo / "params.yaml")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "tests@example.com")
    git(repo, "config", "user.name", "Tests")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "project")
    return repo


def dvc_metrics(repo: Path) -> dict:
    """reports/metrics.json as `dvc metrics show` reads it."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    shown = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                           check=True).stdout
    (workspace,) = json.loads(shown).values()
    return workspace["data"]["reports/metrics.json"]["data"]


def artifacts_of(flow_run_id) -> dict:
    """The run's artifacts by key, read back through the Prefect client."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=list(ARTIFACT_KEYS)), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact for artifact in found}


def summary_rows(markdown: str) -> dict[str, list[str]]:
    """metric -> [this run, champion, change] from the summary's table."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[1:]}


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real Prefect API on a temporary database; result storage under a temporary PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(updates={PREFECT_HOME: home}), prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("flows"))


@pytest.fixture(scope="module")
def first_run(prefect_api, repo):
    """The flow's first run on the project: `dvc repro`, no champion yet."""
    state = retrain(project_dir=str(repo), return_state=True)
    assert state.is_completed(), state.message
    return state


def test_first_run_reproduces_publishes_the_metrics_and_becomes_champion(first_run, repo):
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["epsilon"] is None and metrics["delta"] is None  # not private: the keys are there, null
    # DVC leaves out metrics that are null (they are no number to compare).
    assert dvc_metrics(repo) == {key: value for key, value in metrics.items() if value is not None}
    artifacts = artifacts_of(first_run.state_details.flow_run_id)
    assert set(artifacts) == set(ARTIFACT_KEYS)

    per_class = pd.read_csv(repo / "reports/per_class.csv").to_dict(orient="records")
    assert json.loads(artifacts[PER_CLASS_KEY].data) == per_class
    assert [row["class"] for row in per_class] == ["circle", "square", "stripes"]

    rows = summary_rows(artifacts[SUMMARY_KEY].data)
    for name in ("accuracy", "recall_macro", "precision_macro", "f1_macro", "mia_auc", "mia_tpr_at_1pct_fpr"):
        assert float(rows[name][0]) == pytest.approx(metrics[name], abs=1e-6)
        assert rows[name][1:] == ["–", "–"]  # no champion to compare with
    assert "promoted to champion" in artifacts[SUMMARY_KEY].data

    report = artifacts[REPORT_KEY].data
    assert (repo / "reports/report.html").resolve().as_uri() in report

    folder = repo / "models/champion"
    assert sorted(path.name for path in folder.iterdir()) == [
        ".gitignore", "metrics.json", "model.pt", "per_class.csv", "provenance.json"]
    assert (folder / "model.pt").read_bytes() == (repo / "models/model.pt").read_bytes()
    assert json.loads((folder / "metrics.json").read_text()) == metrics
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["git_commit"] == git(repo, "rev-parse", "HEAD").strip()
    assert provenance["params"]["train"]["epochs"] == 2
    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    assert provenance["data_sha256"] == meta["data_sha256"]
    assert provenance["flow_run"]["id"] == str(first_run.state_details.flow_run_id)
    # The champion's weights never reach git, nor a DVC experiment's commit.
    assert "models/champion" not in git(repo, "status", "--porcelain", "--untracked-files=all", "--ignored=no")


def test_an_experiment_not_beating_the_champion_by_the_margin_leaves_it(first_run, repo):
    champion_before = (repo / "models/champion/provenance.json").read_text()
    state = retrain(overrides=["train.epochs=1"], experiment_name="one-epoch", promotion_margin=1.0,
                    project_dir=str(repo), return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    assert not outcome["promoted"]
    assert "does not beat the champion's" in outcome["reason"] and "the champion stays" in outcome["reason"]
    assert (repo / "models/champion/provenance.json").read_text() == champion_before

    shown = subprocess.run([Path(sys.executable).parent / "dvc", "exp", "show", "--json"], cwd=repo,
                           capture_output=True, text=True, check=True).stdout
    experiments = {exp["name"]: exp for baseline in json.loads(shown)
                   for exp in baseline.get("experiments") or [] for exp in exp["revs"]}
    assert experiments["one-epoch"]["data"]["params"]["params.yaml"]["data"]["train"]["epochs"] == 1

    summary = artifacts_of(state.state_details.flow_run_id)[SUMMARY_KEY].data
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    champion_metrics = json.loads((repo / "models/champion/metrics.json").read_text())
    accuracy = summary_rows(summary)["accuracy"]
    assert [float(value) for value in accuracy] == pytest.approx(
        [metrics["accuracy"], champion_metrics["accuracy"], metrics["accuracy"] - champion_metrics["accuracy"]], abs=1e-6)
    assert "champion stays" in summary and "one-epoch" in summary
    # Each run adds a version under the same keys.
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY])))
    assert len(versions) >= 2


def run_logs(flow_run_id) -> str:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


DVC = str(Path(sys.executable).parent / "dvc")  # beside this interpreter, as the flow finds it


# --- DVC's lock -------------------------------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def orphans_kept_as_zombies():
    """Make this process the one orphaned descendants are re-parented to, and leave them unreaped, as PID 1
    does in many containers; reap them when the block ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for child in psutil.Process().children():
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, 0)


# Starts a command in a session of its own and exits without waiting for it: the command is orphaned.
ORPHAN = "import subprocess, sys; print(subprocess.Popen(sys.argv[1:], start_new_session=True, " \
         "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"


def test_a_run_clears_the_lock_of_a_killed_dvc_left_a_zombie_and_proceeds(first_run, repo):
    with orphans_kept_as_zombies():
        command = [sys.executable, "-c", ORPHAN, DVC, "repro", "--force", "--single-item", "train"]
        launched = subprocess.run(command, cwd=repo, env=stage_env(), capture_output=True, text=True, check=True)
        pid = int(launched.stdout)
        assert wait_until(lambda: pid in [holder.pid for holder in locks.rwlock_holders(repo)], 60)
        os.killpg(pid, signal.SIGKILL)
        assert wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10)

        by_hand = subprocess.run([DVC, "repro"], cwd=repo, env=stage_env(), capture_output=True, text=True)
        assert by_hand.returncode != 0 and f"is being blocked by:\n  (PID {pid})" in by_hand.stdout + by_hand.stderr

        state = retrain(project_dir=str(repo), return_state=True)

    assert state.is_completed(), state.message
    assert (f"cleared DVC's stale lock entry of (PID {pid}) {DVC} repro --force --single-item train: the process "
            "is a zombie" in run_logs(state.state_details.flow_run_id))
    assert locks.rwlock_holders(repo) == []


def test_a_run_waits_for_a_dvc_repro_by_hand_or_fails_after_its_lock_timeout(first_run, repo):
    by_hand = subprocess.Popen([DVC, "repro", "--force", "--single-item", "train"], cwd=repo, env=stage_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: locks.live_holder(repo) is not None, 60)
        impatient = retrain(project_dir=str(repo), lock_timeout_seconds=1, return_state=True)
        assert impatient.is_failed()
        assert f"DVC's lock in {repo} is still held by (PID {by_hand.pid})" in impatient.message
        assert "after 1 s of waiting" in impatient.message

        waiting = retrain(project_dir=str(repo), return_state=True)
        assert by_hand.poll() == 0  # it finished first
    finally:
        by_hand.kill()
        by_hand.wait()
    assert waiting.is_completed(), waiting.message
    logs = run_logs(waiting.state_details.flow_run_id)
    assert f"waiting for DVC's lock, held by (PID {by_hand.pid}) " in logs
    assert " repro --force --single-item train" in logs


def stage_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def wait_until(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_a_failing_stage_fails_the_run_with_its_error_and_leaves_the_champion(first_run, repo):
    champion_before = (repo / "models/champion/provenance.json").read_text()
    state = retrain(overrides=["data.source=../missing.tar.gz"], project_dir=str(repo),
                    download_retry_delays=[0.1], return_state=True)
    assert state.is_failed()
    assert "stage 'download' failed: data.source '../missing.tar.gz' does not exist" in state.message
    assert (repo / "models/champion/provenance.json").read_text() == champion_before
    with get_client(sync_client=True) as client:
        (reproduce,) = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert reproduce.run_count == 2  # download is retried once before the run fails
    git(repo, "checkout", "--", "params.yaml")


def test_served_deployment_has_the_cron_schedule_and_settings_of_prefect_yaml(prefect_api):
    config = deployment_config()
    deployment_id = retrain.to_deployment(**serve_options(config)).apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    assert config["schedules"][0]["cron"] == "0 2 * * *"
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)
    assert deployment.parameters == {"promotion_metric": "accuracy", "promotion_margin": 0.0, "max_epsilon": None,
                                     "overrides": [],
                                     "lock_timeout_seconds": 3600}
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"


# --- promotion, on plain files -------------------------------------------------------------


def workspace(root: Path, accuracy: float, epsilon: float | None = None) -> Path:
    """A project folder whose workspace holds a model and evaluate's outputs with this accuracy (and ε)."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "reports").mkdir(exist_ok=True)
    (root / "models/model.pt").write_bytes(f"weights {accuracy}".encode())
    (root / "reports/metrics.json").write_text(json.dumps({"accuracy": accuracy, "f1_macro": accuracy / 2,
                                                           "epsilon": epsilon, "delta": epsilon and 1e-5}))
    (root / "reports/per_class.csv").write_text("class,precision,recall,f1,support\ncat,1,1,1,2\n")
    return root


def promote_if_decided(root: Path, metric: str = "accuracy", margin: float = 0.0,
                       max_epsilon: float | None = None) -> champion.Decision:
    challenger = json.loads((root / "reports/metrics.json").read_text())
    decision = champion.decide(challenger, champion.champion_metrics(root), metric, margin, max_epsilon)
    if decision.promote:
        champion.promote(root, {"experiment": f"run {challenger['accuracy']}"})
    return decision


def test_a_first_run_with_no_champion_becomes_champion(tmp_path):
    decision = promote_if_decided(workspace(tmp_path, 0.5))
    assert decision.promote and "no champion yet" in decision.reason
    assert (tmp_path / "models/champion/model.pt").read_bytes() == b"weights 0.5"


def test_a_better_challenger_is_promoted_and_a_worse_one_is_not(tmp_path):
    promote_if_decided(workspace(tmp_path, 0.5))
    worse = promote_if_decided(workspace(tmp_path, 0.4))
    assert not worse.promote and "does not beat the champion's 0.5000" in worse.reason
    assert (tmp_path / "models/champion/model.pt").read_bytes() == b"weights 0.5"
    better = promote_if_decided(workspace(tmp_path, 0.6))
    assert better.promote and better.champion == 0.5
    assert (tmp_path / "models/champion/model.pt").read_bytes() == b"weights 0.6"
    assert json.loads((tmp_path / "models/champion/provenance.json").read_text()) == {"experiment": "run 0.6"}
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["champion", "model.pt"]


def test_a_model_above_max_epsilon_is_never_promoted_and_a_non_private_one_counts_as_infinite(tmp_path):
    not_private = promote_if_decided(workspace(tmp_path, 0.9), max_epsilon=8)
    assert not not_private.promote
    assert not_private.reason == "this run has no privacy guarantee (ε = ∞), above max_epsilon 8: never promoted"
    assert not (tmp_path / "models/champion").exists()
    too_much = promote_if_decided(workspace(tmp_path, 0.8, epsilon=10.0), max_epsilon=8)
    assert not too_much.promote and "ε 10, above max_epsilon 8" in too_much.reason
    assert promote_if_decided(workspace(tmp_path, 0.6, epsilon=7.99), max_epsilon=8).promote
    assert promote_if_decided(workspace(tmp_path, 0.9), max_epsilon=None).promote  # no limit: any model


def test_the_margin_and_the_metric_come_from_the_caller(tmp_path):
    promote_if_decided(workspace(tmp_path, 0.5))
    assert not promote_if_decided(workspace(tmp_path, 0.52), margin=0.05).promote
    assert promote_if_decided(workspace(tmp_path, 0.56), metric="f1_macro", margin=0.01).promote
    with pytest.raises(KeyError, match="promotion metric 'recall' is not in reports/metrics.json"):
        promote_if_decided(workspace(tmp_path, 0.7), metric="recall")


def test_a_promotion_interrupted_between_its_renames_keeps_the_previous_champion(tmp_path):
    promote_if_decided(workspace(tmp_path, 0.5))
    # What a crash right after the first rename of `promote` leaves: no champion, the old one set aside.
    os.rename(tmp_path / "models/champion", tmp_path / "models/.champion.previous")
    assert champion.champion_metrics(tmp_path)["accuracy"] == 0.5
    assert (tmp_path / "models/champion/model.pt").read_bytes() == b"weights 0.5"


# Promotes the workspace in argv[1], saying so first; a kill may land at any moment after that line.
PROMOTE = """
import sys
from pathlib import Path
from flows import champion
print("promoting", flush=True)
champion.promote(Path(sys.argv[1]), {"experiment": sys.argv[2]})
"""


def test_a_promotion_killed_at_any_moment_leaves_one_whole_champion(tmp_path):
    root = workspace(tmp_path, 0.5)
    promote_if_decided(root)
    models = {0.5: b"weights 0.5"}  # each run's model, by its accuracy
    before = 0.5  # the champion's accuracy
    big = os.urandom(64 * 2**20)  # long enough to copy and flush that a kill lands midway
    for attempt, delay in enumerate((0.0, 0.01, 0.03, 0.06, 0.1, 0.2, 0.4)):
        accuracy = round(0.6 + attempt / 100, 2)
        workspace(root, accuracy)
        models[accuracy] = big + str(accuracy).encode()
        (root / "models/model.pt").write_bytes(models[accuracy])
        child = subprocess.Popen([sys.executable, "-c", PROMOTE, str(root), f"run {accuracy}"], env=stage_env(),
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "promoting\n"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()

        # Whole: the old champion or the new one, its model, metrics and provenance from the same run
        # (champion_metrics puts back a champion that a kill between the two renames set aside).
        kept = champion.champion_metrics(root)["accuracy"]
        assert kept in (before, accuracy)
        assert (root / "models/champion/model.pt").read_bytes() == models[kept]
        assert json.loads((root / "models/champion/provenance.json").read_text()) == {"experiment": f"run {kept}"}
        before = kept
    promote_if_decided(workspace(root, 0.9))
    assert sorted(path.name for path in (root / "models").iterdir()) == ["champion", "model.pt"]  # no leftovers


def test_a_promotion_interrupted_after_its_renames_removes_what_is_left_of_the_old_champion(tmp_path):
    promote_if_decided(workspace(tmp_path, 0.5))
    promote_if_decided(workspace(tmp_path, 0.6))
    # What a crash while the old champion was being deleted leaves: the new one in place, part of the old beside it.
    (tmp_path / "models/.champion.previous").mkdir()
    (tmp_path / "models/.champion.previous/model.pt").write_bytes(b"weights 0.5")
    assert champion.champion_metrics(tmp_path)["accuracy"] == 0.6
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == ["champion", "model.pt"]
    promote_if_decided(workspace(tmp_path, 0.7))
    assert champion.champion_metrics(tmp_path)["accuracy"] == 0.7
