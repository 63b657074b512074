"""Where and in which number format a run trains: device choice, precision, channels-last memory format.

`--device auto` takes a CUDA GPU, else Apple's MPS, else the CPU. `--precision auto` takes the fastest
format measured to train as well as fp32 there (see `resolve_precision`). Both become fastai callbacks on
the Learner (`set_number_format`).
"""
from __future__ import annotations

import contextlib

import torch
from fastai.callback.core import Callback

from fastft.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    """auto: a CUDA GPU, else MPS, else the CPU. A device that is not here is an error, not a fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible here; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; use one of them, or --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    return device


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
    whole CIFAR-10 runs reached the same test accuracy: bench/README.md.) A precision the device cannot do
    is an error, not a silent fallback."""
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


class Autocast(Callback):
    """bf16 autocast around forward and loss, on any device (fastai's MixedPrecision assumes CUDA)."""

    order = 10

    def __init__(self, device_type: str):
        self.device_type = device_type

    def before_batch(self):
        self.context = autocast_for("bf16", self.device_type)
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


def autocast_for(precision: str, device_type: str):
    """The autocast a step in `precision` (resolved) runs under: bf16 or fp16, else none (fp32)."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def precision_callback(precision: str, device: torch.device):
    if precision == "bf16":
        return Autocast(device.type)
    if precision == "fp16":
        from fastai.callback.fp16 import MixedPrecision

        return MixedPrecision()
    return None


def set_number_format(learn, precision: str, channels_last: bool, device: torch.device) -> None:
    """What --precision (resolved) and --channels-last add to a Learner. Call it before any distributed
    wrapper is built around the model."""
    if callback := precision_callback(precision, device):
        learn.add_cb(callback)
    if channels_last:
        learn.model.to(memory_format=torch.channels_last)
        learn.add_cb(ChannelsLast())


def training_only_callbacks() -> tuple[type, ...]:
    """Callback types that only matter while training: removed before a Learner is exported."""
    from fastai.callback.fp16 import MixedPrecision
    from fastai.callback.mixup import MixHandler

    return Autocast, ChannelsLast, MixedPrecision, MixHandler
