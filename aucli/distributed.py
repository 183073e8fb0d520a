"""Many videos over many processes: ``torchrun --nproc-per-node N -m aucli detect DIR -o OUT/``.

Every process expands the same inputs into the same jobs and output paths,
takes a fixed share of them (``share``), runs its share with its own model (on
GPU ``LOCAL_RANK`` where there are GPUs), and hands its summaries to rank 0,
which prints them all. Each video's results depend only on that video, so the
outputs are those of a single process.

The processes exchange only small Python objects at the end, so they talk over
gloo (TCP) whatever the devices: no GPU collective is needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

# A process that finishes its share waits for the others at the final gather;
# a corpus can keep them busy for hours.
GATHER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes torchrun started (or alone: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Processes:
        """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK; join the group when there are several."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """One GPU per process: "auto" and "cuda" become this process's local GPU where there are GPUs."""
        if self.world == 1 or requested not in ("auto", "cuda"):
            return requested
        import torch

        if torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def gather(self, item: Any) -> list[Any]:
        """Every process's ``item``, in rank order (on every process)."""
        if self.world == 1:
            return [item]
        import torch.distributed as dist

        items: list[Any] = [None] * self.world
        dist.all_gather_object(items, item)
        return items

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def share(sizes: list[int], world: int) -> list[int]:
    """Process of each job: largest first, each to the process with the least work so far
    (ties to the lowest rank). The same sizes always give the same assignment."""
    load = [0] * world
    owner = [0] * len(sizes)
    for job in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        process = min(range(world), key=lambda p: (load[p], p))
        owner[job] = process
        load[process] += max(sizes[job], 1)
    return owner
