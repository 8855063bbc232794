"""A schedule really fires: against a real `prefect server start` (started and stopped with the
project's own `python -m flows.server`), the flow served by `python -m flows.serve` with a short
interval completes a scheduled run with its artifacts; prefect.yaml deploys with its cron.

Polling is sped up for the test only: the scheduler every 2 s, the runner every 2 s.
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

import pytest

from test_flows import ARTIFACT_KEYS, make_repo

# The deadline for the first scheduled run: server and runner start-up, a 10 s interval, and the
# whole tiny pipeline on 2 busy cores (~45 s), with room to spare.
SCHEDULED_RUN_DEADLINE_SECONDS = 240


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def prefect_env(tmp_path) -> dict[str, str]:
    """The environment of every command here: a temporary PREFECT_HOME, no proxy, fast polling."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PREFECT_") and key.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    return env | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


@pytest.fixture
def repo(tmp_path) -> Path:
    return make_repo(tmp_path / "project")


@pytest.fixture
def server(prefect_env, repo):
    """`python -m flows.server start` on a free loopback port; stopped (and checked stopped) afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "flows.server"]
    started = subprocess.run([*command, "start", "--port", str(port)], cwd=repo, env=prefect_env,
                             capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    url = f"http://127.0.0.1:{port}/api"
    assert f"export PREFECT_API_URL={url}" in started.stdout
    yield url
    stopped = subprocess.run([*command, "stop"], cwd=repo, env=prefect_env, capture_output=True, text=True,
                             timeout=60)
    assert stopped.stdout.strip() == "stopped"
    assert not (Path(prefect_env["PREFECT_HOME"]) / "server.pid").exists()


def test_a_served_interval_schedule_completes_a_run_with_artifacts(server, prefect_env, repo, tmp_path):
    env = prefect_env | {"PREFECT_API_URL": server}
    log = (tmp_path / "serve.log").open("w")
    serving = subprocess.Popen([sys.executable, "-m", "flows.serve", "--interval", "10"], cwd=repo, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        run = wait_for_completed_scheduled_run(env, SCHEDULED_RUN_DEADLINE_SECONDS)
        assert run is not None, (tmp_path / "serve.log").read_text()[-5000:]
        assert set(run["artifacts"]) >= set(ARTIFACT_KEYS)
    finally:
        serving.send_signal(signal.SIGTERM)
        serving.wait(timeout=60)
    # Stopping the serving process must not end the schedule (pause_on_shutdown=False).
    assert not query(env, "deployment")["paused"]
    assert (repo / "models/champion/model.pt").exists()

    # prefect.yaml: deployed onto a process work pool with its cron schedule and concurrency limit.
    prefect = [str(Path(sys.executable).parent / "prefect")]
    for command in (["work-pool", "create", "images-process", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
        result = subprocess.run(prefect + command, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    deployed = query(env, "deployment")
    assert deployed["cron"] == ["0 2 * * *"] and deployed["work_pool"] == "images-process"
    assert deployed["limit"] == 1 and deployed["collision"] == "ENQUEUE"
    assert "Traceback" not in (Path(prefect_env["PREFECT_HOME"]) / "server.log").read_text()


# The checks read the API from a subprocess: this process's Prefect settings stay untouched.
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


def query(env: dict[str, str], name: str):
    result = subprocess.run([sys.executable, "-c", QUERIES[name]], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def wait_for_completed_scheduled_run(env: dict[str, str], seconds: float) -> dict | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if run := query(env, "scheduled_run"):
            return run
        time.sleep(3)
    return None
