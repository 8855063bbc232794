"""A real S3 API on 127.0.0.1 for the tests: moto's server mode (ThreadedMotoServer) in this process,
started by a fixture and stopped after it.

IAM authentication is switched on, so that a wrong key or secret is refused as S3 refuses it; the
fixture makes the one user whose key works. DVC and the other processes a test starts get that key, a
region and none of the user's ~/.aws through their environment: S3Server.environment().

Use in a test module, naming the module as a plugin (or importing the fixtures by name):

    pytest_plugins = ["s3_server"]  # fixtures s3_server, s3_environment, silent_endpoint
    from s3_server import add_remote

    def test_push(s3_server, tmp_path):
        repo = ...  # a DVC project
        add_remote(repo, s3_server, s3_server.create_bucket("results"), env=s3_server.environment())
        subprocess.run(["dvc", "push"], cwd=repo, env=s3_server.environment(), check=True, timeout=120)

PYTEST_DONT_REWRITE: this module has no assert to rewrite, and the marker spares the warning pytest gives
when a module imported by a test module is then named as a plugin.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

REGION = "us-east-1"  # buckets there need no LocationConstraint
START_SECONDS = 30.0  # for the server's thread to bind and answer; it takes well under a second
USER = "dvc-tests"
ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
# Variables through which botocore would find other credentials, settings or a proxy than the server's.
FOREIGN_VARIABLES = ("AWS_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
# The tests' own requests to the server go straight to it, whatever proxy the environment names.
NO_PROXY = Config(proxies={})
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_bucket_numbers = itertools.count(1)


@dataclass(frozen=True)
class S3Server:
    """moto's S3 on 127.0.0.1, requiring the one access key it made."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    aws_files: Path  # an empty AWS config and credentials file, standing in for ~/.aws's

    def environment(self, secret_access_key: str | None = None) -> dict[str, str]:
        """This process's environment for a process that talks to the server (`dvc push`): its
        credentials (or a wrong secret), the region, this interpreter's bin/ first on PATH (`dvc`, and
        `python` in dvc.yaml), and no AWS_* setting, ~/.aws file, instance metadata or proxy of the user's."""
        env = {key: value for key, value in os.environ.items() if not key.upper().startswith(FOREIGN_VARIABLES)}
        env.update({
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": secret_access_key or self.secret_access_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": str(self.aws_files / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.aws_files / "credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        })
        return env

    def client(self):
        """A boto3 S3 client with the working key."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION,
                            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key,
                            config=NO_PROXY)

    def create_bucket(self, prefix: str = "bucket") -> str:
        """A new empty bucket, named prefix-<n> (unique in this test session); its name."""
        name = f"{prefix}-{next(_bucket_numbers)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        """The keys of every object in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def add_remote(repo: Path, server: S3Server, bucket: str, env: dict[str, str], name: str = "storage",
               path: str = "cache") -> str:
    """`dvc remote add -d NAME s3://BUCKET/PATH` and `dvc remote modify NAME endpointurl ...` in repo,
    as README "Shared storage: a DVC remote on S3" says (credentials stay in the environment); the URL."""
    url = f"s3://{bucket}/{path}"
    for command in (["remote", "add", "-d", name, url], ["remote", "modify", name, "endpointurl", server.endpoint_url]):
        subprocess.run([sys.executable, "-m", "dvc", *command], cwd=repo, env=env, check=True, capture_output=True,
                       timeout=60)
    return url


# --- the fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """moto's S3 on 127.0.0.1 (a free port), authenticating requests; stopped after the session.

    One server however many modules use it: a module that imports this function (rather than naming the
    plugin) gets a fixture of its own, and moto's users, buckets and authentication switch belong to the
    process anyway, so every instance shares the first one's server and the last one stops it."""
    global _running, _users
    if _running is None:
        _running = start_server(tmp_path_factory.mktemp("aws"))
    _users += 1
    try:
        yield _running[1]
    finally:
        _users -= 1
        if _users == 0:
            stop_server(*_running)
            _running = None


@pytest.fixture
def s3_environment(s3_server, monkeypatch) -> S3Server:
    """s3_server, with this process's environment made its environment() for the test: what code
    that starts DVC itself (flows.remote) passes on."""
    for key in list(os.environ):
        if key.upper().startswith(FOREIGN_VARIABLES):
            monkeypatch.delenv(key)
    for key, value in s3_server.environment().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """http://127.0.0.1:PORT of a socket that takes connections and never answers: a hung server."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes the handshakes; nothing ever reads or writes
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


# --- starting the server --------------------------------------------------------------------------

_running: tuple[ThreadedMotoServer, S3Server] | None = None  # the server the s3_server fixtures share
_users = 0  # s3_server fixture instances using it


def start_server(aws_files: Path) -> tuple[ThreadedMotoServer, S3Server]:
    """moto's server started on 127.0.0.1 and answering, its one user's key made, authentication on."""
    for name in ("config", "credentials"):  # empty files: botocore refuses /dev/null, not being a file
        (aws_files / name).touch()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    # start() waits for its thread without a timeout, forever should the thread fail to bind: wait here.
    call_within(server.start, START_SECONDS, "moto's server did not start")
    host, port = server.get_host_and_port()
    endpoint_url = f"http://{host}:{port}"
    try:
        wait_until_answering(endpoint_url, START_SECONDS)
        access_key_id, secret_access_key = make_user_with_key(endpoint_url)
        set_authentication(endpoint_url, enabled=True)
    except BaseException:
        call_within(server.stop, START_SECONDS, "moto's server did not stop")
        raise
    return server, S3Server(endpoint_url, access_key_id, secret_access_key, aws_files)


def stop_server(server: ThreadedMotoServer, s3: S3Server) -> None:
    """Authentication off again (moto's setting is the process's), then the server stopped."""
    try:
        set_authentication(s3.endpoint_url, enabled=False)
    finally:
        call_within(server.stop, START_SECONDS, "moto's server did not stop")


def call_within(function, seconds: float, failure: str) -> None:
    """function() in a thread, failing the test if it has not returned within seconds."""
    thread = threading.Thread(target=function, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{failure} within {seconds:.0f} s")


def wait_until_answering(endpoint_url: str, seconds: float) -> None:
    """Until an HTTP request to the server gets any answer, for at most seconds."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            DIRECT.open(f"{endpoint_url}/moto-api/", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # an error status is an answer
        except OSError as error:
            if time.monotonic() > deadline:
                pytest.fail(f"moto's server at {endpoint_url} did not answer within {seconds:.0f} s: {error}")
            time.sleep(0.1)


def make_user_with_key(endpoint_url: str) -> tuple[str, str]:
    """An IAM user allowed every S3 action, and its access key id and secret (made before
    authentication is on, when moto takes any key)."""
    iam = boto3.client("iam", endpoint_url=endpoint_url, region_name=REGION, aws_access_key_id="bootstrap",
                       aws_secret_access_key="bootstrap", config=NO_PROXY)
    user = f"{USER}-{endpoint_url.rsplit(':', 1)[1]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(ALLOW_S3))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def set_authentication(endpoint_url: str, enabled: bool) -> None:
    """Switch moto's IAM authentication on (every request from now on) or off, through its API.
    The setting is moto's, for the whole process."""
    count = b"0" if enabled else b"inf"
    # text/plain: a form's content type would have the body parsed as a form, and moto reads none.
    request = urllib.request.Request(f"{endpoint_url}/moto-api/reset-auth", data=count, method="POST",
                                     headers={"Content-Type": "text/plain"})
    DIRECT.open(request, timeout=10).close()
