"""One line of progress from a Ray Train worker, shown once on the driver.

Ray Train (2.60) replaces ``print`` in its workers with a function that logs through the root
logger *and*, because Ray's worker also swaps ``sys.stdout`` for its own stream, prints the line
again: every printed line reached the driver twice. In a worker the root logger already has Ray
Train's console handler (and its per-worker application log file), so logging the line shows it
once and keeps it in that file. Anywhere else (no handler on the root logger) it is printed.
"""

from __future__ import annotations

import logging

__all__ = ["say"]

_log = logging.getLogger("jin_orchestrate")


def say(line: str) -> None:
    """Show ``line`` once: through Ray Train's worker logging when configured, else ``print``."""
    if logging.getLogger().handlers and _log.isEnabledFor(logging.INFO):
        _log.info(line)
    else:
        print(line, flush=True)
