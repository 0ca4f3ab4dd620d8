"""The ResNet18 tutorial's training, kept as the reference for the 600-second comparison in
docs/results.md. Not used by the project.

    python tests/tutorial_train.py --data-dir data --seconds 600
    python tests/tutorial_train.py --data-dir data --seconds 600 --lr 0.1   # kuangliu's learning rate

What the tutorial's train.py does, and this does too: its own ResNet18 (tutorial_resnet.py),
torchvision's CIFAR10 dataset with RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor
and Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)); a DataLoader with batch 128,
shuffle and 2 workers; nn.CrossEntropyLoss; SGD at a constant lr 0.01 (its LR = 0.01),
momentum 0.9, weight decay 5e-4; fp32; the running loss and accuracy read back after every
step and printed. Here training stops after --seconds, then the whole test split is scored
(batch 100, as the tutorial does).
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tutorial_resnet import ResNet18  # noqa: E402  the tutorial's network, with its layer names

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
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)

    start, seen, stop, epoch = time.perf_counter(), 0, False, 0
    while not stop:
        net.train()
        sum_loss, correct, total = 0.0, 0.0, 0.0
        for i, (inputs, labels) in enumerate(trainloader):
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            sum_loss += loss.item()
            correct += (outputs.argmax(1) == labels).sum().item()
            total += labels.size(0)
            seen += len(labels)
            print(f"[epoch:{epoch + 1}, iter:{i + 1 + epoch * len(trainloader)}] Loss: {sum_loss / (i + 1):.3f} | "
                  f"Acc: {100.0 * correct / total:.3f}% | {time.perf_counter() - start:.0f}s", flush=True)
            if time.perf_counter() - start >= args.seconds:
                stop = True
                break
        epoch += 1
    train_seconds = time.perf_counter() - start

    t = time.perf_counter()
    correct = total = 0
    net.eval()
    with torch.no_grad():
        for inputs, labels in testloader:
            correct += (net(inputs).argmax(1) == labels).sum().item()
            total += len(labels)
    print(f"tutorial recipe (lr {args.lr}): {seen} training images ({seen / len(trainset):.2f} epochs) in "
          f"{train_seconds:.1f}s ({seen / train_seconds:.1f} img/s); test accuracy {100 * correct / total:.2f}% "
          f"on {total} images (evaluation {time.perf_counter() - t:.1f}s)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--seconds", type=float, default=600, help="training time budget")
    p.add_argument("--lr", type=float, default=0.01, help="the tutorial's LR; kuangliu's main.py uses 0.1")
    main(p.parse_args())
