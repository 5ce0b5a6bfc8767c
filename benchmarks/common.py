"""Helpers shared by the benchmark scripts: the machine report, the slide and a random model."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_SLIDE = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
BUNDLED_SLIDE = REPO / "samples" / "CMU-1-Small-Region.svs"


def add_run_options(parser) -> None:
    """Add the options that the CPU benchmarks share: workers, batch size, threads, device, slide."""
    parser.add_argument("--workers", type=int, default=2, help="tile reader threads (default: 2)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--slide", type=Path, default=None, help="default: CMU-1-Small-Region.svs")


def sample_slide() -> Path:
    """Return CMU-1-Small-Region.svs from the shared data folder, else the bundled copy."""
    return SHARED_SLIDE if SHARED_SLIDE.exists() else BUNDLED_SLIDE


def random_checkpoint(folder: Path, mpp: float = 1.0, tile_size_px: int = 512, seed: int = 0) -> Path:
    """Write a DeepLabV3-ResNet50 checkpoint with seeded random weights at ``mpp``; return its path.

    Random weights cost the same time as trained ones, and nothing is downloaded.
    """
    import torch

    from bcseg.checkpoint import ModelInfo, save_checkpoint
    from bcseg.model import build_model

    torch.manual_seed(seed)
    info = ModelInfo(mpp=mpp, tile_size_px=tile_size_px, provenance={"weights": f"random, seed {seed}"})
    return save_checkpoint(Path(folder) / f"random-{mpp:g}um-{tile_size_px}px.safetensors", build_model(), info)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_report() -> str:
    """Describe the machine: CPU, cores, load, Python, torch and its thread counts, GPU."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    lines = [
        f"cpu: {cpu_model()}, {cores} cores usable of {os.cpu_count()}",
        f"load average (1, 5, 15 min): {', '.join(f'{value:.2f}' for value in os.getloadavg())}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, interop threads {torch.get_num_interop_threads()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    return "\n".join(lines)


def median(values: list[float]) -> float:
    return statistics.median(values)


def format_times(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)
