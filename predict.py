"""Classify pictures with a trained checkpoint: the class and its confidence.

    python predict.py test/0_3.jpg
    python predict.py photos/ --topk 3
    python predict.py cat.png --checkpoint runs/resnet50/best.pth --json
    python predict.py test/0_3.jpg --checkpoint model/net_128.pth   # a checkpoint of the tutorials' code
    cat photo.jpg | python predict.py -                  # a picture from standard input

Any picture Pillow reads works (JPEG, PNG, GIF, BMP, WebP, TIFF; RGBA, palette,
grayscale, CMYK, 16-bit): it is turned upright by its EXIF tag, made RGB,
center-cropped to a square and resized to the training resolution. The
confidence is the softmax probability the model gives its answer; it says
how sure the model is, not how often it is right.
"""
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # torch_npu loads in device.py, which explains failures

import torch  # noqa: E402

import batching  # noqa: E402
import cli  # noqa: E402
import device  # noqa: E402
import failures  # noqa: E402
import pictures  # noqa: E402
import resnet  # noqa: E402


def get_args_parser():
    p = cli.parser("Classify pictures with a trained checkpoint.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="a picture, a folder of pictures, or - (standard input)")
    cli.checkpoint_flags(p, resnet.MODELS, default=None)
    p.add_argument("--topk", type=cli.integer(min=1), default=1, help="show the K most likely classes")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    # The CPU, not auto: a picture or two are answered before a GPU or NPU would have started.
    p.add_argument("--device", default="cpu", choices=device.DEVICES, help="where to run")
    p.add_argument("--batch-size", type=cli.integer(min=1), default=256, help="pictures per forward pass")
    return p


def trained_runs(runs_dir="runs"):
    """best.pth of every run under runs/, the most recently written last."""
    return sorted(Path(runs_dir).glob("*/best.pth"), key=lambda p: p.stat().st_mtime)


def latest_checkpoint(runs_dir="runs"):
    """best.pth of the most recently written run under runs/, or None."""
    found = trained_runs(runs_dir)
    return found[-1] if found else None


def expand_paths(paths):
    """Pictures named on the command line, with folders opened (sorted, recursively).

    Returns (files, errors): a folder holding no picture is an error of its own."""
    from PIL import Image
    extensions = set(Image.registered_extensions())
    files, errors = [], []
    for text in paths:
        p = Path(text)
        if not text:  # Path("") is the working folder: an unset shell variable ("$PICTURE"), most likely
            errors.append("'': an empty name, no picture")
        elif os.path.isdir(p):  # False for a name the file system refuses: then an error of its own below
            try:
                found = [f for f in pictures.visible_files(p) if f.suffix.lower() in extensions]
            except OSError as e:
                errors.append(f"{p}: cannot read {e.filename or p} ({e.strerror})")
                continue
            if not found:
                errors.append(f"{p}: folder holds no pictures")
            files.extend(found)
        else:
            files.append(p)
    return files, errors


def picture_source(path):
    """What to open for a picture named on the command line: the file, or for "-" standard input."""
    if str(path) != "-":
        return path
    if sys.stdin is None or sys.stdin.isatty():  # reading would wait for a picture typed in
        raise pictures.PictureError("-: standard input is a terminal, not a picture: pipe one in "
                                    "(`cat photo.jpg | python predict.py -`)")
    return sys.stdin.buffer  # a pipe cannot seek: Pillow copies it into memory before decoding


class Classifier:
    """A checkpoint loaded once, ready for any number of pictures."""

    def __init__(self, checkpoint, arch=None, device="cpu"):
        model, self.ckpt = resnet.load_model(checkpoint, arch)
        self.classes, self.image_size = self.ckpt["classes"], self.ckpt["image_size"]
        self.mean, self.std = self.ckpt["mean"], self.ckpt["std"]
        self.assumed = self.ckpt.get("assumed")  # what a tutorial's checkpoint left to assume, or None
        self.device = torch.device(device)
        self.model = resnet.for_inference(model, self.device)

    @torch.no_grad()
    def probabilities(self, images):
        """Softmax over the classes for a uint8 batch (N, 3, size, size)."""
        x = batching.normalize(images.to(self.device), self.mean, self.std)
        return self.model(x).float().softmax(1).cpu()

    def top(self, probs, k):
        conf, idx = probs.topk(min(k, len(self.classes)))
        return [(self.classes[i], c) for i, c in zip(idx.tolist(), conf.tolist())]


def read_picture(path, size):
    """A picture as the model sees it (pictures.load_picture), or the PictureError that reading it raised.
    path: a file, "-" (standard input), or a binary stream (web.py's uploads)."""
    try:
        return pictures.load_picture(picture_source(path), size)
    except pictures.PictureError as e:
        return e


def answers(clf, named, k, probabilities=None):
    """The result dicts --json prints, in the order given, for (name, picture) pairs: a picture is a
    uint8 tensor (3, size, size) or the PictureError its reading raised. The pictures go through the
    model in one forward pass, unless their probabilities (rows in the same order) are given: web.py
    passes the rows of a pass shared with other requests. predict.py, web.py and gui.py answer here."""
    images = [p for _, p in named if isinstance(p, torch.Tensor)]
    if probabilities is None and images:
        probabilities = clf.probabilities(torch.stack(images))
    rows = iter(probabilities if images else [])
    results = []
    for name, picture in named:
        if not isinstance(picture, torch.Tensor):
            results.append({"path": name, "error": str(picture)})
            continue
        top = clf.top(next(rows), k)
        results.append({"path": name, "class": top[0][0], "confidence": top[0][1],
                        "top": [{"class": c, "confidence": p} for c, p in top]})
    return results


def chosen_checkpoint(given, runs_dir="runs"):
    """--checkpoint, or best.pth of the newest run under runs/ (named on stderr where there are several);
    a CheckpointError where there is none. predict.py, web.py and bench_web.py choose here."""
    if given:
        return given
    runs = trained_runs(runs_dir)
    if not runs:
        raise resnet.CheckpointError("no trained model yet: run python train.py, or pass --checkpoint")
    if len(runs) > 1:  # which of them answers is not plain to see
        print(f"note: {runs[-1]}, the newest of {len(runs)} runs (--checkpoint picks another)", file=sys.stderr)
    return runs[-1]


def main(args):
    checkpoint = chosen_checkpoint(args.checkpoint)
    clf = Classifier(checkpoint, args.model, device.pick_device(args.device))
    if clf.assumed:
        print(f"note: {clf.assumed}", file=sys.stderr)
    files, errors = expand_paths(args.paths)
    results = [{"path": e.split(": ")[0], "error": e} for e in errors]
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        results.extend(answers(clf, [(str(f), read_picture(f, clf.image_size)) for f in chunk],
                               args.topk))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"error: {r['error']}", file=sys.stderr)
    if args.json:
        text = json.dumps({"checkpoint": str(checkpoint), "results": results}, indent=2, ensure_ascii=False)
        # A name that is not UTF-8 holds surrogates: escaped as \udcc4, the document stays UTF-8 (json.loads
        # gives the name back, and os.fsencode its bytes).
        print(re.sub("[\udc80-\udcff]", lambda m: f"\\u{ord(m.group()):04x}", text))
    else:
        for r in results:
            if "error" in r:
                continue
            print(f"{r['path']}: {r['class']} ({100 * r['confidence']:.2f}% confidence)")
            for rank, t in enumerate(r["top"][1:], start=2):
                print(f"    {rank}. {t['class']} ({100 * t['confidence']:.2f}%)")
    return 1 if failed else 0


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.main(lambda: main(args), explain=failures.out_of_memory)
