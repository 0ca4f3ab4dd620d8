"""Train a CIFAR ResNet and keep every epoch's checkpoint and log.

    python train.py                                      # ResNet18 on the best device found
    python train.py --model resnet50 --device npu --epochs 60
    python train.py --resume                             # continue runs/resnet18/last.pth
    python train.py --subset 2000 --epochs 1 --device cpu   # a quick look
    python train.py --dataset cifar100                   # CIFAR-100's 100 classes
    python train.py --dataset folder --data-dir photos --image-size 64   # photos/{train,test}/<class>/*
    torchrun --standalone --nproc_per_node=8 train.py --device npu   # 8 NPUs/GPUs, one process each

Into --out-dir (default runs/<model>) it writes, every epoch:
    log.txt       every --log-every steps: `001 00100 | Loss: 1.234 | Acc: 56.789%`
    acc.txt       `EPOCH=001, Accuracy= 85.123%`
    metrics.csv   epoch, train/test loss and accuracy, lr, seconds, img/s (for plot.py)
    best_acc.txt  rewritten when the best improves: `EPOCH=12, best_acc=93.210%`
    net_001.pth   weights and metadata; best.pth the best of them;
    last.pth      the full training state, for --resume

Under torchrun every process trains on its share of each global batch
(DistributedDataParallel); process 0 alone prints and writes files.
"""
import argparse
import copy
import datetime
import math
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import resnet

# Settings that define a run. --resume continues with the checkpoint's values
# of these, whatever the command line says, so the schedule stays the same.
RECIPE = ("model", "dataset", "image_size", "epochs", "batch_size", "lr", "warmup", "momentum", "weight_decay",
          "label_smoothing", "seed", "subset", "sync_bn")
# A collective that waits longer than this means a peer process is gone: fail
# instead of hanging. Generous, because process 0 writes checkpoints meanwhile.
DIST_TIMEOUT = datetime.timedelta(minutes=10)


def get_args_parser():
    p = argparse.ArgumentParser(description="Train a ResNet on CIFAR-10, CIFAR-100 or a folder of pictures.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.print_usage = lambda file=None: None  # a bad flag gets one line, not the usage block
    p.add_argument("--model", default="resnet18", choices=list(resnet.MODELS), help="network")
    # The defaults and the runs behind them: README, "Training recipe".
    p.add_argument("--epochs", type=int, default=40,
                   help="passes over the training set; the schedule spans exactly these "
                        "(ResNet18: 40 scored 0.7 points above 30)")
    p.add_argument("--batch-size", type=int, default=512,
                   help="images per step, global: split between the processes of a torchrun job "
                        "(512 keeps a GPU busy and is what the fast CIFAR recipes use)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 0.1 x batch-size/128, the linear scaling rule; 0.4 at 512; "
                        "half that scored no better)")
    p.add_argument("--warmup", type=float, default=0.15,
                   help="fraction of the steps over which the lr rises from 0 to --lr (a high lr on fresh "
                        "BatchNorm statistics diverges); it then falls linearly to 0")
    p.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum of SGD")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty; the classic CIFAR ResNet value")
    p.add_argument("--label-smoothing", type=float, default=0.1,
                   help="softens targets; regularizes short schedules (0.2 scored within noise of 0.1)")
    p.add_argument("--device", default="auto", choices=data.DEVICES,
                   help="auto: npu if torch_npu finds one, else cuda, else mps, else cpu")
    p.add_argument("--amp", default="auto", choices=data.AMP_CHOICES,
                   help="mixed precision; auto: bf16 on CUDA GPUs and NPUs that have it, fp16 on older ones; "
                        "on a CPU bf16 where it has bf16 instructions (AVX512_BF16/AMX), else off; off on MPS")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="NHWC memory layout; auto: on for CUDA and CPU (faster convolutions), off for NPU and MPS")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (for CUDA); the one-off compile time is reported apart")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, BatchNorm statistics over the global batch instead of each process's share")
    p.add_argument("--dataset", default="cifar10", choices=data.DATASETS,
                   help="cifar10, cifar100 (fine labels), or folder: DATA_DIR/{train,test}/<class>/<picture>")
    p.add_argument("--image-size", type=int, default=32,
                   help="side the pictures are resized to (folder datasets; CIFAR is 32)")
    p.add_argument("--data-dir", default="data",
                   help="folder holding cifar-10-batches-py/ or cifar-100-python/ (folder: the pictures' root)")
    p.add_argument("--out-dir", default=None, help="run directory (default: runs/<model>)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run from PATH (no PATH: OUT_DIR/last.pth)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the shuffling and the augmentation")
    p.add_argument("--subset", type=int, default=None, help="use only the first N images of each split")
    p.add_argument("--eval-batch-size", type=int, default=None,
                   help="images per evaluation step (default: 1000 on a GPU or NPU, 128 on a CPU)")
    p.add_argument("--tta", action="store_true",
                   help="score each test image together with its mirror image "
                        "(+0.8 points for ResNet18 in the README's runs; twice the evaluation time)")
    p.add_argument("--log-every", type=int, default=20, help="write a log.txt line every N steps")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop after this epoch (the schedule still spans --epochs); continue later with --resume")
    return p


# ---------------------------------------------------------------------------
# Files

class TrainingError(Exception):
    """Training that cannot go on; the message is one line for the user."""


def to_cpu(obj):
    """Tensors anywhere in a (nested) state dict moved to the CPU, so a checkpoint
    written on an NPU or GPU opens on a machine without one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_checkpoint(ckpt, path):
    """Write to a temporary file, flush it to disk, then rename: a crash at any
    moment leaves either the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    try:
        torch.save(to_cpu(ckpt), tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a quota, a vanished mount
        Path(tmp).unlink(missing_ok=True)
        raise TrainingError(f"cannot write {path} ({e.strerror or e}); the previous "
                            f"{Path(path).name}, if any, is intact") from None


def write_text_atomic(text, path):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_line(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


METRICS = "epoch,train_loss,train_acc,test_loss,test_acc,lr,epoch_seconds,img_s"


def append_metrics(path, values):
    """One row of metrics.csv per epoch (the header once), for plot.py and spreadsheets."""
    with open(path, "a") as f:
        if f.tell() == 0:
            f.write(METRICS + "\n")
        f.write(",".join(values) + "\n")


def keep_lines(path, pattern, last, header=None):
    """Keep the lines of a log that match its pattern with a number (the pattern's first
    group: epoch or step) up to `last`, and the header. What goes: lines an interrupted
    run wrote after its last saved state (so that, once that work is redone, every
    epoch and step appears exactly once) and half a line from a kill mid-write."""
    def keep(line):
        match = re.fullmatch(pattern, line)
        return line == header or (match is not None and int(match.group(1)) <= last)

    if path.exists():
        lines = path.read_text().splitlines()
        kept = [ln for ln in lines if keep(ln)]
        if kept != lines:
            write_text_atomic("".join(ln + "\n" for ln in kept), path)


def shareable_args(args):
    """The arguments, with paths that would reveal this machine's layout (absolute,
    or outside the working directory) cut to their last part. The environment,
    which may hold secrets, is never stored."""
    out = dict(vars(args))
    for key in ("data_dir", "out_dir", "resume"):
        value = out.get(key)
        if value and (os.path.isabs(value) or os.path.relpath(value).startswith("..")):
            out[key] = os.path.basename(os.path.normpath(value))
    return out


# ---------------------------------------------------------------------------
# Processes

class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all processes.

    nn.SyncBatchNorm does the same on GPUs and NPUs but refuses CPU tensors; this
    one works with any backend (gloo included). Same parameters and buffers as
    BatchNorm2d, so checkpoints do not change.
    """

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # sums, and sums gradients back
        c = x.shape[1]
        count = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
        n = sums[-1]
        mean = sums[:c] / n
        # Two passes (mean first, then squared deviations) as BatchNorm itself does:
        # E[x^2] - E[x]^2 loses digits in fp32 and drifts away from a single process.
        var = all_reduce((x - mean.view(1, c, 1, 1)).square().sum((0, 2, 3))) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return x * scale.view(1, c, 1, 1) + (self.bias - mean * scale).view(1, c, 1, 1)


def convert_sync_bn(module, device):
    """BatchNorm layers made to normalize over the global batch of a multi-process run."""
    if device.type in ("cuda", "npu"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    # Deprecated in favour of a private successor, yet still the public autograd-aware all_reduce.
    warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_reduce", FutureWarning)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_sync_bn(child, device)
    return module


def agreed_signal(stop, device):
    """The stop signal any process received (0: none); under torchrun all processes call this together."""
    return int(all_reduce(torch.tensor([stop.signum], device=device), "max").item())


_latest_collective = []  # see all_reduce


def all_reduce(tensor, op="sum"):
    """Sum (or "max", "min") over all processes, in place (identity in a single process).

    The handle of the latest reduction is kept until the next one. Gloo's worker thread
    lets go of a collective's tensors a moment after the result is in, and that needs the
    GIL: were the interpreter already shutting down (the last reduction comes right before
    the exit), the thread could not have it and the process would abort ("terminate called
    without an active exception", about 1 run in 20 with two CPU processes). With the handle
    held here, the thread never frees the tensors; Python does, on its own thread."""
    if dist.is_initialized():
        work = dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()), async_op=True)
        work.wait()
        _latest_collective[:] = [work]
    return tensor


def peak_lr(args):
    """--lr, or by default the linear scaling rule: 0.1 per 128 images (0.4 at batch 512)."""
    return args.lr if args.lr is not None else 0.1 * args.batch_size / 128


def make_optimizer(model, args):
    """SGD with Nesterov momentum and weight decay, as the recipe says (bench.py times this one too)."""
    return torch.optim.SGD(model.parameters(), lr=peak_lr(args), momentum=args.momentum,
                           nesterov=args.momentum > 0, weight_decay=args.weight_decay)


def make_schedule(optimizer, total_steps, warmup, done_steps=0):
    """Linear warm-up from 0 to the peak lr, then linear decay to 0, spanning
    exactly total_steps (a OneCycle-style triangle, as in the fast-CIFAR recipes).
    done_steps starts it part-way, for a run resumed from weights alone."""
    warm = max(1, round(total_steps * warmup))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if done_steps:
        scheduler.last_epoch = done_steps - 1
        with warnings.catch_warnings():  # "scheduler stepped before optimizer": on purpose here
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    return scheduler


class Progress:
    """A tqdm bar on a terminal; plain lines every --log-every steps otherwise (CI, log files).
    Silent in every process of a torchrun job but the first."""

    def __init__(self, total, desc, enabled=True, initial=0):
        from tqdm import tqdm
        self.tty, self.enabled = sys.stdout.isatty(), enabled
        self.bar = tqdm(total=total, desc=desc, file=sys.stdout, leave=False, initial=initial,
                        disable=not (self.tty and enabled), dynamic_ncols=True)
        self.desc, self.done, self.total = desc, initial, total

    def update(self, done, **stats):
        self.bar.update(done - self.done)
        self.done = done
        text = " ".join(f"{k} {v}" for k, v in stats.items())
        if self.tty:
            self.bar.set_postfix_str(text)
        elif self.enabled:
            print(f"{self.desc} step {done}/{self.total} {text}", flush=True)

    def close(self):
        self.bar.close()


# ---------------------------------------------------------------------------
# Training

class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's kill) asks the run to stop at the
    next safe point, the end of a step, and save; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train_step(model, images, labels, optimizer, scheduler, scaler, amp_dtype, label_smoothing, loss_scale,
               totals):
    """One optimizer step on a batch; adds its summed loss, correct answers and image count
    to `totals` (on the device) and returns the summed loss.

    Nothing here waits for the device: reading a value back (.item()) or building a
    tensor from Python numbers (torch.tensor) makes the host wait until a GPU or NPU has
    run everything queued so far, and then the device idles while the next step is queued."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(images)
    loss_sum = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss_sum * loss_scale).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    totals += torch.stack([loss_sum.detach(), (logits.argmax(1) == labels).sum().float(),
                           torch.full((), len(labels), dtype=torch.float32, device=labels.device)])
    return loss_sum.detach()


def train_one_epoch(model, loader, optimizer, scheduler, scaler, amp_dtype, epoch, args, log_path, master,
                    stop, start_step=0, totals=None):
    """One pass over the training set (from start_step, for a run stopped mid-epoch).

    Returns a dict: loss, acc, images, seconds, first_step (the first step's seconds,
    which hold torch.compile's one-off compilation), and, if a stop was requested,
    stopped_at (steps done) and totals (the running sums to resume with)."""
    device = loader.images.device
    model.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    global_batch = min(args.batch_size, len(loader.labels))
    # Running sums, kept on the device: loss, correct, images, and the first step
    # whose loss was not finite (-1: none). Reading them (.item()) waits for the
    # device, so that happens only every --log-every steps. float32, not float64:
    # Apple's GPUs have no float64 (and counts stay exact up to 16 million images).
    totals = torch.tensor(totals or [0.0, 0.0, 0.0], dtype=torch.float32, device=device)
    bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    steps, start, first_step = len(loader), time.perf_counter(), 0.0
    progress = Progress(steps, f"epoch {epoch}/{args.epochs}", enabled=master, initial=start_step)
    result = {}
    for step, (images, labels) in enumerate(loader.batches(start_step), start=start_step):
        # DDP averages gradients over processes; scaling by world/global batch makes
        # that the mean over the global batch, even when shares differ by an image.
        loss_sum = train_step(model, images, labels, optimizer, scheduler, scaler, amp_dtype,
                              args.label_smoothing, world / global_batch, totals)
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss_sum), step, bad_step)
        if step == start_step:
            data.synchronize(device)
            first_step = time.perf_counter() - start
        # In one process a stop is honoured after any step; under torchrun the
        # processes must agree, so they compare notes at logging points.
        at_log = (step + 1) % args.log_every == 0 or step + 1 == steps
        if at_log or (stop.signum and world == 1):
            summed = all_reduce(torch.cat([totals, (bad_step >= 0).float().view(1),
                                           torch.tensor([float(stop.signum > 0)], device=device)]))
            loss_total, correct, seen, any_bad, stopping = summed.tolist()
            if any_bad:
                first_bad = all_reduce(torch.where(bad_step >= 0, bad_step, steps).view(1), "min")
                raise TrainingError(f"the loss became {'NaN' if math.isnan(loss_total) else 'infinite'} at epoch "
                                    f"{epoch}, step {first_bad.item() + 1} of {steps}; nothing of epoch {epoch} "
                                    f"was saved ({f'last.pth still holds epoch {epoch - 1}' if epoch > 1 else 'no epoch had finished'}). "
                                    "Lower --lr, or try --amp off")
            avg_loss, acc = loss_total / seen, 100.0 * correct / seen
            if at_log:
                if master:
                    iteration = (epoch - 1) * steps + step + 1
                    append_line(log_path, f"{epoch:03d} {iteration:05d} | Loss: {avg_loss:.3f} | Acc: {acc:.3f}%")
                rate = seen / (time.perf_counter() - start)
                progress.update(step + 1, loss=f"{avg_loss:.3f}", acc=f"{acc:.2f}%",
                                lr=f"{scheduler.get_last_lr()[0]:.4f}", img_s=f"{rate:.0f}")
            if stopping and step + 1 < steps:
                result = {"stopped_at": step + 1, "totals": totals.tolist(), "signum": agreed_signal(stop, device)}
                break
    progress.close()
    data.synchronize(device)
    return {"loss": avg_loss, "acc": acc, "images": int(seen), "seconds": time.perf_counter() - start,
            "first_step": first_step, **result}


def evaluate(model, loader, num_classes, amp_dtype, tta, memory_format):
    """Test loss and accuracy over the whole test split; each process scores its
    share, the sums are added up, and every process gets the same answer."""
    device = loader.images.device
    inference = resnet.fold_batchnorm(copy.deepcopy(model)).to(memory_format=memory_format)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss, confusion = resnet.evaluate(inference, loader, num_classes, tta=tta)
    totals = torch.cat([confusion.flatten().float(), torch.tensor([loss * confusion.sum().item()])]).to(device)
    totals = all_reduce(totals).cpu()
    confusion = totals[:-1].view(num_classes, num_classes)
    return totals[-1].item() / confusion.sum().item(), 100.0 * confusion.diag().sum().item() / confusion.sum().item()


def checkpoint_dict(model, classes, norm, epoch, accuracy, args):
    """What a checkpoint says about itself: enough for test.py, predict.py and the
    desktop window to use it with no other flags (classes, picture size, normalization)."""
    return {
        "arch": args.model,
        "dataset": args.dataset,
        "num_classes": len(classes),
        "classes": list(classes),
        "mean": list(norm[0]),
        "std": list(norm[1]),
        "image_size": args.image_size,
        "epoch": epoch,
        "accuracy": accuracy,
        "model": resnet.clean_state_dict(model.state_dict()),
        "args": shareable_args(args),
    }


def save_epoch(out_dir, ckpt, training_state, is_best, r, test_loss, lr, args, first):
    """Write a finished epoch and print its line. The order matters for --resume after
    a crash: everything of the epoch first, last.pth (the commit point) at the end."""
    epoch, acc = ckpt["epoch"], ckpt["accuracy"]
    save_checkpoint(ckpt, out_dir / f"net_{epoch:03d}.pth")
    if is_best:
        save_checkpoint(ckpt, out_dir / "best.pth")
        write_text_atomic(f"EPOCH={epoch}, best_acc={acc:.3f}%\n", out_dir / "best_acc.txt")
    append_line(out_dir / "acc.txt", f"EPOCH={epoch:03d}, Accuracy= {acc:.3f}%")
    append_metrics(out_dir / "metrics.csv", [str(epoch), f"{r['loss']:.4f}", f"{r['acc']:.3f}", f"{test_loss:.4f}",
                                             f"{acc:.3f}", f"{lr:.6g}", f"{r['seconds']:.2f}",
                                             f"{r['images'] / r['seconds']:.1f}"])
    save_checkpoint({**ckpt, **training_state}, out_dir / "last.pth")
    speed = f"{r['images'] / r['seconds']:.0f} img/s"
    if args.compile and first:  # compilation happens in the first step
        first_images = min(args.batch_size, r["images"])
        speed = (f"{(r['images'] - first_images) / max(r['seconds'] - r['first_step'], 1e-9):.0f} "
                 f"img/s after a {r['first_step']:.1f}s first step (compilation)")
    print(f"epoch {epoch:3d}/{args.epochs} | train loss {r['loss']:.3f} acc {r['acc']:6.2f}% | "
          f"test loss {test_loss:.3f} acc {acc:6.2f}% | lr {lr:.4f} | "
          f"{r['seconds']:.1f}s {speed}{' | best' if is_best else ''}", flush=True)


def good_epoch_checkpoints(out_dir):
    """net_XXX.pth files of a run that load, newest first."""
    for path in sorted(out_dir.glob("net_*.pth"), reverse=True):
        try:
            resnet.load_checkpoint(path)
            yield path
        except resnet.CheckpointError:
            continue


def restore(args, out_dir, master):
    """Read the state to resume from (None: nothing saved yet, start afresh); the
    run's recipe replaces the command line's."""
    path = Path(args.resume) if args.resume else out_dir / "last.pth"
    if not args.resume and not path.exists():
        if master:
            print(f"note: {path} does not exist yet; starting the run from the beginning")
        return None
    try:
        state = resnet.load_checkpoint(path)
    except resnet.CheckpointError as e:
        fallback = next(good_epoch_checkpoints(path.parent), None)
        hint = f"; resume from the newest good epoch instead: --resume {fallback}" if fallback else ""
        raise resnet.CheckpointError(f"{e}{hint}") from None
    if "args" not in state or "epoch" not in state or "model" not in state:
        raise resnet.CheckpointError(f"{path}: not a checkpoint of train.py; --resume needs last.pth or net_XXX.pth")
    defaults = get_args_parser().parse_args([])
    for key in RECIPE:
        saved, given = state["args"].get(key, getattr(defaults, key)), getattr(args, key)
        if given != saved and given != getattr(defaults, key) and master:
            print(f"note: ignoring --{key.replace('_', '-')} {given}; the run keeps its own ({saved})")
        setattr(args, key, saved)
    if master:
        where = f"epoch {state['epoch']}" + (f", step {state['step']}" if state.get("step") else "")
        print(f"resuming {path} after {where} of {args.epochs}"
              + ("" if "optimizer" in state else " (weights only: the optimizer's momentum starts afresh)"))
    return state


def main(args):
    # torchrun sets these; a plain `python train.py` is process 0 of 1.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, master = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("RANK", 0)) == 0
    device = data.pick_device(args.device, local_rank)
    data.keep_freed_memory(device)
    if world > 1:
        backend = {"npu": "hccl", "cuda": "nccl"}.get(device.type, "gloo")
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=DIST_TIMEOUT)
    stop = StopRequest()
    try:
        return train(args, device, master, stop)
    finally:
        stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, device, master, stop):
    # A run lives in one folder: --resume PATH continues in PATH's folder.
    out_dir = Path(args.out_dir or (Path(args.resume).parent if args.resume else f"runs/{args.model}"))
    state = None
    if args.resume is not None:
        state = restore(args, out_dir, master)
    elif (out_dir / "last.pth").exists():
        raise resnet.CheckpointError(f"{out_dir} already holds a run: continue it with --resume, "
                                     "or choose another --out-dir (RUN_DIR=)")
    args.lr = peak_lr(args)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    amp_dtype = data.resolve_amp(args.amp, device)
    memory_format = data.memory_format(args.channels_last, device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    t0 = time.perf_counter()
    if args.dataset != "folder" and args.image_size != 32:
        raise data.DataError(f"{args.dataset} pictures are 32x32; --image-size is for folder datasets")
    split = dict(subset=args.subset, dataset=args.dataset, image_size=args.image_size)
    train_x, train_y, classes = data.load_split(args.data_dir, train=True, **split)
    test_x, test_y, _ = data.load_split(args.data_dir, train=False, **split)
    # A resumed run keeps the normalization it started with, even if a folder has changed since.
    norm = (state["mean"], state["std"]) if state and "mean" in state else data.normalization(args.dataset, train_x)
    pad = args.image_size // 8  # the random crops' shift: CIFAR's 4 pixels at 32, in proportion elsewhere
    train_loader = data.CifarLoader(train_x, train_y, args.batch_size, *norm, train=True, device=device, pad=pad,
                                    seed=args.seed, rank=rank, world_size=world, memory_format=memory_format)
    eval_batch = args.eval_batch_size or data.eval_batch_size(device)
    test_loader = data.CifarLoader(test_x, test_y, eval_batch, *norm, train=False, device=device,
                                   rank=rank, world_size=world, memory_format=memory_format)
    load_seconds = time.perf_counter() - t0
    steps = len(train_loader)

    model = resnet.build_model(args.model, len(classes)).to(device, memory_format=memory_format)
    if state is not None:
        model.load_state_dict(state["model"])
    if world > 1 and args.sync_bn:
        model = convert_sync_bn(model, device)
    # `model` stays the plain network: evaluated and saved as is (no `module.` or
    # `_orig_mod.` prefixes). `net` is what trains: compiled and/or DDP-wrapped.
    net = torch.compile(model) if args.compile else model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.index is not None else None)
    optimizer = make_optimizer(model, args)
    done_epochs = state["epoch"] if state else 0
    done_steps = state.get("step", 0) if state else 0
    full_state = state is not None and "optimizer" in state
    scheduler = make_schedule(optimizer, args.epochs * steps, args.warmup,
                              0 if full_state else done_epochs * steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    best_acc, best_epoch = 0.0, 0
    if full_state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        best_acc, best_epoch = state["best_accuracy"], state["best_epoch"]
    elif state is not None:  # weights only: the best so far comes from acc.txt
        for line in (out_dir / "acc.txt").read_text().splitlines() if (out_dir / "acc.txt").exists() else []:
            epoch, acc = int(line.split(",")[0].split("=")[1]), float(line.split("= ")[1].rstrip("%"))
            if epoch <= done_epochs and acc > best_acc:
                best_acc, best_epoch = acc, epoch
    if master:  # what an interrupted run wrote after its saved state goes; the rest stays
        keep_lines(out_dir / "log.txt", r"\d{3} (\d{5}) \| Loss: \S+ \| Acc: \S+%", done_epochs * steps + done_steps)
        keep_lines(out_dir / "acc.txt", r"EPOCH=(\d+), Accuracy= *\S+%", done_epochs)
        keep_lines(out_dir / "metrics.csv", r"(\d+)(,[^,]+){7}", done_epochs, header=METRICS)
        if best_epoch:
            write_text_atomic(f"EPOCH={best_epoch}, best_acc={best_acc:.3f}%\n", out_dir / "best_acc.txt")
    if done_epochs >= args.epochs:
        if master:
            print(f"nothing to do: the run already finished its {args.epochs} epochs "
                  f"(best {best_acc:.2f}% at epoch {best_epoch})")
        return 0

    if master:
        precision = data.PRECISION_NAMES[amp_dtype]
        print(f"{args.model} on {device}{f' x {world} processes' if world > 1 else ''}, {precision}"
              f"{', channels_last' if memory_format == torch.channels_last else ''}"
              f"{', compiled' if args.compile else ''}: {len(train_y)} training / {len(test_y)} test images, "
              f"{steps} step{'s' if steps > 1 else ''} of {min(args.batch_size, len(train_y))} per epoch, "
              f"data loaded in {load_seconds:.1f}s; writing to {out_dir}")
    def training_state():  # what last.pth adds to a checkpoint; built only by the process that saves
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "best_accuracy": best_acc, "best_epoch": best_epoch,
                "rng_cpu": torch.get_rng_state()}

    train_seconds = eval_seconds = 0.0
    last_epoch = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(done_epochs + 1, last_epoch + 1):
        train_loader.set_epoch(epoch)
        resume_here = epoch == done_epochs + 1 and done_steps
        r = train_one_epoch(net, train_loader, optimizer, scheduler, scaler, amp_dtype, epoch, args,
                            out_dir / "log.txt", master, stop, start_step=done_steps if resume_here else 0,
                            totals=state.get("totals") if resume_here else None)
        train_seconds += r["seconds"]
        if "stopped_at" in r:  # a stop was requested: save mid-epoch and leave
            if master:
                save_checkpoint({**checkpoint_dict(model, classes, norm, epoch - 1, None, args), **training_state(),
                                 "step": r["stopped_at"], "totals": r["totals"]}, out_dir / "last.pth")
                print(f"stopped by {signal.Signals(r['signum']).name} at epoch {epoch}, step {r['stopped_at']} "
                      f"of {steps}; saved {out_dir / 'last.pth'}. Continue with: python train.py --resume "
                      f"{out_dir / 'last.pth'}", flush=True)
            return 128 + r["signum"]

        t = time.perf_counter()
        if world > 1:  # every process evaluates, and saves, the weights process 0 has
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        test_loss, acc = evaluate(model, test_loader, len(classes), amp_dtype, args.tta, memory_format)
        eval_seconds += time.perf_counter() - t
        is_best = acc > best_acc
        if is_best:
            best_acc, best_epoch = acc, epoch
        if master:
            save_epoch(out_dir, checkpoint_dict(model, classes, norm, epoch, acc, args), training_state(), is_best, r,
                       test_loss, scheduler.get_last_lr()[0], args, first=epoch == done_epochs + 1)
        # A stop that came during evaluation or saving: the epoch is complete, leave now.
        signum = agreed_signal(stop, device) if world > 1 else stop.signum
        if signum and epoch < last_epoch:
            if master:
                print(f"stopped by {signal.Signals(signum).name} after epoch {epoch}; continue with: "
                      f"python train.py --resume {out_dir / 'last.pth'}", flush=True)
            return 128 + signum

    if master:
        if last_epoch < args.epochs:
            print(f"stopped after epoch {last_epoch} of {args.epochs}; continue with: python train.py "
                  f"--resume {out_dir / 'last.pth'}")
        print(f"best accuracy {best_acc:.2f}% at epoch {best_epoch}, total time "
              f"{time.perf_counter() - t0:.1f}s (training {train_seconds:.1f}s, evaluation {eval_seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except OSError as e:  # writing a log line on a full disk, say
        sys.exit(f"error: {e}")
    except (data.DataError, data.DeviceError, resnet.CheckpointError, TrainingError) as e:
        where = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        sys.exit(f"{where}error: {e}")
    except KeyboardInterrupt:
        print("\ninterrupted at once; the last finished epoch is in last.pth: continue with --resume",
              file=sys.stderr)
        sys.exit(130)
