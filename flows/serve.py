"""Serve the retraining flow on the schedule in prefect.yaml, no worker needed.

    export PREFECT_API_URL=http://127.0.0.1:4200/api && prefect server start --background
    python -m flows.serve                  # prefect.yaml's cron (nightly), parameters and concurrency
    python -m flows.serve --interval 600   # every 10 minutes instead, to try it out

Schedules fire only against a real server (`prefect server start`): Prefect's temporary
server has no scheduler. Stopping this process (Ctrl-C, SIGTERM) cancels a run in progress but
leaves the schedule active, so a restart carries on with the next scheduled run.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.schedules import Cron, Interval, Schedule
from ruamel.yaml import YAML

from flows.retrain import retrain

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
DEPLOYMENT = "nightly-retrain"


def deployment_config(name: str = DEPLOYMENT, path: Path = PREFECT_YAML) -> dict:
    """The deployment's entry in prefect.yaml, the one configuration `prefect deploy` reads too."""
    config = YAML(typ="safe", pure=True).load(path.read_text())
    for deployment in config.get("deployments") or []:
        if deployment["name"] == name:
            return deployment
    raise KeyError(f"{path} has no deployment named {name!r}")


def serve_options(config: dict, interval_seconds: float | None = None) -> dict:
    """Keyword arguments for `retrain.to_deployment` from a prefect.yaml deployment entry; an
    interval, when given, replaces its schedules."""
    if interval_seconds:
        schedules: list[Schedule] = [Interval(timedelta(seconds=interval_seconds))]
    else:
        schedules = [Cron(entry["cron"], timezone=entry.get("timezone"), active=entry.get("active", True))
                     for entry in config.get("schedules") or []]
    limit = config.get("concurrency_limit")
    return {
        "name": config["name"],
        "description": config.get("description"),
        "tags": config.get("tags"),
        "schedules": schedules,
        "parameters": config.get("parameters") or {},
        "concurrency_limit": ConcurrencyLimitConfig(**limit) if limit else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deployment", default=DEPLOYMENT, help="which deployment of prefect.yaml to serve")
    parser.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS instead of the cron")
    args = parser.parse_args()
    options = serve_options(deployment_config(args.deployment), args.interval)
    # pause_on_shutdown=False: Prefect's default pauses the schedule when this process stops, and
    # it stays paused after a restart, which would silently end nightly retraining.
    # flow.serve calls the deployment's concurrency limit `global_limit`.
    retrain.serve(global_limit=options.pop("concurrency_limit"), **options, pause_on_shutdown=False)


if __name__ == "__main__":
    main()
