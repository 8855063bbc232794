"""Writing outputs atomically: to a temporary name beside the target, renamed on success.

A crash midway leaves the previous file or nothing, never half a file a later stage could
take for finished work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write to; it becomes `path` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_json(path: str | Path, content: dict) -> None:
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(content, indent=2) + "\n")
