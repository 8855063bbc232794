"""A Prefect worker for the project's process work pool, whose SIGTERM and Ctrl-C stop the runs it executes.

    python -m flows.worker --pool images-process       # `prefect worker start --pool images-process`, and that

Prefect's own process worker drains when it is told to stop: it takes no new run but lets the running
ones finish (measured with Prefect 3.9.1: after `kill -TERM` of the worker, a retraining run trained
on to its end, 24 s later, before the worker exited). A retraining run can train for hours, so this
one asks Prefect to cancel the runs its worker started, the way the UI's "Cancel" does: the worker
then stops each run's process group, the flow stops DVC and its stage (flows/pipeline.py), and the
runs show Cancelled. Then the worker itself is stopped. Any other option is passed to
`prefect worker start`, but `--crashed-after SECONDS` (below).

A machine that dies (or a worker killed with its runs) cannot say so: its runs would stay Running
forever. The runs this worker starts beat every HEARTBEAT_SECONDS (Prefect's flow-run heartbeat
events), and the worker makes sure its server has the automation that marks a run Crashed when its
heartbeats stop for `--crashed-after` seconds (CRASHED_AFTER_SECONDS; Prefect's own way to catch "zombie"
runs). The first worker to start on a server sets that window; change it in the UI's Automations.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
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
# The clone a shared deployment's runs work in (prefect.yaml's shared-retrain): this worker's own.
CHECKOUT_VARIABLE = "IMAGE_PIPELINE_CHECKOUT"
PROJECT = Path(__file__).resolve().parents[1]


class Stop(Exception):
    """SIGTERM or SIGINT reached this process."""


def main() -> None:
    arguments, crashed_after = crash_window(sys.argv[1:])
    ensure_crash_automation(crashed_after)
    # The runs inherit the worker's environment: each of them beats, and a shared deployment's runs work in this
    # worker's own clone (prefect.yaml's shared-retrain sets its working directory from it).
    environment = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS), CHECKOUT_VARIABLE: str(PROJECT),
                   **os.environ}
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", *arguments], env=environment,
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


def crash_window(arguments: list[str]) -> tuple[list[str], float]:
    """`--crashed-after SECONDS` taken out of the arguments (the rest are `prefect worker start`'s)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--crashed-after", type=float, default=CRASHED_AFTER_SECONDS)
    known, rest = parser.parse_known_args(arguments)
    if known.crashed_after <= HEARTBEAT_SECONDS:
        sys.exit(f"error: --crashed-after {known.crashed_after:g}: a run beats every {HEARTBEAT_SECONDS} s, so a "
                 f"silence must last longer than that to mean it died (default {CRASHED_AFTER_SECONDS})")
    return rest, known.crashed_after


def ensure_crash_automation(crashed_after: float) -> None:
    """The server's automation that marks a flow run Crashed once it has sent no heartbeat for `crashed_after`
    seconds without reaching a final state (Prefect's "detect zombie flows" recipe); made once per server."""
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
            within=timedelta(seconds=crashed_after),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {crashed_after:g} s: its machine or worker died")],
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
