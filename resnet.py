"""ResNet for CIFAR-sized images, and the checkpoint format that turns back into one.

The network is the CIFAR variant of the tutorials this project grew out of
(kuangliu/pytorch-cifar): a 3x3 stride-1 stem and no max-pool, so a 32x32 picture
keeps its resolution into layer1. Parameter names (conv1, bn1, layer1..layer4,
shortcut, linear) match that code, so its state dicts load as they are; the ResNet18
tutorial's own names (conv1.0, layerN.M.left.0, fc) are translated on loading.

This file imports only torch: copy it alone into another project.

    import resnet
    model = resnet.build_model("resnet18", num_classes=10)
    model, ckpt = resnet.load_model("runs/resnet18/best.pth")    # any checkpoint below
    print(ckpt["arch"], ckpt["classes"], ckpt["accuracy"])
"""
import copy
import functools
import math
import os
import re
import warnings

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
    def __init__(self, block, num_blocks, num_classes=10, zero_init_residual=False):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        if zero_init_residual:  # each block starts as its shortcut alone (Goyal et al., 2017)
            for b in self.modules():
                if isinstance(b, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(b.bn3.weight if isinstance(b, Bottleneck) else b.bn2.weight)

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


# Each network: its block and the number of blocks in layer1..layer4.
ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}
MODELS = list(ARCHS)
# The picture sides train.py trains at; a checkpoint claiming another is refused.
IMAGE_SIZES = (8, 1024)


def build_model(arch, num_classes=10, zero_init_residual=False):
    if arch not in ARCHS:
        raise ValueError(f"unknown model {arch!r}; choose from {', '.join(MODELS)}")
    return ResNet(*ARCHS[arch], num_classes=num_classes, zero_init_residual=zero_init_residual)


# The tutorials' constructors: resnet.ResNet18(num_classes=10) builds what their ResNet18() does.
ResNet18, ResNet34, ResNet50, ResNet101, ResNet152 = (functools.partial(build_model, arch) for arch in MODELS)


# ---------------------------------------------------------------------------
# Inference

def fold_batchnorm(model):
    """Turn model, in place, into its inference form: each BatchNorm folded into the
    convolution before it, in eval mode. The same outputs (to float rounding) with one
    pass over the activations fewer per layer; the folded model cannot train."""
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


def for_inference(model, device=None, memory_format=torch.contiguous_format):
    """A copy of model to answer with: BatchNorm folded, eval mode, on device, in memory_format.
    The model itself is left as it is (it may go on training, or be saved)."""
    return fold_batchnorm(copy.deepcopy(model)).to(device, memory_format=memory_format)


TTA = ["off", "flip", "flip-shift"]


def tta_logits(model, images, tta="off"):
    """Logits of a batch, averaged over test-time views of each picture. flip: the picture
    and its mirror image. flip-shift: half the weight on those two, half on the two moved
    one pixel up-left and down-right (edges reflected) with their mirror images."""
    if tta == "off":
        return model(images).float()

    def with_mirror(x):
        return (model(x).float() + model(x.flip(3)).float()) / 2

    logits = with_mirror(images)
    if tta == "flip-shift":
        h, w = images.shape[2:]
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        logits = (logits + (with_mirror(padded[:, :, :h, :w]) + with_mirror(padded[:, :, 2:, 2:])) / 2) / 2
    return logits


@torch.no_grad()
def evaluate(model, loader, num_classes, tta="off", amp_dtype=None):
    """Mean cross-entropy and the confusion matrix (rows: true class, columns: predicted)
    over the loader's batches, in autocast amp_dtype (None: fp32).

    The sums stay on the device and are read once, at the end: a read per batch (or
    bincount, whose output size depends on the data) would make the host wait for the
    device at every batch. float32, which Apple's GPUs have (float64 they lack)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes * num_classes, device=device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for images, labels in loader:
            logits = tta_logits(model, images, tta)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            confusion.index_add_(0, labels * num_classes + logits.argmax(1), torch.ones(len(labels), device=device))
    confusion = confusion.view(num_classes, num_classes).long().cpu()
    return loss_sum.item() / max(int(confusion.sum()), 1), confusion


# ---------------------------------------------------------------------------
# Checkpoints. A checkpoint of this project is a plain dict that describes itself:
#   arch, dataset, num_classes, classes, mean, std, image_size, epoch, accuracy,
#   best_accuracy, best_epoch, model (the state dict), args
# (last.pth adds the training state). Everything in it is a tensor, number, string,
# list or dict, so it loads with weights_only=True: a .pth file from the internet
# cannot run code on this machine. The tutorials' files load too (read_checkpoint).

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The normalization the tutorials train with. Their std (0.2023, 0.1994, 0.2010) is a
# long-copied mistake (kuangliu/pytorch-cifar#19), but their weights expect it.
TUTORIAL_MEAN = (0.4914, 0.4822, 0.4465)
TUTORIAL_STD = (0.2023, 0.1994, 0.2010)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line for the user."""


def checkpoint(model, arch, classes, mean, std, image_size, dataset, epoch, accuracy, args, **extra):
    """The dict a checkpoint file holds: enough for test.py, predict.py, the window and
    export.py to use it with no other flags. extra: more keys (the training state)."""
    return {"arch": arch, "dataset": dataset, "num_classes": len(classes), "classes": list(classes),
            "mean": list(mean), "std": list(std), "image_size": image_size, "epoch": epoch,
            "accuracy": accuracy, "model": clean_state_dict(model.state_dict()), "args": args, **extra}


def clean_state_dict(state_dict):
    """Drop the prefixes DataParallel/DDP ('module.') and torch.compile ('_orig_mod.') add."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


TORCH_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # 0x1950a86a20f9469cfc6c as pickle writes it


def describe_file(path):
    """What a file that torch.load refused is, from its first bytes: for the error message."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        import zipfile
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return "a PyTorch file cut off before its end (truncated: copied or written only in part)"
        if not any(n.endswith("/data.pkl") for n in names):
            return "a zip archive, not a PyTorch file"
        return None
    if head.startswith(b"\x80"):  # a pickle: as torch.save wrote before PyTorch 1.6, its magic number first
        return None if head[2:13] == TORCH_LEGACY_MAGIC else "a Python pickle, not a PyTorch file"
    pictures = {b"\x89PNG": "a PNG picture", b"\xff\xd8\xff": "a JPEG picture", b"GIF8": "a GIF picture"}
    for magic, what in pictures.items():
        if head.startswith(magic):
            return f"{what}, not a checkpoint"
    try:
        head.decode("utf-8")
        return "a text file, not a checkpoint"
    except UnicodeDecodeError:
        return f"not a PyTorch file (it starts with {head[:8].hex(' ')})"


def load_checkpoint(path):
    """Read a .pth file safely (weights_only) onto the CPU, as it is, or raise CheckpointError."""
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": a file that is refused below anyway
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        best = os.path.join(path, "best.pth")  # a run folder named instead of its checkpoint
        hint = f": name a .pth file, such as {best}" if os.path.isfile(best) else ""
        raise CheckpointError(f"{path}: is a directory, not a checkpoint{hint}") from None
    except Exception as e:  # truncated, corrupt, not a checkpoint, or a pickle that wants to run code
        what = describe_file(path)
        if what is None:
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if "weights_only" in detail.lower() or "weights only" in detail.lower():
                what = "holds Python objects besides tensors and plain data; refused, as loading it could run code"
            else:
                what = f"a damaged PyTorch file ({detail[:200]})"
        raise CheckpointError(f"{path}: not a readable checkpoint: {what}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__})")
    return ckpt


# The ResNet18 tutorial's names for the same layers: its stem and blocks are Sequentials.
TUTORIAL_NAMES = [(r"^conv1\.0\.", "conv1."), (r"^conv1\.1\.", "bn1."),
                  (r"\.left\.0\.", ".conv1."), (r"\.left\.1\.", ".bn1."),
                  (r"\.left\.3\.", ".conv2."), (r"\.left\.4\.", ".bn2."), (r"^fc\.", "linear.")]


def _weights_of(ckpt, source):
    """(state dict in this project's names, which format it came in) of any supported file."""
    if "model" in ckpt and "arch" in ckpt:
        weights, kind, key = ckpt["model"], "project", "model"
    elif isinstance(ckpt.get("net"), dict):  # kuangliu's main.py: {'net': state dict, 'acc', 'epoch'}
        weights, kind, key = ckpt["net"], "kuangliu checkpoint", "net"
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        weights, kind, key = ckpt, "state dict", None
    else:
        raise CheckpointError(f"{source}: not a checkpoint of this project or its tutorials "
                              f"(its keys: {', '.join(map(str, list(ckpt)[:5]))})")
    if not (isinstance(weights, dict) and weights
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items())):
        what = f"its {key!r}" if key else "it"
        raise CheckpointError(f"{source}: {what} should map the network's layer names to tensors, and does not")
    return weights, kind


def _translate(state):
    state = clean_state_dict(state)
    if "fc.weight" in state or "conv1.0.weight" in state:  # the ResNet18 tutorial's names
        renamed = {}
        for key, value in state.items():
            for pattern, new in TUTORIAL_NAMES:
                key = re.sub(pattern, new, key)
            renamed[key] = value
        state = renamed
    return state


def infer_arch(state, source="checkpoint"):
    """The network a state dict (in this project's names) belongs to, from its keys."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{n}.")}) for n in range(1, 5))
    block = Bottleneck if "layer1.0.conv3.weight" in state else BasicBlock
    for arch, shape in ARCHS.items():
        if shape == (block, blocks):
            return arch
    if "linear.weight" not in state or not any(blocks):
        raise CheckpointError(f"{source}: not the weights of a CIFAR ResNet (its first keys: "
                              f"{', '.join(list(state)[:3])})")
    raise CheckpointError(f"{source}: a ResNet of {block.__name__}s {list(blocks)}, which is none of "
                          f"{', '.join(MODELS)}")


def _fit(model, state, arch, source):
    """Load state into model, or say in one line which keys or shapes differ."""
    own = model.state_dict()
    problems = []
    for words, keys in (("it lacks", [k for k in own if k not in state]),
                        ("it has extra", [k for k in state if k not in own])):
        if keys:
            problems.append(f"{words} {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}")
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if shapes:
        k = shapes[0]
        problems.append(f"its {k} is {list(state[k].shape)} where {arch} has {list(own[k].shape)}"
                        + (f" ({len(shapes) - 1} more shapes differ)" if len(shapes) > 1 else ""))
    if problems:
        raise CheckpointError(f"{source}: does not fit {arch}: {'; '.join(problems)}")
    model.load_state_dict(state)


def read_checkpoint(ckpt, arch=None, source="checkpoint"):
    """Rebuild the network a checkpoint holds: (model, the checkpoint's description).

    Besides this project's checkpoints it reads what the tutorials save: a bare state dict
    (the ResNet18 tutorial's names or kuangliu's) and kuangliu's {'net', 'acc', 'epoch'}.
    Their network is worked out from the keys (arch, if given, must agree), their classes
    are CIFAR-10's, and their normalization the tutorials': the description's "assumed"
    then says so, in one line for the user. The description has every key of the format."""
    weights, kind = _weights_of(ckpt, source)
    state = _translate(weights)
    found = ckpt["arch"] if kind == "project" else infer_arch(state, source)
    if arch is not None and arch != found:
        raise CheckpointError(f"{source}: holds a {found}, not a {arch}")
    if not isinstance(found, str) or found not in ARCHS:
        raise CheckpointError(f"{source}: a network named {found!r}, which is none of {', '.join(MODELS)}")
    if "linear.weight" not in state:
        raise CheckpointError(f"{source}: has no final layer (linear.weight); not a ResNet of this project")
    if state["linear.weight"].ndim != 2:
        raise CheckpointError(f"{source}: its linear.weight is {list(state['linear.weight'].shape)}, where a final "
                              "layer is [classes, features]")
    num_classes = state["linear.weight"].shape[0]
    model = build_model(found, num_classes)
    _fit(model, state, found, source)
    broken = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken:  # a run that diverged: every answer would be NaN
        raise CheckpointError(f"{source}: its {broken} holds NaN or infinite values; take the checkpoint of an "
                              "epoch before the run diverged")
    described = {"arch": found, "dataset": "cifar10", "num_classes": num_classes, "image_size": 32,
                 "classes": CIFAR10_CLASSES if num_classes == 10 else [str(i) for i in range(num_classes)],
                 "epoch": ckpt.get("epoch"), "accuracy": ckpt.get("acc")}
    if kind == "project":
        described.update(ckpt)
    described["model"] = state
    if "mean" not in described or "std" not in described:
        described.update(mean=list(TUTORIAL_MEAN), std=list(TUTORIAL_STD),
                         assumed=f"{source}: a {kind} without its normalization; assuming the tutorials' "
                                 f"mean {TUTORIAL_MEAN} and std {TUTORIAL_STD}")
    _check_description(described, num_classes, source)
    return model.eval(), described


def is_number(v):
    """A plain int or float as a checkpoint stores one (True and False are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_whole(v):
    """A plain int (True and False are not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _check_description(d, num_classes, source):
    """The keys the scripts read must be what checkpoint() writes; a file edited by hand or
    saved by other code with the same keys gets one line naming the first key that is not."""
    def number(v):
        return is_number(v) and math.isfinite(v)

    classes = d["classes"]
    checks = [
        ("num_classes", d["num_classes"] == num_classes, f"{num_classes}, the outputs of its final layer"),
        ("classes", isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)
         and len(classes) == num_classes, f"{num_classes} class names, one per output of its final layer"),
        ("mean", isinstance(d["mean"], (list, tuple)) and len(d["mean"]) == 3 and all(map(number, d["mean"])),
         "three numbers, one per colour channel"),
        ("std", isinstance(d["std"], (list, tuple)) and len(d["std"]) == 3
         and all(number(v) and v > 0 for v in d["std"]), "three numbers above 0, one per colour channel"),
        ("image_size", is_whole(d["image_size"]) and IMAGE_SIZES[0] <= d["image_size"] <= IMAGE_SIZES[1],
         f"a whole number from {IMAGE_SIZES[0]} to {IMAGE_SIZES[1]}"),
        ("dataset", isinstance(d["dataset"], str), "a name"),
        ("epoch", d["epoch"] is None or is_whole(d["epoch"]), "a whole number"),
        ("accuracy", d["accuracy"] is None or number(d["accuracy"]), "a number"),
        ("args", isinstance(d.get("args", {}), dict) and isinstance(d.get("args", {}).get("data_dir", ""), str),
         "a dict of train.py's flags"),
    ]
    for key, ok, wanted in checks:
        if not ok:
            value = repr(d[key])
            value = value if len(value) <= 60 else value[:57] + "..."
            raise CheckpointError(f"{source}: its {key!r} is {value}, where it should be {wanted}")


def load_model(path, arch=None):
    """Load a checkpoint file: (model in eval mode, its description as read_checkpoint gives it)."""
    return read_checkpoint(load_checkpoint(path), arch, source=str(path))
