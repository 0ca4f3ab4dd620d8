"""Train a CIFAR ResNet and keep every epoch's checkpoint and log.

    python train.py                                      # ResNet18 on the best device found
    python train.py --model resnet50 --device npu --epochs 60
    python train.py --resume                             # continue runs/resnet18/last.pth
    python train.py --subset 2000 --epochs 1 --device cpu   # a quick look

Into --out-dir (default runs/<model>) it writes, every epoch:
    log.txt       every --log-every steps: `001 00100 | Loss: 1.234 | Acc: 56.789%`
    acc.txt       `EPOCH=001, Accuracy= 85.123%`
    best_acc.txt  rewritten when the best improves: `EPOCH=12, best_acc=93.210%`
    net_001.pth   weights and metadata; best.pth the best of them;
    last.pth      the full training state, for --resume
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import resnet

# Settings that define a run. --resume continues with the checkpoint's values
# of these, whatever the command line says, so the schedule stays the same.
RECIPE = ("model", "epochs", "batch_size", "lr", "warmup", "momentum", "weight_decay",
          "label_smoothing", "seed", "subset")


def get_args_parser():
    p = argparse.ArgumentParser(description="Train a ResNet on CIFAR-10.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet18", choices=list(resnet.MODELS), help="network")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training set; the schedule spans exactly these")
    p.add_argument("--batch-size", type=int, default=512,
                   help="images per step (global, over all processes); large batches keep GPUs/NPUs busy")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 0.1 x batch-size/128, the linear scaling rule; 0.4 at 512)")
    p.add_argument("--warmup", type=float, default=0.15,
                   help="fraction of the steps over which the lr rises from 0 to --lr; it then falls linearly to 0")
    p.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum of SGD")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty; the classic CIFAR ResNet value")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="softens targets; regularizes short schedules")
    p.add_argument("--device", default="auto", choices=data.DEVICES,
                   help="auto: npu if torch_npu finds one, else cuda, else mps, else cpu")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--out-dir", default=None, help="run directory (default: runs/<model>)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run from PATH (no PATH: OUT_DIR/last.pth)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the shuffling and the augmentation")
    p.add_argument("--subset", type=int, default=None, help="use only the first N images of each split")
    p.add_argument("--eval-batch-size", type=int, default=1000, help="images per evaluation step")
    p.add_argument("--log-every", type=int, default=20, help="write a log.txt line every N steps")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop after this epoch (the schedule still spans --epochs); continue later with --resume")
    return p


# ---------------------------------------------------------------------------
# Files

def to_cpu(obj):
    """Tensors anywhere in a state dict moved to the CPU, so a checkpoint written
    on an NPU or GPU opens on a machine without one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_atomic(obj, path):
    """Write to a temporary file, flush it to disk, then rename: a crash at any
    moment leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(obj, str):
        tmp.write_text(obj)
    else:
        torch.save(obj, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_line(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


def drop_epochs_after(path, epoch, epoch_of_line):
    """On resume, remove the lines an interrupted epoch left behind, so that each
    finished epoch appears exactly once once it is trained again."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and epoch_of_line(ln) <= epoch]
    if len(kept) != len(lines):
        save_atomic("".join(ln + "\n" for ln in kept), path)


def log_epoch(line):      # `001 00100 | Loss: ...`
    return int(line.split()[0])


def acc_epoch(line):      # `EPOCH=001, Accuracy= ...`
    return int(line.split(",")[0].split("=")[1])


# ---------------------------------------------------------------------------
# Training

def make_schedule(optimizer, total_steps, warmup):
    """Linear warm-up from 0 to the peak lr, then linear decay to 0, spanning
    exactly total_steps (a OneCycle-style triangle, as in the fast-CIFAR recipes)."""
    warm = max(1, round(total_steps * warmup))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Progress:
    """A tqdm bar on a terminal; plain lines every --log-every steps otherwise (CI, log files)."""

    def __init__(self, total, desc):
        from tqdm import tqdm
        self.tty = sys.stdout.isatty()
        self.bar = tqdm(total=total, desc=desc, file=sys.stdout, leave=False, disable=not self.tty,
                        dynamic_ncols=True)
        self.desc, self.done, self.total = desc, 0, total

    def update(self, done, **stats):
        self.bar.update(done - self.done)
        self.done = done
        text = " ".join(f"{k} {v}" for k, v in stats.items())
        if self.tty:
            self.bar.set_postfix_str(text)
        else:
            print(f"{self.desc} step {done}/{self.total} {text}", flush=True)

    def close(self):
        self.bar.close()


def train_one_epoch(model, loader, optimizer, scheduler, epoch, args, log_path):
    model.train()
    loss_sum = torch.zeros((), device=loader.images.device)
    correct = torch.zeros((), dtype=torch.int64, device=loader.images.device)
    seen, steps, start = 0, len(loader), time.perf_counter()
    progress = Progress(steps, f"epoch {epoch}/{args.epochs}")
    for step, (images, labels) in enumerate(loader):
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Accumulated on the device: reading a value (.item()) waits for the
        # device, so that happens only every --log-every steps.
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            avg_loss, acc = loss_sum.item() / seen, 100.0 * correct.item() / seen
            iteration = (epoch - 1) * steps + step + 1
            append_line(log_path, f"{epoch:03d} {iteration:05d} | Loss: {avg_loss:.3f} | Acc: {acc:.3f}%")
            rate = seen / (time.perf_counter() - start)
            progress.update(step + 1, loss=f"{avg_loss:.3f}",
                            acc=f"{acc:.2f}%", lr=f"{scheduler.get_last_lr()[0]:.4f}", img_s=f"{rate:.0f}")
    progress.close()
    return loss_sum.item() / seen, 100.0 * correct.item() / seen, seen


def checkpoint_dict(model, classes, epoch, accuracy, args):
    return {
        "arch": args.model,
        "num_classes": len(classes),
        "classes": list(classes),
        "mean": list(data.CIFAR10_MEAN),
        "std": list(data.CIFAR10_STD),
        "image_size": 32,
        "epoch": epoch,
        "accuracy": accuracy,
        "model": to_cpu(resnet.clean_state_dict(model.state_dict())),
        "args": dict(vars(args)),
    }


def restore(args, out_dir):
    """Read the state to resume from; the run's recipe replaces the command line's."""
    path = Path(args.resume) if args.resume else out_dir / "last.pth"
    state = resnet.load_checkpoint(path)
    if "optimizer" not in state or "args" not in state:
        raise resnet.CheckpointError(f"{path}: holds weights only; --resume needs a last.pth")
    defaults = get_args_parser().parse_args([])
    for key in RECIPE:
        saved, given = state["args"].get(key), getattr(args, key)
        if given != saved and given != getattr(defaults, key):
            print(f"note: ignoring --{key.replace('_', '-')} {given}; the run keeps its own ({saved})")
        setattr(args, key, saved)
    print(f"resuming {path} after epoch {state['epoch']} of {args.epochs}")
    return state


def main(args):
    # A run lives in one folder: --resume PATH continues in PATH's folder.
    out_dir = Path(args.out_dir or (Path(args.resume).parent if args.resume else f"runs/{args.model}"))
    state = None
    if args.resume is not None:
        state = restore(args, out_dir)
    elif (out_dir / "last.pth").exists():
        raise resnet.CheckpointError(f"{out_dir} already holds a run: continue it with --resume, "
                                     "or choose another --out-dir (RUN_DIR=)")
    if args.lr is None:
        args.lr = 0.1 * args.batch_size / 128
    out_dir.mkdir(parents=True, exist_ok=True)
    device = data.pick_device(args.device)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    train_x, train_y, classes = data.load_split(args.data_dir, train=True, subset=args.subset)
    test_x, test_y, _ = data.load_split(args.data_dir, train=False, subset=args.subset)
    mean, std = data.CIFAR10_MEAN, data.CIFAR10_STD
    train_loader = data.CifarLoader(train_x, train_y, args.batch_size, mean, std, train=True,
                                    device=device, seed=args.seed)
    test_loader = data.CifarLoader(test_x, test_y, args.eval_batch_size, mean, std, train=False, device=device)
    load_seconds = time.perf_counter() - t0

    model = resnet.build_model(args.model, len(classes)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=args.momentum > 0, weight_decay=args.weight_decay)
    scheduler = make_schedule(optimizer, args.epochs * len(train_loader), args.warmup)
    start_epoch, best_acc, best_epoch = 1, 0.0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        start_epoch, best_acc, best_epoch = state["epoch"] + 1, state["best_accuracy"], state["best_epoch"]
        drop_epochs_after(out_dir / "log.txt", state["epoch"], log_epoch)
        drop_epochs_after(out_dir / "acc.txt", state["epoch"], acc_epoch)
        if best_epoch:
            save_atomic(f"EPOCH={best_epoch}, best_acc={best_acc:.3f}%\n", out_dir / "best_acc.txt")
    if start_epoch > args.epochs:
        print(f"nothing to do: the run already finished its {args.epochs} epochs "
              f"(best {best_acc:.2f}% at epoch {best_epoch})")
        return best_acc

    print(f"{args.model} on {device}: {len(train_y)} training / {len(test_y)} test images, "
          f"{len(train_loader)} steps of {min(args.batch_size, len(train_y))} per epoch, "
          f"data loaded in {load_seconds:.1f}s; writing to {out_dir}")
    train_seconds = eval_seconds = 0.0
    last_epoch = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start_epoch, last_epoch + 1):
        train_loader.set_epoch(epoch)
        t = time.perf_counter()
        train_loss, train_acc, seen = train_one_epoch(model, train_loader, optimizer, scheduler,
                                                      epoch, args, out_dir / "log.txt")
        epoch_seconds = time.perf_counter() - t
        t = time.perf_counter()
        test_loss, confusion = resnet.evaluate(model, test_loader, len(classes))
        acc = 100.0 * confusion.diag().sum().item() / confusion.sum().item()
        eval_seconds += time.perf_counter() - t
        train_seconds += epoch_seconds

        # Write order matters for --resume after a crash: everything of this
        # epoch first, last.pth (the commit point) at the end.
        ckpt = checkpoint_dict(model, classes, epoch, acc, args)
        save_atomic(ckpt, out_dir / f"net_{epoch:03d}.pth")
        is_best = acc > best_acc
        if is_best:
            best_acc, best_epoch = acc, epoch
            save_atomic(ckpt, out_dir / "best.pth")
            save_atomic(f"EPOCH={epoch}, best_acc={acc:.3f}%\n", out_dir / "best_acc.txt")
        append_line(out_dir / "acc.txt", f"EPOCH={epoch:03d}, Accuracy= {acc:.3f}%")
        save_atomic({**ckpt,
                     "optimizer": to_cpu(optimizer.state_dict()),
                     "scheduler": scheduler.state_dict(),
                     "best_accuracy": best_acc,
                     "best_epoch": best_epoch,
                     "rng_cpu": torch.get_rng_state()}, out_dir / "last.pth")
        print(f"epoch {epoch:3d}/{args.epochs} | train loss {train_loss:.3f} acc {train_acc:6.2f}% | "
              f"test loss {test_loss:.3f} acc {acc:6.2f}% | lr {scheduler.get_last_lr()[0]:.4f} | "
              f"{epoch_seconds:.1f}s {seen / epoch_seconds:.0f} img/s{' | best' if is_best else ''}", flush=True)

    if last_epoch < args.epochs:
        print(f"stopped after epoch {last_epoch} of {args.epochs}; continue with: python train.py "
              f"--resume {out_dir / 'last.pth'}")
    print(f"best accuracy {best_acc:.2f}% at epoch {best_epoch}, total time "
          f"{time.perf_counter() - t0:.1f}s (training {train_seconds:.1f}s, evaluation {eval_seconds:.1f}s)")
    return best_acc


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (data.DataError, data.DeviceError, resnet.CheckpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("\ninterrupted; every finished epoch is saved: continue with --resume", file=sys.stderr)
        sys.exit(130)
