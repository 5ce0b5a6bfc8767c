"""The per-slide task of a batch: runs on a dask worker, or in the batch process for a serial run.

``process_slide`` turns any Exception from a slide into a ``failed`` row with the reason, and
keeps the details, traceback included, in the slide's log file. The loss of the whole worker
process (killed, out of memory) is handled by the batch, which sees the task's worker vanish.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bcseg.errors import BadInputError
from pipeline.run import RunSettings, run_slide
from workflows.status import SlideStatus, utc_iso

log = logging.getLogger(__name__)

EVENT_TOPIC = "bcseg-batch"
LOGGED_PACKAGES = ("pipeline", "bcseg", "workflows")


@dataclass(frozen=True)
class SlideJob:
    """Everything a worker needs to process one slide."""

    slide_path: Path
    settings: RunSettings  # out_dir is the batch folder; output_name is set
    log_path: Path
    log_name: str  # log_path relative to the batch folder, for the status table
    timeout_s: float | None = None  # enforced here only in the main thread (serial runs)


class SlideTimeout(BaseException):
    """Raised by the timer of a serial run when a slide runs past its timeout.

    A BaseException so that no ``except Exception`` in the pipeline swallows it, and run_slide
    still removes its temporary folder.
    """


def process_slide(job: SlideJob) -> SlideStatus:
    """Run one slide and return its status row; failures become ``failed`` rows."""
    started = time.time()
    worker = _worker_address()
    _announce_start(job, worker)
    values = {"slide": str(job.slide_path), "output": job.settings.output_name, "log": job.log_name,
              "worker": worker, "attempts": 1, "started": utc_iso(started)}

    with slide_log(job.log_path) as slide_log_handler:
        log.info("%s: started on %s (host %s, process %d)", job.slide_path, worker, socket.gethostname(), os.getpid())
        try:
            with _timer(job.timeout_s):
                result = run_slide(job.slide_path, job.settings)
        except BadInputError as error:
            reason = str(error)
            log.error("%s: failed: %s", job.slide_path, reason)
        except SlideTimeout:
            reason = f"timed out after {job.timeout_s:g} s"
            log.error("%s: %s", job.slide_path, reason)
        except Exception as error:  # any failure of one slide must not stop the batch
            reason = f"{type(error).__name__}: {error}"
            log.error("%s: failed with an internal error\n%s", job.slide_path, traceback.format_exc())
        else:
            reason = ""
            log.info("%s: %s in %.1f s", job.slide_path, result.status, time.time() - started)
        slide_log_handler.flush()

    finished = time.time()
    values.update(finished=utc_iso(finished), seconds=round(finished - started, 3))
    if reason:
        return SlideStatus(status="failed", reason=reason, **values)
    return SlideStatus.from_summary(result.summary, status=result.status, **values)


@contextmanager
def slide_log(path: Path):
    """Copy this thread's records of the project's loggers, INFO and above, to ``path``.

    NOTE: records logged from helper threads that a stage starts (tile readers, the inference
    prefetcher) are not copied, because the filter keeps only the calling thread's records.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    thread_id = threading.get_ident()
    handler.addFilter(lambda record: record.thread == thread_id)
    loggers = [logging.getLogger(name) for name in LOGGED_PACKAGES]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
        handler.close()


@contextmanager
def _timer(timeout_s: float | None):
    """Raise SlideTimeout in the main thread after ``timeout_s``; elsewhere do nothing.

    On a dask worker the task runs in a worker thread, where signals cannot be delivered, so the
    batch enforces the timeout there by restarting the worker.
    """
    if not timeout_s or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise SlideTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _worker_address() -> str:
    from distributed import get_worker

    try:
        return get_worker().address
    except ValueError:  # not inside a dask task
        return "local"


def _announce_start(job: SlideJob, worker: str) -> None:
    """Tell the batch client that this worker has started the slide, for timeouts and retries."""
    if worker == "local":
        return
    from distributed import get_worker

    get_worker().log_event(EVENT_TOPIC, {"output": job.settings.output_name, "worker": worker, "pid": os.getpid()})
