"""``python -m jin_orchestrate.pretrain``: Jin's main job.

Pretraining composes the four leaf packages and lands with the pretraining issue. Until then this
entry point says so plainly and exits with status 2 rather than pretending to train.
"""

from __future__ import annotations

import argparse
import sys

NOT_YET = (
    "jin_orchestrate.pretrain: curriculum pretraining on Ray Train with MLflow tracking is not "
    "implemented yet (see the README's 'Status' section). Nothing was trained."
)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and report that pretraining is not available yet."""
    parser = argparse.ArgumentParser(prog="python -m jin_orchestrate.pretrain", description=__doc__)
    parser.parse_args(argv)
    print(NOT_YET, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
