"""torch.distributed, as training and corpus classification use it: no cluster layer of our own.

Processes are started by the launcher users already have (``torchrun``, ``accelerate launch``),
which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`context`
joins that group (gloo on CPU, NCCL on CUDA) or reports a single process when there is none.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Context:
    """This process's place in the group: ``rank`` of ``world`` processes (0 of 1 when alone)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def rows(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` rows (the first ``count % world`` ranks get one
        more): every row goes to exactly one rank, in order."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over the group, in place (nothing to do alone)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def context(device: torch.device | None = None) -> Context:
    """The current process group, joined from the launcher's environment if not yet initialised."""
    if not dist.is_available():
        return Context()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Context()
        cuda = device is not None and device.type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Context(rank=dist.get_rank(), world=dist.get_world_size())
