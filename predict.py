"""Classify pictures with a trained checkpoint: the class and its confidence.

    python predict.py test/0_3.jpg
    python predict.py photos/ --topk 3
    python predict.py cat.png --checkpoint runs/resnet50/best.pth --json

Any picture Pillow reads works (JPEG, PNG, GIF, BMP, WebP, TIFF; RGBA, palette,
grayscale, CMYK, 16-bit): it is turned upright by its EXIF tag, made RGB,
center-cropped to a square and resized to the training resolution. The
confidence is the softmax probability the model gives its answer; it says
how sure the model is, not how often it is right.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import data
import resnet


def get_args_parser():
    p = argparse.ArgumentParser(description="Classify pictures with a trained checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.print_usage = lambda file=None: None  # a bad flag gets one line, not the usage block
    p.add_argument("paths", nargs="+", metavar="PATH", help="a picture, or a folder of pictures")
    p.add_argument("--checkpoint", default=None,
                   help="a .pth from train.py (default: best.pth of the most recent run under runs/)")
    p.add_argument("--model", default=None, choices=list(resnet.MODELS),
                   help="network of a bare state dict (checkpoints of train.py say it themselves)")
    p.add_argument("--topk", type=int, default=1, help="show the K most likely classes")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    # One picture is answered fastest on the CPU: starting a GPU or NPU costs seconds.
    p.add_argument("--device", default="cpu", choices=data.DEVICES, help="where to run")
    p.add_argument("--batch-size", type=int, default=256, help="pictures per forward pass")
    return p


def latest_checkpoint(runs_dir="runs"):
    """best.pth of the most recently written run under runs/, or None."""
    found = sorted(Path(runs_dir).glob("*/best.pth"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def expand_paths(paths):
    """Pictures named on the command line, with folders opened (sorted, recursively).

    Returns (files, errors): a folder holding no picture is an error of its own."""
    from PIL import Image
    extensions = set(Image.registered_extensions())
    files, errors = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found = [f for f in data.visible_files(p) if f.suffix.lower() in extensions]
            if not found:
                errors.append(f"{p}: folder holds no pictures")
            files.extend(found)
        else:
            files.append(p)
    return files, errors


class Classifier:
    """A checkpoint loaded once, ready for any number of pictures."""

    def __init__(self, checkpoint, arch=None, device="cpu"):
        self.model, self.ckpt = resnet.load_model(checkpoint, arch)
        n = self.model.linear.out_features
        default_classes = data.CIFAR10_CLASSES if n == len(data.CIFAR10_CLASSES) else [str(i) for i in range(n)]
        self.classes = self.ckpt.get("classes") or default_classes
        self.mean = self.ckpt.get("mean", data.CIFAR10_MEAN)
        self.std = self.ckpt.get("std", data.CIFAR10_STD)
        self.image_size = self.ckpt.get("image_size", 32)
        self.device = torch.device(device)
        self.model = resnet.fold_batchnorm(self.model).to(self.device)

    @torch.no_grad()
    def probabilities(self, pictures):
        """Softmax over the classes for a uint8 batch (N, 3, size, size)."""
        x = data.normalize(pictures.to(self.device), self.mean, self.std)
        return self.model(x).float().softmax(1).cpu()

    def top(self, probs, k):
        conf, idx = probs.topk(min(k, len(self.classes)))
        return [(self.classes[i], c) for i, c in zip(idx.tolist(), conf.tolist())]


def main(args):
    checkpoint = args.checkpoint or latest_checkpoint()
    if checkpoint is None:
        raise resnet.CheckpointError("no trained model yet: run `make train`, or pass --checkpoint")
    clf = Classifier(checkpoint, args.model, data.pick_device(args.device))
    files, errors = expand_paths(args.paths)
    results = [{"path": e.split(": ")[0], "error": e} for e in errors]
    for start in range(0, len(files), args.batch_size):
        batch, pictures = [], []  # results in the order given; pictures for those that loaded
        for f in files[start:start + args.batch_size]:
            try:
                pictures.append(data.load_picture(f, clf.image_size))
                batch.append({"path": str(f)})
            except data.PictureError as e:
                batch.append({"path": str(f), "error": str(e)})
        loaded = [r for r in batch if "error" not in r]
        if pictures:
            for r, probs in zip(loaded, clf.probabilities(torch.stack(pictures))):
                top = clf.top(probs, args.topk)
                r.update({"class": top[0][0], "confidence": top[0][1],
                          "top": [{"class": c, "confidence": p} for c, p in top]})
        results.extend(batch)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"error: {r['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps({"checkpoint": str(checkpoint), "results": results}, indent=2))
    else:
        for r in results:
            if "error" in r:
                continue
            print(f"{r['path']}: {r['class']} ({100 * r['confidence']:.2f}% confidence)")
            for rank, t in enumerate(r["top"][1:], start=2):
                print(f"    {rank}. {t['class']} ({100 * t['confidence']:.2f}%)")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except (data.DeviceError, resnet.CheckpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
