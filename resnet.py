"""ResNet for CIFAR-sized images, plus the code that turns a checkpoint back into a model.

The network is the CIFAR variant used by the tutorials this project grew out of
(kuangliu/pytorch-cifar): a 3x3 stride-1 stem and no max-pool, so a 32x32 picture
keeps its resolution into layer1. Parameter names (conv1, bn1, layer1..layer4,
shortcut, linear) match that code, so a state dict saved by it loads as is.

This file imports only torch: copy it alone into another project.

    import resnet
    model = resnet.build_model("resnet18", num_classes=10)
    model, ckpt = resnet.load_model("runs/resnet18/best.pth")
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval


def shortcut(in_planes, out_planes, stride):
    """Identity when the shapes match, else a strided 1x1 projection (shortcut.0/.1, as the tutorials name them)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4): the block of ResNet50 and deeper."""
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Global average pooling: the tutorials' avg_pool2d(out, 4) at 32x32
        # input (layer4 is 4x4 there), and still correct at any other size.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def ResNet18(num_classes=10):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def ResNet34(num_classes=10):
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def ResNet50(num_classes=10):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def ResNet101(num_classes=10):
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes)


def ResNet152(num_classes=10):
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes)


MODELS = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
}


def build_model(arch, num_classes=10):
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; choose from {', '.join(MODELS)}")
    return MODELS[arch](num_classes)


def fold_batchnorm(model):
    """Turn model, in place, into its inference form: each BatchNorm folded into the
    convolution before it. Returns model, in eval mode.

    In eval mode a BatchNorm is a fixed per-channel scale and shift, which the
    convolution's weights and a bias can absorb: the same outputs (to float
    rounding) with one pass over the activations fewer per layer. The folded
    model's state dict has other keys (conv biases, no bn*) and it cannot train:
    fold a copy (copy.deepcopy) of a model that is still training or to be saved.
    """
    model.eval()
    for block in model.modules():  # the stem (the model itself) and every block
        for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
            if isinstance(getattr(block, bn, None), nn.modules.batchnorm._BatchNorm):
                setattr(block, conv, fuse_conv_bn_eval(getattr(block, conv), getattr(block, bn)))
                setattr(block, bn, nn.Identity())
        shortcut = getattr(block, "shortcut", None)
        if isinstance(shortcut, nn.Sequential) and len(shortcut) == 2:
            block.shortcut = nn.Sequential(fuse_conv_bn_eval(shortcut[0], shortcut[1]))
    return model


# ---------------------------------------------------------------------------
# Checkpoints. A checkpoint is a plain dict that describes itself:
#   arch, num_classes, classes, mean, std, image_size, epoch, accuracy, model
# (last.pth adds the training state). Everything in it is a tensor, number,
# string, list or dict, so it loads with weights_only=True: a .pth file from
# the internet cannot run code on this machine.

class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line for the user."""


def clean_state_dict(state_dict):
    """Drop the prefixes DataParallel/DDP ('module.') and torch.compile ('_orig_mod.') add."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_checkpoint(path):
    """Read a .pth file safely (weights_only) onto the CPU, or raise CheckpointError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint") from None
    except Exception as e:  # truncated, corrupt, or a pickle that wants to run code
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__})")
    return ckpt


def model_from_checkpoint(ckpt, arch=None, source="checkpoint"):
    """Rebuild the network a checkpoint dict describes and load its weights.

    A bare state dict (what the tutorials save) carries no architecture name:
    pass arch for those. The class count is read from the final layer.
    """
    if "model" in ckpt and "arch" in ckpt:
        state, arch = ckpt["model"], ckpt["arch"]
    elif arch is not None and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    elif arch is None and "model" not in ckpt:
        raise CheckpointError(f"{source}: a bare state dict; say which network it is with --model")
    else:
        raise CheckpointError(f"{source}: not a checkpoint of this project")
    state = clean_state_dict(state)
    if "linear.weight" not in state:
        raise CheckpointError(f"{source}: has no 'linear' layer; not a ResNet of this project")
    num_classes = state["linear.weight"].shape[0]
    try:
        model = build_model(arch, num_classes)
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{source}: does not fit {arch} ({first_line})") from None
    return model


def load_model(path, arch=None):
    """Load a checkpoint file and return (model in eval mode, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, arch, source=str(path))
    return model.eval(), ckpt


@torch.no_grad()
def evaluate(model, loader, num_classes, tta=False):
    """Mean cross-entropy and the confusion matrix (rows: true class, columns: predicted).

    tta: average the logits of each image and its mirror image (flip test-time
    augmentation): the network saw both during training, and the two views'
    errors partly cancel.
    """
    model.eval()
    # The sums stay on the device and are read once at the end: a read per batch (or
    # bincount, whose output size depends on the data) would make the host wait for the
    # device at every batch. float32, which Apple's GPUs have (float64 they lack); the
    # counts in it stay exact up to 16 million images.
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes * num_classes, device=device)
    for images, labels in loader:
        logits = model(images).float()
        if tta:
            logits = (logits + model(images.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        confusion.index_add_(0, labels * num_classes + logits.argmax(1), torch.ones(len(labels), device=device))
    confusion = confusion.view(num_classes, num_classes).long().cpu()
    return loss_sum.item() / max(int(confusion.sum()), 1), confusion
