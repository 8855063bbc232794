"""Fixtures shared by the tests: a throw-away project folder to run stages in, a closed port
and a local HTTP server. The data they work on comes from tests/datamaker.py."""

from __future__ import annotations

import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from datamaker import PROJECT_ROOT, write_params

# The tests import `stages` from this checkout, as the stage subprocesses do, installed or not.
sys.path.insert(0, str(PROJECT_ROOT))

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def stage_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a stage runs in: this checkout importable, no proxy unless given."""
    env = {key: value for key, value in os.environ.items() if key.lower() not in PROXY_VARIABLES}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env.update(extra or {})
    return env


@dataclass
class Project:
    """A project folder holding a params.yaml, where stages run as DVC would run them."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def stats(self) -> Path:
        return self.root / "reports" / "download.json"

    def write_params(self, overrides: dict | None = None, remove: tuple[str, ...] = ()) -> Path:
        return write_params(self.root, overrides, remove)

    def run(self, module: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
        """`python -m <module> <args>` in the project (or cwd); the finished process."""
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=cwd or self.root,
            env=stage_environment(env),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def download(self, cwd: Path | None = None, env: dict[str, str] | None = None):
        """The download stage, with dvc.yaml's arguments made absolute."""
        return self.run(
            "stages.download", "--raw", str(self.raw), "--out", str(self.prepared), "--stats", str(self.stats),
            cwd=cwd, env=env,
        )

    def files_written(self) -> list[str]:
        """Every file under data/ and reports/ (hidden temporary ones included)."""
        return sorted(
            path.relative_to(self.root).as_posix()
            for folder in ("data", "reports")
            for path in (self.root / folder).rglob("*")
            if not path.is_dir()
        )


@pytest.fixture
def project(tmp_path: Path) -> Project:
    root = tmp_path / "project"
    root.mkdir()
    return Project(root)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture
def serve_folder():
    """serve_folder(folder) -> the base URL of an HTTP server on 127.0.0.1 serving folder;
    stop it with .shutdown() on the server it returns second."""
    servers = []

    def start(folder: Path) -> tuple[str, http.server.ThreadingHTTPServer]:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
