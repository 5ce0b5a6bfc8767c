"""Time and peak memory of ``bcseg-wsi run`` on a large sparse single-level TIFF.

Writes a JPEG-tiled TIFF of WIDTH x HEIGHT pixels at 0.5 microns per pixel that stores only a
2 x 2 block of 512-pixel tissue tiles, runs the command line on it in a child process, and prints
the wall time, the child's peak resident memory and the stage timings from summary.json.

    python benchmarks/sparse_slide.py --width 60000 --height 80000 --workdir /tmp/sparse-bench
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_inputs_slides import write_sparse_slide  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=60_000, metavar="PIXELS")
    parser.add_argument("--height", type=int, default=80_000, metavar="PIXELS")
    parser.add_argument("--workdir", type=Path, required=True, metavar="DIR")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    slide = args.workdir / "sparse.tif"
    row, col = args.height // 1024, args.width // 1024
    write_sparse_slide(slide, args.height, args.width, {(row, col), (row, col + 1), (row + 1, col), (row + 1, col + 1)})
    print(f"slide: {args.width} x {args.height} px, {slide.stat().st_size / 1e6:.2f} MB on disk")

    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bcseg", "run", str(slide), "--out", str(args.workdir / "out"), "--overwrite", "-q"],
        check=True,
    )
    wall_s = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    summary = json.loads((args.workdir / "out" / "sparse" / "summary.json").read_text())
    print(f"wall time: {wall_s:.1f} s, peak resident memory of the run: {peak_mib:.0f} MiB")
    print(f"tiles: {summary['tiles']}")
    print(f"stage timings (s): {summary['timings_s']}")


if __name__ == "__main__":
    main()
