"""The batch inferencer: decoded tiles in, batches through the model, blended predictions out.

``predict_stream`` runs three stages at once. Reader threads (``pipeline.tiling.read_tiles``)
decode tiles a bounded number ahead. The calling thread assembles batches (in pinned memory on
CUDA, copied to the GPU asynchronously) and starts the model on them. A blending thread hands
each batch's class probabilities to ``add``, normally the stitcher's ``Merger.add``, while the
next batch runs. Every queue between the stages is bounded, so memory does not grow with the
slide. On CUDA the model runs under autocast (bfloat16, or float16 where bfloat16 is
unsupported) in channels_last layout with cuDNN autotuning; on the CPU torch uses every core this
process may run on.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable

import numpy as np
import torch

from bcseg.checkpoint import LoadedModel
from bcseg.errors import BadInputError

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
# Batches predicted but not yet blended. Two let the model run one batch ahead of blending.
BLEND_QUEUE_BATCHES = 2
# Pixels per batch that "auto" aims at on the CPU: four 512 px tiles, so one 1024 px tile.
# NOTE: not tuned by measurement; other batch sizes may run faster on other CPUs.
CPU_AUTO_BATCH_PIXELS = 4 * 512 * 512
# On CUDA, "auto" fills this fraction of the free memory, measured with a probe batch, and
# never exceeds the maximum. The fraction leaves room for cuDNN workspaces; it is an estimate.
CUDA_MEMORY_FRACTION = 0.6
MAX_AUTO_BATCH_SIZE = 256
POLL_S = 0.1  # how often a blocked queue operation checks for an error on the other side


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


class PendingPrediction:
    """The probabilities of one batch, possibly still being computed or copied on the GPU."""

    def __init__(self, probabilities: torch.Tensor, ready: torch.cuda.Event | None = None, inputs=None):
        self._probabilities = probabilities
        self._ready = ready
        self._inputs = inputs  # the pinned input batch, kept alive until its copy has finished

    def result(self) -> np.ndarray:
        """Wait for the batch and return float32 (batch, classes, rows, cols)."""
        if self._ready is not None:
            self._ready.synchronize()
        self._inputs = None
        return self._probabilities.numpy()


class Predictor:
    """Turns batches of uint8 RGB tiles into class probabilities with one loaded model.

    ``amp`` enables autocast on CUDA; the CPU always runs in float32.
    ``compile_model`` wraps the model in ``torch.compile``; the first batch then takes as long
    as the compilation. ``threads`` sets torch's CPU threads (default: every usable core); fewer
    threads help on a machine shared with other busy processes.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        amp: bool = True,
        compile_model: bool = False,
        threads: int | None = None,
    ):
        self.device = device
        self.info = loaded.info
        self.cuda = device.type == "cuda"
        self.model = loaded.model.to(device).eval()
        self.mean = torch.tensor(self.info.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.info.std, device=device).view(1, 3, 1, 1)
        self.stain_normalizer = None
        if self.info.stain_normalization:
            from bcseg.stain import StainNormalizer

            self.stain_normalizer = StainNormalizer.from_json(self.info.stain_normalization)
        self.amp_dtype = None
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
            if amp:
                self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            torch.set_num_threads(threads or available_cpu_count())
        if compile_model:
            self.model = torch.compile(self.model)

    def new_batch(self, batch_size: int, tile_shape: tuple[int, ...]) -> np.ndarray:
        """Return an empty uint8 (batch_size, *tile_shape) batch, in pinned memory on CUDA."""
        if self.cuda:
            return torch.empty((batch_size, *tile_shape), dtype=torch.uint8, pin_memory=True).numpy()
        return np.empty((batch_size, *tile_shape), dtype=np.uint8)

    def start(self, batch: np.ndarray, count: int | None = None) -> PendingPrediction:
        """Start the model on the first ``count`` tiles of a uint8 (batch, rows, cols, 3) batch.

        On CUDA the whole batch runs (padding rows included, so every call has one shape for
        cuDNN autotuning and compilation) and the call returns before the GPU has finished.
        """
        count = len(batch) if count is None else count
        if self.stain_normalizer is not None:
            # NOTE: each tile is normalized on its own statistics, whereas training normalized whole
            # regions, so colours can differ slightly between neighbouring tiles.
            for index in range(count):
                batch[index] = self.stain_normalizer.apply(batch[index])
        host = torch.from_numpy(np.ascontiguousarray(batch if self.cuda else batch[:count]))
        with torch.inference_mode():
            images = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
            images = (images - self.mean) / self.std
            if self.cuda:
                # NOTE: this CUDA path (pinned batches, autocast, channels_last, asynchronous
                # copies) has not yet run on a GPU. The tests cover only the CPU path.
                images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                    logits = self.model(images)
            else:
                logits = self.model(images)
            probabilities = torch.softmax(logits[:count].float(), dim=1)
        if not self.cuda:
            return PendingPrediction(probabilities)
        output = torch.empty(probabilities.shape, dtype=torch.float32, pin_memory=True)
        output.copy_(probabilities, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingPrediction(output, ready, inputs=host)

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        """Probabilities (batch, classes, rows, cols) float32 for uint8 tiles (batch, rows, cols, 3)."""
        return self.start(tiles).result()


def choose_batch_size(predictor: Predictor, tile_size_px: int, requested: int | None) -> int:
    """Return ``requested``, or pick a batch size when it is None ("auto").

    On the CPU "auto" fills CPU_AUTO_BATCH_PIXELS, at least one tile. On CUDA a probe batch of two tiles measures the
    memory one tile needs, and the batch fills CUDA_MEMORY_FRACTION of the free memory.
    """
    if requested is not None:
        return requested
    if not predictor.cuda:
        return max(1, CPU_AUTO_BATCH_PIXELS // (tile_size_px * tile_size_px))
    device = predictor.device
    probe = 2
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    allocated = torch.cuda.memory_allocated(device)
    predictor.predict(np.full((probe, tile_size_px, tile_size_px, 3), 255, dtype=np.uint8))
    per_tile = max(1, (torch.cuda.max_memory_allocated(device) - allocated) / probe)
    free, _ = torch.cuda.mem_get_info(device)
    batch_size = int(min(MAX_AUTO_BATCH_SIZE, max(1, CUDA_MEMORY_FRACTION * free // per_tile)))
    if batch_size >= 8:
        batch_size -= batch_size % 8
    log.info("batch size %d: %.0f MiB free on %s, about %.0f MiB per tile", batch_size, free / 2**20, device,
             per_tile / 2**20)
    return batch_size


def predict_stream(
    tiles: Iterable[tuple[int, int, np.ndarray]],
    predictor,
    add: Callable[[int, int, np.ndarray], None],
    batch_size: int = 4,
    total: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Run ``predictor`` over (m_x, m_y, tile) items and pass each (m_x, m_y, probabilities) to ``add``.

    ``add`` runs in a separate blending thread, one batch behind the model. ``predictor`` needs
    ``predict(tiles)``; ``new_batch`` and ``start``, when it has them, give pinned batches and
    asynchronous prediction. Errors in any stage, and interrupts, stop every stage: this call
    returns or raises only after the blending thread has exited and ``tiles``, when it is a
    generator, has been closed. Returns the number of tiles predicted.
    """
    blender = _BlendWorker(add)
    done = 0
    try:
        for origins, batch, count in _assemble_batches(tiles, predictor, batch_size):
            if hasattr(predictor, "start"):
                pending = predictor.start(batch, count)
            else:
                pending = PendingPrediction(torch.from_numpy(predictor.predict(batch[:count])))
            blender.put((origins, pending))
            done += count
            if progress is not None:
                progress(done, total if total is not None else done)
        blender.finish()
    finally:
        blender.close()
        close = getattr(tiles, "close", None)
        if close is not None:
            close()
    return done


def predict_tiles(
    tile_store,
    predictor,
    add: Callable[[int, int, np.ndarray], None],
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Run ``predictor`` over every tile of a tile store; see ``predict_stream``."""

    def stored_tiles():
        for start in range(0, len(tile_store), batch_size):
            batch = tile_store.read(start, min(start + batch_size, len(tile_store)))
            for offset, tile in enumerate(batch):
                m_x, m_y = (int(value) for value in tile_store.m_origins[start + offset])
                yield m_x, m_y, tile

    return predict_stream(stored_tiles(), predictor, add, batch_size, len(tile_store), progress)


def _assemble_batches(tiles, predictor, batch_size: int):
    """Yield (origins, batch, count) with up to ``batch_size`` tiles copied into each batch."""
    batch, origins = None, []
    for m_x, m_y, pixels in tiles:
        if batch is None:
            if hasattr(predictor, "new_batch"):
                batch = predictor.new_batch(batch_size, pixels.shape)
            else:
                batch = np.empty((batch_size, *pixels.shape), dtype=np.uint8)
        batch[len(origins)] = pixels
        origins.append((m_x, m_y))
        if len(origins) == batch_size:
            yield origins, batch, batch_size
            batch, origins = None, []
    if origins:
        yield origins, batch, len(origins)


_STOP = object()


class _BlendWorker:
    """A thread that waits for each batch's probabilities and passes them to ``add`` tile by tile."""

    def __init__(self, add: Callable[[int, int, np.ndarray], None]):
        self._add = add
        self._queue: queue.Queue = queue.Queue(maxsize=BLEND_QUEUE_BATCHES)
        self._error: BaseException | None = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bcseg-blend", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is not None or self._cancelled.is_set():
                continue  # drain the queue, so that a producer waiting in put() is released
            try:
                origins, pending = item
                for (m_x, m_y), probabilities in zip(origins, pending.result()):
                    self._add(m_x, m_y, probabilities)
            except BaseException as error:  # handed to the producer, which re-raises it
                self._error = error

    def put(self, item) -> None:
        """Queue a batch, waiting while the queue is full; re-raise an error of the blending thread."""
        while True:
            self._raise_error()
            try:
                self._queue.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait until every queued batch is blended; re-raise an error of the blending thread."""
        self._stop()
        self._raise_error()

    def close(self) -> None:
        """Drop the batches not yet blended and wait for the thread to exit."""
        self._cancelled.set()
        self._stop()

    def _stop(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=POLL_S)
            except queue.Full:
                continue
            self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
