"""Bad data in a job: shards that cannot be opened, rows that do not decode, non-finite values.

``data.on_error`` decides what happens, through the whole pretraining path:

- ``"raise"``: the first bad shard, row group or row stops the job with an error naming the URL,
  row group, row, column and sample id (`jin_data.DataError`).
- ``"skip"``: bad data is left out and counted. jin-data's Ray Data path drops a shard whose
  schema cannot be read (truncated, or another data set's file) before training, and the row
  groups and rows that do not read or decode; and
  :class:`FiniteCheck` drops rows whose audio, points or custom vector hold NaN or Inf.

Counting skips that happen inside Ray Data's tasks: jin-data logs each one on the ``jin_data``
logger with the `DataError` as an argument (the number of rows first where it is a row group).
:func:`install_tally_handler`, run in every Ray worker process of the job (``runtime_env``'s
``worker_process_setup_hook``), adds a handler that forwards those records to the job's
:class:`DataErrorTally` actor. Training reads the totals from it and logs them (``[jin] data:``
lines and the MLflow metrics ``data/skipped_rows`` and ``data/skipped_rows/<ErrorType>``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jin_data import DataError, DecodeError

__all__ = [
    "TALLY_ENV",
    "DataErrorTally",
    "FiniteCheck",
    "TallyHandler",
    "install_tally_handler",
    "tally_metrics",
    "tally_runtime_env",
]

TALLY_ENV = "JIN_DATA_TALLY"
logger = logging.getLogger("jin_orchestrate.data")
# Numeric columns after decoding that a NaN or Inf would carry into the loss.
NUMERIC_COLUMNS = ("audio_wave", "points", "custom")


class DataErrorTally:
    """Rows left out by ``on_error="skip"``, by error type, and the first error of each type.

    Run as a Ray actor (``ray.remote(num_cpus=0)(DataErrorTally)``) named after the job, so the
    data tasks can add to it and the training workers and the driver can read it.
    """

    def __init__(self) -> None:
        self.rows: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def add(self, kind: str, rows: int, message: str) -> None:
        """Count ``rows`` rows lost to an error of type ``kind``."""
        self.rows[kind] += rows
        self.first.setdefault(kind, message)

    def totals(self) -> dict[str, int]:
        """Rows skipped so far, by error type."""
        return dict(self.rows)

    def first_errors(self) -> dict[str, str]:
        """The first error message of each type (where the first bad row was)."""
        return dict(self.first)


def tally_metrics(totals: dict[str, int]) -> dict[str, float]:
    """MLflow metrics of a tally: the total and one per error type."""
    metrics = {f"data/skipped_rows/{kind}": float(n) for kind, n in sorted(totals.items())}
    metrics["data/skipped_rows"] = float(sum(totals.values()))
    return metrics


class TallyHandler(logging.Handler):
    """Forwards every log record that carries a `DataError` to the named tally actor."""

    def __init__(self, actor_name: str) -> None:
        super().__init__(logging.WARNING)
        self.actor_name = actor_name
        self._actor: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        errors = [a for a in args if isinstance(a, DataError)]
        if not errors:
            return
        rows = args[0] if isinstance(args[0], int) else 1
        try:
            if self._actor is None:
                import ray

                self._actor = ray.get_actor(self.actor_name)
            self._actor.add.remote(type(errors[0]).__name__, rows, str(errors[0]))
        except Exception:  # a lost count must never fail the data task; the log line remains
            self.handleError(record)


def tally_runtime_env(name: str) -> dict[str, Any]:
    """The Ray ``runtime_env`` that makes every worker process count skips in tally ``name``."""
    return {
        "env_vars": {TALLY_ENV: name},
        "worker_process_setup_hook": f"{__name__}.install_tally_handler",
    }


def install_tally_handler(name: str | None = None) -> None:
    """Count this process's skipped data in tally ``name`` (default: ``$JIN_DATA_TALLY``).

    The ``worker_process_setup_hook`` of :func:`tally_runtime_env`.
    """
    name = name or os.environ.get(TALLY_ENV)
    if not name:
        return
    handler = TallyHandler(name)
    for logger_name in ("jin_data", logger.name):
        logging.getLogger(logger_name).addHandler(handler)


class FiniteCheck:
    """``map_batches`` step (pyarrow format): rows with NaN or Inf in a numeric column raise a
    `DecodeError` naming the column and sample, or with ``on_error="skip"`` are logged and left
    out. Decoded audio of NaN samples would otherwise reach the loss and skip whole steps."""

    def __init__(self, on_error: str) -> None:
        self.on_error = on_error

    def __call__(self, table: pa.Table) -> pa.Table:
        keep = np.ones(table.num_rows, bool)
        for column in NUMERIC_COLUMNS:
            if column not in table.column_names:
                continue
            bad = _nonfinite_rows(table[column].combine_chunks(), table.num_rows)
            urls = table["__url"] if "__url" in table.column_names else None
            for row in np.flatnonzero(bad & keep):
                where = {} if urls is None else {"url": urls[row].as_py()}
                error = DecodeError(
                    "non-finite values (NaN or Inf)",
                    column=column.removesuffix("_wave"),
                    id=table["id"][row].as_py(),
                    **where,
                )
                if self.on_error == "raise":
                    raise error
                logger.warning("jin_orchestrate: skipped row: %s", error)
            keep &= ~bad
        return table if keep.all() else table.filter(pa.array(keep))


def _nonfinite_rows(column: pa.Array, rows: int) -> np.ndarray:
    """Per row of a (nested) list column of floats: whether any value is NaN or Inf."""
    values, parents = column, None
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        indices = pc.list_parent_indices(values).to_numpy()
        parents = indices if parents is None else parents[indices]
        values = values.flatten()
    bad = np.zeros(rows, bool)
    if parents is not None and len(values):
        finite = pc.fill_null(pc.is_finite(values), True).to_numpy(zero_copy_only=False)
        np.logical_or.at(bad, parents[~finite], True)
    return bad
