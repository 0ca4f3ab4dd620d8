"""Evaluate a checkpoint on its dataset's test split: accuracy, loss, per-class accuracy, confusion matrix.

    python test.py                                       # runs/resnet18/best.pth
    python test.py --checkpoint runs/photos/best.pth     # a folder-trained run: its data, classes and size
    python test.py --checkpoint runs/resnet50/net_030.pth --device cpu
    python test.py --checkpoint model/net_128.pth        # a checkpoint of the tutorials' code

(This file is a script. Python also ships a package named `test`, so run it, or
import it by path; `import test` finds the standard library's.)
"""
import os
import sys
import unicodedata

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # torch_npu loads in device.py, which explains failures

import batching  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import device  # noqa: E402
import failures  # noqa: E402
import plot  # noqa: E402
import resnet  # noqa: E402
import rundir  # noqa: E402


def get_args_parser():
    p = cli.parser("Evaluate a checkpoint on its dataset's test split.")
    cli.checkpoint_flags(p, resnet.MODELS)
    p.add_argument("--dataset", default=None, choices=data.DATASETS,
                   help="the data to score on (default: the one the run trained on)")
    p.add_argument("--data-dir", default=None,
                   help="the dataset's folder (default: the run's, as its run folder noted it)")
    p.add_argument("--device", default="auto", choices=device.DEVICES, help="where to run")
    p.add_argument("--subset", type=cli.integer(min=1), default=None, help="use only the first N test images")
    p.add_argument("--batch-size", type=cli.integer(min=1), default=None,
                   help="images per step (default: 1000 on a GPU or NPU, 128 on a CPU)")
    p.add_argument("--amp", default="auto", choices=device.AMP_CHOICES,
                   help="precision as train.py's --amp (its per-epoch figures are scored the same way); "
                        "off: plain fp32")
    p.add_argument("--tta", nargs="?", const="flip", default="off", choices=resnet.TTA,
                   help="test-time augmentation: flip (--tta alone) averages each picture's logits with its "
                        "mirror image's; flip-shift adds both moved by a pixel")
    p.add_argument("--confusion-png", type=plot.picture("confusion.png"), default=None, metavar="PATH",
                   help="also draw the confusion matrix into this picture (needs matplotlib)")
    return p


def columns(text):
    """Terminal columns text takes: two for a Chinese, Japanese or Korean character, else one."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def right(text, width):
    """text right-aligned in `width` columns, cut to fit."""
    while columns(text) > width:
        text = text[:-1]
    return " " * (width - columns(text)) + text


def per_class_accuracy(confusion):
    """Per true class, the % of its pictures predicted as it (0 for a class with none)."""
    return (100.0 * confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()


def format_per_class(confusion, classes):
    """Per-class accuracy as text lines, the names right-aligned in one column however long."""
    width = max(12, *map(columns, classes))
    return "\n".join(f"  {right(name, width)} {acc:6.2f}%  ({int(confusion[i, i])}/{int(confusion[i].sum())})"
                     for i, (name, acc) in enumerate(zip(classes, per_class_accuracy(confusion))))


def format_confusion(confusion, classes):
    """The confusion matrix as a text table: rows are true classes, columns predictions."""
    width = max(6, len(str(int(confusion.max()))) + 1)
    name_width = max(columns(c) for c in classes)
    lines = [" " * name_width + "".join(" " + right(c, width - 1) for c in classes)]
    for name, row in zip(classes, confusion.tolist()):
        lines.append(right(name, name_width) + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def main(args):
    model, ckpt = resnet.load_model(rundir.trained(args.checkpoint), args.model)
    if "assumed" in ckpt:
        print(f"note: {ckpt['assumed']}", file=sys.stderr)
    images, labels, data_classes, data_dir, dataset = data.run_test_split(
        ckpt, args.data_dir, args.dataset, args.subset, remembered=rundir.remembered_data_dir(args.checkpoint))
    classes = ckpt["classes"]
    if ckpt["num_classes"] != len(data_classes):
        raise resnet.CheckpointError(f"{args.checkpoint}: predicts {ckpt['num_classes']} classes, "
                                     f"but the data in {data_dir} has {len(data_classes)}")
    # A model of other classes (a picture folder's, on CIFAR-10, say) would score nothing that means anything. A
    # tutorial's file names no classes ("assumed": 0, 1, ... beyond CIFAR-10's ten): on CIFAR, nothing to compare.
    if (dataset == "folder" or "assumed" not in ckpt) and list(classes) != list(data_classes):
        raise resnet.CheckpointError(f"{args.checkpoint}: trained on {rundir.named(classes)}, "
                                     f"but {data_dir} holds {rundir.named(data_classes)}")
    dev = device.pick_device(args.device)
    device.keep_freed_memory(dev)
    layout = device.memory_format("auto", dev)
    loader = batching.CifarLoader(images, labels, args.batch_size or device.eval_batch_size(dev), ckpt["mean"],
                                  ckpt["std"], train=False, device=dev, memory_format=layout)
    amp = device.resolve_amp(args.amp, dev)
    loss, confusion = resnet.evaluate(resnet.for_inference(model, dev, layout), loader, len(classes),
                                      tta=args.tta, amp_dtype=amp)

    correct, total = int(confusion.diag().sum()), int(confusion.sum())
    print(f"{args.checkpoint}: {ckpt['arch']}, epoch {ckpt.get('epoch') or '?'}, {total} test images from "
          f"{data_dir} on {dev} in {device.PRECISION_NAMES[amp]}"
          f"{'' if args.tta == 'off' else f', with {args.tta} TTA'}")
    print("\nper-class accuracy:")
    print(format_per_class(confusion, classes))
    print("\nconfusion matrix (rows: true class, columns: predicted):")
    print(format_confusion(confusion, classes))
    accuracy = 100.0 * correct / max(total, 1)
    print(f"\naccuracy {accuracy:.2f}% ({correct}/{total}), loss {loss:.4f}")
    if args.confusion_png:
        try:
            plot.plot_confusion(confusion.tolist(), classes, args.confusion_png)
            print(f"wrote {args.confusion_png}")
        except plot.PlotError as e:  # the evaluation itself has succeeded: say so, don't fail
            print(f"note: no confusion matrix picture: {e}", file=sys.stderr)
    return {"accuracy": accuracy, "loss": loss, "confusion": confusion}  # per class: per_class_accuracy(confusion)


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.main(lambda: main(args), explain=failures.out_of_memory)
