"""Running the DVC pipeline from a flow: `dvc repro` or `dvc exp run -S ...`, its output streamed
line by line, a failure reported with the failing stage's own error.

DVC stays in charge of what runs: a stage whose inputs did not change is skipped as always, and
an experiment is one `dvc exp run`, so that it is listed whole in `dvc exp show`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flows import locks

# What DVC prints when a stage starts, is skipped, and when one fails.
RUNNING = re.compile(r"Running stage '(?P<stage>[\w-]+)'")
SKIPPED = re.compile(r"Stage '(?P<stage>[\w-]+)' (didn't change, skipping|is cached)")
FAILED = re.compile(r"failed to reproduce '(?P<stage>[\w-]+)'")
LOCKED = re.compile(r"(Updating|Generating) lock file")  # a stage's last line: what follows is DVC's
# What DVC prints when another DVC process holds its repository lock, or the outputs it would write.
BUSY = re.compile(r"Unable to acquire lock|is busy, it is being blocked by")
LOCK_POLL_SECONDS = 2.0
# Time for DVC to stop its stage and release its lock after SIGINT (a training step ends within a
# second here), well inside the 30 s Prefect's runner gives a cancelled run before it SIGKILLs it.
STOP_GRACE_SECONDS = 10.0


class LockTimeout(RuntimeError):
    """Another DVC process held the checkout's lock for longer than the flow would wait."""


class StageFailed(RuntimeError):
    """A DVC stage exited with an error; the message is the stage's own error text."""

    def __init__(self, stage: str | None, error: str):
        self.stage = stage
        self.error = error
        super().__init__(f"stage '{stage or 'unknown'}' failed: {error}")


@dataclass
class PipelineRun:
    """What one DVC command did, stage by stage, read from its output."""

    command: list[str]
    ran: list[str] = field(default_factory=list)
    current_stage: str | None = None
    skipped: list[str] = field(default_factory=list)
    failed: str | None = None
    lines: list[str] = field(default_factory=list)

    def read(self, line: str) -> None:
        self.lines.append(line)
        if running := RUNNING.search(line):
            self.ran.append(running["stage"])
            self.current_stage = running["stage"]
        elif skipped := SKIPPED.search(line):
            self.skipped.append(skipped["stage"])
        elif failed := FAILED.search(line):
            self.failed = failed["stage"]

    def error_text(self) -> str:
        """The failing stage's own message: its `error: ...` lines (stages.errors.run_stage), else
        its traceback's last line, else DVC's own error."""
        stage_errors, in_error = [], False
        for line in self.lines:
            if line.startswith("error: "):
                stage_errors.append(line.removeprefix("error: "))
                in_error = True
            elif in_error and line.startswith((" ", "\t")):  # the error's own details: params.yaml's problems
                stage_errors.append(line)
            else:
                in_error = False
        if stage_errors:
            return "\n".join(stage_errors)
        exceptions = [line for line in self.lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
        if exceptions:
            return exceptions[-1]
        dvc_errors = [line for line in self.lines if line.startswith("ERROR")]
        return "\n".join(dvc_errors) or "\n".join(self.lines[-5:])


def dvc_command(overrides: list[str], experiment_name: str | None) -> list[str]:
    """`dvc repro` without overrides; `dvc exp run -n NAME -S key=value ...` with them."""
    if not overrides:
        return ["dvc", "repro"]
    command = ["dvc", "exp", "run"]
    if experiment_name:
        command += ["-n", experiment_name]
    for override in overrides:
        command += ["-S", override]
    return command


def stage_environment() -> dict[str, str]:
    """The environment DVC runs stages in: `python` in dvc.yaml is this interpreter (a served flow
    may run without the virtual environment activated), and output is not held in buffers."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1"}


def run_pipeline(command: list[str], project: Path, on_line: Callable[[str | None, str], None],
                 on_wait: Callable[[str], None], lock_timeout: float) -> PipelineRun:
    """Run a DVC command in project, passing each output line to on_line(stage, line) as it comes
    (stage None for DVC's own lines); raise StageFailed with the stage's error when it fails.

    Stale holders of DVC's lock are cleared first (on_wait says which); while another DVC process
    holds it (a person's `dvc repro` in the same checkout), it waits, saying for whom, up to
    lock_timeout seconds, then raises LockTimeout."""
    deadline = time.monotonic() + lock_timeout
    announced = None
    while True:
        for holder, why in locks.clear_stale_holders(project):
            on_wait(f"cleared DVC's stale lock entry of {holder}: the process is {why}")
        holder = locks.live_holder(project)
        if holder is None:
            run, returncode = run_once(command, project, on_line)
            if returncode == 0:
                return run
            if not (BUSY.search("\n".join(run.lines)) and not run.ran):
                raise StageFailed(run.failed or (run.ran[-1] if run.ran else None), run.error_text())
            holder = locks.live_holder(project) or "another DVC process"  # it took the lock first
        if time.monotonic() > deadline:
            raise LockTimeout(f"DVC's lock in {project} is still held by {holder} after {lock_timeout:g} s of "
                              "waiting; run again once it is done, or raise the lock timeout")
        if str(holder) != announced:
            on_wait(f"waiting for DVC's lock, held by {holder} (up to {deadline - time.monotonic():.0f} s more)")
            announced = str(holder)
        time.sleep(LOCK_POLL_SECONDS)


def run_once(command: list[str], project: Path, on_line: Callable[[str | None, str], None]) -> tuple[PipelineRun, int]:
    """One run of the DVC command; what it printed, and its exit status."""
    run = PipelineRun(command)
    # A session of its own, so that whatever stops this process (Ctrl-C, SIGTERM, a cancelled flow run)
    # reaches DVC through `stop`, in order, rather than all at once; stderr joins stdout so that the
    # lines keep their order: a stage's error follows its log.
    process = subprocess.Popen(command, cwd=project, env=stage_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    try:
        for raw_line in process.stdout:
            line = raw_line.rstrip()
            if line:
                run.read(line)
                on_line(run.current_stage, line)
                if LOCKED.search(line):
                    run.current_stage = None
        process.wait()
    except BaseException:
        stop(process)
        raise
    finally:
        process.stdout.close()
    return run, process.returncode


def stop(process: subprocess.Popen) -> None:
    """End DVC and its stage, as Ctrl-C in their terminal would: SIGINT to their process group, so that the stage
    stops and DVC releases its lock; SIGKILL to what is left after STOP_GRACE_SECONDS. DVC is waited for (reaped),
    so that it leaves no zombie holding its lock."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # what did not stop; usually nothing is left
    process.wait()
