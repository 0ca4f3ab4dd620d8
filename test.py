"""Evaluate a checkpoint on its dataset's test split: accuracy, loss, per-class accuracy, confusion matrix.

    python test.py                                       # runs/resnet18/best.pth
    python test.py --checkpoint runs/photos/best.pth     # a folder-trained run: its data, classes and size
    python test.py --checkpoint runs/resnet50/net_030.pth --device cpu
    python test.py --checkpoint tutorial.pth --model resnet50   # a bare state dict

(This file is a script. Python also ships a package named `test`, so run it, or
import it by path; `import test` finds the standard library's.)
"""
import argparse
import sys

import torch

import data
import resnet


def get_args_parser():
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on its dataset's test split.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.print_usage = lambda file=None: None  # a bad flag gets one line, not the usage block
    p.add_argument("--checkpoint", default="runs/resnet18/best.pth", help="a .pth written by train.py")
    p.add_argument("--model", default=None, choices=list(resnet.MODELS),
                   help="network of a bare state dict (checkpoints of train.py say it themselves)")
    p.add_argument("--dataset", default=None, choices=data.DATASETS, help="default: the one the run trained on")
    p.add_argument("--data-dir", default=None, help="the dataset's folder (default: the run's)")
    p.add_argument("--device", default="auto", choices=data.DEVICES, help="where to run")
    p.add_argument("--subset", type=int, default=None, help="use only the first N test images")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: 1000 on a GPU or NPU, 128 on a CPU)")
    p.add_argument("--amp", default="auto", choices=data.AMP_CHOICES,
                   help="precision as train.py's --amp (its per-epoch figures are scored the same way); "
                        "off: plain fp32")
    p.add_argument("--tta", action="store_true",
                   help="average each image's logits with its mirror image's (flip test-time augmentation)")
    p.add_argument("--confusion-png", default=None, metavar="PATH",
                   help="also draw the confusion matrix into this picture (needs matplotlib)")
    return p


def format_confusion(confusion, classes):
    """The confusion matrix as a text table: rows are true classes, columns predictions."""
    width = max(6, len(str(int(confusion.max()))) + 1)
    name_width = max(len(c) for c in classes)
    lines = [" " * name_width + "".join(f"{c[:width - 1]:>{width}}" for c in classes)]
    for name, row in zip(classes, confusion.tolist()):
        lines.append(f"{name:>{name_width}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def main(args):
    model, ckpt = resnet.load_model(args.checkpoint, args.model)
    images, labels, data_classes, data_dir, dataset = data.run_test_split(ckpt, args.data_dir, args.dataset,
                                                                          args.subset)
    classes = ckpt.get("classes") or data_classes
    if model.linear.out_features != len(data_classes):
        raise resnet.CheckpointError(f"{args.checkpoint}: predicts {model.linear.out_features} classes, "
                                     f"but the data in {data_dir} has {len(data_classes)}")
    if dataset == "folder" and list(classes) != list(data_classes):
        raise resnet.CheckpointError(f"{args.checkpoint}: trained on the classes {', '.join(classes[:5])}..., "
                                     f"but {data_dir} holds {', '.join(data_classes[:5])}...")
    device = data.pick_device(args.device)
    data.keep_freed_memory(device)
    layout = data.memory_format("auto", device)
    loader = data.CifarLoader(images, labels, args.batch_size or data.eval_batch_size(device),
                              ckpt.get("mean", data.CIFAR10_MEAN), ckpt.get("std", data.CIFAR10_STD), train=False,
                              device=device, memory_format=layout)
    model = resnet.fold_batchnorm(model).to(device, memory_format=layout)
    amp = data.resolve_amp(args.amp, device)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        loss, confusion = resnet.evaluate(model, loader, len(classes), tta=args.tta)

    correct, total = int(confusion.diag().sum()), int(confusion.sum())
    per_class = (100.0 * confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    print(f"{args.checkpoint}: {ckpt.get('arch', args.model)}, epoch {ckpt.get('epoch', '?')}, "
          f"{total} test images from {data_dir} on {device} in {data.PRECISION_NAMES[amp]}"
          f"{', with flip TTA' if args.tta else ''}")
    print("\nper-class accuracy:")
    for i, (name, acc) in enumerate(zip(classes, per_class)):
        print(f"  {name:>12} {acc:6.2f}%  ({int(confusion[i, i])}/{int(confusion[i].sum())})")
    print("\nconfusion matrix (rows: true class, columns: predicted):")
    print(format_confusion(confusion, classes))
    accuracy = 100.0 * correct / max(total, 1)
    print(f"\naccuracy {accuracy:.2f}% ({correct}/{total}), loss {loss:.4f}")
    if args.confusion_png:
        import plot
        try:
            plot.plot_confusion(confusion.tolist(), classes, args.confusion_png)
            print(f"wrote {args.confusion_png}")
        except plot.PlotError as e:  # the evaluation itself has succeeded: say so, don't fail
            print(f"note: no {args.confusion_png}: {e}", file=sys.stderr)
    return {"accuracy": accuracy, "loss": loss, "per_class": per_class, "confusion": confusion}


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (data.DataError, data.DeviceError, resnet.CheckpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
