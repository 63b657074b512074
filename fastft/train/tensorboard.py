"""`--log tensorboard`: TensorBoard event files under RUN/tensorboard/, through torch.utils.tensorboard.

Per training batch: the loss and each parameter group's learning rate, against a step count that runs on across
phases (fastai's own TensorBoardCallback restarts its count at every fit, and draws a batch of its own, which
would change a seeded run's data order). Per epoch: every figure history.csv holds, and a few training images
as the augmentation left them. Needs the `tensorboard` package: pip install 'fastft[tensorboard]'.
"""
from __future__ import annotations

from pathlib import Path

import torch
from fastai.callback.core import Callback

from fastft.errors import UsageError
from fastft.fastai_internals import AFTER_RECORDER

IMAGES_PER_EPOCH = 8


class TensorBoardLog(Callback):
    order = AFTER_RECORDER + 1  # after EpochLog: the epoch's figures are in

    def __init__(self, folder: Path, epoch_log, mean, std):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--log tensorboard needs the tensorboard package: pip install 'fastft[tensorboard]'") from None
        self.writer, self.epoch_log = SummaryWriter(log_dir=str(folder)), epoch_log
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        self.images = None

    def after_batch(self):
        if not self.training:
            return
        step = self.epoch_log.train_batches
        self.writer.add_scalar("train/batch_loss", self.loss.item(), step)
        for group, hypers in enumerate(self.opt.hypers):
            self.writer.add_scalar(f"lr/group{group}", hypers["lr"], step)
        if self.images is None:
            self.images = self.xb[0][:IMAGES_PER_EPOCH].detach().float().cpu()

    def after_epoch(self):
        if not self.epoch_log.epochs or self.epoch_log.epochs[-1]["epoch"] in getattr(self, "logged", ()):
            return
        entry = self.epoch_log.epochs[-1]
        for key, value in entry.items():
            if key not in ("epoch", "seconds"):
                split, _, figure = key.partition("_")
                self.writer.add_scalar(f"{figure}/{split}", value, entry["epoch"])
        if self.images is not None:
            pictures = (self.images * self.std + self.mean).clamp(0, 1)
            self.writer.add_images("train/augmented", pictures, entry["epoch"])
            self.images = None
        self.logged = {*getattr(self, "logged", ()), entry["epoch"]}
        self.writer.flush()

    def close(self):
        self.writer.close()
