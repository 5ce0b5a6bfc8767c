"""The training run: data and splits, model set-up, epochs of optimizer steps, validation, checkpoints.

A run folder contains ``config.json`` (the settings), ``split.json`` (regions per split),
``state.pt`` (everything needed to resume: weights, optimizer, schedule, random states),
``last.safetensors`` and ``best.safetensors`` (model checkpoints), and the metrics table and plot.
``state.pt`` is written after every epoch and when a run is stopped, so ``resume`` continues
exactly where the last save left off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from bcseg.checkpoint import load_checkpoint, save_checkpoint
from bcseg.classes import CLASS_NAMES, DEFAULT_BCSS_GROUPS, code_lookup_table
from bcseg.errors import BadInputError
from bcseg.model import ARCHITECTURE, IMAGENET_MEAN, IMAGENET_STD, build_model
from bcseg.training import distributed
from bcseg.training.augment import NO_AUGMENTATION, Augmentation
from bcseg.training.data import PatchSampler, class_pixel_counts, class_weights, find_pairs, load_regions
from bcseg.training.logbook import Logbook
from bcseg.training.losses import DiceCrossEntropyLoss
from bcseg.training.model_setup import freeze_backbone, load_backbone_weights, model_info
from bcseg.training.predict import normalize
from bcseg.training.splits import DEFAULT_TEST_SITES, DEFAULT_VALIDATION_FRACTION, Split, read_split_file, split_by_site
from bcseg.training.validation import TUMOR_CHANNEL, Validation, selection_score  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SPLIT_FILE = "split.json"
STATE_FILE = "state.pt"


@dataclass
class TrainConfig:
    data_dirs: list[Path]
    out_dir: Path
    mpp: float = 0.5  # model resolution, microns per pixel
    tile_size: int = 256  # training patch side at model resolution, px
    inference_tile_size: int = 512  # stored in the checkpoint; the pipeline's default tiles are twice this
    epochs: int = 40
    patches_per_epoch: int | None = None  # default: labelled training area / patch area
    batch_size: int = 4  # patches per process and micro-batch
    accumulation_steps: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int | None = None  # default: 5% of all optimizer steps
    dice_weight: float = 1.0  # loss = cross-entropy + dice_weight * (1 - soft Dice)
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA; ignored on CPU
    data_mpp: float | None = None
    test_sites: list[str] = field(default_factory=lambda: list(DEFAULT_TEST_SITES))
    val_sites: list[str] | None = None
    val_fraction: float = DEFAULT_VALIDATION_FRACTION
    split_file: Path | None = None
    val_dir: Path | None = None  # an extra validation folder, e.g. tumour-versus-rest masks
    val_binary: bool = False
    val_every_epochs: int = 1
    scale_range: tuple[float, float] = (0.8, 1.25)
    colour_jitter: bool = True
    stain_normalization: str | None = None  # "macenko" or "reinhard"
    stain_target: Path | None = None
    freeze_backbone: bool = False
    backbone_weights: Path | None = None
    init_from: Path | None = None
    max_minutes: float | None = None
    compact_out: Path | None = None
    groups: dict[int, str | None] = field(default_factory=lambda: dict(DEFAULT_BCSS_GROUPS))

    def to_json(self) -> dict:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
        data["data_dirs"] = [str(path) for path in self.data_dirs]
        data["groups"] = {str(code): group for code, group in sorted(self.groups.items())}
        return data

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        path_keys = ("out_dir", "split_file", "val_dir", "stain_target", "backbone_weights", "init_from", "compact_out")
        for key in path_keys:
            if values.get(key) is not None:
                values[key] = Path(values[key])
        values["data_dirs"] = [Path(path) for path in values["data_dirs"]]
        values["groups"] = {int(code): group for code, group in values["groups"].items()}
        values["scale_range"] = tuple(values["scale_range"])
        return cls(**values)


@dataclass
class TrainResult:
    run_dir: Path
    last_path: Path
    best_path: Path
    compact_path: Path | None
    epochs_done: int
    steps_done: int
    best_score: float | None
    best_score_name: str | None
    seconds_per_step: float
    stopped_early: bool
    stopped_by_signal: bool = False  # SIGTERM, as opposed to --max-minutes


class _StopRequest:
    """Set by SIGTERM so a run stopped from outside saves its state before it exits."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        log.warning("signal %d received: stopping after this step and saving the training state", signum)
        self.requested = True


# The callback receives (epoch, epochs, step in epoch, steps per epoch, loss of the last step).
ProgressCallback = Callable[[int, int, int, int, float], None]


def train(config: TrainConfig, progress: ProgressCallback | None = None, resume: bool = False) -> TrainResult:
    """Train with ``config``, or continue the run in ``config.out_dir`` with ``resume=True``.

    Under ``torchrun`` every process calls this; process 0 writes the run folder. Raises
    BadInputError on bad data or options. The run stops early, saving its state, after
    ``max_minutes`` or on SIGTERM.
    """
    _check_options(config)
    group, device = distributed.start_process_group(config.device)
    try:
        return _Run(config, group, device, progress, resume).execute()
    finally:
        distributed.stop_process_group(group)


def resume_config(run_dir: Path, max_minutes: float | None = None, threads: int | None = None) -> TrainConfig:
    """Read the settings of the run in ``run_dir`` for ``train(..., resume=True)``."""
    config_path, state_path = Path(run_dir) / CONFIG_FILE, Path(run_dir) / STATE_FILE
    if not config_path.exists() or not state_path.exists():
        raise BadInputError(
            f"{run_dir}: not a resumable training run ({CONFIG_FILE} or {STATE_FILE} missing); "
            "a run saves its state after its first epoch or when stopped"
        )
    config = TrainConfig.from_json(json.loads(config_path.read_text(encoding="utf-8")))
    config.out_dir = Path(run_dir)
    config.max_minutes = max_minutes
    if threads:
        config.threads = threads
    return config


class _Run:
    def __init__(self, config: TrainConfig, group, device: torch.device, progress, resume: bool):
        self.config = config
        self.group = group
        self.device = device
        self.progress = progress
        self.resume = resume
        self.run_dir = Path(config.out_dir)
        self.logbook = Logbook(self.run_dir)

    # Set-up

    def execute(self) -> TrainResult:
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        self._prepare_run_dir()
        self._load_data()
        self._build_model()
        self._build_optimizer()
        if self.resume:
            self._load_state()
        return self._loop()

    def _prepare_run_dir(self) -> None:
        state_path = self.run_dir / STATE_FILE
        if not self.resume and state_path.exists():
            raise BadInputError(
                f"{self.run_dir}: already contains a training run; continue it with --resume {self.run_dir} "
                "or choose another --out"
            )
        if self.group.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                _write_json(self.run_dir / CONFIG_FILE, self.config.to_json())
        distributed.barrier(self.group)

    def _load_data(self) -> None:
        config = self.config
        pairs = [pair for data_dir in config.data_dirs for pair in find_pairs(Path(data_dir))]
        by_name = {image.name: (image, mask) for image, mask in pairs}
        if len(by_name) != len(pairs):
            raise BadInputError("two data folders hold images of the same name; give each region one file name")

        split_path = self.run_dir / SPLIT_FILE
        if self.resume:
            split = read_split_file(split_path)
        elif config.split_file is not None:
            split = read_split_file(config.split_file)
        else:
            split = split_by_site(list(by_name), config.test_sites, config.val_sites, config.val_fraction, config.seed)
        missing = sorted(set(split.train + split.validation) - set(by_name))
        if missing:
            raise BadInputError(f"{missing[0]}: listed in the split but not found in {', '.join(map(str, config.data_dirs))}")
        self.split = split
        if self.group.is_main and not self.resume:
            _write_json(split_path, split.to_json())

        self.stain_normalizer = None
        if config.stain_normalization:
            from bcseg.stain import StainNormalizer

            self.stain_normalizer = StainNormalizer.fit_file(config.stain_normalization, config.stain_target)

        lookup = code_lookup_table(config.groups)
        load = lambda names: load_regions(  # noqa: E731
            [by_name[name] for name in names], config.groups, lookup, config.mpp, config.data_mpp, self.stain_normalizer
        )
        self.train_regions = load(split.train)
        validation_regions = load(split.validation) if self.group.is_main else []
        self.validation = Validation.create(config, validation_regions, self.stain_normalizer) if self.group.is_main else None

        self.counts = class_pixel_counts(self.train_regions)
        self.weights = class_weights(self.counts)
        log.info(
            "training pixels per class %s; loss weights %s",
            dict(zip(CLASS_NAMES, self.counts.tolist())), np.round(self.weights, 3).tolist(),
        )
        base = Augmentation() if config.colour_jitter else NO_AUGMENTATION
        augmentation = dataclasses.replace(base, scale_range=tuple(config.scale_range))
        self.augmentation = augmentation
        self.sampler = PatchSampler(
            self.train_regions, config.tile_size, np.random.default_rng([config.seed, self.group.rank]), augmentation
        )

        labelled = int(self.counts.sum())
        patches = config.patches_per_epoch or max(1, round(labelled / config.tile_size**2))
        per_step = config.batch_size * config.accumulation_steps * self.group.world_size
        self.steps_per_epoch = max(1, math.ceil(patches / per_step))
        self.total_steps = self.steps_per_epoch * config.epochs
        log.info(
            "%d epochs of %d steps (%d patches of %d px per step over %d processes)",
            config.epochs, self.steps_per_epoch, per_step, config.tile_size, self.group.world_size,
        )

    def _build_model(self) -> None:
        config = self.config
        torch.manual_seed(config.seed)
        if config.init_from is not None and not self.resume:
            loaded = load_checkpoint(config.init_from)
            if abs(loaded.info.mpp - config.mpp) > 1e-6:
                raise BadInputError(
                    f"{config.init_from}: checkpoint was trained at {loaded.info.mpp} um/px but --mpp is {config.mpp}"
                )
            # The image pooling window follows this run's patch size, not the checkpoint's.
            model = build_model(ARCHITECTURE, image_pooling_px=config.tile_size)
            model.load_state_dict(loaded.model.state_dict())
            log.info("starting from the weights of %s", config.init_from)
        else:
            model = build_model(ARCHITECTURE, image_pooling_px=config.tile_size)
            if config.backbone_weights is not None and not self.resume:
                load_backbone_weights(model, config.backbone_weights)
        if config.freeze_backbone:
            freeze_backbone(model)
        model.to(self.device)
        if self.device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        # Dropout differs per process; the weights are the same everywhere (DDP broadcasts rank 0's).
        torch.manual_seed(config.seed * 1000 + self.group.rank)
        self.model = model
        if self.group.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.train_model = model

        self.autocast_dtype = None
        if self.device.type == "cuda" and config.amp:
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _build_optimizer(self) -> None:
        config = self.config
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
        warmup = config.warmup_steps if config.warmup_steps is not None else max(1, self.total_steps // 20)
        total = self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, warmup, total))
        # A gradient scaler is needed only for float16; bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.loss_function = DiceCrossEntropyLoss(torch.from_numpy(self.weights), config.dice_weight).to(self.device)

        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0
        self.step = 0
        self.epoch_sums = np.zeros(4)  # total loss, cross-entropy, Dice loss, steps
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.elapsed_before = 0.0

    def _load_state(self) -> None:
        state = torch.load(self.run_dir / STATE_FILE, map_location="cpu", weights_only=True)
        if state["world_size"] != self.group.world_size:
            raise BadInputError(
                f"{self.run_dir}: the run was trained with {state['world_size']} processes; resume it with the same number"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.rng.bit_generator.state = json.loads(state["sampler_rng"][self.group.rank])
        torch.set_rng_state(state["torch_rng"][self.group.rank])
        if self.device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state(state["cuda_rng"][self.group.rank], self.device)
        self.epoch, self.step_in_epoch, self.step = state["epoch"], state["step_in_epoch"], state["step"]
        self.epoch_sums = np.asarray(state["epoch_sums"], dtype=np.float64)
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.elapsed_before = state["elapsed_seconds"]
        if self.group.is_main:
            self.logbook.truncate_after(self.epoch)
        log.info("resuming %s at epoch %d, step %d of %d", self.run_dir, self.epoch + 1, self.step, self.total_steps)

    # Training

    def _loop(self) -> TrainResult:
        config = self.config
        stop = _StopRequest()
        previous_handler = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
        started = time.monotonic()
        steps_at_start = self.step
        stopped_early = False
        try:
            while self.epoch < config.epochs and not stopped_early:
                epoch_started = time.monotonic()
                self.model.train()
                if config.freeze_backbone:
                    self.model.net.backbone.eval()
                halt = False
                while self.step_in_epoch < self.steps_per_epoch and not halt:
                    loss = self._optimizer_step()
                    if self.progress and self.group.is_main:
                        self.progress(self.epoch + 1, config.epochs, self.step_in_epoch, self.steps_per_epoch, loss)
                    out_of_time = config.max_minutes is not None and time.monotonic() - started >= config.max_minutes * 60
                    # Every process must agree, or the ones that go on wait forever for the others.
                    halt = distributed.any_process(self.group, stop.requested or out_of_time, self.device)
                    if halt and out_of_time:
                        log.info("stopping at step %d: --max-minutes %.1f reached", self.step, config.max_minutes)
                elapsed = self.elapsed_before + time.monotonic() - started
                if self.step_in_epoch == self.steps_per_epoch:
                    self._finish_epoch(time.monotonic() - epoch_started, elapsed)
                else:
                    self._save(elapsed, scores=None)
                stopped_early = halt and self.epoch < config.epochs
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)

        steps_run = self.step - steps_at_start
        seconds_per_step = (time.monotonic() - started) / max(steps_run, 1)
        result = self._result(seconds_per_step, stopped_early)
        result.stopped_by_signal = stopped_early and stop.requested
        return result

    def _optimizer_step(self) -> float:
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        totals = np.zeros(3)
        for micro in range(config.accumulation_steps):
            images, labels = zip(*(self.sampler.sample() for _ in range(config.batch_size)))
            inputs = normalize(np.stack(images), IMAGENET_MEAN, IMAGENET_STD).to(self.device, non_blocking=True)
            targets = torch.from_numpy(np.stack(labels).astype(np.int64)).to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            last_micro = micro == config.accumulation_steps - 1
            # DDP averages gradients only on the last micro-batch of a step.
            sync = self.train_model.no_sync() if self.group.distributed and not last_micro else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    logits = self.train_model(inputs)
                loss = self.loss_function(logits, targets) / config.accumulation_steps
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            parts = self.loss_function.last_parts
            totals += [float(loss.detach()) * config.accumulation_steps, parts["cross_entropy"], parts.get("dice_loss", 0.0)]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.step_in_epoch += 1

        totals /= config.accumulation_steps
        totals = np.asarray(distributed.mean_over_processes(self.group, totals.tolist(), self.device))
        if not math.isfinite(totals[0]):
            raise RuntimeError(f"training loss became {totals[0]} at step {self.step}; lower --lr")
        self.epoch_sums += [*totals, 1]
        return float(totals[0])

    def _finish_epoch(self, epoch_seconds: float, elapsed: float) -> None:
        config = self.config
        self.epoch += 1
        self.step_in_epoch = 0
        sums, self.epoch_sums = self.epoch_sums, np.zeros(4)
        steps = max(sums[3], 1)
        record = {
            "epoch": self.epoch,
            "step": self.step,
            "lr": self.scheduler.get_last_lr()[0],
            "loss": sums[0] / steps,
            "cross_entropy": sums[1] / steps,
            "dice_loss": sums[2] / steps if config.dice_weight else None,
        }
        scores = None
        if self.group.is_main:
            validate_now = self.epoch % config.val_every_epochs == 0 or self.epoch == config.epochs
            if self.validation is not None and validate_now:
                scores = self.validation.run(self.model, self.device, self.autocast_dtype)
                record.update(scores)
            record["epoch_seconds"] = round(epoch_seconds, 1)
            record["elapsed_seconds"] = round(elapsed, 1)
            self.logbook.append(record)
            score_name, score = selection_score(scores)
            log.info(
                "epoch %d/%d loss %.4f%s (%.0f s)",
                self.epoch, config.epochs, record["loss"],
                "" if score is None else f", validation {score_name} {score:.4f}", epoch_seconds,
            )
        self._save(elapsed, scores)

    # Saving

    def _save(self, elapsed: float, scores: dict | None) -> None:
        """Write last.safetensors, best.safetensors when the score improved, and state.pt."""
        sampler_states = distributed.gather_objects(self.group, json.dumps(self.sampler.rng.bit_generator.state))
        torch_states = distributed.gather_objects(self.group, torch.get_rng_state())
        cuda_states = (
            distributed.gather_objects(self.group, torch.cuda.get_rng_state(self.device)) if self.device.type == "cuda" else []
        )
        if self.group.is_main:
            score_name, score = selection_score(scores)
            improved = score is not None and (self.best_score is None or score > self.best_score)
            if improved:
                self.best_score, self.best_epoch = score, self.epoch
            info = model_info(self, elapsed, scores)
            last_path, best_path = self.run_dir / "last.safetensors", self.run_dir / "best.safetensors"
            save_checkpoint(last_path, self.model, info)
            if improved:
                _replace_with_copy(last_path, best_path)
                log.info("new best validation %s %.4f at epoch %d: %s", score_name, score, self.epoch, best_path)
            elif self.validation is None and self.step_in_epoch == 0:
                _replace_with_copy(last_path, best_path)

            state = {
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "sampler_rng": sampler_states,
                "torch_rng": torch_states,
                "cuda_rng": [state.cpu() for state in cuda_states],
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "step": self.step,
                "epoch_sums": self.epoch_sums.tolist(),
                "best_score": self.best_score,
                "best_epoch": self.best_epoch,
                "elapsed_seconds": elapsed,
                "world_size": self.group.world_size,
            }
            temporary = self.run_dir / (STATE_FILE + ".partial")
            torch.save(state, temporary)
            os.replace(temporary, self.run_dir / STATE_FILE)
        distributed.barrier(self.group)

    def _result(self, seconds_per_step: float, stopped_early: bool) -> TrainResult:
        compact_path = None
        best_path = self.run_dir / "best.safetensors"
        if self.config.compact_out and self.group.is_main and not stopped_early and best_path.exists():
            best = load_checkpoint(best_path)
            compact_path = save_checkpoint(self.config.compact_out, best.model, best.info, compact=True)
            log.info("compact copy of %s written to %s", best_path, compact_path)
        return TrainResult(
            run_dir=self.run_dir,
            last_path=self.run_dir / "last.safetensors",
            best_path=best_path,
            compact_path=compact_path,
            epochs_done=self.epoch,
            steps_done=self.step,
            best_score=self.best_score,
            best_score_name=self.validation.score_name if self.validation else None,
            seconds_per_step=seconds_per_step,
            stopped_early=stopped_early,
        )


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 1% of the base rate at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def _check_options(config: TrainConfig) -> None:
    checks = [
        (config.mpp > 0, f"--mpp must be positive, got {config.mpp}"),
        (config.tile_size >= 32, f"--tile-size must be at least 32 px, got {config.tile_size}"),
        (config.inference_tile_size >= 64, f"--inference-tile-size must be at least 64 px, got {config.inference_tile_size}"),
        (config.epochs >= 1, f"--epochs must be at least 1, got {config.epochs}"),
        (config.patches_per_epoch is None or config.patches_per_epoch >= 1,
         f"--patches-per-epoch must be at least 1, got {config.patches_per_epoch}"),
        (config.batch_size >= 2, f"--batch-size must be at least 2 (batch normalization), got {config.batch_size}"),
        (config.accumulation_steps >= 1, f"--accumulation-steps must be at least 1, got {config.accumulation_steps}"),
        (config.lr > 0, f"--lr must be positive, got {config.lr}"),
        (config.dice_weight >= 0, f"--dice-weight must be 0 or more, got {config.dice_weight}"),
        (config.val_every_epochs >= 1, f"--val-every must be at least 1, got {config.val_every_epochs}"),
        (config.data_mpp is None or config.data_mpp > 0, f"--data-mpp must be positive, got {config.data_mpp}"),
        (not config.val_binary or config.val_dir is not None, "--val-binary needs --val-dir"),
        (0 < config.scale_range[0] <= config.scale_range[1],
         f"--scale-jitter gives an invalid zoom range {config.scale_range}"),
        (not config.stain_normalization or config.stain_target is not None,
         "--stain-normalization needs --stain-target IMAGE, an H&E image whose colours the data are mapped to"),
        (config.backbone_weights is None or config.init_from is None,
         "--backbone-weights and --init-from both set the starting weights; give one"),
        (config.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {config.device}"),
    ]
    for passed, message in checks:
        if not passed:
            raise BadInputError(message)


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _replace_with_copy(source: Path, target: Path) -> None:
    """Make ``target`` a copy of ``source``: a hard link where the file system allows one.

    Checkpoints are replaced by rename, never rewritten in place, so a link stays a true copy.
    """
    temporary = target.with_name(target.name + ".partial")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


