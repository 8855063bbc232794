"""Beyond one checkout (README "Several machines"): a PostgreSQL-backed Prefect server, two workers each with a
clone of its own (standing in for two machines), one bare git remote and one S3 remote (moto's) between them.

prefect.yaml's `shared-retrain` deployment runs on either worker: the run brings that worker's clone to the
remote's `main`, runs the pipeline stage by stage with each stage pushed to S3, saves and pushes it as a DVC
experiment, and promotes through DVC's model registry. Two runs at once both complete on the two workers;
a worker killed with its run (a machine lost) leaves the run Crashed, and the same run again on the other
worker restores what the lost one had computed from S3 instead of computing it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from prefect_postgres import postgres_prefect_fixture  # noqa: F401  (the fixture postgres_prefect)
from s3_server import add_remote
from test_flows import git, make_repo
from test_flows_server import QUERIES, wait_for

pytest_plugins = ["s3_server"]

POOL = "images-shared"
DEPLOYMENT = "retrain/shared-retrain"
RUN_DEADLINE_SECONDS = 420  # the tiny pipeline stage by stage, with its pushes, on 2 busy cores
CRASHED_AFTER_SECONDS = 45  # the workers' --crashed-after: a heartbeat is sent every 30 s

QUERIES = {**QUERIES, "run": """
import json, sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    run = client.read_flow_run(sys.argv[1])
    print(json.dumps({"state": run.state_type.value, "message": run.state.message if run.state else None,
                      "start": run.start_time.timestamp() if run.start_time else None,
                      "end": run.end_time.timestamp() if run.end_time else None}))
"""}


@dataclass
class Team:
    env: dict[str, str]
    origin: Path
    clones: dict[str, Path]
    workers: dict[str, subprocess.Popen]
    logs: Path

    def start_worker(self, name: str) -> None:
        log = (self.logs / f"worker-{name}-{len(list(self.logs.iterdir()))}.log").open("w")
        # A session of its own: the test can take the worker down with everything it started, as a machine dies.
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "flows.worker", "--pool", POOL, "--limit", "1", "--crashed-after",
             str(CRASHED_AFTER_SECONDS)], cwd=self.clones[name], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def run_deployment(self, overrides: list[str], experiment: str) -> str:
        parameters = json.dumps({"overrides": overrides, "experiment_name": experiment})
        result = prefect(["deployment", "run", DEPLOYMENT, "--params", parameters], self.clones["a"], self.env)
        assert result.returncode == 0, result.stdout + result.stderr
        return next(line.split()[-1] for line in result.stdout.splitlines() if "UUID" in line)

    def run(self, flow_run: str) -> dict:
        result = subprocess.run([sys.executable, "-c", QUERIES["run"], flow_run], env=self.env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    def wait_until(self, flow_runs: list[str], states: set[str], seconds: float) -> list[dict]:
        finished = wait_for(lambda: (runs := [self.run(run) for run in flow_runs]) and all(
            run["state"] in states for run in runs) and runs, seconds, every=3)
        assert finished, ([self.run(run) for run in flow_runs], self.worker_logs())
        return finished

    def log_of(self, worker: str) -> str:
        """Everything the worker's latest process printed, its runs' logs included."""
        return max(self.logs.glob(f"worker-{worker}-*.log"), key=lambda path: path.stat().st_mtime).read_text()

    def worker_logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in sorted(self.logs.iterdir()))


def prefect(args: list[str], cwd: Path, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def team(postgres_prefect, s3_server, tmp_path_factory):
    """The project pushed to a bare origin with an S3 remote in its .dvc/config, two clones with a worker each
    on the `images-shared` pool, prefect.yaml's shared-retrain deployed; the workers stopped afterwards."""
    workdir = tmp_path_factory.mktemp("shared")
    env = {**s3_server.environment(),
           **{key: value for key, value in postgres_prefect.env.items() if key.startswith("PREFECT_")},
           "PYTHONUNBUFFERED": "1"}
    seed = make_repo(workdir)  # workdir/repo, its data source ../images.tar.gz: the clones sit beside it
    add_remote(seed, s3_server, s3_server.create_bucket("shared"), env=env)
    git(seed, "commit", "-qam", "the team's S3 remote")
    origin = workdir / "origin.git"
    git(workdir, "clone", "-q", "--bare", str(seed), str(origin))
    clones = {}
    for name in ("a", "b"):
        clones[name] = workdir / name
        git(workdir, "clone", "-q", str(origin), str(clones[name]))
        git(clones[name], "config", "user.email", f"worker-{name}@example.com")
        git(clones[name], "config", "user.name", f"Worker {name}")
    for command in (["work-pool", "create", POOL, "--type", "process"],
                    ["--no-prompt", "deploy", "--name", "shared-retrain"]):
        result = prefect(command, clones["a"], env)
        assert result.returncode == 0, result.stdout + result.stderr
    logs = workdir / "logs"
    logs.mkdir()
    team = Team(env, origin, clones, {}, logs)
    for name in clones:
        team.start_worker(name)
    yield team
    for worker in team.workers.values():
        with_everything_it_started(worker.pid, signal.SIGTERM)
        worker.wait(timeout=90)


def with_everything_it_started(pid: int, stop: signal.Signals) -> list[psutil.Process]:
    """Signal a process and every process below it (its flow runs, their DVC, its stages)."""
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for process in processes:
        try:
            process.send_signal(stop)
        except psutil.NoSuchProcess:
            pass
    return processes


def experiments_in(origin: Path) -> list[str]:
    refs = git(origin, "for-each-ref", "--format=%(refname)", "refs/exps/")
    return sorted(ref.rsplit("/", 1)[-1] for ref in refs.split())


def test_two_runs_at_once_complete_on_the_two_workers_and_share_their_experiments(team, s3_server, tmp_path):
    runs = [team.run_deployment(["train.lr=0.05"], "alpha"), team.run_deployment(["train.lr=0.02"], "beta")]
    finished = team.wait_until(runs, {"COMPLETED", "FAILED", "CRASHED"}, RUN_DEADLINE_SECONDS)

    assert [run["state"] for run in finished] == ["COMPLETED", "COMPLETED"], (finished, team.worker_logs())
    first, second = finished
    assert first["start"] < second["end"] and second["start"] < first["end"]  # at the same time
    for name in ("a", "b"):  # one run on each worker: each brought its own clone to origin/main
        log = team.log_of(name)
        assert f"{team.clones[name]} at origin/main" in log and "Finished in state Completed()" in log, log[-3000:]
    assert experiments_in(team.origin) == ["alpha", "beta"]
    for clone in team.clones.values():  # neither checkout left broken: DVC finds everything it recorded
        status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=clone, env=team.env,
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr

    # Anyone else: a fresh clone pulls an experiment and its model from the shared remotes.
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(team.origin), str(other))
    for command in (["exp", "pull", "origin", "beta"], ["exp", "apply", "beta"], ["checkout"]):
        done = subprocess.run([sys.executable, "-m", "dvc", *command], cwd=other, env=team.env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
    assert (other / "models/model.pt").stat().st_size > 0
    assert "train.lr=0.02" not in (other / "params.yaml").read_text()  # the override went into the file
    assert "lr: 0.02" in (other / "params.yaml").read_text()

    # One champion in the registry, and both runs' decisions in its history.
    decisions = git(team.origin, "tag", "-n1", "--list", "decisions/image-classifier/*")
    assert len(decisions.splitlines()) == 2, decisions
    assert len([line for line in decisions.splitlines() if "promoted as" in line]) >= 1


def test_a_run_whose_machine_died_is_crashed_and_another_machine_resumes_from_what_it_pushed(team, tmp_path):
    # A run on worker a alone (b taken off the pool), with augment's settings of its own: what it computes
    # before it dies is in no other run's cache.
    with_everything_it_started(team.workers["b"].pid, signal.SIGTERM)
    team.workers["b"].wait(timeout=90)
    lost = team.run_deployment(["augment.copies=1", "augment.policy=trivialaugment", "train.epochs=3000"], "lost")
    trained = wait_for(lambda: "train: epoch 2/3000" in team.log_of("a") or team.run(lost)["state"] == "FAILED",
                       RUN_DEADLINE_SECONDS, every=2)
    assert trained and team.run(lost)["state"] == "RUNNING", team.log_of("a")[-5000:]

    # The machine dies: the worker, the flow run, DVC and the stage, all at once.
    with_everything_it_started(team.workers["a"].pid, signal.SIGKILL)
    team.workers["a"].wait(timeout=30)
    (crashed,) = team.wait_until([lost], {"CRASHED"}, CRASHED_AFTER_SECONDS + 120)
    assert "no heartbeat" in crashed["message"]

    # The run again on a new machine (a fresh clone, an empty cache): augment comes from S3, where the lost run
    # pushed it, instead of being computed again.
    team.clones["c"] = tmp_path / "c"
    git(tmp_path, "clone", "-q", str(team.origin), str(team.clones["c"]))
    git(team.clones["c"], "config", "user.email", "worker-c@example.com")
    git(team.clones["c"], "config", "user.name", "Worker c")
    (team.clones["c"].parent / "images.tar.gz").symlink_to(team.clones["a"].parent / "images.tar.gz")
    team.start_worker("c")
    again = team.run_deployment(["augment.copies=1", "augment.policy=trivialaugment", "train.epochs=2"], "again")
    (finished,) = team.wait_until([again], {"COMPLETED", "FAILED", "CRASHED"}, RUN_DEADLINE_SECONDS)
    assert finished["state"] == "COMPLETED", team.worker_logs()
    log = team.log_of("c")
    assert "Stage 'augment' is cached - skipping run" in log, log
    assert "Running stage 'augment'" not in log
    assert "Running stage 'train'" in log
