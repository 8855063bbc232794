"""Sharing results through a DVC remote on S3 (flows/remote.py; README "Shared storage: a DVC remote
on S3"), against moto's real S3 API on 127.0.0.1 (tests/s3_server.py) with a bare git repository on
disk as the git remote.

One committed copy of the project is reproduced on tiny generated images and pushed, as a user
would; its clones stand for the other machines. The failures are tried on that same copy, each
setting broken in .dvc/config.local (or the environment) and put back after.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from s3_server import S3Server
from test_flows import make_repo
from test_pipeline import stages_run

from flows import remote
from stages.models import load_checkpoint

pytest_plugins = ["s3_server"]  # its fixtures: s3_server, s3_environment, silent_endpoint

EXPERIMENT = "one-epoch"
# An endpoint that never answers fails after 5 tries of these seconds each (flows/remote.py).
TIMEOUT_SECONDS = 2


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command in cwd, which must succeed; its finished process."""
    done = subprocess.run(command, cwd=cwd, env=env or os.environ, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def git(repo: Path, *args: str) -> str:
    return run(["git", *args], repo).stdout


@dataclass(frozen=True)
class Shared:
    """The machine that reproduced the pipeline and pushed its results: to S3, and to a bare git
    repository (origin) its clones come from."""

    repo: Path
    origin: Path
    url: str  # the DVC remote's, s3://bucket/cache


@pytest.fixture(scope="module")
def shared(s3_server, tmp_path_factory) -> Shared:
    """A committed copy of the project after `dvc repro`, its DVC remote on the S3 server committed,
    pushed with `dvc push` and `git push`."""
    workdir = tmp_path_factory.mktemp("remote")
    env = s3_server.environment()
    repo = reproduced_project(workdir, env)
    url = f"s3://{s3_server.create_bucket('results')}/cache"
    run(["dvc", "remote", "add", "-d", "storage", url], repo, env)  # as the README says; the credentials
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3_server.endpoint_url], repo, env)  # in env
    git(repo, "add", ".dvc/config")
    git(repo, "commit", "-qm", "DVC remote on S3")
    pushed = run(["dvc", "push"], repo, env)
    assert "files pushed" in pushed.stdout, pushed.stdout
    origin = workdir / "origin.git"
    git(workdir, "init", "-q", "--bare", "-b", "main", str(origin))
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "push", "-q", "origin", "main")
    return Shared(repo, origin, url)


def reproduced_project(workdir: Path, env: dict[str, str]) -> Path:
    """A committed copy of the project whose data source, ../images.tar.gz, is tiny (tests/test_flows.py's
    make_repo), after one `dvc repro`."""
    repo = make_repo(workdir)
    run(["dvc", "repro"], repo, env)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "results")
    return repo


def clone(shared: Shared, path: Path) -> Path:
    """A fresh `git clone` of origin: another machine, with nothing in its DVC cache."""
    run(["git", "clone", "-q", str(shared.origin), str(path)], path.parent)
    git(path, "config", "user.email", "tests@example.com")
    git(path, "config", "user.name", "Tests")
    return path


def dvc_metrics(repo: Path) -> dict:
    return json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)


# --- results and experiments travel ---------------------------------------------------------------


def test_a_fresh_clone_pulls_the_results_and_reproduces_nothing(shared, s3_environment, tmp_path):
    machine = clone(shared, tmp_path / "machine")
    assert "added" in remote.pull(machine)
    repro = run(["dvc", "repro"], machine)
    assert stages_run(repro.stdout) == [], repro.stdout
    assert "Data and pipelines are up to date." in repro.stdout
    assert dvc_metrics(machine) == dvc_metrics(shared.repo)


@pytest.fixture
def pushed_experiment(shared, s3_environment, tmp_path) -> Path:
    """A clone that pulled the results, ran experiment EXPERIMENT (one epoch) and pushed it."""
    worker = clone(shared, tmp_path / "worker")
    remote.pull(worker)
    ran = run(["dvc", "exp", "run", "-n", EXPERIMENT, "-S", "train.epochs=1"], worker)
    assert stages_run(ran.stdout) == ["train", "evaluate", "compress", "report"], ran.stdout  # the rest pulled
    remote.push_experiment(worker, EXPERIMENT)
    return worker


def test_an_experiment_pushed_from_one_clone_is_pulled_with_its_model_in_another(pushed_experiment, shared, tmp_path):
    machine = clone(shared, tmp_path / "machine")
    remote.pull_experiment(machine, EXPERIMENT)
    shown = experiments_shown(machine)
    assert shown[EXPERIMENT]["params"]["params.yaml"]["data"]["train"]["epochs"] == 1
    (worker,) = dvc_metrics(pushed_experiment).values()  # the workspace's, where the experiment ran
    worker_metrics = worker["data"]["reports/metrics.json"]["data"]
    assert shown[EXPERIMENT]["metrics"]["reports/metrics.json"]["data"] == worker_metrics

    run(["dvc", "exp", "apply", EXPERIMENT], machine)
    model = machine / "models/model.pt"
    assert model.read_bytes() == (pushed_experiment / "models/model.pt").read_bytes()
    _, checkpoint = load_checkpoint(model)
    assert checkpoint["params"]["train"]["epochs"] == 1


def experiments_shown(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json`'s experiments by name: each one's params and metrics as DVC lists them."""
    baselines = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    return {experiment["name"]: experiment["revs"][0]["data"]
            for baseline in baselines for experiment in baseline.get("experiments") or []}


# --- failures: one line each, nothing lost, pushed once fixed -------------------------------------


@pytest.fixture
def repo(shared, s3_environment):
    """The shared project, with whatever a test sets in .dvc/config.local or .dvc/config undone after."""
    yield shared.repo
    (shared.repo / ".dvc/config.local").unlink(missing_ok=True)
    git(shared.repo, "checkout", "--", ".dvc/config")


def test_wrong_credentials_are_named_and_the_results_pushed_once_fixed(repo, shared, s3_environment, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    error = failed_push(repo)
    assert error.problem == remote.CREDENTIALS
    # DVC's first request decides what S3 answers: a listing's SignatureDoesNotMatch, a HEAD's bare 403.
    assert "SignatureDoesNotMatch" in error.cause or "HTTP 403 Forbidden" in error.cause
    assert_one_line(error, f"DVC remote 'storage' ({shared.url}, endpoint {s3_environment.endpoint_url})",
                    "the credentials were refused or are missing (",
                    "dvc remote modify --local storage access_key_id", "AWS_SECRET_ACCESS_KEY",
                    "the results stay in the local cache")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_environment.secret_access_key)
    assert_pushed_once_fixed(repo, s3_environment)


def test_a_missing_bucket_is_named_and_the_results_pushed_once_fixed(repo, s3_environment):
    dvc(repo, "remote", "modify", "--local", "storage", "url", "s3://no-such-bucket/cache")
    error = failed_push(repo)
    assert error.problem == remote.BUCKET
    assert_one_line(error, f"DVC remote 'storage' (s3://no-such-bucket/cache, endpoint {s3_environment.endpoint_url})",
                    "bucket 'no-such-bucket' does not exist", "NoSuchBucket", "dvc remote modify storage url",
                    "the results stay in the local cache")
    assert_pushed_once_fixed(repo, s3_environment)


@pytest.mark.parametrize("endpoint", ["refusing", "silent"])
def test_an_endpoint_that_does_not_answer_fails_within_seconds(endpoint, repo, shared, s3_environment, request):
    address = (f"http://127.0.0.1:{request.getfixturevalue('closed_port')}" if endpoint == "refusing"
               else request.getfixturevalue("silent_endpoint"))
    dvc(repo, "remote", "modify", "--local", "storage", "endpointurl", address)
    dvc(repo, "remote", "modify", "--local", "storage", "connect_timeout", str(TIMEOUT_SECONDS))
    dvc(repo, "remote", "modify", "--local", "storage", "read_timeout", str(TIMEOUT_SECONDS))
    started = time.monotonic()
    error = failed_push(repo)
    # 5 tries of 2 s, s3fs's backoff between them, DVC's start: ~14 s measured on a busy machine.
    assert time.monotonic() - started < 60
    assert error.problem == remote.ENDPOINT
    assert_one_line(error, f"DVC remote 'storage' ({shared.url}, endpoint {address})",
                    "the endpoint does not answer", "Read timeout" if endpoint == "silent" else "Could not connect",
                    "dvc remote modify storage endpointurl", "read_timeout", "the results stay in the local cache")
    dvc(repo, "remote", "modify", "--local", "storage", "endpointurl", s3_environment.endpoint_url)
    assert_pushed_once_fixed(repo, s3_environment)


def test_no_remote_configured_is_said_and_the_results_pushed_once_one_is(repo, s3_environment):
    dvc(repo, "remote", "remove", "storage")
    error = failed_push(repo)
    assert error.problem == remote.NO_REMOTE
    assert_one_line(error, f"no DVC remote is configured in {repo}", "dvc remote add -d storage s3://",
                    "the results stay in the local cache")
    git(repo, "checkout", "--", ".dvc/config")  # the remote as committed
    assert_pushed_once_fixed(repo, s3_environment)


def dvc(repo: Path, *args: str) -> None:
    run(["dvc", *args], repo)


def failed_push(repo: Path) -> remote.RemoteError:
    """push_cache's error, checking that the local cache lost nothing in the failure."""
    cached = cache_files(repo)
    with pytest.raises(remote.RemoteError) as raised:
        remote.push_cache(repo)
    assert cache_files(repo) == cached
    assert run(["dvc", "status"], repo).stdout.strip() == "Data and pipelines are up to date."
    return raised.value


def cache_files(repo: Path) -> dict[str, int]:
    """Every file in the DVC cache (ab/cdef...), with its size; it must hold the model."""
    cache = repo / ".dvc/cache/files/md5"
    files = {path.relative_to(cache).as_posix(): path.stat().st_size for path in cache.rglob("*") if path.is_file()}
    assert model_object(repo) in files
    return files


def model_object(repo: Path) -> str:
    """models/model.pt's file in the cache and the remote, as dvc.lock names it (ab/cdef...)."""
    lock = YAML(typ="safe", pure=True).load(repo / "dvc.lock")
    (md5,) = [out["md5"] for out in lock["stages"]["train"]["outs"] if out["path"] == "models/model.pt"]
    return f"{md5[:2]}/{md5[2:]}"


def assert_one_line(error: remote.RemoteError, *parts: str) -> None:
    message = str(error)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def assert_pushed_once_fixed(repo: Path, server: S3Server) -> None:
    """push_cache, on settings that work, uploads from the cache what the workspace's outputs need: to a new
    bucket, so that nothing the shared fixture pushed can stand in for it. (The cache holds more: the run
    cache's copies of outputs kept in git, such as reports/download.json, which `dvc push` leaves.)"""
    bucket = server.create_bucket("fixed")
    dvc(repo, "remote", "modify", "--local", "storage", "url", f"s3://{bucket}/cache")
    assert "files pushed" in remote.push_cache(repo)
    assert "are in sync" in run(["dvc", "status", "--cloud"], repo).stdout
    uploaded = {key.removeprefix("cache/files/md5/") for key in server.keys(bucket)}
    assert model_object(repo) in uploaded and uploaded <= set(cache_files(repo))
