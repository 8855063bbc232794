"""Running a stage (or the tutorial) as a child process: its lines logged, its peak memory measured;
each stage's command line as dvc.yaml, its one home, gives it."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ruamel.yaml import YAML

from flows.pipeline import stage_environment

log = logging.getLogger("bench")

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@cache
def stage_command(stage: str) -> list[str]:
    """dvc.yaml's `cmd` of a stage, split as a shell would: `["python", "-m", "stages.train", ...]`."""
    stages = YAML(typ="safe", pure=True).load(PROJECT_ROOT / "dvc.yaml")["stages"]
    return shlex.split(stages[stage]["cmd"])


@dataclass(frozen=True)
class Finished:
    returncode: int
    peak_memory_mb: float  # the child's maximum resident set size (ru_maxrss)


class ChildFailed(Exception):
    """A stage exited with an error; the message holds its last lines."""


def run_module(module: str, *args: str, cwd: Path, log_file: Path, tag: str) -> Finished:
    """`python -m module args` in cwd, as DVC would run it; every line it prints goes to log_file
    and, prefixed with `tag`, to the bench's log. Raises ChildFailed on a non-zero exit."""
    # As the flows run DVC: `python` in dvc.yaml is this interpreter, also when the bench was started as
    # `.venv/bin/python -m bench` without the environment activated.
    env = dict(stage_environment(),
               PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", module, *args]
    last_lines: list[str] = []
    with open(log_file, "a") as log_out:
        log_out.write(f"$ {' '.join(command)}\n")
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, bufsize=1)
        try:
            for line in child.stdout:
                log_out.write(line)
                log.info("[%s] %s", tag, line.rstrip())
                last_lines = (last_lines + [line.rstrip()])[-20:]
        except BaseException:  # Ctrl-C or `kill` of the bench: the child must not train on, orphaned
            child.terminate()
            child.wait()
            raise
        child.stdout.close()
        # os.wait4 instead of child.wait(): it also returns the child's resource usage, whose
        # ru_maxrss (kB on Linux) is the peak memory of the process (DataLoader workers are
        # separate processes: their peaks are not added, the largest one counts).
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise ChildFailed(f"{module} exited with {child.returncode}; its last lines:\n" + "\n".join(last_lines))
    return Finished(child.returncode, round(usage.ru_maxrss / 1024, 1))


def run_stage(stage: str, *, cwd: Path, log_file: Path, tag: str) -> Finished:
    """A stage, with dvc.yaml's command line, in cwd: a folder laid out as the project (data/, models/, reports/)."""
    _python, _dash_m, module, *args = stage_command(stage)
    return run_module(module, *args, cwd=cwd, log_file=log_file, tag=tag)
