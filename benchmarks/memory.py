"""Peak resident memory of a slide run on a small and a 100 times larger synthetic slide.

Writes two sparse tiled TIFF pyramids at 0.5 um/px with tifffile: 10,000 x 8,000 px with one
patch of synthetic stained tissue, and 100,000 x 80,000 px with the same 10,000 x 8,000 layout
repeated 10 x 10 times. Glass tiles are left empty (sparse, no bytes on disk). Each slide runs
through ``pipeline.run.run_slide`` in its own subprocess, which reports its peak resident set
size (ru_maxrss). The model is a DeepLabV3-ResNet50 with seeded random weights at 4 um/px with
128 px tiles, so the larger slide takes minutes, not hours, on a 2-core CPU.

    python benchmarks/memory.py [--workers 2] [--threads N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_report, random_checkpoint  # noqa: E402

TARGET_RATIO = 1.3
CELL_PX = (10_000, 8_000)  # (width, height) of the repeated layout, level-0 pixels
# (x, y, width, height) of the tissue patch in each cell: 500 x 450 um, about 1.1% of the cell.
# It is small so that the larger slide runs in minutes. It is not smaller because the tissue
# detector finds no tissue covering under 1% of a slide: it measures contrast between the 1st
# and 99th percentiles of saturation and darkness.
TISSUE_BOX_PX = (2_000, 1_700, 1_000, 900)
SLIDE_MPP = 0.5
TILE_PX = 512
LEVEL_DOWNSAMPLES = (1, 4, 16, 64)


def tissue_tile(height: int, width: int, seed: int) -> "np.ndarray":  # noqa: F821
    """Pink and purple noise, saturated like eosin and hematoxylin."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = np.array([200, 120, 170], dtype=np.int16)
    nuclei = rng.random((height, width)) < 0.15
    pixels = base + rng.integers(-25, 26, size=(height, width, 3), dtype=np.int16)
    pixels[nuclei] = (90, 60, 140)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_slide(path: Path, repeats: int) -> None:
    """Write a sparse tiled pyramid of ``repeats`` x ``repeats`` cells."""
    import numpy as np
    import tifffile

    l0_width, l0_height = CELL_PX[0] * repeats, CELL_PX[1] * repeats
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        for downsample in LEVEL_DOWNSAMPLES:
            width, height = -(-l0_width // downsample), -(-l0_height // downsample)

            def tiles(downsample=downsample, width=width, height=height):
                box_x, box_y, box_width, box_height = TISSUE_BOX_PX
                for tile_y in range(0, height, TILE_PX):
                    for tile_x in range(0, width, TILE_PX):
                        # Tissue pixels of this tile, level pixels inside the tile.
                        mask = np.zeros((TILE_PX, TILE_PX), dtype=bool)
                        l0_ys = (tile_y + np.arange(TILE_PX)) * downsample % CELL_PX[1]
                        l0_xs = (tile_x + np.arange(TILE_PX)) * downsample % CELL_PX[0]
                        in_y = (l0_ys >= box_y) & (l0_ys < box_y + box_height)
                        in_x = (l0_xs >= box_x) & (l0_xs < box_x + box_width)
                        mask[np.ix_(in_y, in_x)] = True
                        if not mask.any() and (tile_x, tile_y) != (0, 0):
                            # An empty tile, with no bytes on disk. tifffile takes the data type
                            # from the first tile, so that one is written.
                            yield None
                            continue
                        pixels = np.full((TILE_PX, TILE_PX, 3), 240, dtype=np.uint8)
                        pixels[mask] = tissue_tile(TILE_PX, TILE_PX, seed=downsample)[mask]
                        yield pixels

            resolution = (1e4 / (SLIDE_MPP * downsample),) * 2  # pixels per cm
            tiff.write(
                tiles(), shape=(height, width, 3), dtype="uint8", tile=(TILE_PX, TILE_PX), photometric="rgb",
                compression="zlib", resolution=resolution, resolutionunit="CENTIMETER",
                subfiletype=1 if downsample > 1 else 0,
            )


def run_in_subprocess(slide: Path, checkpoint: Path, out_dir: Path, workers: int, threads: int | None) -> dict:
    code = f"""
import json, resource, time
from pathlib import Path
from pipeline.run import RunSettings, run_slide
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
clock = time.perf_counter()
result = run_slide(Path({str(slide)!r}), RunSettings(out_dir=Path({str(out_dir)!r}), model_path=Path({str(checkpoint)!r}),
                   device="cpu", tile_size_px=128, overlap_px=16, batch_size=4, workers={workers}, threads={threads}))
print(json.dumps({{"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - clock, "tiles": result.summary["tiles"],
                  "status": result.status}}))
"""
    repo = Path(__file__).resolve().parents[1]
    completed = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="tile reader threads (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    parser.add_argument("--keep", type=Path, default=None, help="write the slides and outputs here and keep them")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bcseg-bench-") as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint = random_checkpoint(folder, mpp=4.0, tile_size_px=128)
        results = {}
        for name, repeats in (("small", 1), ("large", 10)):
            slide = folder / f"synthetic-{name}.tif"
            clock = time.perf_counter()
            write_slide(slide, repeats)
            written_s = time.perf_counter() - clock
            results[name] = run_in_subprocess(slide, checkpoint, folder / "out", args.workers, args.threads)
            results[name]["size_px"] = (CELL_PX[0] * repeats, CELL_PX[1] * repeats)
            results[name]["file_mib"] = slide.stat().st_size / 2**20
            results[name]["write_s"] = written_s

    print(machine_report())
    print(f"model: random DeepLabV3-ResNet50 at 4 um/px, 128 px tiles, 16 px overlap, batch 4, "
          f"{args.workers} reader threads")
    for name, result in results.items():
        width, height = result["size_px"]
        print(f"  {name}: {width} x {height} px ({result['file_mib']:.1f} MiB on disk), "
              f"{result['tiles']['with_tissue']} of {result['tiles']['total']} tiles, {result['seconds']:.1f} s, "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB")
    ratio = results["large"]["peak_rss_mib"] / results["small"]["peak_rss_mib"]
    print(f"ratio of peaks, large / small: {ratio:.3f} (target <= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
