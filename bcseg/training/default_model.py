"""Build the bundled default model: the int8 compact copy of a trained checkpoint and its model card.

Run as ``python -m bcseg.training.default_model FLOAT_CHECKPOINT --slide SLIDE --val-dir DIR
--notes JSON``. It measures on real data how far the compact copy is from the float model: label
agreement on a slide and tumour Dice of both on the validation region. It also times inference
per slide area, then writes ``default.safetensors``, ``default.card.json`` and ``default.card.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from bcseg.checkpoint import DEFAULT_MODEL_PATH, file_sha256, load_checkpoint, save_checkpoint
from bcseg.metrics import binary_dice
from bcseg.training.data import load_binary_validation
from bcseg.training.validation import TUMOR_CHANNEL
from bcseg.training.predict import predict_labels

log = logging.getLogger(__name__)

MAX_DEFAULT_MODEL_BYTES = 45 * 1024 * 1024
CARD_JSON = DEFAULT_MODEL_PATH.with_name("default.card.json")
CARD_MD = DEFAULT_MODEL_PATH.with_name("default.card.md")
DEMONSTRATION_NOTE = (
    "Trained on two labelled regions (TCGA-A2-A0D2 and eight tiles of TCGA-A1-A0SK) on a 2-core CPU "
    "from a random initialisation (no ImageNet or other pretrained weights). It is demonstration "
    "grade: use it to exercise the pipeline, not to measure tissue."
)


def read_slide_at_mpp(slide_path: Path, mpp: float) -> np.ndarray:
    """Read a whole slide resampled to ``mpp`` as RGB uint8."""
    from pipeline.slide import open_slide

    with open_slide(slide_path) as slide:
        m_width, m_height = slide.size_at_mpp(mpp)
        return slide.read_region_at_mpp(0, 0, m_width, m_height, mpp)


def label_map(model, info, rgb: np.ndarray) -> np.ndarray:
    return predict_labels(model, rgb, info.mean, info.std, window_px=2 * info.tile_size_px, margin_px=32)


def build(float_path: Path, slide_path: Path, val_dir: Path, notes: dict, out_path: Path = DEFAULT_MODEL_PATH) -> dict:
    """Write the compact model and its card; return the card."""
    float_model = load_checkpoint(float_path)
    info = float_model.info
    save_checkpoint(out_path, float_model.model, info, compact=True)
    compact_model = load_checkpoint(out_path)
    size = out_path.stat().st_size
    if size > MAX_DEFAULT_MODEL_BYTES:
        raise RuntimeError(f"{out_path}: {size} bytes exceeds the {MAX_DEFAULT_MODEL_BYTES} byte limit")

    # Compact against float on a real slide at the model's resolution.
    slide_rgb = read_slide_at_mpp(slide_path, info.mpp)
    started = time.monotonic()
    float_labels = label_map(float_model.model, info, slide_rgb)
    seconds = time.monotonic() - started
    compact_labels = label_map(compact_model.model, info, slide_rgb)
    agreement = float((float_labels == compact_labels).mean())
    area_mm2 = slide_rgb.shape[0] * slide_rgb.shape[1] * (info.mpp / 1000.0) ** 2

    # Tumour Dice of both forms on the held-out binary region. The float score comes from the
    # checkpoint when training validated on that folder with the same windows.
    validation = {}
    recorded = info.provenance.get("best_validation") or {}
    candidates = [("compact", compact_model)]
    if recorded.get("kind") == "tumor_vs_rest" and Path(info.provenance.get("validation_dir") or "") == val_dir:
        validation["float"] = recorded["tumor_dice"]
    else:
        candidates.insert(0, ("float", float_model))
    for name, loaded in candidates:
        truths, predictions = [], []
        for _, rgb, tumor in load_binary_validation(val_dir, info.mpp, None):
            truths.append(tumor.ravel())
            predictions.append(label_map(loaded.model, info, rgb).ravel() == TUMOR_CHANNEL)
        validation[name] = binary_dice(np.concatenate(truths), np.concatenate(predictions))

    provenance = info.provenance
    card = {
        "file": out_path.name,
        "sha256": file_sha256(out_path),
        "size_bytes": size,
        "weights_encoding": compact_model.weights_encoding,
        "architecture": info.architecture,
        "mpp": info.mpp,
        "tile_size_px": info.tile_size_px,
        "classes": [c["name"] for c in info.classes],
        "bcss_groups": info.bcss_groups,
        "initialization": "random (no pretrained weights)",
        "training_data": [entry["file"] for entry in provenance.get("training_data", [])],
        "validation_data": val_dir.name + ": " + ", ".join(sorted(p.name for p in (val_dir / "images").iterdir())),
        "steps": provenance.get("steps"),
        "train_seconds": provenance.get("train_seconds"),
        "seconds_per_step": provenance.get("seconds_per_step"),
        "recipe": provenance.get("recipe"),
        "checkpoint_validation": provenance.get("best_validation"),
        "validation_tumor_dice": {"float": validation["float"], "compact": validation["compact"]},
        "compact_vs_float": {
            "slide": slide_path.name,
            "pixels": int(float_labels.size),
            "label_agreement": agreement,
        },
        "inference_seconds_per_mm2": {
            "value": seconds / area_mm2,
            "measured_on": f"{slide_path.name} at {info.mpp} um/px ({area_mm2:.2f} mm2), "
            f"torch threads: {torch.get_num_threads()}, float model, in-memory windows of "
            f"{2 * info.tile_size_px} px",
        },
        "float_checkpoint_sha256": file_sha256(float_path),
        "date": provenance.get("date"),
        "package_version": provenance.get("package_version"),
        "statement": DEMONSTRATION_NOTE,
        **notes,
    }
    return card


def render_markdown(card: dict) -> str:
    """Write the model card as Markdown from the card's JSON."""
    val = card["validation_tumor_dice"]
    agreement = card["compact_vs_float"]
    lines = [
        "# Default model: DeepLabV3-ResNet50, five breast tissue classes",
        "",
        card["statement"],
        "",
        "## Summary",
        "",
        "| | |",
        "|---|---|",
        f"| file | `{card['file']}`, {card['size_bytes'] / 1e6:.1f} MB, {card['weights_encoding']} |",
        f"| sha256 | `{card['sha256']}` |",
        f"| resolution | {card['mpp']} um/px; checkpoint tile size {card['tile_size_px']} px (the pipeline's default tiles are twice that) |",
        f"| classes | {', '.join(card['classes'])} |",
        f"| initialisation | {card['initialization']} |",
        f"| steps of the last run | {card['steps']} ({card['seconds_per_step']} s per step including validation, "
        f"{card['train_seconds'] / 60:.0f} min) |",
        f"| validation tumour Dice, TCGA-A2-A1G6 (tumour vs rest) | float {val['float']:.4f}, compact {val['compact']:.4f} |",
        f"| compact vs float label agreement | {agreement['label_agreement'] * 100:.3f}% of {agreement['pixels']} px of {agreement['slide']} |",
        f"| inference time | {card['inference_seconds_per_mm2']['value']:.1f} s per mm2 ({card['inference_seconds_per_mm2']['measured_on']}) |",
        "",
        *([card["history"], ""] if card.get("history") else []),
        "## Data",
        "",
        "Training: " + ", ".join(f"`{name}`" for name in card["training_data"]) + " (BCSS, CC0).",
        f"Validation, never trained on: {card['validation_data']}.",
        "BCSS codes 0 (outside_roi) and 7 (exclude) are ignored; the full code table is in the checkpoint.",
        "",
        "## Resolution choice",
        "",
    ]
    comparison = card.get("resolution_comparison")
    if comparison:
        lines += [comparison["summary"], "", "| mpp | steps | train min | validation tumour Dice | inference s per mm2 |", "|---|---|---|---|---|"]
        for row in comparison["runs"]:
            lines.append(
                f"| {row['mpp']} | {row['steps']} | {row['train_minutes']:.1f} | {row['tumor_dice']:.4f} | {row['inference_seconds_per_mm2']:.1f} |"
            )
        lines.append("")
    lines += [
        "## Recipe",
        "",
        "```json",
        json.dumps(card["recipe"], indent=2),
        "```",
        "",
        "## Limits",
        "",
        "- Two training regions from two slides: the model has seen almost no inflammatory tissue "
        "and no 'other' tissue, so those classes are not usable.",
        "- The validation score is from one region of one slide, scored tumour against everything else.",
        "- No pretrained backbone was available offline; a model trained from ImageNet weights on the "
        "full BCSS would be expected to do much better.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("float_checkpoint", type=Path)
    parser.add_argument("--slide", type=Path, required=True, help="real slide for the compact-vs-float agreement")
    parser.add_argument("--val-dir", type=Path, required=True, help="binary tumour-versus-rest validation folder")
    parser.add_argument("--notes", type=Path, help="JSON merged into the card (e.g. resolution_comparison)")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    notes = json.loads(args.notes.read_text()) if args.notes else {}
    card = build(args.float_checkpoint, args.slide, args.val_dir, notes, args.out)
    args.out.with_name(args.out.stem + ".card.json").write_text(json.dumps(card, indent=2) + "\n")
    args.out.with_name(args.out.stem + ".card.md").write_text(render_markdown(card))
    log.info("wrote %s (%d bytes); validation tumour Dice %s; agreement %.5f",
             args.out, card["size_bytes"], card["validation_tumor_dice"], card["compact_vs_float"]["label_agreement"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
