"""Against a real Prefect server, started and stopped with Prefect's own `prefect server start --background`
/ `status --wait` / `stop` on a port of its own: a schedule fires and its run completes with artifacts; the UI
on that port shows the run (in Chromium); and every way of stopping a run in progress — cancelling it, SIGINT
or SIGTERM to `python -m flows.retrain`, SIGTERM to the worker running it — ends DVC and its stage within
seconds, frees DVC's lock and lets the next run proceed. prefect.yaml deploys with its cron.

Polling is sped up for the test only: the scheduler, the runner and the worker every 2 s.
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
from selenium.webdriver.common.by import By

from flows import locks
from test_flows import ARTIFACT_KEYS, make_repo

# Server and runner start-up, a 10 s interval, and the whole tiny pipeline on 2 busy cores (~45 s).
RUN_DEADLINE_SECONDS = 240
STOPPED_WITHIN_SECONDS = 15  # for DVC and its stage to be gone after a run is stopped
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory) -> dict[str, str]:
    """The environment of every command here: a temporary PREFECT_HOME, the server on a free loopback port
    (PREFECT_SERVER_API_PORT, which the UI's own API address follows), fast polling, no proxy."""
    port = free_port()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PREFECT_") and key.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    return env | {
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(prefect_env, repo):
    """Prefect's own background server, from the project folder (prefect.toml binds it to 127.0.0.1); stopped,
    and checked stopped, afterwards."""
    started = prefect(["server", "start", "--background"], repo, prefect_env)
    assert started.returncode == 0, started.stdout + started.stderr
    ready = prefect(["server", "status", "--wait", "--timeout", "120"], repo, prefect_env, timeout=150)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    pid = int((Path(prefect_env["PREFECT_HOME"]) / "server.pid").read_text())
    yield prefect_env["PREFECT_API_URL"]
    stopped = prefect(["server", "stop"], repo, prefect_env)
    assert "Server stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert wait_for(lambda: locks.why_stale(pid) is not None, 30, every=0.5), "the server did not stop"


def prefect(args: list[str], repo: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(PREFECT + args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def serving(server, prefect_env, repo, tmp_path):
    """serving(*options) starts `python -m flows.serve` (prefect.yaml's deployment and cron schedule); each is
    stopped afterwards. Its log's path."""
    processes = []

    def serve(*options: str) -> Path:
        log = tmp_path / f"serve-{len(processes)}.log"
        processes.append(subprocess.Popen([sys.executable, "-m", "flows.serve", *options], cwd=repo, env=prefect_env,
                                          stdout=log.open("w"), stderr=subprocess.STDOUT))
        served = wait_for(lambda: "Your flow 'retrain' is being served" in log.read_text(), 120, every=0.5)
        assert served, log.read_text()[-3000:]
        return log

    yield serve
    for process in processes:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_a_cancelled_run_stops_dvc_and_its_stage_and_two_runs_after_it_complete(serving, prefect_env, repo):
    serving()  # the nightly cron: no scheduled run comes in the way of the ones triggered here
    # In two processes: torch's launcher starts each rank in a session of its own, out of reach of the
    # process-group signals that stop dvc and its stage; the ranks follow their launcher.
    retrain_needed(repo, 40, processes=2)
    flow_run = deployment_run(prefect_env, repo)
    train_starts(repo, processes=3)  # the launcher and its two ranks

    cancelled = prefect(["flow-run", "cancel", flow_run], repo, prefect_env)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert_stopped_and_lock_free(repo)
    assert wait_for(lambda: query(prefect_env, "state", flow_run) == "CANCELLED", 60)

    # Two runs triggered at once: the deployment's limit of one queues the second; both complete.
    retrain_needed(repo, 3, processes=1)
    runs = [deployment_run(prefect_env, repo), deployment_run(prefect_env, repo)]
    assert wait_for(lambda: all(query(prefect_env, "state", run) == "COMPLETED" for run in runs),
                    2 * RUN_DEADLINE_SECONDS, every=3), [query(prefect_env, "state", run) for run in runs]


def test_a_served_interval_schedule_completes_a_run_with_artifacts(serving, prefect_env, repo):
    log = serving("--interval", "10")
    run = wait_for(lambda: query(prefect_env, "scheduled_run"), RUN_DEADLINE_SECONDS)
    assert run is not None, log.read_text()[-5000:]
    assert set(run["artifacts"]) >= set(ARTIFACT_KEYS)
    assert (repo / "models/champion/model.pt").exists()


def test_stopping_the_served_flow_leaves_its_schedule_active(prefect_env):
    # The `serving` fixture stopped `python -m flows.serve` after the last test: pause_on_shutdown=False.
    assert not query(prefect_env, "deployment")["paused"]


def test_the_ui_on_its_own_port_shows_the_flow_runs(server, prefect_env, browser):
    (name,) = {run["name"] for run in query(prefect_env, "completed_runs")[:1]}
    browser.get(server.removesuffix("/api") + "/runs")
    deadline = time.monotonic() + 60
    while name not in (text := browser.find_element(By.TAG_NAME, "body").text) and time.monotonic() < deadline:
        time.sleep(1)
    assert name in text, text[:2000]
    assert "Oops" not in text
    # The UI talks to the API on the port the server runs on, not Prefect's default 4200.
    settings = json.loads(subprocess.run(["curl", "-s", server.removesuffix("/api") + "/ui-settings"],
                                         capture_output=True, text=True, timeout=30).stdout)
    assert settings["api_url"] == server


# --- stopping a run in progress --------------------------------------------------------------


def pipeline_processes(repo: Path) -> list[psutil.Process]:
    """The dvc and stage processes working in the repo."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd", "status"]):
        command = " ".join(process.info["cmdline"] or [])
        if (process.info["cwd"] == str(repo) and process.info["status"] != psutil.STATUS_ZOMBIE
                and ("dvc " in command or "stages." in command)):
            found.append(process)
    return found


def train_starts(repo: Path, deadline_seconds: float = RUN_DEADLINE_SECONDS, processes: int = 1) -> None:
    """Wait until the train stage runs in the repo (as `processes` processes: its launcher and ranks)."""
    training = wait_for(lambda: len([p for p in pipeline_processes(repo)
                                     if "stages.train" in " ".join(p.info["cmdline"])]) >= processes,
                        deadline_seconds, every=0.2)
    assert training, "train never started"


def assert_stopped_and_lock_free(repo: Path) -> None:
    started = time.monotonic()
    left = wait_for(lambda: not pipeline_processes(repo), STOPPED_WITHIN_SECONDS, every=0.2)
    assert left, f"still running after {STOPPED_WITHIN_SECONDS} s: {[p.cmdline() for p in pipeline_processes(repo)]}"
    print(f"dvc and its stage gone {time.monotonic() - started:.1f} s after the stop")
    # A killed dvc stays in DVC's rwlock until its zombie is reaped by its parent, which may take a moment
    # on a loaded machine (CI once saw it listed right after the processes were gone).
    free = wait_for(lambda: locks.live_holder(repo) is None and locks.rwlock_holders(repo) == [], 15, every=0.2)
    assert free, (locks.live_holder(repo), locks.rwlock_holders(repo))


def retrain_needed(repo: Path, epochs: int, processes: int | None = None) -> None:
    """A params.yaml change that makes the next run train again (long enough to be stopped midway)."""
    text = (repo / "params.yaml").read_text().replace("\n  epochs: ", f"\n  epochs: {epochs}  # ", 1)
    if processes is not None:
        text = text.replace("\n  processes: ", f"\n  processes: {processes}  # ", 1)
    (repo / "params.yaml").write_text(text)


# Python started with SIGINT at its default, as in a terminal: a shell without job control starts background
# commands (`pytest &` in a script) with SIGINT ignored, which their children inherit, and Ctrl-C's
# KeyboardInterrupt would then never come.
IN_THE_FOREGROUND = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                     "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_retrain_command_stops_dvc_and_its_stage(server, prefect_env, repo, stop):
    retrain_needed(repo, 41 + stop)
    process = subprocess.Popen([*IN_THE_FOREGROUND, "-m", "flows.retrain"], cwd=repo, env=prefect_env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    train_starts(repo)

    process.send_signal(stop)
    try:
        assert_stopped_and_lock_free(repo)
    except AssertionError as error:  # what the flow said, to tell why
        process.kill()
        raise AssertionError(f"{error}\nflows.retrain printed:\n{process.communicate()[0][-4000:]}") from None
    output, _ = process.communicate(timeout=60)
    assert "Finished in state Crashed" in output
    if stop == signal.SIGINT:
        assert process.returncode == 1 and "stopped: dvc and its stage ended with this run" in output, output
    else:  # Prefect, having recorded the run, lets SIGTERM end the process as it would have
        assert process.returncode == -signal.SIGTERM, output


def test_stopping_the_worker_cancels_its_run_and_stops_dvc_and_its_stage(server, prefect_env, repo, tmp_path):
    # prefect.yaml, deployed onto a process work pool with its cron schedule and concurrency limit.
    for command in (["work-pool", "create", "images-process", "--type", "process"],
                    ["--no-prompt", "deploy", "--name", "nightly-retrain"]):
        result = prefect(command, repo, prefect_env)
        assert result.returncode == 0, result.stdout + result.stderr
    deployed = query(prefect_env, "deployment")
    assert deployed["cron"] == ["0 2 * * *"] and deployed["work_pool"] == "images-process"
    assert deployed["limit"] == 1 and deployed["collision"] == "ENQUEUE"

    query(prefect_env, "delete_scheduled_runs")  # of the interval schedule served earlier: none is for the worker
    retrain_needed(repo, 50)
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "flows.worker", "--pool", "images-process"], cwd=repo,
                              env=prefect_env, stdout=log, stderr=subprocess.STDOUT)
    flow_run = deployment_run(prefect_env, repo)
    train_starts(repo)

    worker.send_signal(signal.SIGTERM)
    assert_stopped_and_lock_free(repo)
    assert worker.wait(timeout=90) == 1, (tmp_path / "worker.log").read_text()[-3000:]
    assert "cancelled its 1 running flow run(s)" in (tmp_path / "worker.log").read_text()
    cancelled = wait_for(lambda: query(prefect_env, "state", flow_run) == "CANCELLED", 30)
    assert cancelled, query(prefect_env, "state", flow_run)


# --- reading the API, from a subprocess: this process's Prefect settings stay untouched ----------

QUERIES = {
    "scheduled_run": """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
with get_client(sync_client=True) as client:
    runs = [run for run in client.read_flow_runs() if run.auto_scheduled and run.state and run.state.is_completed()]
    if runs:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[runs[0].id])))
        print(json.dumps({"id": str(runs[0].id), "artifacts": sorted(artifact.key for artifact in found)}))
    else:
        print("null")
""",
    "completed_runs": """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    print(json.dumps([{"name": run.name} for run in client.read_flow_runs() if run.state and run.state.is_completed()]))
""",
    "state": """
import sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    print(client.read_flow_run(sys.argv[1]).state_type.value)
""",
    "delete_scheduled_runs": """
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
with get_client(sync_client=True) as client:
    waiting = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED", "PENDING"])))
    for run in client.read_flow_runs(flow_run_filter=waiting):
        client.delete_flow_run(run.id)
print("null")
""",
    "deployment": """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    deployment = client.read_deployment_by_name("retrain/nightly-retrain")
    print(json.dumps({"paused": deployment.paused, "work_pool": deployment.work_pool_name,
           "cron": [getattr(entry.schedule, "cron", None) for entry in deployment.schedules if entry.active],
           "limit": deployment.global_concurrency_limit and deployment.global_concurrency_limit.limit,
           "collision": deployment.concurrency_options and deployment.concurrency_options.collision_strategy.value}))
""",
}


def query(env: dict[str, str], name: str, *args: str):
    result = subprocess.run([sys.executable, "-c", QUERIES[name], *args], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    return last if name == "state" else json.loads(last)


def deployment_run(env: dict[str, str], repo: Path) -> str:
    """`prefect deployment run` of prefect.yaml's deployment; the flow run's id."""
    result = prefect(["deployment", "run", "retrain/nightly-retrain"], repo, env)
    assert result.returncode == 0, result.stdout + result.stderr
    return next(line.split()[-1] for line in result.stdout.splitlines() if "UUID" in line)


def wait_for(check, seconds: float, every: float = 3):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    return None
