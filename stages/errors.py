"""The one kind of error a stage reports as a message instead of a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


class StageError(Exception):
    """Bad input the user can fix: the message names the thing at fault and what is accepted."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a StageError becomes one line on stderr and exit status 1."""
    # force: a library (Opacus) may have given the root logger a handler of its own on import.
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", force=True)
    try:
        main()
    except StageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
