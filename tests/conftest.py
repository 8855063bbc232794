"""Fixtures shared by the tests: a throw-away project folder to run stages in, a closed port,
a local HTTP server, and a tiny project taken through download, augment and train once per
session. The data they work on comes from tests/datamaker.py."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from datamaker import PROJECT_ROOT, make_image_folder, write_params

# The tests import `stages` from this checkout, as the stage subprocesses do, installed or not.
sys.path.insert(0, str(PROJECT_ROOT))

from bench.processes import stage_command  # noqa: E402  (from the checkout, as above)

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

TINY_CLASSES = ("cat", "dog", "owl")
# Params small enough for a whole train run to take well under a second on one core; 16 px is
# the smallest image lenet takes.
TINY_PARAMS = {
    "data.image_size": 16,
    "augment.preview_images": 4,
    "train.widths": [8, 16, 16],
    "train.epochs": 2,
    "train.batch_size": 16,
    "train.device": "cpu",
    "train.threads": 1,
    "evaluate.batch_size": 5,
    "compress.batch_size": 8,
    "compress.latency_repeats": 3,
}
AUGMENTED_PARAMS = {**TINY_PARAMS, "augment.copies": 2, "augment.policy": "trivialaugment"}  # augmented_project's
# Tiny tensors gain nothing from a second thread, and OpenMP threads that spin-wait for each
# other run ~100x slower when another job shares the CPU (train.threads does this for train).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


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

    def run_stage(self, stage: str, cwd: Path | None = None, env: dict[str, str] | None = None):
        """The stage with dvc.yaml's command line, run in the project; from another cwd, with its paths
        made absolute."""
        _python, _dash_m, module, *args = stage_command(stage)
        if cwd is not None:
            args = [arg if arg.startswith("-") else str(self.root / arg) for arg in args]
        return self.run(module, *args, cwd=cwd, env=env)

    def download(self, cwd: Path | None = None, env: dict[str, str] | None = None):
        return self.run_stage("download", cwd=cwd, env=env)

    def augment(self):
        return self.run_stage("augment", env=ONE_THREAD)

    def train(self):
        return self.run_stage("train")

    def evaluate(self):
        return self.run_stage("evaluate", env=ONE_THREAD)

    def compress(self):
        return self.run_stage("compress", env=ONE_THREAD)

    @property
    def augmented(self) -> Path:
        return self.root / "data" / "augmented"

    @property
    def model(self) -> Path:
        return self.root / "models" / "model.pt"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def copy(self, root: Path, *paths: str) -> Project:
        """A new project in root holding copies of these files and folders of this one."""
        for relative in paths:
            source, target = self.root / relative, root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
        return Project(root)

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


# --- one tiny project taken through the stages once, for the augment, train and evaluate tests ---
# The project folders are plain folders, not git repositories: DVCLive then only writes its files.


def prepare_tiny_set(root: Path, per_class: int, test_per_class: int, overrides: dict | None = None) -> Project:
    """A project whose data/prepared the real download stage made from a generated image folder
    of TINY_CLASSES (20x18 px images, prepared at 16 px); params TINY_PARAMS plus overrides."""
    project = Project(root)
    make_image_folder(root / "images", classes=TINY_CLASSES, per_class=per_class, test_per_class=test_per_class,
                      size=(20, 18))
    project.write_params({**TINY_PARAMS, "data.source": "images", **(overrides or {})})
    result = project.download()
    assert result.returncode == 0, result.stderr
    return project


@pytest.fixture(scope="session")
def augmented_project(tmp_path_factory) -> Project:
    """30 training and 12 test images prepared, then two trivialaugment copies of each training image."""
    project = prepare_tiny_set(tmp_path_factory.mktemp("augmented"), per_class=10, test_per_class=4,
                               overrides=AUGMENTED_PARAMS)
    result = project.augment()
    assert result.returncode == 0, result.stderr
    return project


@pytest.fixture(scope="session")
def trained_project(augmented_project, tmp_path_factory) -> Project:
    """A copy of augmented_project after a real train run: convnet, sgd, precision auto, on the CPU."""
    project = augmented_project.copy(tmp_path_factory.mktemp("trained"), "params.yaml", "data")
    result = project.train()
    assert result.returncode == 0, result.stderr
    return project


def finished(runs: dict, name: str) -> Project:
    """The project of run `name` from a dict of (project, finished process), which must have succeeded."""
    project, result = runs[name]
    assert result.returncode == 0, result.stderr
    return project


# --- a real browser -------------------------------------------------------------------------

# Debian's packages (`apt-get install chromium chromium-driver`), which .ci/run installs.
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Headless, and as root (CI) without the sandbox; no background connections, which a closed
# network refuses by the dozen.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900")


@pytest.fixture(scope="module")
def browser():
    """Chromium driven through chromedriver (selenium), keeping the page's console log."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        message = f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (.ci/run installs them)")
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()
