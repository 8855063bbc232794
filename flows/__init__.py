"""Prefect orchestration of the DVC pipeline: when it runs, what is retried, where results show.

    python -m flows.retrain [--set train.epochs=20 ...]   # one run, by hand
    prefect server start --background                     # Prefect's local server, in the background
    python -m flows.serve                                  # retrain on prefect.yaml's schedule
    python -m flows.worker --pool images-process           # or run the deployment on a worker

DVC still says what is computed (dvc.yaml, params.yaml); these modules only drive it.
"""

from __future__ import annotations

import os

# Nothing phones home. These machines are offline, and Prefect's client sends anonymous usage
# events unless DO_NOT_TRACK is set; it is an environment variable, not a Prefect setting, so
# it cannot live in prefect.toml and is set here, before any module of this package imports
# Prefect. The server's own heartbeat is switched off by prefect.toml (server.analytics_enabled).
os.environ.setdefault("DO_NOT_TRACK", "1")
