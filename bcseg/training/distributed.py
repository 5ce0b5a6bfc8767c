"""Process group set-up for multi-GPU training under ``torchrun``.

``torchrun --nproc_per_node N`` starts N copies of the command with RANK, LOCAL_RANK and
WORLD_SIZE set. Each process trains on its own GPU (``cuda:LOCAL_RANK``) with its own patch
stream; DistributedDataParallel averages the gradients. Without those variables there is one
process and nothing here does anything. On machines without CUDA the gloo backend runs the same
code on CPU processes, which is how the tests exercise it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start_process_group(device_request: str) -> tuple[ProcessGroup, torch.device]:
    """Join the ``torchrun`` process group when there is one, and choose this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_request == "cuda" or (device_request == "auto" and torch.cuda.is_available())
    if device_request == "cuda" and not torch.cuda.is_available():
        from bcseg.errors import BadInputError

        raise BadInputError("--device cuda requested, but torch sees no CUDA device; use --device cpu or auto")

    if world_size > 1 and not dist.is_initialized():
        # NOTE: the NCCL branch has not run here: the development machine has no GPU. The gloo
        # branch runs in the tests with two CPU processes.
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    group = ProcessGroup(
        rank=dist.get_rank() if world_size > 1 else 0, world_size=world_size, local_rank=local_rank
    )
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if group.distributed:
        log.info("process %d of %d on %s", group.rank, group.world_size, device)
    return group, device


def stop_process_group(group: ProcessGroup) -> None:
    if group.distributed and dist.is_initialized():
        dist.destroy_process_group()


def any_process(group: ProcessGroup, flag: bool, device: torch.device) -> bool:
    """Return True on every process when ``flag`` is True on at least one."""
    if not group.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def mean_over_processes(group: ProcessGroup, values: list[float], device: torch.device) -> list[float]:
    if not group.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / group.world_size).tolist()


def gather_objects(group: ProcessGroup, value):
    """Return the list of every process's ``value``, in rank order."""
    if not group.distributed:
        return [value]
    gathered = [None] * group.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(group: ProcessGroup) -> None:
    if group.distributed:
        dist.barrier()
