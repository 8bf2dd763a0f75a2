"""One line of progress from a Ray Train worker, shown once on the driver.

Ray Train (2.60) replaces ``print`` in its workers with a function that logs through the root
logger *and*, because Ray's worker also swaps ``sys.stdout`` for its own stream, prints the line
again: every printed line reached the driver twice. In a worker the root logger already has Ray
Train's console handler (and its per-worker application log file), so logging the line shows it
once and keeps it in that file. Anywhere else (no handler on the root logger) it is printed.

Ray Train also logs every ``ray.train.report`` of every worker at INFO with the whole metrics dict
(about 2,000 characters a line, one line per worker per report); `quiet_report_dumps` keeps only
that logger's warnings.
"""

from __future__ import annotations

import logging

__all__ = ["quiet_report_dumps", "say"]

_log = logging.getLogger("jin_orchestrate")


def say(line: str) -> None:
    """Show ``line`` once: through Ray Train's worker logging when configured, else ``print``."""
    if logging.getLogger().handlers and _log.isEnabledFor(logging.INFO):
        _log.info(line)
    else:
        print(line, flush=True)


def quiet_report_dumps() -> None:
    """Keep Ray Train's per-report metrics dumps off the console (its warnings still show).

    Ray Train 2.60 names that logger by its file path, so ``RunConfig(logging_config=...)``, which
    filters ``ray.train.*`` records, does not reach it. The metrics are in MLflow and in the
    progress lines already. Nothing happens with a Ray that has no such module.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
