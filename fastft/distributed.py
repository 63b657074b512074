"""Many processes through Hugging Face accelerate, on GPUs and on CPU, and mixed precision.

`accelerate launch --num_processes N -m fastft RECIPE ...` (GPUs: NCCL) and
`torchrun --nproc_per_node N -m fastft RECIPE ...` (CPU: gloo) run the same command. fastai's own
`distrib_ctx` calls CUDA, and its DistributedDL broadcasts through CUDA tensors, so fastft adds a thin
layer: `Accelerator(cpu=True)` when no GPU is visible, a broadcast that works on gloo, and a test set
sharded without padding so every test image counts exactly once.

`--bs` is per process: N processes each take bs images a step, a global batch of N x bs.
"""
from __future__ import annotations

import math
import os

import torch
from fastai.callback.core import Callback
from fastai.distributed import DistributedDL, DistributedTrainer
from fastai.torch_core import to_detach

from fastft.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def world_size() -> int:
    """Processes in this run: torchrun and accelerate launch both set WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 convolutions and matmuls run in hardware. Elsewhere oneDNN emulates them,
    slower than fp32. (torch exposes the check only as private helpers; an older torch without them gets
    False, so fp32.)"""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: the fastest measured format that trains as well as fp32: bf16 autocast on GPUs that have it
    (fp16 on older GPUs) and on CPUs with native bf16; fp32 on other CPUs and on MPS. (On a 2-core CPU with
    AVX512-BF16, bench/performance.py measured bf16 1.03x fp32's images/s at 32 px and 1.27x at 40 px, and
    whole CIFAR-10 runs reached the same test accuracy: README, Benchmarks.) A precision the device cannot
    do is an error, not a silent fallback."""
    if name not in PRECISIONS:
        raise UsageError(f"unknown precision '{name}'; choose one of: {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cpu":
            return "bf16" if cpu_has_native_bf16() else "fp32"
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "fp16" and device.type != "cuda":
        raise UsageError(f"--precision fp16 needs a CUDA GPU (this run is on {device.type}); use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bfloat16; use fp16 or fp32")
    if name == "bf16" and device.type == "mps":
        raise UsageError("--precision bf16 is not supported on MPS; use fp32")
    return name


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
        if not self.accelerator:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

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

    def callback(self):
        return DistributedTraining(self)


def _broadcast_list(values: list, rank: int) -> list:
    from accelerate.utils import broadcast_object_list

    box = [values]
    broadcast_object_list(box, from_process=rank)
    return box[0]


class ShardedDL(DistributedDL):
    """fastai's DistributedDL (rank 0 shuffles, each rank takes its shard of every epoch), broadcasting
    the order as a Python object so it works on gloo (CPU) as well as NCCL."""

    def _broadcast(self, t, rank):
        return _broadcast_list(list(t), rank)


class TestShardDL(ShardedDL):
    """The test set split across ranks without padding, so every image is scored exactly once; results
    are not gathered per batch (shards differ in size) but summed at the end of the epoch."""

    def get_idxs(self):
        idxs = list(self.dl.get_idxs())
        self.n = len(idxs)
        return idxs[self.rank::self.world_size]

    def __len__(self):
        mine = len(range(self.rank, len(self.dl.dataset), self.world_size))
        return math.ceil(mine / self.dl.bs)

    def to_detach(self, b, cpu=True, gather=True):
        return to_detach(b, cpu, gather=False)


class DistributedTraining(DistributedTrainer):
    """fastai's DistributedTrainer over fastft's Accelerator: DDP model, sharded train and test loaders.
    SyncBatchNorm on GPUs only (it has no CPU kernel)."""

    def __init__(self, dist: Distributed):
        Callback.__init__(self)
        self.accelerator, self.sync_bn = dist.accelerator, dist.device.type == "cuda"

    def _wrap_dl(self, dl):
        if isinstance(dl, ShardedDL):
            return dl
        test = dl is self.learn.dls.valid or not getattr(dl, "shuffle", False)
        return (TestShardDL if test else ShardedDL)(dl, device=self.learn.model.device)


class Autocast(Callback):
    """bf16 autocast around forward and loss, on any device (fastai's MixedPrecision assumes CUDA)."""

    order = 10

    def __init__(self, device_type: str):
        self.device_type = device_type

    def before_batch(self):
        self.context = torch.autocast(self.device_type, dtype=torch.bfloat16)
        self.context.__enter__()

    def after_pred(self):
        self.learn.pred = self.pred.float()

    def after_loss(self):
        self.context.__exit__(None, None, None)


class ChannelsLast(Callback):
    """Batches in channels-last (NHWC) memory format, for a model converted with
    `model.to(memory_format=torch.channels_last)`: the same arithmetic, a faster layout for many
    convolution kernels (bench/performance.py, precision part)."""

    order = 5  # before Autocast: the batch is laid out before the forward pass

    def before_batch(self):
        self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in self.xb)


def set_number_format(learn, precision: str, channels_last: bool, device: torch.device) -> None:
    """What --precision (resolved) and --channels-last add to a Learner. Call it before any distributed
    wrapper is built around the model."""
    if callback := precision_callback(precision, device):
        learn.add_cb(callback)
    if channels_last:
        learn.model.to(memory_format=torch.channels_last)
        learn.add_cb(ChannelsLast())


def precision_callback(precision: str, device: torch.device):
    if precision == "bf16":
        return Autocast(device.type)
    if precision == "fp16":
        from fastai.callback.fp16 import MixedPrecision

        return MixedPrecision()
    return None
