"""bcseg-wsi against TIAToolbox's SemanticSegmentor on the same slide, model and settings.

Both run a DeepLabV3-ResNet50 with the same seeded random weights on CMU-1-Small-Region at
1 um/px, 512 px tiles with 64 px overlap (448 px stride), batch 4, on the CPU, each tiling only
tissue with its own tissue detector. Runs alternate between the two, one of each first to warm
up, and the ratio is of the medians. Written for the TIAToolbox 2.x engine API (``run`` with
``patch_mode=False``); skipped with a message when TIAToolbox is not importable. TIAToolbox needs
torch < 2.13, so run it from its own virtual environment (see benchmarks/README.md).

    python benchmarks/vs_tiatoolbox.py [--repeats 3] [--workers 2]
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

TARGET_SPEEDUP = 1.5


def tiatoolbox_model(net, mean, std, patch_counter: list[int]):
    """Wrap ``net`` (logits out) as a TIAToolbox model that returns probabilities (N, H, W, C).

    Each call adds its number of patches to ``patch_counter[0]``.
    """
    import torch
    from tiatoolbox.models.models_abc import ModelABC

    class WrappedModel(ModelABC):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

        def forward(self, images):
            return self.net((images - self.mean) / self.std)

        @staticmethod
        def infer_batch(model, batch_data, *args, **kwargs):
            device = kwargs.get("device", args[0] if args else "cpu")
            patch_counter[0] += len(batch_data)
            images = torch.as_tensor(batch_data).to(device).permute(0, 3, 1, 2).float() / 255.0
            model.eval()
            with torch.inference_mode():
                probabilities = torch.softmax(model(images), dim=1)
            return probabilities.permute(0, 2, 3, 1).cpu().numpy()

    return WrappedModel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="reader threads, and TIAToolbox loader workers")
    parser.add_argument("--slide", type=Path, default=None, help="default: CMU-1-Small-Region.svs")
    args = parser.parse_args(argv)
    try:
        from tiatoolbox.models.engine.io_config import IOSegmentorConfig
        from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
    except ImportError as error:
        print(f"skipped: TIAToolbox is not importable here ({error}). It needs torch < 2.13; run this script "
              "from its own virtual environment as benchmarks/README.md describes.")
        return 0
    logging.basicConfig(level=logging.WARNING)

    from bcseg.checkpoint import load_checkpoint
    from pipeline.run import RunSettings, run_slide

    slide = args.slide or sample_slide()
    resolution = [{"units": "mpp", "resolution": 1.0}]
    ioconfig = IOSegmentorConfig(
        input_resolutions=resolution, output_resolutions=resolution, patch_input_shape=(512, 512),
        patch_output_shape=(512, 512), stride_shape=(448, 448), save_resolution=resolution[0],
    )
    with tempfile.TemporaryDirectory(prefix="bcseg-bench-") as folder:
        folder = Path(folder)
        checkpoint = random_checkpoint(folder, mpp=1.0, tile_size_px=512)
        loaded = load_checkpoint(checkpoint)
        patch_counter = [0]
        model = tiatoolbox_model(loaded.model, loaded.info.mean, loaded.info.std, patch_counter)
        tiles = {"tiatoolbox": 0, "bcseg-wsi": 0}
        settings = RunSettings(out_dir=folder / "bcseg", model_path=checkpoint, device="cpu", tile_size_px=512,
                               overlap_px=64, batch_size=4, workers=args.workers, overwrite=True)

        def run_tiatoolbox(index: int) -> None:
            patch_counter[0] = 0
            segmentor = SemanticSegmentor(model=model, batch_size=4, num_workers=args.workers,
                                          device="cpu", verbose=False)
            segmentor.run([slide], patch_mode=False, ioconfig=ioconfig, device="cpu",
                          save_dir=folder / f"tiatoolbox-{index}", output_type="zarr", overwrite=True)
            tiles["tiatoolbox"] = patch_counter[0]

        def run_bcseg(index: int) -> None:
            tiles["bcseg-wsi"] = run_slide(slide, settings).summary["tiles"]["with_tissue"]

        seconds = {"tiatoolbox": [], "bcseg-wsi": []}
        runners = {"tiatoolbox": run_tiatoolbox, "bcseg-wsi": run_bcseg}
        for index in range(args.repeats + 1):
            for name, runner in runners.items():
                clock = time.perf_counter()
                runner(index)
                if index > 0:  # the first round warms up
                    seconds[name].append(time.perf_counter() - clock)

    import tiatoolbox

    print(machine_report())
    print(f"tiatoolbox {tiatoolbox.__version__}; slide {slide.name}, 1 um/px, 512 px tiles, 64 px overlap, batch 4")
    for name, values in seconds.items():
        print(f"  {name:<10} s: {format_times(values)}; median {median(values):.2f}; {tiles[name]} tiles through the model")
    speedup = median(seconds["tiatoolbox"]) / median(seconds["bcseg-wsi"])
    print(f"speed-up of bcseg-wsi (TIAToolbox median / bcseg-wsi median): {speedup:.2f} (target >= {TARGET_SPEEDUP})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
