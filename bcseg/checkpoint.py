"""Checkpoints: safetensors weights with the metadata that binds them to their preprocessing.

A checkpoint is one ``.safetensors`` file. Its header metadata holds, under the key ``bcseg``, a
JSON object with the architecture, class table, BCSS code mapping, model resolution (mpp), tile
size, normalization and provenance, so inference cannot drift from training. Nothing is ever
unpickled: a pickled PyTorch file is rejected because unpickling can run arbitrary code.

Weights are stored as float32, or compactly as int8 with one float32 scale per output channel
(``weights_encoding = "int8-per-channel"``), dequantized when loaded. In the compact form, small
tensors (at most FLOAT_MAX_ELEMENTS values) stay float32: they are the stem, the first residual
stage and the classifier's last layer, about 1% of the weights, and their int8 rounding error
flows through the whole network.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bcseg.classes import CLASSES, DEFAULT_BCSS_GROUPS, NUM_CLASSES
from bcseg.errors import BadInputError
from bcseg.model import ARCHITECTURE, IMAGENET_MEAN, IMAGENET_STD, SegmentationNet, build_model

FORMAT_NAME = "bcseg-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "bcseg"
SCALE_SUFFIX = ".__scale__"
# Measured on a DeepLabV3-ResNet50 trained here: int8 in every convolution changed 1.9% of the
# labels of a 512x512 slide region. Keeping tensors up to this size float changed 0.3%.
FLOAT_MAX_ELEMENTS = 65_536
DEFAULT_MODEL_PATH = Path(__file__).parent / "models" / "default.safetensors"


@dataclass
class ModelInfo:
    """Everything about a model except its weights."""

    mpp: float  # microns per pixel of the model's input
    tile_size_px: int  # tile size the model was trained and validated for
    architecture: str = ARCHITECTURE
    num_classes: int = NUM_CLASSES
    classes: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"label": c.label, "name": c.name, "qupath_name": c.qupath_name, "color": list(c.color)}
            for c in CLASSES
        ]
    )
    bcss_groups: dict[str, str | None] = field(
        default_factory=lambda: {str(k): v for k, v in sorted(DEFAULT_BCSS_GROUPS.items())}
    )
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Stain normalization the model expects on its input (bcseg.stain), or None.
    stain_normalization: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def image_pooling_px(self) -> int | None:
        """Window of the ASPP image pooling at inference: the training patch side, when the recipe records it."""
        recipe = self.provenance.get("recipe")
        patch = recipe.get("tile_size") if isinstance(recipe, dict) else None
        return int(patch) if isinstance(patch, (int, float)) and patch > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "bcss_groups": self.bcss_groups,
            "mpp": self.mpp,
            "tile_size_px": self.tile_size_px,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "stain_normalization": self.stain_normalization,
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(
            mpp=float(data["mpp"]),
            tile_size_px=int(data["tile_size_px"]),
            architecture=data["architecture"],
            num_classes=int(data["num_classes"]),
            classes=data["classes"],
            bcss_groups=data["bcss_groups"],
            mean=tuple(data["normalization"]["mean"]),
            std=tuple(data["normalization"]["std"]),
            stain_normalization=data.get("stain_normalization"),
            provenance=data.get("provenance", {}),
        )


@dataclass
class LoadedModel:
    model: SegmentationNet
    info: ModelInfo
    path: Path
    sha256: str
    weights_encoding: str


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    info: ModelInfo,
    compact: bool = False,
) -> Path:
    """Write ``model``'s weights and ``info`` to ``path`` atomically.

    With ``compact=True`` every floating-point tensor of two or more dimensions (convolution
    weights) with more than FLOAT_MAX_ELEMENTS values is stored as int8 with a
    per-output-channel scale; the rest stay float32.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in _unwrapped_state_dict(model).items():
        tensor = tensor.detach().cpu()
        if compact and tensor.is_floating_point() and tensor.ndim >= 2 and tensor.numel() > FLOAT_MAX_ELEMENTS:
            quantized, scale = _quantize_per_channel(tensor.float())
            tensors[name] = quantized
            tensors[name + SCALE_SUFFIX] = scale
        elif tensor.is_floating_point():
            tensors[name] = tensor.float().contiguous()
        else:
            tensors[name] = tensor.contiguous()

    metadata = info.to_json()
    metadata["weights_encoding"] = "int8-per-channel" if compact else "float32"
    temporary = path.with_name(path.name + ".partial")
    save_file(tensors, str(temporary), metadata={METADATA_KEY: json.dumps(metadata)})
    # safetensors writes through a private (0600) temporary file. Apply the umask's usual
    # permissions instead, so a model bundled in an installed package is readable by every user.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    os.replace(temporary, path)
    return path


def read_model_info(path: str | os.PathLike) -> tuple[ModelInfo, str]:
    """Read the metadata of a checkpoint without loading its weights.

    Returns the model information and the weights encoding.
    """
    path = Path(path)
    header = _read_safetensors_header(path)
    raw = header.get("__metadata__", {}).get(METADATA_KEY)
    if raw is None:
        raise BadInputError(
            f"{path}: this safetensors file has no bcseg metadata, so its classes, resolution "
            "and normalization are unknown; save it with bcseg.checkpoint.save_checkpoint"
        )
    try:
        data = json.loads(raw)
        info = ModelInfo.from_json(data)
    except (ValueError, KeyError, TypeError) as error:
        raise BadInputError(f"{path}: invalid bcseg metadata in checkpoint ({error})") from error
    if data.get("format") != FORMAT_NAME or int(data.get("format_version", -1)) > FORMAT_VERSION:
        raise BadInputError(
            f"{path}: checkpoint format {data.get('format')!r} version {data.get('format_version')} "
            f"is not readable by this release (reads {FORMAT_NAME} up to version {FORMAT_VERSION})"
        )
    return info, data.get("weights_encoding", "float32")


def load_checkpoint(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint, or the bundled default model when ``path`` is None.

    The model is returned in eval mode on ``device``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_MODEL_PATH
    info, encoding = read_model_info(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise BadInputError(
            f"{path}: the checkpoint's weights cannot be read ({error}); the file may be truncated "
            "or corrupt, so copy or download it again"
        ) from error
    state = _dequantize(tensors) if encoding == "int8-per-channel" else tensors

    # Built on the meta device, so no time goes into random initial weights that the checkpoint
    # replaces (seconds on a 2-core CPU); assign=True makes the loaded tensors the parameters.
    with torch.device("meta"):
        model = build_model(info.architecture, info.num_classes, info.image_pooling_px)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise BadInputError(
            f"{path}: the weights do not fit a {info.architecture} with {info.num_classes} classes "
            f"({str(error).splitlines()[0]})"
        ) from error
    model.eval().to(device)
    return LoadedModel(model, info, path, file_sha256(path), encoding)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse the JSON header of a safetensors file, rejecting anything else with a clear message."""
    if not path.exists():
        raise BadInputError(f"{path}: checkpoint not found; pass an existing file to --model")
    if path.is_dir():
        raise BadInputError(f"{path}: is a folder; --model needs a .safetensors checkpoint file")
    try:
        with open(path, "rb") as file:
            prefix = file.read(8)
            header_size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if 2 <= header_size <= 100_000_000:
                header_bytes = file.read(header_size)
            else:
                header_bytes = b""
    except PermissionError as error:
        raise BadInputError(f"{path}: checkpoint is not readable (permission denied)") from error

    # Parse the safetensors header first: its 8-byte little-endian size can itself start with
    # 0x80, so sniffing for a pickle before parsing would reject valid checkpoints.
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as error:
        if prefix[:1] == b"\x80" or prefix[:4] == b"PK\x03\x04":
            raise BadInputError(
                f"{path}: this is a pickled PyTorch file, not a safetensors checkpoint. bcseg-wsi never "
                "unpickles checkpoints because unpickling can run arbitrary code. If you trust the file, "
                "load it with torch.load(path, weights_only=True) and save it with "
                "bcseg.checkpoint.save_checkpoint"
            ) from None
        raise BadInputError(
            f"{path}: not a safetensors checkpoint (unreadable header); pass a .safetensors file "
            "written by bcseg-wsi train"
        ) from error
    return header


def _unwrapped_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # DistributedDataParallel and torch.compile wrap the model; store the plain module's keys.
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model.state_dict()


def _quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = weight.reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    quantized = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return quantized.reshape(weight.shape).contiguous(), scale.contiguous()


def _dequantize(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        if scale is not None:
            shape = (-1,) + (1,) * (tensor.ndim - 1)
            state[name] = tensor.float() * scale.reshape(shape)
        else:
            state[name] = tensor
    return state
