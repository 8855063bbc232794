"""Running the DVC pipeline from a flow: `dvc repro` or `dvc exp run -S ...`, its output streamed
line by line, a failure reported with the failing stage's own error.

DVC stays in charge of what runs: a stage whose inputs did not change is skipped as always, and
an experiment is one `dvc exp run`, so that it is listed whole in `dvc exp show`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# What DVC prints when a stage starts, is skipped, and when one fails.
RUNNING = re.compile(r"Running stage '(?P<stage>[\w-]+)'")
SKIPPED = re.compile(r"Stage '(?P<stage>[\w-]+)' (didn't change, skipping|is cached)")
FAILED = re.compile(r"failed to reproduce '(?P<stage>[\w-]+)'")
LOCKED = re.compile(r"(Updating|Generating) lock file")  # a stage's last line: what follows is DVC's


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
        stage_errors = [line.removeprefix("error: ") for line in self.lines if line.startswith("error: ")]
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


def run_pipeline(command: list[str], project: Path, on_line: Callable[[str | None, str], None]) -> PipelineRun:
    """Run a DVC command in project, passing each output line to on_line(stage, line) as it comes
    (stage None for DVC's own lines); raise StageFailed with the stage's error when it fails."""
    run = PipelineRun(command)
    # stderr joins stdout so that the lines keep their order: a stage's error follows its log.
    with subprocess.Popen(command, cwd=project, env=stage_environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for raw_line in process.stdout:
            line = raw_line.rstrip()
            if line:
                run.read(line)
                on_line(run.current_stage, line)
                if LOCKED.search(line):
                    run.current_stage = None
    if process.returncode != 0:
        raise StageFailed(run.failed or (run.ran[-1] if run.ran else None), run.error_text())
    return run
