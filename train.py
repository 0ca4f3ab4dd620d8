"""Train a CIFAR ResNet and keep every epoch's checkpoint and log.

    python train.py                                      # ResNet18 on the best device found
    python train.py --model resnet50 --device npu --epochs 60
    python train.py --resume                             # continue runs/resnet18/last.pth
    python train.py --subset 2000 --epochs 1 --batch-size 16 --device cpu   # a quick look
    python train.py --dataset folder --data-dir photos --image-size 64   # photos/{train,test}/<class>/*
    torchrun --standalone --nproc_per_node=8 train.py --device npu   # 8 NPUs/GPUs, one process each

What it writes into --out-dir (default runs/<model>): rundir.py; what --resume continues from,
after a stop or a kill: resume.py; the optimizer, schedule and EMA: optim.py. Under torchrun
every process trains on its share of each global batch (DistributedDataParallel); process 0
alone prints and writes files.
"""
import argparse
import math
import os
import signal
import sys
import time
from typing import NamedTuple, Optional

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # torch_npu loads in device.py, which explains failures

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import batching  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import device  # noqa: E402
import failures  # noqa: E402
import optim  # noqa: E402
import report  # noqa: E402
import resnet  # noqa: E402
import resume  # noqa: E402
import rundir  # noqa: E402

# Settings that define a run. --resume continues with the checkpoint's values of these,
# whatever the command line says, so the schedule stays the same, and so do the precision
# (--amp as resolved) and how each epoch is scored (--tta), which picks best.pth.
RECIPE = ("model", "dataset", "image_size", "epochs", "batch_size", "lr", "warmup", "momentum", "weight_decay",
          "norm_weight_decay", "label_smoothing", "ema", "flip", "zero_init_residual", "seed", "subset", "sync_bn",
          "tta", "amp")
PRECISIONS = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # what --amp auto resolves to
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch.compile's


def get_args_parser():
    p = cli.parser("Train a ResNet on CIFAR-10, CIFAR-100 or a folder of pictures.")
    # The defaults and the runs behind them: docs/training.md.
    r, share = p.add_argument_group("recipe"), cli.real(min=0, below=1)
    r.add_argument("--model", default="resnet18", choices=resnet.MODELS, help="network")
    r.add_argument("--epochs", type=cli.integer(min=1), default=40, help="passes over the training set: the schedule's")
    r.add_argument("--batch-size", type=cli.integer(min=1), default=512,
                   help="images per step, global: split between the processes of a torchrun job")
    r.add_argument("--lr", type=cli.real(above=0), default=None,
                   help="peak learning rate (default: 0.1 x batch-size/128, the linear scaling rule)")
    r.add_argument("--warmup", type=share, default=0.15,
                   help="share of the steps over which the lr rises to --lr (then it falls linearly to 0)")
    r.add_argument("--momentum", type=share, default=0.9, help="Nesterov momentum of SGD")
    r.add_argument("--weight-decay", type=cli.real(min=0), default=5e-4, help="L2 penalty on the weights")
    r.add_argument("--norm-weight-decay", type=cli.real(min=0), default=None,
                   help="L2 penalty on BatchNorm's weights and biases and the final bias (default: --weight-decay)")
    r.add_argument("--label-smoothing", type=share, default=0.1, help="softens the targets; regularizes short runs")
    r.add_argument("--ema", type=share, default=0, metavar="DECAY",
                   help="evaluate and save a moving average of the weights with this decay per step (0: off)")
    r.add_argument("--flip", default="random", choices=batching.FLIPS,
                   help="mirror each training picture at random, or alternate: in every other epoch")
    r.add_argument("--zero-init-residual", action="store_true",
                   help="start each block's last BatchNorm at zero, so each block starts as its shortcut")
    r.add_argument("--seed", type=cli.integer(min=0, max=2 ** 32 - 1), default=0,
                   help="seeds the weights, the shuffling and the augmentation")
    r.add_argument("--subset", type=cli.integer(min=1), default=None, help="use only the first N images of each split")
    r.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, BatchNorm statistics over the global batch instead of each process's share")
    d = p.add_argument_group("data and device")
    d.add_argument("--dataset", default="cifar10", choices=data.DATASETS,
                   help="cifar10, cifar100 (fine labels), or folder: DATA_DIR/{train,test}/<class>/<picture>")
    d.add_argument("--image-size", type=cli.integer(*resnet.IMAGE_SIZES), default=32,
                   help="side the pictures are resized to (folder datasets; CIFAR is 32)")
    d.add_argument("--data-dir", default="data",
                   help="folder holding cifar-10-batches-py/ or cifar-100-python/ (folder: the pictures' root)")
    d.add_argument("--device", default="auto", choices=device.DEVICES,
                   help="auto: npu if torch_npu finds one, else cuda, else mps, else cpu")
    d.add_argument("--amp", default="auto", choices=device.AMP_CHOICES,
                   help="mixed precision; auto: bf16 where the chip has it (fp16 on older GPUs/NPUs; on a CPU, "
                        "AMX-BF16, or AVX512_BF16 on AMD, in /proc/cpuinfo), else fp32")
    d.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="NHWC memory layout; auto: on for CUDA and CPU (faster convolutions), off for NPU and MPS")
    d.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE", choices=COMPILE_MODES,
                   help=f"torch.compile the model (CUDA) in MODE, one of {', '.join(COMPILE_MODES)}")
    d.add_argument("--fused", action="store_true", help="SGD's fused kernel: one launch for all parameters")
    d.add_argument("--eval-batch-size", type=cli.integer(min=1), default=None,
                   help="images per evaluation step (default: 1000 on a GPU or NPU, 128 on a CPU)")
    d.add_argument("--tta", nargs="?", const="flip", default="off", choices=resnet.TTA,
                   help="test-time views: flip (--tta alone) adds the mirror image, flip-shift also shifts")
    o = p.add_argument_group("run folder")
    o.add_argument("--out-dir", default=None, help="run folder (default: runs/<model>, or --resume PATH's folder)")
    o.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run from PATH (no PATH: OUT_DIR/last.pth), in its own recipe and precision")
    o.add_argument("--log-every", type=cli.integer(min=1), default=20, help="write a log.txt line every N steps")
    o.add_argument("--stop-after", type=cli.integer(min=1), default=None, metavar="EPOCH",
                   help="stop after this epoch (the schedule still spans --epochs); continue later with --resume")
    return p


# ---------------------------------------------------------------------------
# The training step

def train_step(t, images, labels, loss_scale, totals):
    """One optimizer step of optim.Training t; adds its summed loss, correct answers and image count
    to `totals` (on the device) and returns the summed loss. Nothing here waits for the device: a value read back
    (.item()) or a tensor built from Python numbers (torch.tensor) would make the host wait until a
    GPU or NPU has run everything queued, and the device would idle while the next step is queued."""
    with device.autocast(images.device, t.amp):
        logits = t.net(images)
    loss_sum = F.cross_entropy(logits.float(), labels, label_smoothing=t.label_smoothing, reduction="sum")
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss_sum * loss_scale).backward()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.scheduler.step()
    if t.ema is not None:
        t.ema.update()
    totals += torch.stack([loss_sum.detach(), (logits.argmax(1) == labels).sum().float(),
                           torch.full((), len(labels), dtype=torch.float32, device=labels.device)])
    return loss_sum.detach()


class Sums:
    """An epoch's running sums on the device (loss, correct, images), read only at log points, and
    its first step whose loss is not finite. Those of a resumed epoch are the whole job's: the main
    process alone carries them on, as they are added up over the processes."""

    def __init__(self, carried, is_main, dev):
        self.carried = carried[2] if carried else 0.0  # images of the epoch before a stop: not this run's speed
        self.totals = torch.tensor(carried if carried and is_main else [0.0] * 3, dtype=torch.float32, device=dev)
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=dev)
        self.summed = [0.0] * 3

    def watch(self, loss_sum, step):
        self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss_sum), step, self.bad_step)

    def read(self, stop, epoch, steps, start_step):
        """(loss, accuracy, whether a stop was asked for) over every process; LossNotFinite for a loss
        that is not finite."""
        dev = self.totals.device
        summed = device.all_reduce(torch.cat([self.totals, (self.bad_step >= 0).float().view(1),
                                              torch.tensor([float(stop.signum > 0)], device=dev)])).tolist()
        self.summed, (loss, correct, seen, any_bad, stopping) = summed[:3], summed
        if any_bad:
            first = device.all_reduce(torch.where(self.bad_step >= 0, self.bad_step, steps).view(1), "min").item()
            raise failures.LossNotFinite(math.isnan(loss), epoch, first + 1, steps, start_step)
        return loss / seen, 100.0 * correct / seen, stopping

    def images(self):
        return int(self.summed[2] - self.carried)


class Epoch(NamedTuple):
    """What train_one_epoch did."""
    loss: float
    acc: float
    images: int  # trained by this process group now: a resumed epoch's earlier steps are not counted
    seconds: float
    first_step: float  # seconds of the first step, which holds torch.compile's compilation
    stopped_at: int = 0  # steps done when a stop came mid-epoch (0: the epoch ran to its end)
    totals: Optional[list] = None  # the running sums of the whole job then, to resume with
    signum: int = 0


def train_one_epoch(t, loader, epoch, args, folder, stop, start_step=0, totals=None):
    """One pass over the training set, from start_step (for a run stopped mid-epoch)."""
    dev, steps = loader.images.device, len(loader)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    # DDP averages gradients over processes; scaling by world/global batch makes that
    # the mean over the global batch, even when shares differ by an image.
    loss_scale, sums = world / min(args.batch_size, len(loader.labels)), Sums(totals, folder.is_main, dev)
    progress = report.StepLog(steps, f"epoch {epoch}/{args.epochs}", enabled=folder.is_main, initial=start_step)
    start, first_step, stopped_at = time.perf_counter(), 0.0, 0
    t.net.train()
    for step, (images, labels) in enumerate(loader.batches(start_step), start=start_step):
        sums.watch(train_step(t, images, labels, loss_scale, sums.totals), step)
        if step == start_step:
            device.synchronize(dev)
            first_step = time.perf_counter() - start
        # One process honours a stop after any step; the processes of a job agree at log points.
        at_log = (step + 1) % args.log_every == 0 or step + 1 == steps
        if at_log or (stop.signum and world == 1):
            loss, acc, stopping = sums.read(stop, epoch, steps, start_step)
            if at_log:
                folder.log_step(epoch, (epoch - 1) * steps + step + 1, loss, acc)
                progress.update(step + 1, loss=report.loss_text(loss), acc=f"{acc:.2f}%",
                                lr=f"{t.scheduler.get_last_lr()[0]:.4f}",
                                img_s=f"{sums.images() / (time.perf_counter() - start):.0f}")
            if stopping and step + 1 < steps:
                stopped_at = step + 1
                break
    progress.close()
    device.synchronize(dev)
    return Epoch(loss, acc, sums.images(), time.perf_counter() - start, first_step, stopped_at,
                 sums.summed if stopped_at else None, stop.agreed(dev) if stopped_at else 0)


def evaluate(model, loader, num_classes, amp, tta, memory_format):
    """Test loss and accuracy over the whole test split; each process scores its share, the
    sums are added up, and every process gets the same answer."""
    dev = loader.images.device
    loss, confusion = resnet.evaluate(resnet.for_inference(model, memory_format=memory_format), loader,
                                      num_classes, tta=tta, amp_dtype=amp)
    totals = torch.cat([confusion.flatten().float(), torch.tensor([loss * confusion.sum().item()])]).to(dev)
    totals = device.all_reduce(totals).cpu()
    count = totals[:-1].sum().item()
    return totals[-1].item() / count, 100.0 * totals[:-1].view(num_classes, num_classes).diag().sum().item() / count


# ---------------------------------------------------------------------------
# The run

class Result(NamedTuple):
    """How a run ended: its exit code, and what bench.py --speedrun reports."""
    code: int
    best_acc: float = 0.0
    best_epoch: int = 0
    acc: float = 0.0  # after the last epoch trained
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    first_step: float = 0.0  # the first step's seconds (compilation, warm-up), part of train_seconds
    images: int = 0


def precision(choice, dev, job):
    """--amp as the run trains in it: bf16, fp16 or off (refused where the chip lacks it). auto is
    decided once, by process 0, for every process; the answer is saved with the recipe, so --resume
    goes on in the same precision."""
    if choice != "auto" or job.world_size == 1:
        return list(PRECISIONS)[list(PRECISIONS.values()).index(device.resolve_amp(choice, dev))]
    answer = list(PRECISIONS.values()).index(device.resolve_amp("auto", dev)) if job.is_main else 0
    return list(PRECISIONS)[int(device.all_reduce(torch.tensor([answer], device=dev)).item())]  # the others add 0


def main(args, given=None):
    """given: the recipe's flags the command line gave (None: those not at their default), for --resume's notes."""
    job = device.job()
    dev = device.pick_device(args.device, job.local_rank)
    device.keep_freed_memory(dev)
    folder = rundir.RunFolder(resume.run_folder(args), job.is_main)
    with device.process_group(job, dev), device.StopRequest() as stop, folder:
        plan = resume.plan(folder.path, args, RECIPE, get_args_parser(), given)
        for line in plan.notes:  # what --resume does, and the given flags it does not take
            folder.say(line)
        args = argparse.Namespace(**{**vars(args), **plan.recipe})  # the run's own recipe
        args.lr, args.amp = optim.peak_lr(args), precision(args.amp, dev, job)
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        loaders, classes, norm = load_data(args, plan, dev, job)
        load_seconds, steps = time.perf_counter() - t0, len(loaders[0])
        model = resnet.build_model(args.model, len(classes), args.zero_init_residual)
        t = optim.make_training(model.to(dev, memory_format=loaders[0].memory_format), args, dev,
                                PRECISIONS[args.amp], args.epochs * steps)
        start = resume.restore(t, plan, steps, classes, folder.path) if plan.state else rundir.Start()
        if args.stop_after and args.epochs > start.epoch >= args.stop_after:  # before begin(), which cuts the logs
            return nothing_to_do(folder, start, f"the run already trained epoch {start.epoch} of {args.epochs} "
                                 f"(--stop-after {args.stop_after}); continue it with: "
                                 f"{resume.command(plan.checkpoint, args, get_args_parser())}")
        folder.begin(args.data_dir, start, steps)
        if start.epoch >= args.epochs:
            return nothing_to_do(folder, start, f"the run already finished, at epoch {start.epoch} of {args.epochs} "
                                 f"(best {start.best[0]:.2f}% at epoch {start.best[1]}); a longer one is a new run")
        folder.say(report.first_line(args, dev, job.world_size, device.PRECISION_NAMES[t.amp], loaders,
                                     load_seconds, folder.path))
        if not plan.state:  # a resumed run keeps its batch
            folder.say(report.few_steps_note(len(loaders[0].labels), steps, args.epochs))
        describe = dict(arch=args.model, classes=classes, mean=norm[0], std=norm[1], image_size=args.image_size,
                        dataset=args.dataset, args=rundir.shareable_args(args))
        return run_epochs(args, t, loaders, describe, folder, stop, start, t0)


def nothing_to_do(folder, start, why):
    folder.say(f"nothing to do: {why}")
    return Result(0, *start.best)


def load_data(args, plan, dev, job):
    """The loaders, class names and normalization; a resumed run keeps the normalization it started
    with, even if a folder has changed since."""
    state = plan.state
    try:
        loaders, classes, norm = batching.training_loaders(
            args.data_dir, args.dataset, args.image_size, args.subset, args.batch_size,
            args.eval_batch_size or device.eval_batch_size(dev), args.seed, args.flip,
            (state["mean"], state["std"]) if state and "mean" in state else None, device=dev, rank=job.rank,
            world_size=job.world_size, memory_format=device.memory_format(args.channels_last, dev))
    except data.DataError as e:  # a resumed run says where its data was
        raise data.DataError(f"{e}{resume.where_data_was(plan, args.data_dir)}") from None
    share = min(args.batch_size, len(loaders[0].labels)) // job.world_size  # the smallest per process
    if share * math.ceil(args.image_size / 8) ** 2 < 2:  # the last block's maps are 1/8 of the side
        raise rundir.TrainingError(f"steps of {cli.plural(share, 'picture')} per process at --image-size "
                                   f"{args.image_size} leave BatchNorm one value per channel: give --batch-size 2 "
                                   "or more per process")
    return loaders, classes, norm


def run_epochs(args, t, loaders, describe, folder, stop, start, t0):
    """The epoch loop: train, evaluate, save; stop early when asked to."""
    (train_loader, test_loader), best, clock = loaders, start.best, report.Clock()
    last_epoch, acc = min(args.epochs, args.stop_after or args.epochs), 0.0
    scored = t.ema.model if t.ema else t.model  # what is evaluated and saved as "model"
    for epoch in range(start.epoch + 1, last_epoch + 1):
        train_loader.set_epoch(epoch)
        first = epoch == start.epoch + 1  # a run stopped mid-epoch goes on from its step
        r = clock.trained(train_one_epoch(t, train_loader, epoch, args, folder, stop,
                                          *((start.step, start.totals) if first else ())))
        if r.stopped_at:  # a stop was asked for: save mid-epoch and leave
            folder.save_stopped(lambda: snapshot(scored, epoch - 1, None, best, describe), t, r.stopped_at, r.totals)
            return stopped(folder, args, r.signum, f"at epoch {epoch}, step {r.stopped_at} of {len(train_loader)}")
        for model in (t.model,) if scored is t.model else (t.model, scored):  # one order in every process
            device.broadcast_buffers(model)  # every process evaluates, and saves, what process 0 has
        with clock.evaluating():
            test_loss, acc = evaluate(scored, test_loader, len(describe["classes"]), t.amp, args.tta,
                                      train_loader.memory_format)
        is_best = acc > best[0] or not best[1]  # the first epoch is the best so far even at 0%: best.pth exists
        best, lr = (acc, epoch) if is_best else best, t.scheduler.get_last_lr()[0]
        folder.save_epoch(lambda: snapshot(scored, epoch, acc, best, describe), t, is_best,
                          rundir.metrics_row(epoch, r, test_loss, acc, lr))
        left = clock.seconds_left(epoch - start.epoch, last_epoch - epoch) if epoch < last_epoch else None
        folder.say(report.epoch_line(args, epoch, r, test_loss, acc, lr, is_best, left, first))
        signum = stop.agreed(test_loader.images.device)  # a stop during evaluation: the epoch is complete
        if signum and epoch < last_epoch:
            return stopped(folder, args, signum, f"after epoch {epoch}")
    if last_epoch < args.epochs:
        folder.say(f"stopped after epoch {last_epoch} of {args.epochs}; continue with: "
                   f"{resume.command(folder.path / 'last.pth', args, get_args_parser())}")
    folder.say(f"best accuracy {best[0]:.2f}% at epoch {best[1]}, total time {time.perf_counter() - t0:.1f}s "
               f"(training {clock.train:.1f}s, evaluation {clock.eval:.1f}s)")
    return Result(0, *best, acc, clock.train, clock.eval, clock.first_step, clock.images)


def snapshot(scored, epoch, accuracy, best, describe):
    """The checkpoint of what is evaluated and saved, after `epoch`; best: (accuracy, epoch) so far."""
    return resnet.checkpoint(scored, epoch=epoch, accuracy=accuracy, best_accuracy=best[0], best_epoch=best[1],
                             **describe)


def stopped(folder, args, signum, where):
    folder.say(f"stopped by {signal.Signals(signum).name} {where}; saved {folder.path / 'last.pth'}. Continue "
               f"with: {resume.command(folder.path / 'last.pth', args, get_args_parser())}")
    return Result(128 + signum)


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    given = cli.given(get_args_parser(), sys.argv[1:], RECIPE)
    saved = resume.run_folder(args) / "last.pth"  # the resume command's, once the run has saved an epoch
    cli.main(lambda: main(args, given).code, explain=lambda e: failures.explain(e, args.fused, saved.is_file()),
             stopped=lambda: resume.after_a_stop(saved, args, get_args_parser()))
