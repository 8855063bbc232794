"""Sharing a checkout's results through DVC's remote (S3 or any S3-compatible server, README "Shared
storage: a DVC remote on S3"): push the cache, push an experiment, pull either back. Each is DVC's own
command run in the checkout; a failure becomes one RemoteError whose message is one line naming the
remote, its URL and endpoint, what went wrong and what to do.

A failed push loses nothing: DVC uploads from its local cache and never removes from it, so the
results stay there and the same call pushes them once the remote is fixed (tests/test_remote.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dvc.config import Config, ConfigError
from dvc.exceptions import DvcException
from dvc.repo import Repo
from dvc_data.hashfile.tree import Tree

# botocore's attempts per request, where the environment does not choose: s3fs (under dvc-s3) already
# tries each request 5 times, retrying timeouts, refused connections and throttling, and botocore's
# default of 5 attempts inside each of those made an endpoint that accepts connections but never answers
# cost 25 read timeouts of 15 s: `dvc push` failed after 7 min; with 1 attempt, after 79 s, and after
# 14 s with `dvc remote modify <remote> read_timeout 2` (and connect_timeout, the same for an address
# that never accepts). A refused connection fails within seconds either way.
BOTOCORE_ATTEMPTS = "1"

# What went wrong, read from DVC's error; each has its own advice in RemoteError.
CREDENTIALS, BUCKET, ENDPOINT, NO_REMOTE, GIT_REMOTE, OTHER = (
    "credentials", "bucket", "endpoint", "no remote", "git remote", "other")
PROBLEM_PATTERNS = {
    NO_REMOTE: re.compile(r"no remote specified|remote '[^']*' doesn't exist"),
    GIT_REMOTE: re.compile(r"Git failed to (push|fetch)|No git repository was found"),
    # A HEAD request's 403 carries no error code, only "Forbidden" (what `dvc pull` meets first).
    CREDENTIALS: re.compile(r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|InvalidToken|ExpiredToken"
                            r"|Unable to locate credentials|Forbidden"),
    BUCKET: re.compile(r"NoSuchBucket|bucket does not exist"),
    ENDPOINT: re.compile(r"Could not connect to the endpoint URL|(Read|Connect) timeout on endpoint URL"
                         r"|Connection was closed"),
}
# What DVC writes before the cause, by command: push, exp push, pull.
DVC_PREFIXES = re.compile(r"^(unexpected error - |failed to push cache: |failed to connect to s3 \([^)]*\) - "
                          r"|failed to (push|pull) data (to|from) the cloud - )")
# botocore's "An error occurred (Code) when calling the Op operation: text", shortened to "Code: text".
BOTOCORE_ERROR = re.compile(r"An error occurred \((?P<code>[\w.]+)\) when calling the \w+ operation: (?P<text>.*)")


@dataclass(frozen=True)
class Remote:
    """A DVC remote as the checkout's configuration (all levels: system, global, repo, local) has it."""

    name: str
    url: str
    endpoint: str | None  # None: the cloud's own endpoint (AWS S3's for s3:// URLs)

    def __str__(self) -> str:
        where = f"endpoint {self.endpoint}" if self.endpoint else "the provider's default endpoint"
        return f"DVC remote '{self.name}' ({self.url}, {where})"

    @property
    def bucket(self) -> str:
        return re.sub(r"^\w+://", "", self.url).split("/", 1)[0]


class RemoteError(RuntimeError):
    """A DVC command on a remote failed; str() is one line: the remote, the cause, what to do.

    `problem` is one of CREDENTIALS, BUCKET, ENDPOINT, NO_REMOTE, GIT_REMOTE, OTHER.
    """

    def __init__(self, command: str, problem: str, remote: Remote | None, cause: str, advice: str):
        self.command, self.problem, self.remote, self.cause = command, problem, remote, cause
        target = f" with {remote}" if remote else ""
        super().__init__(f"`{command}`{target} failed: {cause}; {advice}")


# --- what the flow calls ------------------------------------------------------------------------


def push_cache(project: Path, remote: str | None = None, run_cache: bool = False) -> str:
    """Upload the checkout's DVC cache for its workspace (what dvc.lock names) to the remote (default:
    the default remote), with DVC's run-cache too when asked (what lets `dvc repro --pull` elsewhere restore a
    stage that ran here instead of running it); DVC's summary ("3 files pushed"). Raises RemoteError."""
    keep = "the results stay in the local cache: push again once fixed"
    summary = run_dvc(project, ["push", *remote_option(remote), *(["--run-cache"] if run_cache else [])], remote, keep)
    if run_cache:
        summary += f"; {push_uncached_outputs(project, remote, keep)} files of cache: false outputs"
    return summary


def push_uncached_outputs(project: Path, remote: str | None, keep: str) -> int:
    """DVC's run-cache records every output of a stage, those it leaves to git (`cache: false`: the metrics, the
    tables) too, and keeps a copy of them in the local cache; `dvc push --run-cache` sends the record but not
    those copies, so elsewhere `dvc repro --pull` finds the run, misses its metrics and runs the stage again.
    They are pushed here, through DVC's own transfer; how many were sent."""
    try:
        with Repo(str(project)) as repo:
            hashes = set()
            for output in (out for stage in repo.index.stages for out in stage.outs if not out.use_cache):
                hashes |= objects_of(repo, output.hash_info)
            return len(repo.cloud.push(hashes, remote=remote).transferred)
    except DvcException as error:
        raise remote_error(project, "dvc push (cache: false outputs)", dvc_error(str(error)), remote, keep,
                           None) from None


def push_experiment(project: Path, experiment: str, git_remote: str = "origin", remote: str | None = None) -> str:
    """`dvc exp push`: the experiment's git refs to git_remote, then its data to the DVC remote; DVC's
    summary. Raises RemoteError.

    DVC pushes the refs first: when the data upload then fails, the experiment is listed in the git
    remote without its data until this is called again. push_cache right after `dvc exp run` (whose
    outputs the workspace then holds) uploads the data before anyone can see the experiment.
    """
    return run_dvc(project, ["exp", "push", *remote_option(remote), git_remote, experiment], remote,
                   "the experiment and its data stay in this checkout: push it again once fixed",
                   git_remote=git_remote)


def pull(project: Path, remote: str | None = None) -> str:
    """Download what the workspace's dvc.lock names from the remote into the cache and the workspace;
    DVC's summary. Raises RemoteError."""
    return run_dvc(project, ["pull", *remote_option(remote)], remote, "pull again once fixed")


def pull_experiment(project: Path, experiment: str, git_remote: str = "origin", remote: str | None = None) -> str:
    """`dvc exp pull`: the experiment's git refs from git_remote and its data from the DVC remote into
    the cache (the workspace is unchanged: `dvc exp apply` puts it there); DVC's summary. Raises
    RemoteError. Called again after a failed data download, it downloads the data of refs it already has."""
    return run_dvc(project, ["exp", "pull", *remote_option(remote), git_remote, experiment], remote,
                   "pull it again once fixed", git_remote=git_remote)


def objects_of(repo: Repo, hash_info) -> set:
    """An output's objects in the local cache: the file's, or a folder's listing and each of its files' (DVC's
    transfer sends what it is given, not what a listing names). None where the cache lacks them: an output of a
    stage whose run DVC did not record (its other outputs include a `cache: false` one that is no metric or plot)."""
    if not hash_info or not repo.cache.local.exists(hash_info.value):
        return set()
    if not hash_info.isdir:
        return {hash_info}
    return {hash_info, *(entry for _, _, entry in Tree.load(repo.cache.local, hash_info))}


# --- running DVC --------------------------------------------------------------------------------


def remote_option(remote: str | None) -> list[str]:
    return ["--remote", remote] if remote else []


def dvc_environment() -> dict[str, str]:
    """This process's environment, with botocore's attempts bounded unless it sets them (see
    BOTOCORE_ATTEMPTS)."""
    return {"AWS_MAX_ATTEMPTS": BOTOCORE_ATTEMPTS, **os.environ}


def run_dvc(project: Path, args: list[str], remote: str | None, keep: str, git_remote: str | None = None) -> str:
    """`dvc <args>` in the project (this interpreter's DVC); its output, or RemoteError from its error."""
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=dvc_environment(),
                          capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return done.stdout.strip()
    raise remote_error(project, f"dvc {' '.join(args)}", dvc_error(done.stdout + done.stderr), remote, keep,
                       git_remote)


def dvc_error(output: str) -> str:
    """DVC's error from its output: its first `ERROR:` line without DVC's prefixes, and botocore's
    text once, shortened (DVC writes "text: An error occurred (Code) when calling the Op operation: text")."""
    errors = [line.removeprefix("ERROR: ") for line in output.splitlines() if line.startswith("ERROR: ")]
    error = errors[0] if errors else (output.strip().splitlines() or ["no output"])[-1]
    error = DVC_PREFIXES.sub("", error)
    if botocore := BOTOCORE_ERROR.search(error):
        code = botocore["code"]  # a HEAD request's error has no body: its code is the HTTP status
        return f"HTTP {code} {botocore['text']}" if code.isdigit() else f"{code}: {botocore['text']}"
    return error


def remote_error(project: Path, command: str, error: str, remote_name: str | None, keep: str,
                 git_remote: str | None) -> RemoteError:
    """The one-line RemoteError for DVC's error: its problem named, with what to do about it."""
    problem = next((name for name, pattern in PROBLEM_PATTERNS.items() if pattern.search(error)), OTHER)
    remote = configured_remote(project, remote_name)
    name = remote.name if remote else (remote_name or "<remote>")
    if problem == NO_REMOTE:
        missing = f"DVC remote '{remote_name}' is not" if remote_name else "no DVC remote is"
        return RemoteError(command, problem, None, f"{missing} configured in {project}",
                           f"add one with `dvc remote add -d storage s3://<bucket>/<path>` (README \"Shared "
                           f"storage: a DVC remote on S3\"); {keep}")
    if problem == CREDENTIALS:
        cause = f"the credentials were refused or are missing ({error})"
        advice = (f"give the right ones with `dvc remote modify --local {name} access_key_id ...` and "
                  "`secret_access_key ...`, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    elif problem == BUCKET:
        bucket = remote.bucket if remote else "<bucket>"
        cause = f"bucket '{bucket}' does not exist ({error})"
        advice = f"create it on the server, or point the remote at one with `dvc remote modify {name} url s3://...`"
    elif problem == ENDPOINT:
        cause = f"the endpoint does not answer ({error})"
        advice = (f"check that the server is up and that `dvc remote modify {name} endpointurl` is its address; "
                  f"each request is tried 5 times, each try bounded by `dvc remote modify {name} connect_timeout` "
                  "and `read_timeout` (seconds)")
    elif problem == GIT_REMOTE:
        cause = f"git remote '{git_remote}' failed ({error})"
        advice = "check it with `git remote -v` and `git ls-remote`"
        remote = None  # the DVC remote was not reached
    else:
        cause, advice = error, f"`{command}` in {project} shows DVC's whole output"
    return RemoteError(command, problem, remote, cause, f"{advice}; {keep}")


def configured_remote(project: Path, name: str | None) -> Remote | None:
    """The named remote, or the default one, as the checkout's DVC configuration has it; None when
    there is none or the configuration cannot be read (DVC's error then says why)."""
    try:
        config = Config(dvc_dir=str(project / ".dvc"))
    except ConfigError:
        return None
    name = name or config["core"].get("remote")
    settings = config["remote"].get(name) if name else None
    if not settings:
        return None
    return Remote(name, settings["url"], settings.get("endpointurl"))
