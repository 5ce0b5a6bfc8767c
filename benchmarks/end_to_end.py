"""End-to-end time of a slide run against the model alone on as many tiles, in one process.

Runs ``pipeline.run.run_slide`` (what ``bcseg-wsi run`` calls) on CMU-1-Small-Region at 1 um/px
with 512 px tiles, 64 px overlap, and a DeepLabV3-ResNet50 with seeded random weights. Then it
runs the same model (the same ``Predictor``) on as many in-memory tiles of the same size in the
same batches. Repeats alternate between the two, and the ratio is of the medians. One run of
each comes first to warm up (imports, oneDNN kernels) and is not counted.

    python benchmarks/end_to_end.py [--repeats 3] [--workers 2] [--batch-size 4] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_run_options, format_times, machine_report, median, random_checkpoint, sample_slide  # noqa: E402

TARGET_RATIO = 1.10


def model_only(predictor, batches) -> float:
    clock = time.perf_counter()
    for batch in batches:
        predictor.predict(batch)
    return time.perf_counter() - clock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    add_run_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    import torch

    from bcseg.checkpoint import load_checkpoint
    from pipeline.inference import Predictor, select_device
    from pipeline.run import RunSettings, run_slide

    slide = args.slide or sample_slide()
    with tempfile.TemporaryDirectory(prefix="bcseg-bench-") as folder:
        checkpoint = random_checkpoint(Path(folder), mpp=1.0, tile_size_px=512)
        settings = RunSettings(
            out_dir=Path(folder) / "out", model_path=checkpoint, device=args.device, tile_size_px=512,
            overlap_px=64, batch_size=args.batch_size, workers=args.workers, threads=args.threads, overwrite=True,
        )
        device = select_device(args.device)
        predictor = Predictor(load_checkpoint(checkpoint, device=device), device, threads=args.threads)

        # Warm-up, which also counts the tiles that touch tissue.
        warm_up = run_slide(slide, settings)
        tile_count = warm_up.summary["tiles"]["with_tissue"]
        rng = np.random.default_rng(0)
        batches = [
            rng.integers(0, 256, size=(min(args.batch_size, tile_count - start), 512, 512, 3), dtype=np.uint8)
            for start in range(0, tile_count, args.batch_size)
        ]
        model_only(predictor, batches)

        end_to_end_s, model_s = [], []
        for _ in range(args.repeats):
            clock = time.perf_counter()
            result = run_slide(slide, settings)
            end_to_end_s.append(time.perf_counter() - clock)
            model_s.append(model_only(predictor, batches))
        stage_s = result.summary["timings_s"]

    ratio = median(end_to_end_s) / median(model_s)
    print(machine_report())
    print(f"slide: {slide.name}, 1 um/px, 512 px tiles, 64 px overlap, batch {args.batch_size}, "
          f"{args.workers} reader threads, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"tiles with tissue: {tile_count} ({math.ceil(tile_count / args.batch_size)} batches)")
    print(f"end to end (run_slide) s: {format_times(end_to_end_s)}; median {median(end_to_end_s):.2f}")
    print(f"model only s:             {format_times(model_s)}; median {median(model_s):.2f}")
    print(f"last run's stages s: {stage_s}")
    print(f"ratio end to end / model only: {ratio:.3f} (target <= {TARGET_RATIO})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
