"""The ResNet18 tutorial's training recipe, kept as the reference for the README's
600-second comparison. Not used by the project.

    python tests/tutorial_train.py --data-dir data --seconds 600

What the tutorial does: torchvision's CIFAR10 dataset, RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor, Normalize; a DataLoader with batch 128, shuffle
and 2 workers; SGD at a constant lr 0.1, momentum 0.9, weight decay 5e-4; fp32.
Here training stops after --seconds, then the whole test split is scored.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from resnet import ResNet18  # noqa: E402  the tutorial's network (same layers and names)


# A rebuilt copy of CIFAR-10 has other MD5 sums than the official files: skip torchvision's check.
torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True
CIFAR10 = torchvision.datasets.CIFAR10


def main(args):
    torch.manual_seed(0)
    normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    transform_train = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                          transforms.ToTensor(), normalize])
    transform_test = transforms.Compose([transforms.ToTensor(), normalize])
    trainset = CIFAR10(root=args.data_dir, train=True, download=False, transform=transform_train)
    testset = CIFAR10(root=args.data_dir, train=False, download=False, transform=transform_test)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=128, shuffle=True, num_workers=2)
    testloader = torch.utils.data.DataLoader(testset, batch_size=100, shuffle=False, num_workers=2)
    net = ResNet18()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    start, seen, stop = time.perf_counter(), 0, False
    while not stop:
        net.train()
        for inputs, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
            if seen // 128 % 20 == 0:
                print(f"{seen} images, loss {loss.item():.3f}, {time.perf_counter() - start:.0f}s", flush=True)
            if time.perf_counter() - start >= args.seconds:
                stop = True
                break
    train_seconds = time.perf_counter() - start

    t = time.perf_counter()
    correct = total = 0
    net.eval()
    with torch.no_grad():
        for inputs, labels in testloader:
            correct += (net(inputs).argmax(1) == labels).sum().item()
            total += len(labels)
    print(f"tutorial recipe: {seen} training images ({seen / len(trainset):.2f} epochs) in {train_seconds:.1f}s "
          f"({seen / train_seconds:.1f} img/s); test accuracy {100 * correct / total:.2f}% on {total} images "
          f"(evaluation {time.perf_counter() - t:.1f}s)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--seconds", type=float, default=600, help="training time budget")
    main(p.parse_args())
