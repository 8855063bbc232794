"""`kill -9` of the whole `dvc repro` process group while any stage runs: nothing is left that DVC or a
later stage could take for finished, and the next `dvc repro` re-runs from the killed stage and ends
with exactly the metrics of an uninterrupted run.

Two committed copies of the project on the same tiny data, served slowly over HTTP so that the kill
lands mid-download: one reproduced without interruption (the reference), the other killed once in
every stage, each time as soon as the stage's own log line shows it at work, then reproduced again.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from datamaker import make_image_folder, make_tar_gz
from test_pipeline import STAGES, run, set_params, stages_run
from test_flows import make_repo

# A line each stage prints once it is at work, with work still ahead of it.
AT_WORK = {
    "download": "download: downloading http://",
    "augment": "augment: augmenting ",
    "train": "train: epoch 1/",
    "evaluate": "evaluate: scoring ",
    "compress": "compress: writing variant pruned",
    "report": "report: drawing the pictures",
}
# Each stage has a second or so of work after its line: tiny, but slowed where it is cheap to
# (batches of one image to score, many timed latency runs).
SLOW_PARAMS = {
    "augment": {"copies": 2, "policy": "trivialaugment", "preview_images": 4},
    "train": {"widths": [16, 32, 32], "epochs": 3, "batch_size": 16, "lr": 0.05, "threads": 1},
    "evaluate": {"batch_size": 1},
    "compress": {"batch_size": 8, "latency_repeats": 200},
}
CHUNK_BYTES, CHUNK_SECONDS = 16_384, 0.05  # the archive trickles at ~330 kB/s
TIMINGS = ("eval_seconds",)  # the only figures of reports/metrics.json that differ from run to run


class Trickle(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, source, destination) -> None:
        while block := source.read(CHUNK_BYTES):
            destination.write(block)
            time.sleep(CHUNK_SECONDS)

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture(scope="module")
def archive_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    images = make_image_folder(folder / "images", classes=("circle", "square", "stripes"), per_class=80,
                               split_test=False, size=(20, 20))
    make_tar_gz(images, folder / "images.tar.gz", wrap="images")
    handler = lambda *args, **kwargs: Trickle(*args, directory=str(folder), **kwargs)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/images.tar.gz"
    server.shutdown()
    server.server_close()


def slow_repo(root: Path, url: str) -> Path:
    repo = make_repo(root)
    set_params(repo, {**SLOW_PARAMS, "data": {"source": url, "image_size": 16, "test_fraction": 0.25}})
    run(["git", "commit", "-qam", "slow params"], repo)
    return repo


def metrics_without_timings(repo: Path) -> dict:
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    return {name: value for name, value in metrics.items() if name not in TIMINGS}


def kill_when(repo: Path, command: list[str], line: str, deadline_seconds: float = 300) -> str:
    """Start `command` in a session of its own, read its output until `line` appears, then SIGKILL the whole
    process group and wait for it; the output read."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    seen, deadline = [], time.monotonic() + deadline_seconds
    try:
        for output_line in process.stdout:
            seen.append(output_line)
            if line in output_line or time.monotonic() > deadline:
                break
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()
    assert line in "".join(seen), f"{line!r} never came:\n{''.join(seen)}"
    return "".join(seen)


def leftovers(repo: Path) -> list[str]:
    """Temporary outputs of killed runs (stages.outputs names them .<name>.<...>.part)."""
    return sorted(str(path.relative_to(repo)) for folder in ("data", "models", "reports")
                  for path in (repo / folder).rglob(".*.part"))


def test_a_kill_in_any_stage_leaves_nothing_finished_and_the_next_repro_recovers(archive_url, tmp_path):
    reference = slow_repo(tmp_path / "reference", archive_url)
    run(["dvc", "repro"], reference)
    expected = metrics_without_timings(reference)

    repo = slow_repo(tmp_path / "killed", archive_url)
    for stage in STAGES:
        output = kill_when(repo, ["dvc", "repro"], AT_WORK[stage])
        # After the kill in the stage before, this repro started with that stage again, and got as far as this one.
        assert stages_run(output)[-1] == stage, output
        assert stage == STAGES[0] or stages_run(output)[0] == STAGES[STAGES.index(stage) - 1], output
        # DVC sees the killed stage as not done, and so would anything that follows it.
        status = json.loads(run(["dvc", "status", "--json"], repo).stdout)
        assert stage in status, status
        if stage == "download":
            assert not (repo / "data/prepared").exists()
            assert not (repo / "data/raw/images.tar.gz").exists()  # the partial download is not the archive

    finished = run(["dvc", "repro"], repo)
    assert stages_run(finished.stdout) == ["report"]
    assert metrics_without_timings(repo) == expected
    assert run(["dvc", "status", "--json"], repo).stdout.strip() == "{}"
    assert leftovers(repo) == []
    assert not list((repo / "data/raw").glob(".*.part"))
