"""The files the stages write and read: written atomically, to a temporary name beside the target
renamed on success, and identified by their checksums.

A crash midway, or a `kill -9`, leaves the previous output or nothing, never half of one that a
later stage could take for finished work; the temporaries a killed run left behind are removed
by the next run that writes the same output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".part"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write to; it becomes `path` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_json(path: str | Path, content: dict) -> None:
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(content, indent=2) + "\n")


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """An empty temporary folder beside `path` to fill; it replaces `path` when the block ends without error."""
    partial = partial_folder(path)
    try:
        yield partial
        replace_folder(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def partial_folder(path: str | Path) -> Path:
    """A new hidden folder beside `path`, after removing those that killed runs left there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Only one run writes an output at a time (DVC's lock; a queued experiment has a workspace of
    # its own), so a partial folder of this output that exists now was left by a killed run.
    for leftover in path.parent.glob(f".{path.name}.*{PARTIAL_SUFFIX}"):
        shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent))


def replace_folder(partial: Path, path: str | Path) -> None:
    """Put the finished folder `partial` in the place of `path`. A kill between the two steps leaves no
    folder at `path`, which no stage takes for finished work."""
    partial.chmod(0o755)  # mkdtemp makes it private; the outputs are not
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in blocks (hashlib's own loop)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, algorithm).hexdigest()
