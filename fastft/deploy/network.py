"""The network fastft trains, rebuilt from torch and timm alone (no fastai), for pickle-free inference.

fastai's `vision_learner` makes Sequential(TimmBody(timm model), head) with its default `create_head`;
`build_network` makes the same modules under the same parameter names, so a state dict saved from a
trained Learner loads into it strictly. tests/test_bundle.py checks the two agree.
"""
from __future__ import annotations

import torch
from torch import nn

# fastai's create_head defaults: concat pooling, one hidden layer of 512, dropout 0.25 then 0.5.
HEAD_DEFAULTS = {"hidden": 512, "dropout": 0.5, "concat_pool": True}
HEADS = {
    "fastai": {"hidden": 512, "concat_pool": True},  # fastai's create_head
    "linear": {"hidden": 0, "concat_pool": False},  # a linear classifier on average-pooled features: what a probe fits
}


class ConcatPool(nn.Module):
    """Max- and average-pool to 1x1, concatenated (max first), as fastai's AdaptiveConcatPool2d."""

    def forward(self, x):
        return torch.cat([nn.functional.adaptive_max_pool2d(x, 1), nn.functional.adaptive_avg_pool2d(x, 1)], 1)


class Body(nn.Module):
    """The timm model without its classifier; feature maps where it has them (as fastai's TimmBody)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.needs_pool = model.default_cfg.get("pool_size") is not None

    def forward(self, x):
        return self.model.forward_features(x) if self.needs_pool else self.model(x)


def head(n_features: int, n_classes: int, pool: bool, hidden: int = 512, dropout: float = 0.5,
         concat_pool: bool = True) -> nn.Sequential:
    """fastai's create_head: [pool, flatten,] BN, dropout/2, linear, ReLU, BN, dropout, linear. Like fastai's
    LinBnDrop, a dropout of 0 leaves the Dropout layers out (which renumbers the parameters after them).
    hidden=0: a linear classifier instead, [pool, flatten,] [dropout,] linear with a bias (LINEAR_HEAD)."""
    layers: list[nn.Module] = []
    if pool:
        layers += [ConcatPool() if concat_pool else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        n_features *= 2 if concat_pool else 1
    if not hidden:
        return nn.Sequential(*layers, *([nn.Dropout(dropout)] if dropout else []), nn.Linear(n_features, n_classes))
    for n_in, n_out, p, last in ((n_features, hidden, dropout / 2, False), (hidden, n_classes, dropout, True)):
        layers += [nn.BatchNorm1d(n_in)] + ([nn.Dropout(p)] if p else []) + [nn.Linear(n_in, n_out, bias=False)]
        layers += [] if last else [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def build_network(arch: str, n_classes: int, head_config: dict | None = None) -> nn.Sequential:
    """A randomly initialised network of the trained shape; load a bundle's weights into it."""
    import timm

    body = Body(timm.create_model(arch, pretrained=False, num_classes=0))
    config = {**HEAD_DEFAULTS, **(head_config or {})}
    return nn.Sequential(body, head(body.model.num_features, n_classes, pool=body.needs_pool, **config))
