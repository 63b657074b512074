"""The frozen backbone's pooled features of a list of images, and of their mirror images: what the linear probe
(fastft/train/probe.py), the out-of-fold predictions of the backbone choice and the label check
(fastft/train/out_of_fold.py), and the budget's timing of a pass all stand on.

They are computed through the test transform (resize, centre crop), in eval mode, and in one process kept in the
feature cache (fastft/data/cache.py) by file, picture size and a digest of the backbone's weights: one pass of a
backbone over a set of images serves every step of a command that needs it, and a second command on the same files.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from fastft.fastai_internals import labelled_loader
from fastft.train.distributed import unwrapped


def pooled_features(learn, items, show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (N, D), mirror images' features (N, D), labels (N,)) of `items`, through the frozen backbone and
    the head's pooling layers, with the test transform. Runs on the Learner's device, in eval mode.
    `show_progress`: a bar over the batches (a terminal's)."""
    network = unwrapped(learn.model)  # DistributedDataParallel wraps it during a fit of several processes
    body, head = network[0], network[1]
    pool = torch.nn.Sequential(*[m for m in head if isinstance(m, (torch.nn.AdaptiveAvgPool2d, torch.nn.Flatten))])
    dl = labelled_loader(learn.dls, items, shuffle=False)
    originals, mirrors, labels = [], [], []
    was_training = network.training
    network.eval()
    with torch.inference_mode():
        if show_progress:
            from fastprogress.fastprogress import progress_bar

            dl = progress_bar(dl, leave=False)
            dl.comment = "probe: features of the training images"
        for xb, yb in dl:
            xb, yb = xb.as_subclass(torch.Tensor), yb.as_subclass(torch.Tensor)  # plain tensors, not fastai's types
            originals.append(pool(body(xb)).float().cpu())
            mirrors.append(pool(body(xb.flip(-1))).float().cpu())
            labels.append(yb.cpu())
    network.train(was_training)
    return torch.cat(originals), torch.cat(mirrors), torch.cat(labels)


def backbone_digest(learn) -> str:
    """A digest of the backbone's weights and buffers: the features cache's key for this network."""
    digest = hashlib.sha1()
    for name, tensor in learn.model[0].state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_order(items: list) -> list[int]:
    """The items' indices in file order. Features are stored that way, not in item order (items are grouped by
    label): a changed label, the point of checking them, leaves the cache's key and rows as they were."""
    return sorted(range(len(items)), key=lambda i: str(items[i][0]))


def features_cached(learn, items: list, recipe) -> bool:
    """Whether `frozen_features` will read all these items' features back rather than run the backbone."""
    from fastft.data import cache

    files = [Path(item[0]) for item in items]
    return recipe.cache and not cache.features_missing(files, recipe.size, recipe.crop_pct, backbone_digest(learn))


def frozen_features(learn, items: list, recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), mirror images' features (N, D)) of the training `items` through the frozen backbone, read
    back from the cache for the files this network saw at this size before, computed for the rest (--no-cache:
    all computed, none stored)."""
    from fastai.torch_core import no_random

    from fastft.data import cache

    order = file_order(items)

    def compute(rows: list[int]) -> dict:  # `rows`: positions in file order
        originals, mirrors, _ = pooled_features(learn, [items[order[r]] for r in rows],
                                                show_progress=sys.stdout.isatty())
        return {"features": originals, "mirrors": mirrors}
    files = [Path(items[i][0]) for i in order]
    # the random state as it was, whether the features were computed (a loader draws its seed) or read back: a run
    # trains the same numbers the second time, when its features are cached
    with no_random(recipe.seed):
        stored = (cache.features(files, recipe.size, recipe.crop_pct, backbone_digest(learn), compute) if recipe.cache
                  else compute(list(range(len(order)))))
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))  # row of item i in file order
    return stored["features"][back], stored["mirrors"][back]
