"""Starting weights, frozen layers and the metadata written into each training checkpoint."""

from __future__ import annotations

import logging
import pickle
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from bcseg import __version__
from bcseg.checkpoint import ModelInfo
from bcseg.classes import CLASS_NAMES
from bcseg.errors import BadInputError
from bcseg.model import SegmentationNet

log = logging.getLogger(__name__)

RANDOM_INITIALIZATION = "random initialization: no pretrained weights"


def load_backbone_weights(model: SegmentationNet, path: Path) -> None:
    """Load a torchvision-format ResNet-50 state dict (``.pth``/``.pt`` or ``.safetensors``) into the backbone.

    The classifier (``fc.*``) is dropped and a ``module.`` prefix (from DataParallel) removed.
    The file is read with ``torch.load(weights_only=True)``, which runs no code from it.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        raise BadInputError(
            f"{path}: failed to read backbone weights ({error}); expected a ResNet-50 state dict saved with torch.save or safetensors"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError(f"{path}: not a state dict of tensors; expected torchvision's resnet50().state_dict()")
    state = {key.removeprefix("module."): value for key, value in state.items() if not key.removeprefix("module.").startswith("fc.")}

    backbone = model.net.backbone
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BadInputError(
            f"{path}: not a torchvision ResNet-50 state dict: {len(missing)} backbone weights missing "
            f"(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})"
        )
    wrong_shape = [key for key in expected if expected[key].shape != state[key].shape]
    if wrong_shape:
        raise BadInputError(f"{path}: weight {wrong_shape[0]} has shape {tuple(state[wrong_shape[0]].shape)}, expected {tuple(expected[wrong_shape[0]].shape)}")
    backbone.load_state_dict(state, strict=True)
    log.info("backbone weights loaded from %s (%d tensors)", path, len(state))


def freeze_backbone(model: SegmentationNet) -> None:
    """Stop gradient updates of the ResNet-50 backbone; the caller keeps its batch norms in eval mode."""
    for parameter in model.net.backbone.parameters():
        parameter.requires_grad_(False)


def model_info(run, elapsed: float, scores: dict | None) -> ModelInfo:
    """Build the checkpoint metadata of a training run (``loop._Run``) at its current step."""
    config = run.config
    if config.init_from is not None:
        initialization = f"weights of {Path(config.init_from).name}"
    elif config.backbone_weights is not None:
        initialization = f"backbone from {Path(config.backbone_weights).name}, head random"
    else:
        initialization = RANDOM_INITIALIZATION
    recipe = {
        key: value
        for key, value in config.to_json().items()
        if key not in ("data_dirs", "out_dir", "val_dir", "init_from", "compact_out", "groups", "split_file",
                       "stain_target", "backbone_weights")
    }
    recipe.update(
        optimizer="AdamW",
        schedule="linear warm-up then cosine decay to 1% of lr",
        loss=f"class-weighted cross-entropy + {config.dice_weight} x (1 - soft Dice); ignored codes count nowhere",
        sampling="patch centres drawn equally often from each class with at least 1% of labelled pixels, rarer ones in proportion",
        augmentation=run.augmentation.describe() if config.colour_jitter else {"scale_range": config.scale_range},
        initialization=initialization,
        steps_per_epoch=run.steps_per_epoch,
        processes=run.group.world_size,
        frozen_backbone=config.freeze_backbone,
    )
    provenance = {
        "split": {
            part: {"sites": run.split.sites(part), "regions": len(getattr(run.split, part))}
            for part in ("train", "validation", "test")
        },
        "training_regions": [{"file": region.name, "source_mpp": region.source_mpp} for region in run.train_regions],
        "class_pixels": dict(zip(CLASS_NAMES, run.counts.tolist())),
        "class_weights": dict(zip(CLASS_NAMES, [round(float(w), 4) for w in run.weights])),
        "recipe": recipe,
        "epochs": run.epoch,
        "steps": run.step,
        "train_seconds": round(elapsed, 1),
        "validation": scores,
        "best_validation": {"score": run.best_score, "epoch": run.best_epoch},
        "package_version": __version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()}, {run.device.type}, {torch.get_num_threads()} torch threads",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return ModelInfo(
        mpp=config.mpp,
        tile_size_px=config.inference_tile_size,
        bcss_groups={str(code): group for code, group in sorted(config.groups.items())},
        stain_normalization=run.stain_normalizer.to_json() if run.stain_normalizer else None,
        provenance=provenance,
    )
