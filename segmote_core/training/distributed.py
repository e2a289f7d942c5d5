"""DDP setup: torchrun's environment -> the process group (NCCL on CUDA, gloo on CPU); one process otherwise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Tear down the process group this run created, every rank at once: left to interpreter exit, gloo's
        worker threads can abort the process."""
        if self.world > 1 and self.owns_group:
            dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; then NCCL on CUDA, gloo on CPU. One process otherwise."""
    from ..devices import resolve_device, tune_cpu_allocator
    from ..torchrun import torchrun_environment

    rank, world, local_rank = torchrun_environment()
    device = resolve_device(device_name)
    if device.type == "cpu":
        tune_cpu_allocator()  # ~1.8x faster encoder passes on glibc (docs/benchmarks.md)
    if world <= 1:
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, owns), device

