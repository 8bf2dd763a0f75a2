"""Fault injection for reliability drills and the fault tests: off unless an environment variable
asks for it.

The faults that can be produced from outside (a killed process, a truncated shard, a bad request)
need nothing here. What needs a hook is *when*: a worker must be killed in the middle of a stage,
not before it starts or after it ends, and a loss must turn non-finite at a known step. Two
variables, read by each Ray Train worker at start (set them where the workers' environment comes
from: before ``ray.init`` starts a local Ray, or in a job's ``runtime_env``):

``JIN_FAULT_PAUSE_AT=STAGE:STEP``
    After optimiser step ``STEP`` of stage ``STAGE`` (and its checkpoint, if one falls there),
    rank 0 writes its PID to ``$JIN_FAULT_DIR/worker.pid`` and waits up to 10 minutes, so a drill
    can ``kill -9`` it mid-stage. It pauses once per ``JIN_FAULT_DIR``: the restarted worker
    trains on.

``JIN_FAULT_NONFINITE_AT=STAGE:STEP[:COUNT][,...]``
    Once stage ``STAGE`` is about to take optimiser step ``STEP``, the loss of its next ``COUNT``
    attempts (every later one if no ``COUNT``) is made NaN on every rank before the finiteness
    check, as an overflow would. Skipped attempts take no step, so ``COUNT`` counts attempts.

Nothing reads these variables but :func:`FaultPlan.from_env`; a job without them runs exactly the
code it runs in production.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from jin_orchestrate._worker_log import say

__all__ = ["FaultPlan"]

PAUSE_AT = "JIN_FAULT_PAUSE_AT"
NONFINITE_AT = "JIN_FAULT_NONFINITE_AT"
FAULT_DIR = "JIN_FAULT_DIR"
PAUSE_LIMIT_S = 600.0


def _split(value: str, name: str) -> tuple[str, list[int]]:
    """``STAGE:N[:M]`` -> (STAGE, [N, M]); the stage name may itself hold colons."""
    parts = value.split(":")
    for cut in range(max(1, len(parts) - 2), len(parts)):  # the longest numeric tail
        numbers = parts[cut:]
        if all(n.isdigit() for n in numbers) and len(numbers) <= 2:
            stage = ":".join(parts[:cut])
            if stage:
                return stage, [int(n) for n in numbers]
    raise ValueError(f"${name}: expected STAGE:STEP[:COUNT], received {value!r}")


@dataclass
class FaultPlan:
    """The faults the environment asks one stage's worker to inject (none by default)."""

    stage: str
    pause_at: int | None = None
    fault_dir: Path | None = None
    # step -> the NaN attempts still to inject there (None: every one)
    nonfinite_left: dict[int, int | None] = field(default_factory=dict)

    @classmethod
    def from_env(cls, stage: str) -> FaultPlan:
        """The plan for ``stage`` from ``$JIN_FAULT_*``; errors name the variable."""
        plan = cls(stage)
        if value := os.environ.get(PAUSE_AT):
            name, numbers = _split(value, PAUSE_AT)
            if FAULT_DIR not in os.environ:
                raise ValueError(f"${PAUSE_AT} needs ${FAULT_DIR}, where the worker's PID goes")
            if name == stage:
                plan.pause_at, plan.fault_dir = numbers[0], Path(os.environ[FAULT_DIR])
        for spec in filter(None, os.environ.get(NONFINITE_AT, "").split(",")):
            name, numbers = _split(spec.strip(), NONFINITE_AT)
            if name == stage:
                plan.nonfinite_left[numbers[0]] = numbers[1] if len(numbers) > 1 else None
        return plan

    def nonfinite(self, step: int) -> bool:
        """Whether the attempt at (1-based) optimiser step ``step`` gets a NaN loss."""
        if step not in self.nonfinite_left:
            return False
        left = self.nonfinite_left[step]
        if left is None:
            return True
        if left == 0:
            return False
        self.nonfinite_left[step] = left - 1
        return True

    def maybe_pause(self, step: int, rank: int) -> None:
        """At the planned step, on rank 0, once: publish this process's PID and wait."""
        if self.pause_at != step or rank != 0 or self.fault_dir is None:
            return
        marker = self.fault_dir / f"paused-{self.stage}-{step}"
        if marker.exists():
            return
        self.fault_dir.mkdir(parents=True, exist_ok=True)
        marker.touch()
        tmp = self.fault_dir / "worker.pid.tmp"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, self.fault_dir / "worker.pid")
        say(f"[jin] fault drill: worker pid {os.getpid()} paused after step {step}")
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while time.monotonic() < deadline:
            time.sleep(0.2)
