"""Scores of a checkpoint on labelled regions, through two paths that must agree.

The region path runs the model over each whole region held in memory: windows four times the
checkpoint's tile size wide (twice the pipeline's default tile), each keeping its centre, so every
pixel has at least half a checkpoint tile of context. Halving that context changes about 0.4 %
of the bundled model's labels on a BCSS region. The pipeline path runs the whole-slide pipeline on the
same image file: tiles at the model's resolution, overlap, blending and the label map. Both
paths read the same pixels (the slide reader's resampling) and see white past the region's
edges, as the pipeline does past a slide's edges, so their agreement measures what tiling and
blending cost. Both label maps are scored against the mask at the mask's own resolution.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bcseg.classes import CLASS_NAMES, NUM_CLASSES, code_lookup_table
from bcseg.errors import BadInputError
from bcseg.metrics import confusion_matrix, summarize
from bcseg.training.data import BINARY_TUMOR_VALUE, find_pairs, read_pair, resolution_of
from bcseg.training.splits import site_of
from bcseg.training.validation import TUMOR_CHANNEL

log = logging.getLogger(__name__)

BINARY_NAMES = ("rest", "tumor")
PATHS = ("region", "pipeline")
# The pipeline labels pixels outside detected tissue as background. In class mode this is an
# extra prediction column: such pixels count as errors. In tumour-versus-rest mode they are rest.
NOT_TISSUE = NUM_CLASSES
# Side of the region path's windows, in the checkpoint's tile sizes.
REGION_WINDOW_TILES = 4


@dataclass
class EvaluationSettings:
    checkpoint: Path | None  # None: the bundled default model
    data_dir: Path
    out_dir: Path
    binary: bool = False  # masks are 255 tumour / 0 the rest
    data_mpp: float | None = None
    sites: list[str] | None = None  # only regions of these tissue-source sites
    pipeline: bool = True
    tissue_detection: bool = False
    tile_size_px: int | None = None
    overlap_px: int | None = None  # None: the pipeline's default
    blend_mode: str = "gaussian"
    batch_size: int | None = None  # None: chosen for the device, as in `bcseg-wsi run`
    device: str = "auto"
    threads: int | None = None


@dataclass
class RegionScore:
    name: str
    site: str
    scored_pixels: int
    scores: dict[str, dict] = field(default_factory=dict)  # path -> summary
    agreement: float | None = None  # fraction of scored pixels where both paths agree
    seconds: dict[str, float] = field(default_factory=dict)


def evaluate(settings: EvaluationSettings) -> dict:
    """Score ``settings.checkpoint`` on every region of ``settings.data_dir``; write the report folder.

    Returns the scores dict also written to ``scores.json``. The folder is built under a
    temporary name and renamed when complete.
    """
    import torch

    from bcseg.checkpoint import load_checkpoint
    from pipeline.inference import select_device

    if settings.threads:
        torch.set_num_threads(settings.threads)
    pairs = find_pairs(Path(settings.data_dir))
    if settings.sites:
        wanted = {site.upper() for site in settings.sites}
        pairs = [pair for pair in pairs if site_of(pair[0].name) in wanted]
        if not pairs:
            raise BadInputError(f"{settings.data_dir}: no regions from sites {sorted(wanted)}")
    device = select_device(settings.device)
    loaded = load_checkpoint(settings.checkpoint, device=device)
    info = loaded.info
    groups = {int(code): group for code, group in info.bcss_groups.items()}
    lookup = code_lookup_table(groups)
    num_classes = 2 if settings.binary else NUM_CLASSES + 1
    class_names = BINARY_NAMES if settings.binary else CLASS_NAMES
    stain = None
    if info.stain_normalization:
        from bcseg.stain import StainNormalizer

        stain = StainNormalizer.from_json(info.stain_normalization)

    out_dir = Path(settings.out_dir)
    if out_dir.exists():
        raise BadInputError(f"{out_dir} already exists; choose another --out or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    # mkdtemp creates the folder private (0700); give the report the umask's usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work_dir, 0o777 & ~umask)
    try:
        matrices = {path: np.zeros((num_classes, num_classes), dtype=np.int64) for path in PATHS}
        regions: list[RegionScore] = []
        for image_path, mask_path in pairs:
            region, region_matrices = _evaluate_region(
                image_path, mask_path, settings, loaded, groups, lookup, stain, work_dir
            )
            for path, matrix in region_matrices.items():
                matrices[path] += matrix
            regions.append(region)
            log.info(
                "%s: %s", region.name,
                ", ".join(f"{path} mean Dice {_fmt(score['mean_dice'])}" for path, score in region.scores.items())
                + ("" if region.agreement is None else f", agreement {region.agreement:.4%}"),
            )
        scores = _scores(settings, loaded, regions, matrices, class_names)
        _write_report(work_dir, scores, regions, matrices, class_names)
        from bcseg.model_card import write_model_card

        write_model_card(work_dir, loaded, scores)
        shutil.rmtree(work_dir / "pipeline_runs", ignore_errors=True)
        os.replace(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return scores


def _evaluate_region(image_path, mask_path, settings, loaded, groups, lookup, stain, work_dir):
    from bcseg.training.predict import predict_labels

    info = loaded.info
    source_mpp = resolution_of(image_path, settings.data_mpp)
    rgb, mask = read_pair(image_path, mask_path)
    if settings.binary:
        values = set(np.unique(mask).tolist())
        if not values <= {0, BINARY_TUMOR_VALUE}:
            raise BadInputError(f"{mask_path}: a binary tumour mask contains only 0 and 255, found {sorted(values)}; drop --binary")
        target = (mask == BINARY_TUMOR_VALUE).astype(np.uint8)
    else:
        unknown = sorted(set(np.unique(mask).tolist()) - set(groups))
        if unknown:
            raise BadInputError(f"{mask_path}: unknown label codes {unknown}; the checkpoint's code table has {min(groups)}..{max(groups)}")
        target = lookup[mask]
    region = RegionScore(image_path.name, site_of(image_path.name), int((target != 255).sum()))

    predictions = {}
    started = time.monotonic()
    model_rgb = _read_at_model_resolution(image_path, source_mpp, info.mpp)
    if stain is not None:
        model_rgb = stain.apply(model_rgb)
    margin = info.tile_size_px // 2
    # A region smaller than one window runs in one window just large enough for it and its margin.
    window = min(REGION_WINDOW_TILES * info.tile_size_px, max(model_rgb.shape[:2]) + 2 * margin)
    m_labels = predict_labels(loaded.model, model_rgb, info.mean, info.std, window_px=window, margin_px=margin, padding="white")
    predictions["region"] = _to_mask_size(m_labels, mask.shape, info.mpp / source_mpp)
    region.seconds["region"] = round(time.monotonic() - started, 2)

    if settings.pipeline:
        started = time.monotonic()
        predictions["pipeline"] = _to_mask_size(_pipeline_labels(image_path, source_mpp, settings, work_dir), mask.shape,
                                                info.mpp / source_mpp)
        region.seconds["pipeline"] = round(time.monotonic() - started, 2)

    matrices = {}
    scored = target != 255
    for path, labels in predictions.items():
        if settings.binary:
            labels = (labels == TUMOR_CHANNEL).astype(np.uint8)
        matrices[path] = confusion_matrix(target, labels, 2 if settings.binary else NUM_CLASSES + 1)
        region.scores[path] = summarize(matrices[path], BINARY_NAMES if settings.binary else CLASS_NAMES)
    if "pipeline" in predictions:
        same = predictions["region"] == predictions["pipeline"]
        region.agreement = float(same[scored].mean()) if scored.any() else float(same.mean())
    return region, matrices


def _pipeline_labels(image_path: Path, source_mpp: float, settings: EvaluationSettings, work_dir: Path) -> np.ndarray:
    """Run the whole-slide pipeline on the region's image; return model channels at model resolution."""
    from pipeline.run import RunSettings, run_slide
    from pipeline.stitching import open_prediction

    run_settings = RunSettings(
        out_dir=work_dir / "pipeline_runs",
        model_path=settings.checkpoint,
        device=settings.device,
        mpp_override=source_mpp,
        tile_size_px=settings.tile_size_px,
        overlap_px=settings.overlap_px,
        batch_size=settings.batch_size,
        tissue_detection=settings.tissue_detection,
        blend_mode=settings.blend_mode,
    )
    result = run_slide(image_path, run_settings)
    _, labels, _ = open_prediction(result.output_dir / "prediction.zarr")
    slide_labels = np.asarray(labels[:])
    shutil.rmtree(result.output_dir, ignore_errors=True)
    # The label map stores 0 for background (outside tissue) and 1..5 for classes. Background
    # counts as an error, so it maps to a channel value that no class has.
    return np.where(slide_labels == 0, NOT_TISSUE, slide_labels - 1).astype(np.uint8)


def _read_at_model_resolution(image_path: Path, source_mpp: float, mpp: float) -> np.ndarray:
    """Read a whole region at ``mpp`` with the slide reader, so both paths see the same pixels."""
    from pipeline.slide import open_slide

    with open_slide(image_path, mpp=source_mpp) as slide:
        m_width, m_height = slide.size_at_mpp(mpp)
        return slide.read_region_at_mpp(0, 0, m_width, m_height, mpp)


def _to_mask_size(labels: np.ndarray, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Give each mask pixel the label under its centre; ``scale`` is mask pixels per label pixel."""
    if labels.shape == shape and scale == 1.0:
        return labels
    rows = np.minimum(((np.arange(shape[0]) + 0.5) / scale).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) / scale).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def _scores(settings, loaded, regions: list[RegionScore], matrices: dict, class_names) -> dict:
    paths = [path for path in PATHS if any(path in region.scores for region in regions)]
    summaries = {
        path: {**summarize(matrices[path], class_names), "confusion_matrix": matrices[path].tolist()} for path in paths
    }
    agreements = [region.agreement for region in regions if region.agreement is not None]
    from pipeline.run import RunSettings

    weights = [region.scored_pixels for region in regions if region.agreement is not None]
    tile_size_px, overlap_px = RunSettings(tile_size_px=settings.tile_size_px, overlap_px=settings.overlap_px).tiling_for(loaded.info)
    return {
        "checkpoint": str(loaded.path),
        "checkpoint_sha256": loaded.sha256,
        "data_dir": str(settings.data_dir),
        "mode": "tumor_vs_rest" if settings.binary else "classes",
        "model_mpp": loaded.info.mpp,
        "tile_size_px": tile_size_px,
        "overlap_px": overlap_px,
        "region_window_px": REGION_WINDOW_TILES * loaded.info.tile_size_px,
        "region_margin_px": loaded.info.tile_size_px // 2,
        "blend_mode": settings.blend_mode,
        "tissue_detection": settings.tissue_detection,
        "regions": len(regions),
        "sites": sorted({region.site for region in regions}),
        "paths": summaries,
        "agreement": float(np.average(agreements, weights=weights)) if agreements else None,
        "per_region": [
            {"name": region.name, "site": region.site, "scored_pixels": region.scored_pixels, "agreement": region.agreement,
             "seconds": region.seconds,
             **{f"{path}_mean_dice": region.scores[path]["mean_dice"] for path in region.scores},
             **{f"{path}_dice": region.scores[path]["dice"] for path in region.scores}}
            for region in regions
        ],
    }


def _write_report(work_dir: Path, scores: dict, regions: list[RegionScore], matrices: dict, class_names) -> None:
    (work_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    with open(work_dir / "per_class.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "class", "dice", "iou", "precision", "recall"])
        for path, summary in scores["paths"].items():
            for name in class_names:
                writer.writerow([path, name] + [summary[key][name] for key in ("dice", "iou", "precision", "recall")])
            writer.writerow([path, "mean", summary["mean_dice"], summary["mean_iou"], "", ""])
    with open(work_dir / "per_region.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["region", "site", "scored_pixels", "agreement"] + [f"{path}_mean_dice" for path in scores["paths"]])
        for region in regions:
            writer.writerow(
                [region.name, region.site, region.scored_pixels, region.agreement]
                + [region.scores[path]["mean_dice"] for path in scores["paths"]]
            )
    for path in scores["paths"]:
        matrix = matrices[path]
        with open(work_dir / f"confusion_{path}.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            columns = list(class_names) + (["not tissue"] if len(matrix) > len(class_names) else [])
            writer.writerow(["true \\ predicted"] + columns)
            for name, row in zip(columns, matrix):
                writer.writerow([name] + row.tolist())
        _plot_confusion(matrix, class_names, work_dir / f"confusion_{path}.png", f"{path} path")


def _plot_confusion(matrix: np.ndarray, class_names, path: Path, title: str) -> None:
    """Draw the confusion matrix as a heat map of row fractions, with the pixel counts written in."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = len(class_names)
    columns = list(class_names) + (["not tissue"] if matrix.shape[1] > rows else [])
    counts = matrix[:rows]
    totals = counts.sum(axis=1, keepdims=True)
    fractions = counts / np.maximum(totals, 1)
    figure, axes = plt.subplots(figsize=(1.2 * len(columns) + 1.5, 1.0 * rows + 1.5), dpi=100)
    image = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    axes.set_yticks(range(rows), class_names)
    axes.set(xlabel="predicted", ylabel="true", title=f"confusion, {title} (row fractions)")
    for row in range(rows):
        for col in range(len(columns)):
            if totals[row, 0] > 0:
                value = fractions[row, col]
                axes.text(col, row, f"{value:.2f}\n{counts[row, col]:,}", ha="center", va="center", fontsize=7,
                          color="white" if value > 0.5 else "black")
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
