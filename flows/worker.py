"""A Prefect worker for the project's process work pool, whose SIGTERM and Ctrl-C stop the runs it executes.

    python -m flows.worker --pool images-process       # `prefect worker start --pool images-process`, and that

Prefect's own process worker drains when it is told to stop: it takes no new run but lets the running
ones finish (measured with Prefect 3.9.1: after `kill -TERM` of the worker, a retraining run trained
on to its end, 24 s later, before the worker exited). A retraining run can train for hours, so this
one asks Prefect to cancel the runs its worker started, the way the UI's "Cancel" does: the worker
then stops each run's process group, the flow stops DVC and its stage (flows/pipeline.py), and the
runs show Cancelled. Then the worker itself is stopped. Any other option is passed to
`prefect worker start`.

A machine that dies (or a worker killed with its runs) cannot say so: its runs would stay Running
forever. The runs this worker starts beat every HEARTBEAT_SECONDS (Prefect's flow-run heartbeat
events), and the worker makes sure its server has the automation that marks a run Crashed when its
heartbeats stop for CRASHED_AFTER_SECONDS (Prefect's own way to catch "zombie" runs).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from uuid import UUID

import flows  # noqa: F401, I001  first: sets DO_NOT_TRACK before Prefect is imported
import psutil
from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture, ResourceSpecification
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import State, StateType
from prefect.exceptions import PrefectHTTPStatusError

# A cancelled run's process gets 30 s from Prefect's worker before it is killed; then a little more.
RUNS_STOP_SECONDS = 40
WORKER_STOP_SECONDS = 30
# Prefect sends flow-run heartbeats at most every 30 s; a run silent for three of them is taken for dead.
HEARTBEAT_SECONDS = 30
CRASHED_AFTER_SECONDS = 90
CRASH_AUTOMATION = "retrain: mark runs whose heartbeats stopped as Crashed"


class Stop(Exception):
    """SIGTERM or SIGINT reached this process."""


def main() -> None:
    ensure_crash_automation()
    # The runs inherit the worker's environment: each of them beats.
    environment = {**os.environ, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": os.environ.get(
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_SECONDS))}
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", *sys.argv[1:]], env=environment,
                              start_new_session=True)  # Ctrl-C reaches this process only, which then stops it
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, raise_stop)
    try:
        sys.exit(worker.wait())
    except Stop:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        runs = cancel_runs_of(worker.pid)
        wait_until_cancelled(runs, RUNS_STOP_SECONDS)
        worker.terminate()
        try:
            worker.wait(timeout=WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        sys.exit(f"stopped the worker and cancelled its {len(runs)} running flow run(s)")


def ensure_crash_automation() -> None:
    """The server's automation that marks a flow run Crashed once it has sent no heartbeat for
    CRASHED_AFTER_SECONDS without reaching a final state (Prefect's "detect zombie flows" recipe); made once."""
    with contextlib.suppress(ValueError):  # Automation.read raises it when there is none of that name
        if Automation.read(name=CRASH_AUTOMATION):
            return
    Automation(
        name=CRASH_AUTOMATION,
        description="A run of a machine that died, or of a worker killed with its runs, stops beating.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=CRASHED_AFTER_SECONDS),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {CRASHED_AFTER_SECONDS} s: its machine or worker died")],
    ).create()


def raise_stop(signal_number: int, frame) -> None:
    raise Stop(signal.Signals(signal_number).name)


def cancel_runs_of(worker_pid: int) -> list[UUID]:
    """Ask Prefect to cancel every running flow run whose process the worker started; their ids."""
    children = {child.pid for child in psutil.Process(worker_pid).children(recursive=True)}
    cancelled = []
    with get_client(sync_client=True) as client:
        running = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))
        for run in running:
            if (run.infrastructure_pid or "").isdigit() and int(run.infrastructure_pid) in children:
                client.set_flow_run_state(run.id, State(type=StateType.CANCELLING,
                                                        message="its worker was told to stop"))
                cancelled.append(run.id)
    return cancelled


def wait_until_cancelled(runs: list[UUID], seconds: float) -> None:
    """Until the worker has stopped each run's processes and marked it Cancelled (or the time is up)."""
    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            try:
                if all(client.read_flow_run(run).state.is_final() for run in runs):
                    return
            except PrefectHTTPStatusError as error:
                # The server's SQLite answers 500 while another writer holds it (seen under load): asked again.
                if error.response.status_code < 500:
                    raise
            time.sleep(0.5)


if __name__ == "__main__":
    main()
