"""--mixup and --cutmix: fastai's MixUp and CutMix callbacks as recipe keys."""
import json

import pytest
from fastai.callback.core import Callback

from conftest import TINY, invoke, make_split_dataset
from test_distributed import torchrun


class LossDuringTraining(Callback):
    """Records the Learner's loss function at every training batch."""
    def __init__(self):
        self.seen = []

    def after_batch(self):
        if self.training:
            self.seen.append(self.learn.loss_func)


@pytest.mark.parametrize("option, handler", [("mixup", "MixUp"), ("cutmix", "CutMix")])
def test_mixing_trains_on_mixed_batches_and_leaves_no_trace_in_the_saved_model(option, handler, tmp_path):
    from fastai.learner import load_learner

    from fastft.recipe import load_recipe
    from fastft.train.pipeline import train

    data = make_split_dataset(tmp_path / "colours", per_class=8)
    recipe = load_recipe("cifar").replace(data=str(data), arch="resnet18", pretrained=False, size=32, bs=4, workers=0,
                                          device="cpu", epochs=2, strategy="fine-tune", **{option: 0.4})
    spy = LossDuringTraining()
    metrics = train(recipe, str(tmp_path / "run"), callbacks=[spy])
    assert spy.seen and all(type(lf.__self__).__name__ == handler for lf in spy.seen)  # every batch: the mixed loss
    assert f"{option} = 0.4" in (tmp_path / "run" / "recipe.toml").read_text()
    assert 0 <= metrics["final"]["test_acc"] <= 1
    learn = load_learner(tmp_path / "run" / "model.pkl")
    assert not [cb for cb in learn.cbs if type(cb).__name__ == handler]  # a training-only callback
    assert learn.loss_func.__class__.__name__ == "CrossEntropyLossFlat"


def test_mixup_and_cutmix_together_or_negative_are_one_line_errors(tmp_path):
    data = make_split_dataset(tmp_path / "colours", per_class=4)
    both = invoke("train", data, *TINY, "--mixup", "0.4", "--cutmix", "1", "--out", tmp_path / "both")
    assert both.exit_code == 2 and "choose one" in both.output and not (tmp_path / "both").exists()
    negative = invoke("train", data, *TINY, "--mixup", "-1", "--out", tmp_path / "negative")
    assert negative.exit_code == 2 and "'mixup'" in negative.output


def test_mixup_on_two_processes(dataset, tmp_path):
    args = ["train", dataset, *TINY, "--epochs", "2", "--strategy", "fine-tune", "--mixup", "0.4"]
    two = torchrun("-m", "fastft", *args, "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("mixed by MixUp") == 1
    assert len(json.loads((tmp_path / "two" / "metrics.json").read_text())["epochs"]) == 2
