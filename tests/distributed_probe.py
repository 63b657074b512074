"""Run under torchrun by test_distributed.py: trains through fastft's library with a probe that records,
per rank, the training batches and examples of each epoch and a checksum of the final weights."""
import hashlib
import json
import os
import sys

from fastai.callback.core import Callback

from fastft.recipe import load_recipe
from fastft.train.pipeline import train


class Probe(Callback):
    order = 90

    def __init__(self, path):
        self.path, self.epochs = path, []

    def before_epoch(self):
        self.batches, self.examples = 0, 0

    def after_batch(self):
        if self.training:
            self.batches += 1
            self.examples += len(self.yb[0])

    def after_epoch(self):
        self.epochs.append({"batches": self.batches, "examples": self.examples})

    def after_fit(self):
        model = getattr(self.learn.model, "module", self.learn.model)
        digest = hashlib.sha256()
        for name, value in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().numpy().tobytes())
        with open(self.path, "w") as f:
            json.dump({"epochs": self.epochs, "weights": digest.hexdigest()}, f)


def tiny_recipe(name: str, data: str, strategy: str = ""):
    """Recipe `name` made tiny for synthetic data, on CPU processes (gloo), GPU or not."""
    recipe = load_recipe(name).replace(data=data, arch="resnet18", pretrained=False, size=32, bs=4, workers=0, epochs=2,
                                       device="cpu")
    return recipe.replace(strategy=strategy) if strategy else recipe


if __name__ == "__main__":  # DATA OUT PROBES [RECIPE [STRATEGY]]
    data, out, probes, *rest = sys.argv[1:]
    recipe = tiny_recipe(rest[0] if rest else "cifar", data, rest[1] if len(rest) > 1 else "")
    train(recipe, out, callbacks=[Probe(os.path.join(probes, f"rank{os.environ.get('RANK', '0')}.json"))])
