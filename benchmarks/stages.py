"""Time each stage of one slide run on its own, so a regression shows where it is.

Stages: open (slide, fingerprint, model), tissue detection, tile reading (decoding only, with the
reader threads), writing the tiles to a zarr store and reading them back (the former path,
now only with --keep-tiles), inference (the model alone), blending (the merger's add and
finalize), export (GeoJSON, labels.tif, overlay.png, areas). Then the overlapped read + infer +
blend as the run does it, to show how much of reading and blending hides behind the model.

    python benchmarks/stages.py [--workers 2] [--batch-size 4] [--threads N] [--slide PATH]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_run_options, machine_report, random_checkpoint, sample_slide  # noqa: E402


class Stopwatch:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def time(self, name: str, function, *args, **kwargs):
        clock = time.perf_counter()
        value = function(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - clock
        return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    import torch

    from bcseg.checkpoint import load_checkpoint
    from pipeline.inference import Predictor, predict_stream, select_device
    from pipeline.run import RunSettings, export_outputs
    from pipeline.slide import open_slide, slide_fingerprint
    from pipeline.stitching import Merger
    from pipeline.tiling import TileGrid, read_tiles, select_tissue_tiles, write_tiles
    from pipeline.tissue import detect_tissue

    slide_path = args.slide or sample_slide()
    watch = Stopwatch()
    with tempfile.TemporaryDirectory(prefix="bcseg-bench-") as folder:
        folder = Path(folder)
        checkpoint = random_checkpoint(folder, mpp=1.0, tile_size_px=512)
        device = select_device(args.device)

        def open_all():
            slide = open_slide(slide_path)
            slide_fingerprint(slide_path)
            return slide, load_checkpoint(checkpoint, device=device)

        slide, loaded = watch.time("open", open_all)
        predictor = Predictor(loaded, device)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        mpp, tile = loaded.info.mpp, 512
        m_width, m_height = slide.size_at_mpp(mpp)
        tissue = watch.time("tissue", detect_tissue, slide)
        grid = TileGrid(m_width, m_height, tile, 64)
        m_origins = select_tissue_tiles(grid, tissue, mpp)
        predictor.predict(np.zeros((1, tile, tile, 3), dtype=np.uint8))  # warm-up

        tiles = watch.time("read", lambda: list(read_tiles(slide, m_origins, tile, mpp, workers=args.workers)))
        store = watch.time("zarr write", write_tiles, slide, grid, m_origins, mpp, folder / "tiles.zarr",
                           workers=args.workers)
        watch.seconds["zarr write"] -= watch.seconds["read"]  # write_tiles decodes too
        watch.time("zarr read", store.read, 0, len(store))

        def infer():
            predictions = []
            for start in range(0, len(tiles), args.batch_size):
                batch = tiles[start : start + args.batch_size]
                batch_probabilities = predictor.predict(np.stack([pixels for _, _, pixels in batch]))
                predictions += [(m_x, m_y, p) for (m_x, m_y, _), p in zip(batch, batch_probabilities)]
            return predictions

        predictions = watch.time("infer", infer)

        def blend():
            merger = Merger(folder / "blend.zarr", m_width, m_height, loaded.info.num_classes, tile,
                            m_origins=m_origins, tissue=tissue, mpp=mpp)
            for m_x, m_y, probabilities in predictions:
                merger.add(m_x, m_y, probabilities)
            return merger.finalize()

        probabilities, labels = watch.time("blend", blend)
        settings = RunSettings(out_dir=folder)
        (folder / "export").mkdir()
        watch.time("export", export_outputs, slide, labels, probabilities, mpp, settings, folder / "export", "slide")

        def overlapped():
            merger = Merger(folder / "overlapped.zarr", m_width, m_height, loaded.info.num_classes, tile,
                            m_origins=m_origins, tissue=tissue, mpp=mpp)
            stream = read_tiles(slide, m_origins, tile, mpp, workers=args.workers, max_ahead=2 * args.batch_size + args.workers)
            predict_stream(stream, predictor, merger.add, args.batch_size, len(m_origins))
            return merger.finalize()

        watch.time("read + infer + blend, overlapped", overlapped)
        shutil.rmtree(folder / "tiles.zarr")
        slide.close()

    print(machine_report())
    print(f"slide: {slide_path.name}, 1 um/px, {len(m_origins)} tiles of {tile} px, batch {args.batch_size}, "
          f"{args.workers} reader threads, torch threads {torch.get_num_threads()}")
    for name, seconds in watch.seconds.items():
        per_tile = f"{1000 * seconds / len(m_origins):8.1f} ms/tile" if name not in ("open", "tissue", "export") else ""
        print(f"  {name:<34} {seconds:7.2f} s {per_tile}")
    separate = sum(watch.seconds[name] for name in ("read", "infer", "blend"))
    print(f"  read + infer + blend, one after another: {separate:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
