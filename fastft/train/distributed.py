"""Many processes through Hugging Face accelerate, on GPUs and on CPU.

`accelerate launch --num_processes N -m fastft RECIPE ...` (GPUs: NCCL) and
`torchrun --nproc_per_node N -m fastft RECIPE ...` (CPU: gloo) run the same command. fastai's own
`distrib_ctx` calls CUDA, and its DistributedDL broadcasts through CUDA tensors, so fastft adds a thin
layer: `Accelerator(cpu=True)` when no GPU is visible, a broadcast that works on gloo, and a test set
sharded without padding so every test image counts exactly once.

`--bs` is per process: N processes each take bs images a step, a global batch of N x bs.
"""
from __future__ import annotations

import os

import torch

from fastft.errors import UsageError


def unwrapped(model):
    """The network itself: DistributedDataParallel wraps it during a fit of many processes."""
    return getattr(model, "module", model)


def world_size() -> int:
    """Processes in this run: torchrun and accelerate launch both set WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def broadcast(value, from_rank: int):
    """`value` of process `from_rank`, on every process: any picklable object, over gloo or NCCL."""
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=from_rank)
    return box[0]


class Distributed:
    """This process's place in a multi-process run, or a single process (rank 0 of 1)."""

    def __init__(self, device: torch.device):
        self.size = world_size()
        self.accelerator = None
        if self.size > 1:
            from accelerate import Accelerator

            # precision is fastft's callbacks' job (same in one process or many): accelerate runs the processes
            self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
        self.rank = self.accelerator.process_index if self.accelerator else 0
        self.device = self.accelerator.device if self.accelerator else device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    def share(self, value):
        """Rank 0's `value` on every rank (any picklable object)."""
        return broadcast(value if self.is_main else None, 0) if self.accelerator else value

    def gather(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if not self.accelerator:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        if not self.accelerator:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def from_main(self, function):
        """`function()` run on rank 0 alone, its result (or UsageError) given to every rank."""
        if not self.accelerator:
            return function()
        result, error = None, None
        if self.is_main:
            try:
                result = function()
            except UsageError as e:
                error = str(e)
        result, error = self.share((result, error))
        if error:
            raise UsageError(error)
        return result

    def main_first(self, function):
        """Run `function` on rank 0 first (a download, say), then on the others, which find it done.
        Rank 0's UsageError reaches every rank."""
        result = self.from_main(function)
        if not self.is_main:
            result = function()
        self.wait()
        return result
