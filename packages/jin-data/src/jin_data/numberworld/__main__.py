"""``python -m jin_data.numberworld --out URL --samples N --seed S``: write a NumberWorld corpus."""

from __future__ import annotations

import argparse
import sys
import time

import fsspec
from pydantic import ValidationError

from jin_data.numberworld.corpus import DEFAULT_HELD_OUT, NumberWorldConfig, generate_numberworld
from jin_data.numberworld.speech import EspeakNotFoundError


def _numbers(text: str) -> list[int]:
    try:
        return [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, received {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """Parse, generate, print a summary; exit status 2 on a bad flag value, when espeak-ng is
    missing or when a data set exists at ``--out`` (without ``--overwrite``)."""
    parser = argparse.ArgumentParser(prog="python -m jin_data.numberworld", description=__doc__)
    parser.add_argument("--out", required=True, help="fsspec URL of the data set to write")
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--held-out",
        type=_numbers,
        default=",".join(map(str, DEFAULT_HELD_OUT)),
        help="comma-separated numbers kept out of the train split ('' for none)",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="speech cache (default ~/.cache/jin_data)"
    )
    parser.add_argument("--rows-per-shard", type=int, default=1024)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.out:  # "" would write into the working directory
        parser.error("argument --out: expected the URL of a data set, received ''")
    try:
        fsspec.core.url_to_fs(args.out)
    except (ImportError, ValueError) as err:  # unknown protocol, or its package not installed
        parser.error(f"argument --out: {err}")
    held_out = args.held_out
    options = {
        "held_out": held_out,
        "cache_dir": args.cache_dir,
        "rows_per_shard": args.rows_per_shard,
    }
    try:  # checked here, not inside the generator, so a bad value names its flag
        NumberWorldConfig(samples=args.samples, seed=args.seed, **options)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "value_error":  # our validator's message, which quotes the value
            problem = str(first["ctx"]["error"])
        else:
            problem = f"{first['msg'].lower()}, received {first['input']!r}"
        parser.error(f"argument --{str(first['loc'][0]).replace('_', '-')}: {problem}")
    start = time.perf_counter()
    try:
        manifest = generate_numberworld(
            args.out,
            args.samples,
            args.seed,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            **options,
        )
    except EspeakNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileExistsError as err:
        print(f"error: {err}; pass --overwrite to replace it", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(
        f"wrote {manifest.num_rows} samples in {len(manifest.shards)} shards to {args.out} "
        f"in {seconds:.1f}s ({manifest.num_rows / seconds:.0f} samples/s); splits "
        f"{manifest.splits}; held out of train: {held_out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
