"""Each fastai behaviour fastft relies on that fastai does not promise (fastft/fastai_internals.py), checked
directly: a fastai upgrade that changes one fails here, under a name that says what broke."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastai.data.core import Datasets, TfmdDL
from fastai.learner import Learner
from fastai.vision.all import Transform

from fastft.fastai_internals import (AFTER_PROGRESS, AFTER_RECORDER, AFTER_TRAINING_MODE, BroadcastHookDL,
                                     HyperHookOptimWrapper, LoaderHookTrainer, finder_saves_under, loader_rng,
                                     release_last_batch, set_workers, labelled_loader, train_only, valid_only)


class AddTen(Transform):
    def encodes(self, x: int):
        return x + 10


def test_split_idx_makes_a_transform_training_only_or_validation_only():
    trained = Datasets([1, 2, 3, 4], tfms=[[train_only(AddTen())]], splits=([0, 1], [2, 3]))
    assert [x for (x,) in trained.train] == [11, 12] and [x for (x,) in trained.valid] == [3, 4]
    tested = Datasets([1, 2, 3, 4], tfms=[[valid_only(AddTen())]], splits=([0, 1], [2, 3]))
    assert [x for (x,) in tested.train] == [1, 2] and [x for (x,) in tested.valid] == [13, 14]


class WorkerPid(Transform):
    def encodes(self, x: int):
        return os.getpid()


def test_a_dataloader_starts_the_worker_count_its_torch_loader_holds():
    dl = TfmdDL(Datasets(list(range(8)), tfms=[[WorkerPid()]]), bs=4)
    set_workers(dl, 2)
    pids = {int(pid) for (batch,) in dl for pid in batch}
    assert len(pids) == 2 and os.getpid() not in pids  # two batches, one per worker
    set_workers(dl, 1)
    pids = {int(pid) for (batch,) in dl for pid in batch}
    assert len(pids) == 1 and os.getpid() not in pids
    set_workers(dl, 0)
    assert {int(pid) for (batch,) in dl for pid in batch} == {os.getpid()}


def _tiny_learner():
    from fastai.data.core import DataLoaders

    x = torch.randn(16, 3)
    y = (x[:, 0] > 0).long()
    dls = DataLoaders(TfmdDL(list(zip(x, y)), bs=4, shuffle=True), TfmdDL(list(zip(x, y)), bs=4))
    return Learner(dls, torch.nn.Linear(3, 2), loss_func=torch.nn.CrossEntropyLoss())


def test_a_learner_stopped_mid_fit_holds_its_last_batch_until_released():
    from fastai.callback.core import Callback

    class CtrlC(Callback):
        def after_batch(self):
            raise KeyboardInterrupt

    learn = _tiny_learner()
    with learn.no_bar(), learn.no_logging(), pytest.raises(KeyboardInterrupt):
        learn.fit(1, cbs=CtrlC())
    assert isinstance(learn.pred, torch.Tensor) and isinstance(learn.xb[0], torch.Tensor)  # what would be pickled
    release_last_batch(learn)
    assert learn.pred is None and learn.loss is None and learn.xb == (None,) and learn.yb == (None,) and learn.dl is None


def test_set_hyper_spreads_a_slice_over_the_groups_and_stores_it_through_the_hook():
    stored = []

    class Recording(HyperHookOptimWrapper):
        def store_hyper(self, key, values):
            stored.append((key, list(values)))

    groups = [[torch.nn.Parameter(torch.zeros(2))] for _ in range(3)]
    opt = Recording(groups, opt=torch.optim.SGD, lr=0.1)
    opt.set_hyper("lr", slice(1e-3, 1e-1))
    opt.set_hyper("wd", 0.5)
    assert stored[0][0] == "lr" and stored[0][1] == pytest.approx([1e-3, 1e-2, 1e-1])
    assert stored[1] == ("wd", [0.5, 0.5, 0.5])


def test_the_hyper_hook_sets_torchs_names_in_a_torch_group():
    class Plain(HyperHookOptimWrapper):
        def store_hyper(self, key, values):
            pass

    opt = Plain([[torch.nn.Parameter(torch.zeros(2))]], opt=torch.optim.AdamW, lr=0.1, betas=(0.9, 0.99))
    group = opt.opt.param_groups[0]
    opt.set_group_hyper(group, "lr", 0.5)
    opt.set_group_hyper(group, "mom", 0.8)  # fastai's mom is Adam's first beta, sqr_mom its second
    opt.set_group_hyper(group, "sqr_mom", 0.95)
    opt.set_group_hyper(group, "wd", 0.3)
    assert group["lr"] == 0.5 and group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.3


def test_the_distributed_trainer_wraps_loaders_through_the_hook():
    class Recording(LoaderHookTrainer):
        def wrap_loader(self, dl):
            return ("wrapped", dl)

    trainer = Recording(accelerator=None, sync_bn=False)
    assert trainer.accelerator is None and trainer.sync_bn is False  # what the trainer's own methods read
    trainer.learn = SimpleNamespace(dl="train loader")
    trainer.before_train()
    assert trainer.learn.dl == ("wrapped", "train loader")
    trainer.learn.dl = "test loader"
    trainer.before_validate()
    assert trainer.learn.dl == ("wrapped", "test loader")


def test_the_sharded_loader_takes_its_order_from_the_broadcast_hook():
    asked = []

    class Recording(BroadcastHookDL):
        def broadcast_order(self, indices, rank):
            asked.append(rank)
            return list(reversed(indices))  # what rank 0 "sent"

    dl = TfmdDL(list(range(10)), bs=2)
    shards = [list(Recording(dl, rank=r, world_size=2).get_idxs()) for r in (0, 1)]
    assert asked == [0, 0]
    assert shards == [[9, 8, 7, 6, 5], [4, 3, 2, 1, 0]]


def test_a_wrapped_loader_keeps_its_generator_and_makes_test_loaders():
    from operator import itemgetter

    from fastai.distributed import DistributedDL

    pairs = [[torch.full((3,), float(i)), i % 2] for i in range(16)]  # lists: a Transform maps over tuples
    dsets = Datasets(pairs, tfms=[[itemgetter(0)], [itemgetter(1)]], splits=(list(range(12)), list(range(12, 16))))
    dls = dsets.dataloaders(bs=4)
    valid = dls.valid
    dls.valid = DistributedDL(valid, rank=0, world_size=2)  # as fastai's DistributedTrainer leaves it mid-fit
    assert loader_rng(dls.valid) is valid.rng and loader_rng(dls.train) is dls.train.rng
    batches = list(labelled_loader(dls, pairs[:6], bs=3))
    assert [len(x) for x, _ in batches] == [3, 3]  # every item, through the test split's pipeline, with its label
    assert torch.equal(torch.cat([y for _, y in batches]), torch.tensor([0, 1, 0, 1, 0, 1]))


def test_callback_orders_sit_around_fastais_own():
    from fastai.callback.core import TrainEvalCallback
    from fastai.callback.progress import ProgressCallback
    from fastai.learner import Recorder

    assert TrainEvalCallback.order < AFTER_TRAINING_MODE < Recorder.order < AFTER_RECORDER < ProgressCallback.order
    assert ProgressCallback.order < AFTER_PROGRESS


def test_the_lr_finder_keeps_its_copy_of_the_model_under_the_folder_it_is_given(tmp_path):
    learn = _tiny_learner()
    saved_under = []
    original = learn.save

    def save(name, *args, **kwargs):  # fastai's finder saves the model before it starts, under learn.path
        saved_under.append(Path(learn.path))
        return original(name, *args, **kwargs)
    learn.save = save
    before = learn.path
    with learn.no_bar(), learn.no_logging(), finder_saves_under(learn, tmp_path):
        learn.lr_find(num_it=5, show_plot=False)
    assert saved_under == [tmp_path] and learn.path == before
    assert not (tmp_path / learn.model_dir).exists()  # its temporary folder is gone


def test_inference_modules_do_not_import_fastai():
    code = ("import sys, fastft, fastft.deploy.evaluate, fastft.deploy.predict, fastft.deploy.bundle, "
            "fastft.deploy.export, fastft.deploy.network; "
            "print(sorted(m for m in sys.modules if m == 'fastai' or m.startswith('fastai.')))")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "[]"
