"""Retraining beyond one checkout: each worker has a clone of its own, and the clones share a git remote and
a DVC remote (README "Several machines").

A shared run
1. brings the worker's clone to the deployment's git revision (`git fetch`, a detached checkout);
2. applies its overrides to params.yaml as `dvc exp run -S` would (DVC's own code for it), then runs the
   pipeline stage by stage with `dvc repro --pull`, pushing the cache and DVC's run-cache to the DVC
   remote as each stage finishes: a run that dies halfway, on any machine, leaves what it computed there,
   and the next run anywhere restores those stages from the remote instead of computing them again
   ("Stage 'download' is cached - skipping run, checking out outputs");
3. saves the workspace as a DVC experiment (`dvc exp save`) and pushes it (`dvc exp push`): the experiment
   is in the shared git remote, its data in the DVC remote, `dvc exp show` lists it in any clone after
   `dvc exp pull`.

Why not one `dvc exp run`: DVC holds its repository lock for the whole run and `dvc push` needs it, so an
experiment run cannot push until it has finished, and a machine lost mid-run would lose every stage.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dvc.repo import Repo
from dvc.utils.hydra import apply_overrides
from ruamel.yaml import YAML

from flows import locks, registry, remote
from flows.pipeline import PipelineRun, run_pipeline


class CheckoutBusy(RuntimeError):
    """A DVC process of someone else's is at work in the worker's clone: it is not the flow's to reset."""


@dataclass
class SharedRun:
    """What a shared run did: the stages DVC ran and restored or skipped, the experiment and its commit."""

    ran: list[str]
    skipped: list[str]
    experiment: str
    commit: str


def sync_checkout(project: Path, git_remote: str, revision: str) -> str:
    """The clone at `revision` of `git_remote` (a branch, tag or commit), detached, with what the last run left
    in tracked files (params, dvc.lock, metrics) put back: a worker's clone is the flow's own. Its commit."""
    if holder := locks.live_holder(project):
        raise CheckoutBusy(f"{holder} is running DVC in {project}; a shared run resets this clone to "
                           f"{git_remote}/{revision}, so it waits for no one: give each worker a clone of its own")
    git(project, "fetch", "--quiet", "--tags", "--force", git_remote)
    commit = resolve(project, git_remote, revision)
    git(project, "checkout", "--quiet", "--force", "--detach", commit)
    return commit


def resolve(project: Path, git_remote: str, revision: str) -> str:
    """A branch of the remote (`main` → its `origin/main`), else a tag or commit."""
    for candidate in (f"refs/remotes/{git_remote}/{revision}", revision):
        found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"], cwd=project,
                               capture_output=True, text=True)
        if found.returncode == 0:
            return found.stdout.strip()
    raise ValueError(f"revision {revision!r} is neither a branch of git remote {git_remote!r} nor a tag or commit "
                     f"of {project}")


def reproduce_and_share(project: Path, overrides: list[str], experiment: str, git_remote: str,
                        on_line: Callable[[str | None, str], None], on_wait: Callable[[str], None],
                        lock_timeout: float) -> SharedRun:
    """Steps 2 and 3 above: the pipeline with `overrides`, each finished stage pushed, saved and pushed as
    `experiment`. Raises flows.pipeline.StageFailed, LockTimeout or flows.remote.RemoteError."""
    if overrides:
        apply_overrides(project / "params.yaml", overrides)
    ran, skipped = [], []
    for stage in pipeline_stages(project):
        run: PipelineRun = run_pipeline(["dvc", "repro", "--pull", stage], project, on_line, on_wait, lock_timeout)
        ran += [name for name in run.ran if name not in ran]
        skipped += [name for name in run.skipped if name not in skipped and name not in ran]
        on_line(None, f"pushed {stage}: {remote.push_cache(project, run_cache=True) or 'nothing new'}")
    included = [argument for path in uncached_outputs(project) for argument in ("--include-untracked", path)]
    run_pipeline(["dvc", "exp", "save", "--force", "--name", experiment, *included], project, on_line, on_wait,
                 lock_timeout)
    on_line(None, f"pushed experiment {experiment}: {remote.push_experiment(project, experiment, git_remote)}")
    return SharedRun(ran, skipped, experiment, registry.experiment_commit(project, experiment))


def pipeline_stages(project: Path) -> list[str]:
    """dvc.yaml's stages as written. Their order only sets when each is pushed: `dvc repro <stage>` runs
    whatever a stage needs first."""
    return list(YAML(typ="safe", pure=True).load((project / "dvc.yaml").read_text())["stages"])


def uncached_outputs(project: Path) -> list[str]:
    """The outputs DVC leaves to git (`cache: false`: the metrics, tables and plots' data). `dvc exp run` adds them
    to the experiment's commit itself; `dvc exp save` only when they are named, unless git tracks them already."""
    with Repo(str(project)) as repo:
        return [out.def_path for stage in repo.index.stages for out in stage.outs if not out.use_cache]


def git(project: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} in {project} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout
