"""fastai's Adam, stepped by torch's fused AdamW kernel.

fastai's Adam runs a Python loop of small tensor operations per parameter: 29.6 ms per ResNet-18 step
on 2 CPU cores, against 5.5 ms for torch's fused AdamW (`python bench/performance.py --only optimizer`).
At 32 px that was a fifth of a CIFAR-10 training step at batch 128, a ninth at 256. The arithmetic is the
same: decoupled weight decay (p *= 1 - lr * wd), bias-corrected moments, fastai's defaults (sqr_mom 0.99,
eps 1e-5), and fit_one_cycle's momentum schedule drives beta1 as it drives fastai's `mom`.
"""
from __future__ import annotations

import torch
from fastcore.foundation import L

from fastft.fastai_internals import HyperHookOptimWrapper


class FusedAdam(HyperHookOptimWrapper):
    """A drop-in `opt_func` for a fastai Learner. Each fastai parameter group (the splitter's stages, each
    with its own lr) is two torch groups: weights, then the 1-D parameters (BatchNorm weights and biases,
    every bias), which take no weight decay. That is fastai's `wd_bn_bias=False` and timm's rule."""

    def __init__(self, params, lr: float, mom: float = 0.9, sqr_mom: float = 0.99, eps: float = 1e-5,
                 wd: float = 0.01, decouple_wd: bool = True):
        if not decouple_wd:
            raise ValueError("FusedAdam is AdamW: decoupled weight decay only")
        params = list(params)  # a splitter's groups, or one flat list
        groups = [list(g) for g in params] if isinstance(params[0], (list, tuple, L)) else [params]
        torch_groups = []
        for group in groups:
            torch_groups += [{"params": [p for p in group if p.ndim > 1]},
                             {"params": [p for p in group if p.ndim <= 1], "no_decay": True, "weight_decay": 0.0}]
        settings = dict(lr=lr, betas=(mom, sqr_mom), eps=eps, weight_decay=wd)
        try:  # one kernel per step where the device has it (CPU and CUDA in torch >= 2.4), else foreach
            opt = torch.optim.AdamW(torch_groups, fused=True, **settings)
        except RuntimeError:
            opt = torch.optim.AdamW(torch_groups, foreach=True, **settings)
        super().__init__(opt=opt)

    @property
    def param_lists(self):
        pairs = self.opt.param_groups
        return [pairs[i]["params"] + pairs[i + 1]["params"] for i in range(0, len(pairs), 2)]

    @property
    def hypers(self):  # one per fastai group: its weights' torch group holds them all
        return super().hypers[::2]

    def store_hyper(self, key, values):
        for i, value in enumerate(values):
            for group in self.opt.param_groups[2 * i: 2 * i + 2]:
                if not (key == "wd" and group.get("no_decay")):
                    self.set_group_hyper(group, key, value)
