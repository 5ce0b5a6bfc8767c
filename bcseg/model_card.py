"""Model cards: what a checkpoint was trained on, how, and how it scores beside published models."""

from __future__ import annotations

import json
from pathlib import Path

from bcseg.classes import CLASS_NAMES

# Per-class Dice reported on the held-out BCSS test sites (OL, LL, E2, EW, GM, S3). The models are
# the VGG16-FCN8 of Amgad et al. (Bioinformatics 35(18):3461-3467, 2019) and TIAToolbox's
# pretrained UNet-ResNet50 at 0.25 um/px. A course project's DeepLabV3-ResNet50 (ImageNet backbone,
# 768 px crops, 40 epochs, soft Dice) reports only the mean, on its own split.
ANCHORS = [
    {"model": "VGG16-FCN8 (Amgad et al. 2019)",
     "dice": {"tumor": 0.851, "stroma": 0.800, "inflammatory": 0.712, "necrosis": 0.723, "other": 0.666}, "mean_dice": 0.750},
    {"model": "UNet-ResNet50, 0.25 um/px (TIAToolbox pretrained)",
     "dice": {"tumor": 0.885, "stroma": 0.825, "inflammatory": 0.761, "necrosis": 0.765, "other": 0.581}, "mean_dice": 0.763},
    {"model": "DeepLabV3-ResNet50, ImageNet backbone (course project)", "dice": {}, "mean_dice": 0.685},
]


def build_card(loaded, scores: dict) -> dict:
    """Return the card as a JSON-ready dict from a loaded checkpoint and ``evaluation.evaluate``'s scores."""
    info = loaded.info
    provenance = info.provenance or {}
    return {
        "model": {
            "architecture": info.architecture,
            "checkpoint": Path(loaded.path).name,
            "sha256": loaded.sha256,
            "weights_encoding": loaded.weights_encoding,
            "mpp": info.mpp,
            "tile_size_px": info.tile_size_px,
            "classes": [c["name"] for c in info.classes],
            "bcss_groups": info.bcss_groups,
            "stain_normalization": info.stain_normalization,
        },
        "training": {
            "split": provenance.get("split"),
            "regions": provenance.get("training_regions") or provenance.get("training_data"),
            "class_pixels": provenance.get("class_pixels"),
            "recipe": provenance.get("recipe"),
            "epochs": provenance.get("epochs"),
            "steps": provenance.get("steps"),
            "train_seconds": provenance.get("train_seconds"),
            "machine": provenance.get("machine"),
        },
        "evaluation": {
            "data_dir": Path(scores["data_dir"]).name,
            "region_names": [region["name"] for region in scores["per_region"]],
            "trained_on": sorted(
                {region["name"] for region in scores["per_region"]} & set(_training_names(provenance))
            ),
            "mode": scores["mode"],
            "regions": scores["regions"],
            "sites": scores["sites"],
            "settings": {key: scores[key] for key in ("tile_size_px", "overlap_px", "blend_mode", "tissue_detection")},
            "scores": {
                path: {key: summary[key] for key in ("dice", "iou", "precision", "recall", "mean_dice", "mean_iou", "pixel_accuracy")}
                for path, summary in scores["paths"].items()
            },
            "pipeline_region_agreement": scores["agreement"],
        },
        "anchors": ANCHORS,
        "anchors_note": (
            "Published scores are on the held-out test sites of the full BCSS dataset (151 regions); "
            "this model's scores are on the regions listed above, so the two sides compare only where "
            "the evaluation data are those test sites."
        ),
    }


def _training_names(provenance: dict) -> list[str]:
    regions = provenance.get("training_regions") or provenance.get("training_data") or []
    return [region["file"] for region in regions if isinstance(region, dict) and "file" in region]


def write_model_card(folder: Path, loaded, scores: dict) -> dict:
    """Write ``model_card.json`` and ``model_card.md`` into ``folder``; return the card."""
    card = build_card(loaded, scores)
    (folder / "model_card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    (folder / "model_card.md").write_text(card_markdown(card), encoding="utf-8")
    return card


def card_markdown(card: dict) -> str:
    model, training, evaluation = card["model"], card["training"], card["evaluation"]
    lines = [
        f"# Model card: {model['checkpoint']}",
        "",
        f"- Architecture: {model['architecture']}, {len(model['classes'])} classes ({', '.join(model['classes'])})",
        f"- Input: {model['mpp']} um/px, tiles of {model['tile_size_px']} px; weights {model['weights_encoding']}",
        f"- Stain normalization: {(model['stain_normalization'] or {}).get('method', 'none')}",
        f"- SHA-256: `{model['sha256']}`",
        "",
        "## Training",
        "",
    ]

    split = training.get("split") or {}
    for part in ("train", "validation", "test"):
        if part in split:
            lines.append(f"- {part}: {split[part]['regions']} regions, sites {', '.join(split[part]['sites']) or '-'}")

    recipe = training.get("recipe") or {}
    regions = training.get("regions") or []
    if regions:
        names = [region["file"] for region in regions if isinstance(region, dict) and "file" in region]
        lines.append(f"- training regions ({len(names)}): {', '.join(names)}")
    for key in ("loss", "optimizer", "schedule", "initialization", "epochs", "batch_size", "lr", "tile_size", "sampling"):
        if key in recipe:
            lines.append(f"- {key}: {recipe[key]}")
    if training.get("steps") is not None:
        lines.append(f"- steps run: {training['steps']} ({training.get('train_seconds')} s on {training.get('machine')})")

    lines += ["", "## Evaluation", ""]
    settings = evaluation["settings"]
    count = evaluation["regions"]
    lines.append(
        f"{count} region{'' if count == 1 else 's'} from site{'' if len(evaluation['sites']) == 1 else 's'} "
        f"{', '.join(evaluation['sites'])} in `{evaluation['data_dir']}`, scored at the masks' resolution "
        f"({evaluation['mode']}): {', '.join(evaluation['region_names'])}. Pipeline settings: "
        f"{settings['tile_size_px']} px tiles, {settings['overlap_px']} px overlap, {settings['blend_mode']} blending, "
        f"tissue detection {'on' if settings['tissue_detection'] else 'off'}."
    )
    if evaluation["trained_on"]:
        lines += ["", f"**Warning: {len(evaluation['trained_on'])} of these regions were in the training data** "
                  f"({', '.join(evaluation['trained_on'])}), so their scores do not measure generalisation and do "
                  "not compare with the published scores below."]

    agreement = evaluation["pipeline_region_agreement"]
    if agreement is not None:
        lines.append(f"Whole-slide pipeline versus whole-region inference: **{agreement:.2%}** of scored pixels agree.")

    lines += ["", "| model | " + " | ".join(_columns(evaluation)) + " |", "|---|" + "---|" * len(_columns(evaluation))]
    for path, scores in evaluation["scores"].items():
        lines.append(f"| this model, {path} path | " + " | ".join(_cells(scores, _columns(evaluation))) + " |")
    if evaluation["mode"] == "classes":
        for anchor in card["anchors"]:
            lines.append(f"| {anchor['model']} | " + " | ".join(_cells(anchor, _columns(evaluation))) + " |")
        lines += ["", card["anchors_note"]]
    lines.append("")
    return "\n".join(lines)


def _columns(evaluation: dict) -> list[str]:
    return ["tumor", "rest"] if evaluation["mode"] == "tumor_vs_rest" else [*CLASS_NAMES, "mean"]


def _cells(scores: dict, columns: list[str]) -> list[str]:
    cells = []
    for column in columns:
        value = scores.get("mean_dice") if column == "mean" else scores.get("dice", {}).get(column)
        cells.append("-" if value is None else f"{value:.3f}")
    return cells
