"""--ema: the run keeps an exponential moving average of its weights, one network of the same shape."""
import json

import torch
from fastai.callback.core import Callback

from conftest import TINY, invoke, make_split_dataset
from distributed_probe import tiny_recipe
from test_distributed import torchrun


class ReferenceAverage(Callback):
    """The average --ema promises, computed here from the weights after every optimizer step: timm's warm-up,
    decay min(D, 1 - t^(-2/3)) at step t > 1, and 0 (a copy) at step 1."""

    def __init__(self, decay: float):
        self.decay, self.steps, self.average = decay, 0, None

    def after_step(self):
        self.steps += 1
        weights = {k: v.detach().float().clone() for k, v in getattr(self.learn.model, "module", self.learn.model)
                   .state_dict().items()}
        d = 0.0 if self.steps == 1 else min(self.decay, 1 - self.steps ** (-2 / 3))
        self.average = weights if self.average is None else {k: d * self.average[k] + (1 - d) * v
                                                              for k, v in weights.items()}


def test_the_kept_weights_are_the_average_of_the_training_steps_and_training_is_unchanged(tmp_path):
    from safetensors.torch import load_file

    from fastft.train.pipeline import train

    data = make_split_dataset(tmp_path / "colours", classes=("blue", "red"), per_class=8)
    recipe = tiny_recipe("train", str(data), "lp-ft").replace(epochs=3, keep="last", lr=3e-3)
    reference = ReferenceAverage(0.9)
    averaged = train(recipe.replace(ema=0.9), str(tmp_path / "ema"), callbacks=[reference])
    plain = train(recipe, str(tmp_path / "plain"))
    assert reference.steps == 8  # 16 images, batch 4: 4 steps in each of the 2 fine-tuning epochs
    saved = load_file(str(tmp_path / "ema" / "model.safetensors"))
    last = load_file(str(tmp_path / "plain" / "model.safetensors"))
    names = {k for k, v in saved.items() if v.is_floating_point()}
    assert names and names <= set(reference.average)  # the bundle holds the network as it trained
    for name in names:
        torch.testing.assert_close(saved[name].float(), reference.average[name].float(), atol=2e-5, rtol=1e-4)
    moved = max((saved[n].float() - last[n].float()).abs().max().item() for n in names)
    assert moved > 1e-4  # the average is not the last step's weights
    # the average is only measured and kept: the training steps are the same as without it
    assert [e["train_loss"] for e in averaged["epochs"]] == [e["train_loss"] for e in plain["epochs"]]
    assert "ema = 0.9\n" in (tmp_path / "ema" / "recipe.toml").read_text()


def test_ema_with_the_probe_strategy_is_a_usage_error_and_on_two_processes_it_runs(dataset, tmp_path):
    result = invoke("train", dataset, *TINY, "--strategy", "probe", "--ema", "0.99", "--out", tmp_path / "probe")
    assert result.exit_code == 2 and "--ema" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "probe").exists()
    args = ["train", dataset, *TINY, "--epochs", "2", "--strategy", "fine-tune", "--ema", "0.99"]
    two = torchrun("-m", "fastft", *args, "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("an EMA of the weights") == 1
    assert len(json.loads((tmp_path / "two" / "metrics.json").read_text())["epochs"]) == 2
