"""The d2l reference for time to accuracy: d2l 13.1's CIFAR-10 recipe, as its train_ch13 runs it.

    python bench/d2l_cifar.py        # all of CIFAR-10, 10 epochs: about 18 minutes on 2 CPU cores

timm's ResNet-18 (ImageNet stem) at 32 px, Xavier-uniform init of every conv and linear layer,
RandomHorizontalFlip + ToTensor for training, ToTensor for testing, batch 256, DataLoader with 2
workers, Adam at a constant 1e-3, loss summed over the batch. Prints the figures per epoch and
writes bench/results/d2l_cifar.json, which bench/performance.py compares fastft's runs against.
Costly: run it once per machine and commit the result.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from common import ROOT, SHARED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "cifar10")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "d2l_cifar.json")
    args = parser.parse_args()
    started = time.perf_counter()

    import timm
    import torch
    from torch import nn
    from torchvision import datasets, transforms

    torch.manual_seed(0)

    def loader(split, transform, shuffle):
        return torch.utils.data.DataLoader(datasets.ImageFolder(str(args.data / split), transform), batch_size=256,
                                           shuffle=shuffle, num_workers=args.workers)

    train_iter = loader("train", transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()]), True)
    test_iter = loader("test", transforms.ToTensor(), False)
    net = timm.create_model("resnet18", num_classes=10)
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    history = []
    for epoch in range(args.epochs):
        net.train()
        loss_sum = correct = seen = 0
        epoch_started = time.perf_counter()
        for x, y in train_iter:
            optimizer.zero_grad()
            out = net(x)
            loss = loss_fn(out, y)
            loss.sum().backward()
            optimizer.step()
            loss_sum, correct, seen = loss_sum + loss.sum().item(), correct + (out.argmax(1) == y).sum().item(), seen + len(y)
        train_seconds = time.perf_counter() - epoch_started
        net.eval()
        test_correct = test_seen = 0
        with torch.no_grad():
            for x, y in test_iter:
                test_correct += (net(x).argmax(1) == y).sum().item()
                test_seen += len(y)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                        "test_acc": test_correct / test_seen, "train_examples_per_s": seen / train_seconds,
                        "elapsed_s": time.perf_counter() - started})
        print(json.dumps(history[-1]), flush=True)
    last = history[-1]
    record = {"measured": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "by": "bench/d2l_cifar.py", "epochs": args.epochs, "wall_seconds": time.perf_counter() - started,
              "test_acc": last["test_acc"], "train_acc": last["train_acc"], "history": history}
    if args.json.is_file() and "issue_figures" in (earlier := json.loads(args.json.read_text())):
        record["issue_figures"] = earlier["issue_figures"]  # issue 7's targets were set by these: keep them beside
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"d2l recipe: test acc {last['test_acc']:.3f}, train acc {last['train_acc']:.3f} after {args.epochs} "
          f"epochs in {record['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
