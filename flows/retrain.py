"""The retraining flow: run the DVC pipeline, publish its metrics as artifacts, promote a better model.

    python -m flows.retrain                                   # dvc repro
    python -m flows.retrain --set train.epochs=20 --name e20  # dvc exp run -n e20 -S train.epochs=20
    python -m flows.retrain --metric f1_macro --margin 0.01   # promotion settings (defaults below)
    python -m flows.retrain --git-remote origin --revision main   # shared: see flows/shared.py

Without a Prefect server configured (PREFECT_API_URL), Prefect starts its own for the run.

With a git remote (`git_remote`, the `shared-retrain` deployment), the run is shared with other machines
(flows/shared.py): the checkout follows the remote's revision, every run is a DVC experiment pushed to the git
remote with its data in the DVC remote, and the champion is DVC's model registry's (flows/registry.py).
Without one, everything stays in this checkout: `dvc repro`, and the champion in models/champion/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import flows  # noqa: F401, I001  first: sets DO_NOT_TRACK before Prefect is imported
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from ruamel.yaml import YAML

from flows import champion, publish, registry, shared
from flows.pipeline import LockTimeout, StageFailed, dvc_command, run_pipeline
from flows.remote import RemoteError

PROJECT = Path(__file__).resolve().parents[1]
# A failed download is retried after 10 s, then 60 s: long enough for a network blip or a
# restarting mirror to pass. No other stage is retried: their failures are not transient.
DOWNLOAD_RETRY_DELAYS = [10.0, 60.0]
# A `dvc repro` by hand in the same checkout may take a while: a flow run waits this long for it.
DEFAULT_LOCK_TIMEOUT_SECONDS = 3600.0


def download_failed(task, task_run, state) -> bool:
    """Retry the pipeline only when it failed in download, before any other stage ran."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, StageFailed) and error.stage == "download"


@task(retries=len(DOWNLOAD_RETRY_DELAYS), retry_delay_seconds=DOWNLOAD_RETRY_DELAYS, retry_condition_fn=download_failed)
def reproduce(project: Path, overrides: list[str], experiment: str | None, lock_timeout: float) -> dict:
    """Run `dvc repro` (or `dvc exp run -S ...`), each output line logged under its stage; what ran and what was skipped."""
    logger = get_run_logger()
    command = dvc_command(overrides, experiment)
    logger.info("$ %s", " ".join(command))
    run = run_pipeline(command, project, lambda stage, line: logger.info("[%s] %s", stage or "dvc", line),
                       on_wait=logger.warning, lock_timeout=lock_timeout)
    logger.info("stages run: %s; up to date: %s", ", ".join(run.ran) or "none", ", ".join(run.skipped) or "none")
    return {"ran": run.ran, "skipped": run.skipped}


@task
def sync_checkout(project: Path, git_remote: str, revision: str) -> str:
    """The worker's clone brought to the deployment's revision of the shared git remote; its commit."""
    commit = shared.sync_checkout(project, git_remote, revision)
    get_run_logger().info("%s at %s/%s, commit %s", project, git_remote, revision, commit[:12])
    return commit


@task(retries=len(DOWNLOAD_RETRY_DELAYS), retry_delay_seconds=DOWNLOAD_RETRY_DELAYS, retry_condition_fn=download_failed)
def reproduce_shared(project: Path, overrides: list[str], experiment: str, git_remote: str,
                     lock_timeout: float) -> dict:
    """The pipeline stage by stage, each pushed to the DVC remote as it finishes, then saved and pushed as a DVC
    experiment (flows/shared.py); what ran, what was restored from the remote or skipped, the experiment's commit."""
    logger = get_run_logger()
    run = shared.reproduce_and_share(project, overrides, experiment, git_remote,
                                     lambda stage, line: logger.info("[%s] %s", stage or "dvc", line),
                                     logger.warning, lock_timeout)
    logger.info("stages run: %s; restored or up to date: %s; experiment %s (commit %s) pushed to %s",
                ", ".join(run.ran) or "none", ", ".join(run.skipped) or "none", experiment, run.commit[:12],
                git_remote)
    return {"ran": run.ran, "skipped": run.skipped, "commit": run.commit}


@task
def promote_in_registry(project: Path, challenger: registry.Challenger, metric: str, margin: float,
                        max_epsilon: float | None) -> registry.Outcome:
    """Decide against the champion registered in the shared git remote; register and assign prod when better."""
    outcome = registry.promote_if_better(project, challenger, metric, margin, max_epsilon)
    registry.refresh_champion_cache(project)
    get_run_logger().info("%s (recorded as %s)", outcome.reason, outcome.record)
    return outcome


@task
def publish_results(project: Path, decision: champion.Decision, champion_before: dict | None, about: dict) -> dict:
    """Publish the per-class table, the summary and the report link; the metrics they came from."""
    metrics = publish.read_metrics(project)
    publish.publish_per_class(project)
    publish.publish_summary(publish.summary_markdown(metrics, champion_before, decision, about))
    publish.publish_report_link(project, about.get("experiment"))
    return metrics


@task
def promote_if_better(project: Path, decision: champion.Decision, provenance: dict) -> str:
    """Promote the workspace's model when the decision says so; the run's verdict, logged."""
    logger = get_run_logger()
    if decision.promote:
        folder = champion.promote(project, provenance)
        logger.info("promoted to champion (%s): %s", folder, decision.reason)
    else:
        logger.info("not promoted: %s", decision.reason)
    return decision.reason


@flow(name="retrain")
def retrain(
    overrides: list[str] | None = None,
    experiment_name: str | None = None,
    promotion_metric: str = "accuracy",
    promotion_margin: float = 0.0,
    max_epsilon: float | None = None,
    project_dir: str | None = None,
    download_retry_delays: list[float] | None = None,
    lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
    git_remote: str | None = None,
    revision: str = "main",
) -> dict:
    """Retrain through DVC (an experiment when overrides are given), publish the metrics, promote a better model.

    overrides: `key=value` params, as `dvc exp run -S` takes them (`train.epochs=20`).
    promotion_metric, promotion_margin: a run is promoted when its metric (a key of
        reports/metrics.json) exceeds the champion's by more than the margin.
    max_epsilon: never promote a model whose privacy budget ε is above this (a model trained without
        differential privacy counts as ε = ∞); None: any model.
    lock_timeout_seconds: how long to wait for DVC's lock while another DVC process in the checkout
        holds it (a `dvc repro` by hand), before the run fails.
    git_remote, revision: share the run (flows/shared.py): the checkout is brought to `revision` (a branch, tag
        or commit) of this git remote, the run is a DVC experiment pushed there with its data in the DVC remote,
        and the champion is the one registered there (flows/registry.py). None: this checkout alone.
    """
    project = Path(project_dir).resolve() if project_dir else PROJECT
    if git_remote:
        return retrain_shared(project, list(overrides or []), experiment_name, promotion_metric, promotion_margin,
                              max_epsilon, git_remote, revision, lock_timeout_seconds)
    overrides = list(overrides or [])
    experiment = (experiment_name or f"retrain-{datetime.now():%Y%m%d-%H%M%S}") if overrides else None
    delays = DOWNLOAD_RETRY_DELAYS if download_retry_delays is None else download_retry_delays
    stages = reproduce.with_options(retries=len(delays), retry_delay_seconds=delays or 0)(
        project, overrides, experiment, lock_timeout_seconds)

    metrics = publish.read_metrics(project)
    champion_before = champion.champion_metrics(project)
    decision = champion.decide(metrics, champion_before, promotion_metric, promotion_margin, max_epsilon)
    about = {"experiment": experiment or "workspace (dvc repro)", "git commit": git_commit(project),
             "overrides": " ".join(overrides) or "none", "stages run": ", ".join(stages["ran"]) or "none (up to date)"}
    publish_results(project, decision, champion_before, about)
    verdict = promote_if_better(project, decision, provenance(project, experiment, overrides, metrics, decision))
    return {"metrics": metrics, "promoted": decision.promote, "reason": verdict, "experiment": experiment}


def retrain_shared(project: Path, overrides: list[str], experiment_name: str | None, metric: str, margin: float,
                   max_epsilon: float | None, git_remote: str, revision: str, lock_timeout: float) -> dict:
    """A run shared through the git remote, the DVC remote and the model registry (flows/shared.py)."""
    commit = sync_checkout(project, git_remote, revision)
    registry.refresh_champion_cache(project)  # the report compares the run with the registered champion
    # Unique across machines: two workers starting in the same second still name their experiments apart.
    experiment = experiment_name or f"retrain-{datetime.now():%Y%m%d-%H%M%S}-{flow_run.name}"
    stages = reproduce_shared(project, overrides, experiment, git_remote, lock_timeout)
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    challenger = registry.Challenger(stages["commit"], experiment, overrides, meta.get("data_sha256"),
                                     str(flow_run.id), flow_run.name)
    outcome = promote_in_registry(project, challenger, metric, margin, max_epsilon)
    metrics = publish.read_metrics(project)
    about = {"experiment": experiment, "git commit": f"{commit} ({git_remote}/{revision})",
             "experiment commit": stages["commit"], "overrides": " ".join(overrides) or "none",
             "stages run": ", ".join(stages["ran"]) or "none (restored or up to date)",
             "registry": outcome.record + (f", registered as {outcome.version}" if outcome.version else "")}
    publish_results(project, outcome.decision, outcome.champion.metrics if outcome.champion else None, about)
    return {"metrics": metrics, "promoted": outcome.decision.promote, "reason": outcome.reason,
            "experiment": experiment, "version": outcome.version}


def provenance(project: Path, experiment: str | None, overrides: list[str], metrics: dict,
               decision: champion.Decision) -> dict:
    """Where a champion came from: code, experiment, params, data, and the run that promoted it."""
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    return {
        "git_commit": git_commit(project),
        "experiment": experiment,
        "overrides": overrides,
        "params": YAML(typ="safe", pure=True).load((project / "params.yaml").read_text()),
        "data_sha256": meta.get("data_sha256"),
        "metrics": metrics,
        "promotion": {"metric": decision.metric, "reason": decision.reason, "previous": decision.champion},
        "flow_run": {"id": str(flow_run.id), "name": flow_run.name},
        "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def git_commit(project: Path) -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True)
    return head.stdout.strip() if head.returncode == 0 else "none (not a git repository)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override, as `dvc exp run -S` takes it; repeat for several")
    parser.add_argument("--name", help="the DVC experiment's name (with --set; default retrain-<date>-<time>)")
    parser.add_argument("--metric", default="accuracy", help="promotion metric, a key of reports/metrics.json")
    parser.add_argument("--margin", type=float, default=0.0, help="by how much the champion must be beaten")
    parser.add_argument("--max-epsilon", type=float, metavar="EPSILON",
                        help="never promote a model with a larger privacy budget ε (a non-private one counts as ∞)")
    parser.add_argument("--project", help="the project folder (default: the one holding flows/)")
    parser.add_argument("--lock-timeout", type=float, default=DEFAULT_LOCK_TIMEOUT_SECONDS, metavar="SECONDS",
                        help="how long to wait while another DVC process holds the checkout's lock")
    parser.add_argument("--git-remote", metavar="REMOTE", help="share the run through this git remote, the DVC "
                        "remote and the model registry (README \"Several machines\"); default: this checkout alone")
    parser.add_argument("--revision", default="main", help="with --git-remote: the branch, tag or commit to run")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    try:
        outcome = retrain(overrides=args.overrides, experiment_name=args.name, promotion_metric=args.metric,
                          promotion_margin=args.margin, max_epsilon=args.max_epsilon, project_dir=args.project,
                          lock_timeout_seconds=args.lock_timeout, git_remote=args.git_remote, revision=args.revision)
    except (StageFailed, LockTimeout, RemoteError, registry.RegistryError, shared.CheckoutBusy) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        # DVC and its stage were stopped and waited for (flows.pipeline.stop); what DVC finished is in dvc.lock.
        # (On SIGTERM the same happens, then Prefect lets the signal end the process.)
        sys.exit("stopped: dvc and its stage ended with this run; the next run starts where DVC left off")
    print(("promoted: " if outcome["promoted"] else "not promoted: ") + outcome["reason"])


if __name__ == "__main__":
    main()
