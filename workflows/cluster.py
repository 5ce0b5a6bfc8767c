"""The dask cluster of a batch: a LocalCluster sized to this machine, or an existing scheduler.

A local cluster gets one worker per GPU, each seeing only its own GPU, or, without a GPU, CPU
workers that split the cores between them. Each worker runs one slide at a time
(``nthreads=1``); the pipeline itself uses the worker's cores for reading tiles and for the
model.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass

from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin

from bcseg.errors import BadInputError
from pipeline.inference import available_cpu_count

log = logging.getLogger(__name__)

GPU_RESOURCE = "GPU"
# An estimate, not a measurement: torch's CPU convolutions gain little past about four threads
# per slide, so more, smaller workers keep more cores busy on a large machine.
CPUS_PER_CPU_WORKER = 4
# A slide whose worker dies (killed, out of memory) is run once more on another worker, then failed.
ALLOWED_FAILURES = 1
CONNECT_TIMEOUT_S = 30


@dataclass
class BatchCluster:
    """A connected client, and what the batch's slide tasks must ask of the workers."""

    client: Client
    task_resources: dict[str, float] | None  # {"GPU": 1} where workers offer GPUs
    dashboard_link: str | None
    local: bool  # True when the batch started the cluster itself


@contextmanager
def connect(scheduler: str | None, n_workers: int | None, device: str, dashboard: bool = True):
    """Yield a BatchCluster: an existing scheduler's, or a LocalCluster closed on exit."""
    if scheduler is not None:
        client = _connect_existing(scheduler)
        try:
            yield BatchCluster(client, _existing_task_resources(client, device), client.dashboard_link, local=False)
        finally:
            client.close()
        return

    cluster, gpu_count = _start_local_cluster(n_workers, device, dashboard)
    try:
        client = Client(cluster)
        try:
            client.register_plugin(
                ShareMachine(gpu_count, available_cpu_count(), len(cluster.workers)), name="bcseg-share-machine"
            )
            resources = {GPU_RESOURCE: 1} if gpu_count else None
            link = cluster.dashboard_link if _dashboard_available() and dashboard else None
            yield BatchCluster(client, resources, link, local=True)
        finally:
            client.close()
    finally:
        _close_quietly(cluster)


def default_worker_count(gpu_count: int, cpu_count: int) -> int:
    """Return one worker per GPU, or one per CPUS_PER_CPU_WORKER cores (at least one)."""
    if gpu_count:
        return gpu_count
    return max(1, cpu_count // CPUS_PER_CPU_WORKER)


def count_gpus(device: str) -> int:
    if device == "cpu":
        return 0
    import torch

    count = torch.cuda.device_count()
    if device.startswith("cuda") and count == 0:
        raise BadInputError("--device cuda was requested but torch sees no CUDA GPU; use --device cpu or auto")
    return count


class ShareMachine(WorkerPlugin):
    """Give each worker of a local cluster its own GPU, or its own share of the CPU cores.

    Worker ``i`` (LocalCluster names its workers 0, 1, ...) sees only GPU ``i`` through
    CUDA_VISIBLE_DEVICES, set before torch initialises CUDA in the worker. Without GPUs it is
    pinned to its share of the cores, so the model's CPU threads of parallel slides do not
    compete for the same cores.
    """

    def __init__(self, gpu_count: int, cpu_count: int, worker_count: int):
        self.gpu_count = gpu_count
        self.cpu_count = cpu_count
        self.worker_count = worker_count

    def setup(self, worker) -> None:
        if not isinstance(worker.name, int):
            return
        index = worker.name % self.worker_count
        if self.gpu_count:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(index % self.gpu_count)
            return
        if not hasattr(os, "sched_setaffinity"):
            return
        cpus = sorted(os.sched_getaffinity(0))
        share = max(1, len(cpus) // self.worker_count)
        own = cpus[index * share : (index + 1) * share] or cpus
        os.sched_setaffinity(0, own)
        log.info("worker %s runs on CPUs %s", worker.name, own)


def _start_local_cluster(n_workers: int | None, device: str, dashboard: bool) -> tuple[LocalCluster, int]:
    import dask

    gpu_count = count_gpus(device)
    cpu_count = available_cpu_count()
    if n_workers is None:
        n_workers = default_worker_count(gpu_count, cpu_count)
    worker_options = {"resources": {GPU_RESOURCE: 1}} if gpu_count else {}
    # worker-saturation 1.0: a worker holds only the slide it runs, so a restart after a
    # timeout loses no queued slide.
    with dask.config.set({
        "distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
        "distributed.scheduler.worker-saturation": 1.0,
    }):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:8787" if dashboard and _dashboard_available() else None,
            **worker_options,
        )
    log.info("local dask cluster: %d workers, %d GPUs, %d CPUs", n_workers, gpu_count, cpu_count)
    return cluster, gpu_count


def _close_quietly(cluster: LocalCluster) -> None:
    # A worker that has run torch may take longer than the nanny's 4 s grace period to exit. The
    # nanny then kills it and warns, which is harmless once the batch is over.
    nanny_log = logging.getLogger("distributed.nanny")
    level = nanny_log.level
    nanny_log.setLevel(logging.ERROR)
    try:
        cluster.close()
    finally:
        nanny_log.setLevel(level)


def _connect_existing(address: str) -> Client:
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as error:
        raise BadInputError(
            f"--scheduler {address}: cannot connect to a dask scheduler there ({error}); check the address, "
            "and that the scheduler is running and reachable from this machine"
        ) from error


def _existing_task_resources(client: Client, device: str) -> dict[str, float] | None:
    """Ask for a GPU per slide when the cluster's workers offer a GPU resource."""
    if device == "cpu":
        return None
    workers = client.scheduler_info().get("workers", {}).values()
    if not workers:
        log.warning("the scheduler has no workers yet; the slides wait until workers connect")
    if any(GPU_RESOURCE in worker.get("resources", {}) for worker in workers):
        return {GPU_RESOURCE: 1}
    return None


def _dashboard_available() -> bool:
    try:
        import bokeh  # noqa: F401  (the dashboard needs it)
    except ImportError:
        return False
    return True
