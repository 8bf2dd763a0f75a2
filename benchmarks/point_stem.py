"""Point-cloud stems side by side in one run: k-NN groups against a voxel grid (jin-encoders).

    python benchmarks/point_stem.py --json benchmarks/results/point_stem.json [--demo]

`PointCloudEncoderConfig(stem="voxels")` bins each cloud into a voxel grid and reads it with a
3-D convolutional stem, the point-cloud twin of the vision encoder's ``stem="conv"``, which made
NumberWorld's images readable from ~1,700 examples where ViT's linear patches were not
(`vision_stem.md`). Measured as `point_frame.py` measures the frame, with the same reader,
batches and optimiser:

- supervised reading, for each stem in each frame (``input``: the coordinates as given, ``pca``:
  each cloud in its principal-axes frame): a jin-tiny-sized `PointCloudEncoder` under a 4-block
  dense `Backbone` learns to read the tens and units digits; accuracy on test clouds of seen and
  of held-out numbers every ``--every`` steps;
- with ``--demo``: the demo's whole self-supervised curriculum (jin-tiny, in process, ~15 min
  each on 2 cores) with its point encoder as configured (groups, input frame) and with the voxel
  stem in the principal-axes frame; the evaluation's point-cloud retrieval rows.

The corpus is generated into the jin cache if missing.
"""

from __future__ import annotations

from point_frame import compare
from vision_stem import reader_parser

VARIANTS = {
    "groups, input": {"stem": "groups", "frame": "input"},
    "groups, pca": {"stem": "groups", "frame": "pca"},
    "voxels, input": {"stem": "voxels", "frame": "input"},
    "voxels, pca": {"stem": "voxels", "frame": "pca"},
}
DEMO_VARIANTS = ("groups, input", "voxels, pca")


def main() -> int:
    parser = reader_parser(__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also the demo curriculum, 2 variants")
    return compare(parser.parse_args(), VARIANTS, DEMO_VARIANTS, "variant")


if __name__ == "__main__":
    raise SystemExit(main())
