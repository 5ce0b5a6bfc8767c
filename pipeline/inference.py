"""The batch inferencer: runs the model over the tiles of a tile store.

A background thread reads batches from the zarr store into a bounded queue, so reading overlaps
the model. Predictions (softmax probabilities) go to a callback, normally the stitcher's
``Merger.add``. On CUDA the model runs under autocast in channels_last layout; on the
CPU torch uses every core this process may run on.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

from bcseg.checkpoint import LoadedModel
from bcseg.errors import BadInputError

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
PREFETCH_BATCHES = 2


def select_device(request: str = "auto") -> torch.device:
    """Resolve ``auto``, ``cpu`` or ``cuda`` (optionally ``cuda:N``) to a torch device."""
    if request == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if request.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInputError("--device cuda was requested but torch sees no CUDA GPU; use --device cpu or auto")
        return torch.device(request)
    if request == "cpu":
        return torch.device("cpu")
    raise BadInputError(f"--device {request!r} is not one of {', '.join(DEVICE_CHOICES)}")


def available_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Predictor:
    """Turns batches of uint8 RGB tiles into class probabilities with one loaded model."""

    def __init__(self, loaded: LoadedModel, device: torch.device):
        self.device = device
        self.info = loaded.info
        self.model = loaded.model.to(device).eval()
        self.mean = torch.tensor(self.info.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.info.std, device=device).view(1, 3, 1, 1)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        else:
            torch.set_num_threads(available_cpu_count())

    @torch.inference_mode()
    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """Probabilities (batch, classes, rows, cols) float32 for uint8 tiles (batch, rows, cols, 3)."""
        images = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, non_blocking=True)
        images = images.permute(0, 3, 1, 2).float().div_(255.0)
        images = (images - self.mean) / self.std
        if self.device.type == "cuda":
            # NOTE: this CUDA path (autocast, channels_last) has not yet run on a GPU; only the
            # CPU path is covered by the tests.
            images = images.contiguous(memory_format=torch.channels_last)
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                logits = self.model(images)
        else:
            logits = self.model(images)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()


def iterate_batches(tile_store, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (start index, tiles) batches, read ahead by a background thread."""
    batches: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    stop = threading.Event()

    def read_ahead():
        try:
            for start in range(0, len(tile_store), batch_size):
                if stop.is_set():
                    return
                batches.put((start, tile_store.read(start, min(start + batch_size, len(tile_store)))))
            batches.put(None)
        except BaseException as error:  # handed to the consumer, which re-raises it
            batches.put(error)

    reader = threading.Thread(target=read_ahead, name="tile-reader", daemon=True)
    reader.start()
    try:
        while (item := batches.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting on a full queue
            try:
                batches.get_nowait()
            except queue.Empty:
                reader.join(timeout=0.1)


def predict_tiles(
    tile_store,
    predictor: Predictor,
    add: Callable[[int, int, np.ndarray], None],
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Run ``predictor`` over every tile and pass each (m_x, m_y, probabilities) to ``add``.

    Returns the number of tiles predicted.
    """
    done = 0
    for start, tiles in iterate_batches(tile_store, batch_size):
        probabilities = predictor.predict(tiles)
        for offset, tile_probabilities in enumerate(probabilities):
            m_x, m_y = (int(value) for value in tile_store.m_origins[start + offset])
            add(m_x, m_y, tile_probabilities)
        done += len(tiles)
        if progress is not None:
            progress(done, len(tile_store))
    return done
