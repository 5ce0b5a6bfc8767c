"""Tiles per second of a whole slide run against the model alone, on an NVIDIA GPU with AMP.

Runs ``pipeline.run.run_slide`` on CMU-1-Small-Region with a DeepLabV3-ResNet50 with seeded random
weights at ``--mpp``. The default on CUDA is 0.25 um/px, 140 tiles of 512 px. The slide is
upsampled there, which is cheap to read, so reading costs less than on a real 40x scan. Tissue
detection is off so that every tile runs, and the batch size is chosen from free GPU memory.
Then the same Predictor runs on as many in-memory tiles in the same batches (model only). The
script prints tiles per second of the whole run, of the overlapped read + infer + blend stage
alone, and of the model, with the ratios. Without CUDA it runs the same code on the CPU at
2 um/px (4 tiles) with one repeat, as a check that the script works.

    python benchmarks/gpu.py [--device cuda] [--mpp 0.25] [--repeats 3] [--workers 8] [--compile]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import format_times, machine_report, median, random_checkpoint, sample_slide  # noqa: E402

TARGET_RATIO = 0.85


def main(argv: list[str] | None = None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--mpp", type=float, default=0.25 if cuda else 2.0, help="model resolution, um/px")
    parser.add_argument("--repeats", type=int, default=3 if cuda else 1)
    parser.add_argument("--workers", type=int, default=8 if cuda else 2, help="tile reader threads")
    parser.add_argument("--batch-size", type=int, default=None, help="default: auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--slide", type=Path, default=None, help="default: CMU-1-Small-Region.svs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from bcseg.checkpoint import load_checkpoint
    from pipeline.inference import Predictor, choose_batch_size, select_device
    from pipeline.run import RunSettings, run_slide

    slide = args.slide or sample_slide()
    device = select_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bcseg-bench-") as folder:
        checkpoint = random_checkpoint(Path(folder), mpp=args.mpp, tile_size_px=512)
        predictor = Predictor(load_checkpoint(checkpoint, device=device), device, compile_model=args.compile)
        batch_size = choose_batch_size(predictor, 512, args.batch_size)
        settings = RunSettings(
            out_dir=Path(folder) / "out", model_path=checkpoint, device=args.device, tile_size_px=512,
            overlap_px=64, batch_size=batch_size, workers=args.workers, tissue_detection=False,
            compile_model=args.compile, overwrite=True,
        )
        warm_up = run_slide(slide, settings)
        tile_count = warm_up.summary["tiles"]["with_tissue"]

        # Model only: the same batches, started back to back, one wait at the end.
        generator = torch.Generator().manual_seed(0)
        batches = [
            torch.randint(0, 256, (min(batch_size, tile_count - start), 512, 512, 3), dtype=torch.uint8,
                          generator=generator).numpy()
            for start in range(0, tile_count, batch_size)
        ]

        def model_only() -> float:
            pending = []
            if cuda and args.device == "cuda":
                torch.cuda.synchronize()
            clock = time.perf_counter()
            for batch in batches:
                pending.append(predictor.start(batch))
            for prediction in pending:
                prediction.result()
            return time.perf_counter() - clock

        model_only()
        run_s, stream_s, model_s = [], [], []
        for _ in range(args.repeats):
            clock = time.perf_counter()
            result = run_slide(slide, settings)
            run_s.append(time.perf_counter() - clock)
            stream_s.append(result.summary["timings_s"]["inference_s"])
            model_s.append(model_only())

    def rate(seconds: list[float]) -> float:
        return tile_count / median(seconds)

    print(machine_report())
    print(f"slide {slide.name} at {args.mpp} um/px, {tile_count} tiles of 512 px, batch {batch_size}, "
          f"{args.workers} reader threads, device {args.device}, AMP {predictor.amp_dtype}, compile {args.compile}")
    print(f"whole run s: {format_times(run_s)}; {rate(run_s):.3g} tiles/s")
    print(f"read + infer + blend stage s: {format_times(stream_s)}; {rate(stream_s):.3g} tiles/s")
    print(f"model only s: {format_times(model_s)}; {rate(model_s):.3g} tiles/s")
    print(f"throughput ratio, stage / model only: {rate(stream_s) / rate(model_s):.3f} (target >= {TARGET_RATIO})")
    print(f"throughput ratio, whole run / model only: {rate(run_s) / rate(model_s):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
