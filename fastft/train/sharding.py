"""The fastai side of many processes: sharded loaders and the DDP callback. Imported only when a run has more
than one process (fastai.distributed brings accelerate with it, seconds of imports a single process skips)."""
from __future__ import annotations

import math

from fastai.torch_core import to_detach

from fastft.fastai_internals import BroadcastHookDL, LoaderHookTrainer
from fastft.train.distributed import Distributed, broadcast


class ShardedDL(BroadcastHookDL):
    """fastai's DistributedDL (rank 0 shuffles, each rank takes its shard of every epoch), broadcasting
    the order as a Python object so it works on gloo (CPU) as well as NCCL."""

    def broadcast_order(self, indices, rank):
        return broadcast(indices, rank)


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


class DistributedTraining(LoaderHookTrainer):
    """fastai's DistributedTrainer over fastft's Accelerator: DDP model, sharded train and test loaders.
    SyncBatchNorm on GPUs only (it has no CPU kernel)."""

    def __init__(self, dist: Distributed):
        super().__init__(dist.accelerator, sync_bn=dist.device.type == "cuda")

    def wrap_loader(self, dl):
        if isinstance(dl, ShardedDL):
            return dl
        test = dl is self.learn.dls.valid or not getattr(dl, "shuffle", False)
        return (TestShardDL if test else ShardedDL)(dl, device=self.learn.model.device)
