"""A Prefect worker for the project's process work pool, whose SIGTERM and Ctrl-C stop the runs it executes.

    python -m flows.worker --pool images-process       # `prefect worker start --pool images-process`, and that

Prefect's own process worker drains when it is told to stop: it takes no new run but lets the running
ones finish (measured with Prefect 3.9.1: after `kill -TERM` of the worker, a retraining run trained
on to its end, 24 s later, before the worker exited). A retraining run can train for hours, so this
one asks Prefect to cancel the runs its worker started, the way the UI's "Cancel" does: the worker
then stops each run's process group, the flow stops DVC and its stage (flows/pipeline.py), and the
runs show Cancelled. Then the worker itself is stopped. Any other option is passed to
`prefect worker start`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from uuid import UUID

import flows  # noqa: F401, I001  first: sets DO_NOT_TRACK before Prefect is imported
import psutil
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import State, StateType
from prefect.exceptions import PrefectHTTPStatusError

# A cancelled run's process gets 30 s from Prefect's worker before it is killed; then a little more.
RUNS_STOP_SECONDS = 40
WORKER_STOP_SECONDS = 30


class Stop(Exception):
    """SIGTERM or SIGINT reached this process."""


def main() -> None:
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", *sys.argv[1:]],
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
