"""Train a CIFAR ResNet and keep every epoch's checkpoint and log.

    python train.py                                      # ResNet18 on the best device found
    python train.py --model resnet50 --device npu --epochs 60
    python train.py --resume                             # continue runs/resnet18/last.pth
    python train.py --subset 2000 --epochs 1 --batch-size 16 --device cpu   # a quick look
    python train.py --dataset folder --data-dir photos --image-size 64   # photos/{train,test}/<class>/*
    torchrun --standalone --nproc_per_node=8 train.py --device npu   # 8 NPUs/GPUs, one process each

What it writes into --out-dir (default runs/<model>), and how --resume continues after
a stop or a kill: rundir.py. Under torchrun every process trains on its share of each
global batch (DistributedDataParallel); process 0 alone prints and writes files.
"""
import copy
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # torch_npu loads in device.py, which explains failures

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cli  # noqa: E402
import data  # noqa: E402
import device  # noqa: E402
import resnet  # noqa: E402
import rundir  # noqa: E402

# Settings that define a run. --resume continues with the checkpoint's values of these,
# whatever the command line says, so the schedule stays the same, and so does how each
# epoch is scored (--tta), which picks best.pth.
RECIPE = ("model", "dataset", "image_size", "epochs", "batch_size", "lr", "warmup", "momentum", "weight_decay",
          "norm_weight_decay", "label_smoothing", "ema", "flip", "zero_init_residual", "seed", "subset", "sync_bn",
          "tta")
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch.compile's


def get_args_parser():
    p = cli.parser("Train a ResNet on CIFAR-10, CIFAR-100 or a folder of pictures.")
    # The defaults and the runs behind them: docs/training.md.
    r = p.add_argument_group("recipe")
    r.add_argument("--model", default="resnet18", choices=resnet.MODELS, help="network")
    r.add_argument("--epochs", type=cli.integer(min=1), default=40,
                   help="passes over the training set; the schedule spans exactly these")
    r.add_argument("--batch-size", type=cli.integer(min=1), default=512,
                   help="images per step, global: split between the processes of a torchrun job")
    r.add_argument("--lr", type=cli.real(above=0), default=None,
                   help="peak learning rate (default: 0.1 x batch-size/128, the linear scaling rule)")
    r.add_argument("--warmup", type=cli.real(min=0, below=1), default=0.15,
                   help="share of the steps over which the lr rises to --lr (then it falls linearly to 0)")
    r.add_argument("--momentum", type=cli.real(min=0, below=1), default=0.9, help="Nesterov momentum of SGD")
    r.add_argument("--weight-decay", type=cli.real(min=0), default=5e-4, help="L2 penalty on the weights")
    r.add_argument("--norm-weight-decay", type=cli.real(min=0), default=None,
                   help="L2 penalty on BatchNorm's weights and biases and the final bias (default: --weight-decay)")
    r.add_argument("--label-smoothing", type=cli.real(min=0, below=1), default=0.1,
                   help="softens the targets; regularizes short schedules")
    r.add_argument("--ema", type=cli.real(min=0, below=1), default=0, metavar="DECAY",
                   help="evaluate and save a moving average of the weights with this decay per step (0: off)")
    r.add_argument("--flip", default="random", choices=data.FLIPS,
                   help="mirror each training picture at random, or alternate: in every other epoch")
    r.add_argument("--zero-init-residual", action="store_true",
                   help="start each block's last BatchNorm at zero, so each block starts as its shortcut")
    r.add_argument("--seed", type=cli.integer(min=0, max=2 ** 32 - 1), default=0,
                   help="seeds the weights, the shuffling and the augmentation")
    r.add_argument("--subset", type=cli.integer(min=1), default=None, help="use only the first N images of each split")
    r.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, BatchNorm statistics over the global batch instead of each process's share")
    add_run_args(p)
    return p


def add_run_args(p):
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
    d.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=COMPILE_MODES,
                   help=f"torch.compile the model (CUDA) in MODE, one of {', '.join(COMPILE_MODES)}; a bare "
                        "--compile is default, reduce-overhead captures CUDA graphs")
    d.add_argument("--fused", action="store_true", help="SGD's fused kernel: one launch for all parameters")
    d.add_argument("--eval-batch-size", type=cli.integer(min=1), default=None,
                   help="images per evaluation step (default: 1000 on a GPU or NPU, 128 on a CPU)")
    d.add_argument("--tta", nargs="?", const="flip", default="off", choices=resnet.TTA,
                   help="test-time views: flip (--tta alone) adds the mirror image, flip-shift also shifts")
    o = p.add_argument_group("run folder")
    o.add_argument("--out-dir", default=None, help="run folder (default: runs/<model>, or with --resume PATH, "
                                                    "PATH's folder)")
    o.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run from PATH (no PATH: OUT_DIR/last.pth)")
    o.add_argument("--log-every", type=cli.integer(min=1), default=20, help="write a log.txt line every N steps")
    o.add_argument("--stop-after", type=cli.integer(min=1), default=None, metavar="EPOCH",
                   help="stop after this epoch (the schedule still spans --epochs); continue later with --resume")


# ---------------------------------------------------------------------------
# The training step

class EMA:
    """A moving average of a model's weights and BatchNorm statistics, updated every step and evaluated
    and saved in the model's place: it smooths away the noise of the last steps' updates."""

    def __init__(self, model, decay):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        self.averages, self.sources = zip(*[(a, m) for a, m in pairs if a.is_floating_point()])
        self.counts = [a for a, _ in pairs if not a.is_floating_point()]  # BatchNorm's batch counts: copied
        self.count_sources = [m for a, m in pairs if not a.is_floating_point()]

    def decay_now(self):
        # A short memory at first, while the weights still move fast (as TensorFlow's EMA does).
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self):
        self.updates += 1
        torch._foreach_lerp_(self.averages, self.sources, 1 - self.decay_now())
        if self.counts:
            torch._foreach_copy_(self.counts, self.count_sources)


class Training(NamedTuple):
    """What a training step works with."""
    model: nn.Module  # the plain network: averaged, evaluated and saved as it is
    net: nn.Module  # what trains: the model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: Optional[torch.dtype]  # autocast dtype; None: fp32
    label_smoothing: float
    ema: Optional[EMA]


def peak_lr(args):
    """--lr, or by default the linear scaling rule: 0.1 per 128 images (0.4 at batch 512)."""
    return args.lr if args.lr is not None else 0.1 * args.batch_size / 128


def few_steps_note(n, steps, epochs):
    """Advice when an epoch holds fewer than 8 steps or the run fewer than 100: a run of a few dozen
    steps learns little (BatchNorm's running statistics hardly settle, and the peak lr is made for
    thousands of steps), and a smaller batch makes more steps of the same epochs."""
    if steps >= 8 and steps * epochs >= 100:
        return None
    per_epoch = max(8, min(math.ceil(100 / epochs), n // 16))  # batches of 16 at the least, for the 100
    batch = 2 ** max(0, int(math.log2(n / per_epoch)))  # the largest power of two that makes them
    if n // batch <= steps:
        return None
    return (f"note: {cli.plural(steps, 'step')} per epoch, {steps * epochs} in all: too few to learn "
            f"much. A smaller batch gives more: --batch-size {batch} (make: BATCH={batch}) makes {n // batch} "
            f"per epoch, {n // batch * epochs} in all")


def make_optimizer(model, args):
    """SGD with Nesterov momentum; --norm-weight-decay, where given, on the one-dimensional
    parameters (BatchNorm's weights and biases, the final bias) and --weight-decay on the rest."""
    params = list(model.parameters())
    if args.norm_weight_decay is not None and args.norm_weight_decay != args.weight_decay:
        params = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": args.norm_weight_decay}]
    return torch.optim.SGD(params, lr=peak_lr(args), momentum=args.momentum, nesterov=args.momentum > 0,
                           weight_decay=args.weight_decay, fused=args.fused or None)


def make_schedule(optimizer, total_steps, warmup):
    """Linear warm-up from 0 to the peak lr, then linear decay to 0, spanning exactly
    total_steps (a OneCycle-style triangle, as in the fast-CIFAR recipes)."""
    warm = max(1, round(total_steps * warmup))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_training(model, args, dev, amp, total_steps):
    """The optimizer, schedule, scaler and EMA of the recipe, for a model already on dev."""
    net = torch.compile(model, mode=args.compile) if args.compile else model
    if torch.distributed.is_initialized():
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.index is not None else None)
    optimizer = make_optimizer(model, args)
    return Training(model, net, optimizer, make_schedule(optimizer, total_steps, args.warmup),
                    device.grad_scaler(dev, amp), amp, args.label_smoothing,
                    EMA(model, args.ema) if args.ema else None)


def train_step(t, images, labels, loss_scale, totals):
    """One optimizer step; adds its summed loss, correct answers and image count to `totals` (on
    the device) and returns the summed loss. Nothing here waits for the device: a value read back
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
    dev = loader.images.device
    t.net.train()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    global_batch = min(args.batch_size, len(loader.labels))
    # Running sums on the device (loss, correct, images), read only at log points. Those of a
    # resumed epoch are the whole job's: the main process alone carries them on, as they are added up.
    carried = totals[2] if totals else 0.0  # images of the epoch trained before the stop: not this run's speed
    totals = torch.tensor(totals if totals and folder.is_main else [0.0] * 3, dtype=torch.float32, device=dev)
    bad_step = torch.full((), -1, dtype=torch.int64, device=dev)  # the first non-finite loss
    steps, start, first_step, stopped_at = len(loader), time.perf_counter(), 0.0, 0
    progress = rundir.StepLog(steps, f"epoch {epoch}/{args.epochs}", enabled=folder.is_main, initial=start_step)
    for step, (images, labels) in enumerate(loader.batches(start_step), start=start_step):
        # DDP averages gradients over processes; scaling by world/global batch makes that
        # the mean over the global batch, even when shares differ by an image.
        loss_sum = train_step(t, images, labels, world / global_batch, totals)
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss_sum), step, bad_step)
        if step == start_step:
            device.synchronize(dev)
            first_step = time.perf_counter() - start
        # One process honours a stop after any step; under torchrun the processes must
        # agree, so they compare notes at log points.
        at_log = (step + 1) % args.log_every == 0 or step + 1 == steps
        if at_log or (stop.signum and world == 1):
            summed = device.all_reduce(torch.cat([totals, (bad_step >= 0).float().view(1),
                                                  torch.tensor([float(stop.signum > 0)], device=dev)]))
            loss_total, correct, seen, any_bad, stopping = summed.tolist()
            if any_bad:
                first = device.all_reduce(torch.where(bad_step >= 0, bad_step, steps).view(1), "min").item()
                kept = (f"last.pth still holds it up to step {start_step}" if start_step else
                        f"last.pth still holds epoch {epoch - 1}" if epoch > 1 else "no epoch had finished")
                raise rundir.TrainingError(f"the loss became {'NaN' if math.isnan(loss_total) else 'infinite'} at "
                                           f"epoch {epoch}, step {first + 1} of {steps}; nothing of epoch {epoch} "
                                           f"{f'after step {start_step} ' if start_step else ''}was saved ({kept}). "
                                           "Lower --lr, or try --amp off")
            loss, acc = loss_total / seen, 100.0 * correct / seen
            if at_log:
                folder.log_step(epoch, (epoch - 1) * steps + step + 1, loss, acc)
                progress.update(step + 1, loss=loss_text(loss), acc=f"{acc:.2f}%",
                                lr=f"{t.scheduler.get_last_lr()[0]:.4f}",
                                img_s=f"{(seen - carried) / (time.perf_counter() - start):.0f}")
            if stopping and step + 1 < steps:
                stopped_at = step + 1
                break
    progress.close()
    device.synchronize(dev)
    return Epoch(loss, acc, int(seen - carried), time.perf_counter() - start, first_step, stopped_at,
                 [loss_total, correct, seen] if stopped_at else None, stop.agreed(dev) if stopped_at else 0)


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


def run_folder(args):
    """Where the run lives: --out-dir; or --resume PATH's folder, which the run goes on in; or runs/<model>."""
    return Path(args.out_dir or (Path(args.resume).parent if args.resume else f"runs/{args.model}"))


def main(args, given=None):
    """given: the recipe's settings the command line gave, for --resume to note those the run does not take
    (None, for a caller that parsed no command line: those not at their default)."""
    job = device.job()
    dev = device.pick_device(args.device, job.local_rank)
    device.keep_freed_memory(dev)
    folder = rundir.RunFolder(run_folder(args), job.is_main)
    with device.process_group(job, dev), device.StopRequest() as stop, folder:
        state = folder.resume(args, RECIPE, get_args_parser(), given)  # may put the run's recipe in args
        args.lr = peak_lr(args)
        torch.manual_seed(args.seed)
        amp, layout = device.resolve_amp(args.amp, dev), device.memory_format(args.channels_last, dev)
        t0 = time.perf_counter()
        # A resumed run keeps the normalization it started with, even if a folder has changed since.
        try:
            loaders, classes, norm = data.training_loaders(
                args.data_dir, args.dataset, args.image_size, args.subset, args.batch_size,
                args.eval_batch_size or device.eval_batch_size(dev), args.seed, args.flip,
                (state["mean"], state["std"]) if state and "mean" in state else None,
                device=dev, rank=job.rank, world_size=job.world_size, memory_format=layout)
        except data.DataError as e:  # a resumed run says where its data was
            raise data.DataError(f"{e}{folder.where_data_was(args.data_dir) if state else ''}") from None
        load_seconds = time.perf_counter() - t0
        n, steps = len(loaders[0].labels), len(loaders[0])  # training pictures, steps per epoch
        share = min(args.batch_size, n) // job.world_size  # the smallest per process
        if share * math.ceil(args.image_size / 8) ** 2 < 2:  # the last block's maps are 1/8 of the side
            raise rundir.TrainingError(f"steps of {share} picture{'' if share == 1 else 's'} per process at "
                                       f"--image-size {args.image_size} leave BatchNorm one value per channel to "
                                       "normalize: give --batch-size 2 or more per process")
        model = resnet.build_model(args.model, len(classes), args.zero_init_residual).to(dev, memory_format=layout)
        if job.world_size > 1 and args.sync_bn:
            model = device.convert_sync_bn(model, dev)
        t = make_training(model, args, dev, amp, args.epochs * steps)
        start = folder.restore(t, state, steps, classes) if state else rundir.Start()
        if args.stop_after and args.epochs > start.epoch >= args.stop_after:  # before begin(), which cuts the logs
            folder.say(f"nothing to do: the run already trained epoch {start.epoch} of {args.epochs} (--stop-after "
                       f"{args.stop_after}); continue it with: {resume_command(folder.resumed_from, args)}")
            return Result(0, *start.best)
        folder.begin(args.data_dir, start, steps)
        if start.epoch >= args.epochs:
            folder.say(f"nothing to do: the run already finished, at epoch {start.epoch} of {args.epochs} "
                       f"(best {start.best[0]:.2f}% at epoch {start.best[1]}); a longer schedule is a new run: "
                       "a larger --epochs in another --out-dir")
            return Result(0, *start.best)
        folder.say(f"{args.model} on {dev}{f' x {job.world_size} processes' if job.world_size > 1 else ''}, "
                   f"{device.PRECISION_NAMES[amp]}{', channels_last' if layout == torch.channels_last else ''}"
                   f"{', compiled' if args.compile else ''}: {n} training / {len(loaders[1].labels)} test images, "
                   f"{cli.plural(steps, 'step')} of {min(args.batch_size, n)} per epoch, data loaded in "
                   f"{load_seconds:.1f}s; writing to {folder.path}")
        note = None if state else few_steps_note(n, steps, args.epochs)  # a resumed run keeps its batch
        if note:
            folder.say(note)
        describe = dict(arch=args.model, classes=classes, mean=norm[0], std=norm[1], image_size=args.image_size,
                        dataset=args.dataset, args=rundir.shareable_args(args))
        return run_epochs(args, t, loaders, describe, folder, stop, start, t0)


def run_epochs(args, t, loaders, describe, folder, stop, start, t0):
    """The epoch loop: train, evaluate, save; stop early when asked to."""
    (train_loader, test_loader), best = loaders, start.best
    train_seconds = eval_seconds = first_step = 0.0
    acc, images, last_epoch = 0.0, 0, min(args.epochs, args.stop_after or args.epochs)
    scored = t.ema.model if t.ema else t.model  # what is evaluated and saved as "model"
    loop_start = time.perf_counter()

    def snapshot(epoch, accuracy):
        return resnet.checkpoint(scored, epoch=epoch, accuracy=accuracy, best_accuracy=best[0], best_epoch=best[1],
                                 **describe)
    for epoch in range(start.epoch + 1, last_epoch + 1):
        train_loader.set_epoch(epoch)
        first = epoch == start.epoch + 1  # a run stopped mid-epoch goes on from its step
        resumable = epoch > 1 or start.step > 0  # last.pth is there: a failure's advice says --resume
        try:
            r = train_one_epoch(t, train_loader, epoch, args, folder, stop, start.step if first else 0,
                                start.totals if first else None)
        except (RuntimeError, NotImplementedError) as e:  # a batch too large, --compile or --fused unsupported
            why = step_failure(e, args.fused, resume=resumable)
            if why is None:
                raise
            raise rundir.TrainingError(why) from None
        train_seconds, images = train_seconds + r.seconds, images + r.images
        first_step = first_step or r.first_step
        if r.stopped_at:  # a stop was asked for: save mid-epoch and leave
            folder.save_stopped(lambda: snapshot(epoch - 1, None), t, r.stopped_at, r.totals)
            return stopped(folder, args, r.signum, f"at epoch {epoch}, step {r.stopped_at} of {len(train_loader)}")
        tick = time.perf_counter()
        for model in (t.model,) if scored is t.model else (t.model, scored):  # one order in every process
            device.broadcast_buffers(model)  # every process evaluates, and saves, what process 0 has
        try:
            test_loss, acc = evaluate(scored, test_loader, len(describe["classes"]), t.amp, args.tta,
                                      train_loader.memory_format)
        except RuntimeError as e:
            oom = device.out_of_memory(e)
            if oom is None:
                raise
            raise rundir.TrainingError(f"out of memory in evaluation: {oom}; run again "
                                       f"{'--resume ' if resumable else ''}with a smaller --eval-batch-size") from None
        eval_seconds += time.perf_counter() - tick
        is_best = acc > best[0] or not best[1]  # the first epoch is the best so far even at 0%: best.pth exists
        best = (acc, epoch) if is_best else best
        lr = t.scheduler.get_last_lr()[0]
        folder.save_epoch(lambda: snapshot(epoch, acc), t, is_best,
                          [str(epoch), f"{r.loss:.4f}", f"{r.acc:.3f}", f"{test_loss:.4f}", f"{acc:.3f}", f"{lr:.6g}",
                           f"{r.seconds:.2f}", f"{r.images / r.seconds:.1f}"])
        left = seconds_left(time.perf_counter() - loop_start, first_step, epoch - start.epoch, last_epoch - epoch)
        folder.say(f"epoch {epoch:3d}/{args.epochs} | train loss {loss_text(r.loss)} acc {r.acc:6.2f}% | test loss "
                   f"{loss_text(test_loss)} acc {acc:6.2f}% | lr {lr:.4f} | {r.seconds:.1f}s {speed(r, args, first)}"
                   f"{' | best' if is_best else ''}{f' | {duration(left)} left' if epoch < last_epoch else ''}")
        signum = stop.agreed(test_loader.images.device)  # a stop during evaluation: the epoch is complete
        if signum and epoch < last_epoch:
            return stopped(folder, args, signum, f"after epoch {epoch}")
    if last_epoch < args.epochs:
        folder.say(f"stopped after epoch {last_epoch} of {args.epochs}; continue with: "
                   f"{resume_command(folder.path / 'last.pth', args)}")
    folder.say(f"best accuracy {best[0]:.2f}% at epoch {best[1]}, total time {time.perf_counter() - t0:.1f}s "
               f"(training {train_seconds:.1f}s, evaluation {eval_seconds:.1f}s)")
    return Result(0, *best, acc, train_seconds, eval_seconds, first_step, images)


def step_failure(error, fused, resume=False):
    """One line for an error of the training step that the command line can mend: out of memory, or
    --compile or --fused where the device lacks them (torch.compile's error may run to pages: a C++
    compiler's output). resume: a finished epoch is saved, so the run goes on from there. None for
    any other error, which keeps its traceback."""
    again, oom = f"run again {'--resume ' if resume else ''}without", device.out_of_memory(error)
    if oom:  # a smaller batch is a new run: --resume keeps the run's batch size
        return f"out of memory: {oom}; run again with a smaller --batch-size (make: BATCH=)"
    if isinstance(error, torch._dynamo.exc.TorchDynamoException):
        return f"torch.compile failed: {cause(error)}; {again} --compile"
    if fused and "fused" in str(error):
        return f"SGD's fused kernel failed: {cause(error)}; {again} --fused"
    return None


def cause(error):
    """The first sentence of an error's first line (torch.compile's lines "backend=..." left out)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and not ln.startswith("backend=")]
    return lines[0].split(". ")[0] if lines else type(error).__name__


def speed(r, args, first):
    if not (args.compile and first) or r.images <= args.batch_size:
        return f"{r.images / r.seconds:.0f} img/s"
    rate = (r.images - min(args.batch_size, r.images)) / max(r.seconds - r.first_step, 1e-9)
    return f"{rate:.0f} img/s after a {r.first_step:.1f}s first step (compilation)"


def seconds_left(elapsed, first_step, done, to_do):
    """The epochs to do at the pace of those done, evaluation and saving included; the run's first
    step does not set the pace (it holds torch.compile's compilation and cuDNN's kernel choice)."""
    return max(elapsed - first_step, 0) / done * to_do


def loss_text(loss):
    """'1.234', or '2.42e+07' for a loss thrown off course (a few steps at a steep lr): its size at a glance."""
    return f"{loss:.3f}" if abs(loss) < 1000 else f"{loss:.3g}"


def duration(seconds):
    """'45s', '12 min' or '3.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def stopped(folder, args, signum, where):
    folder.say(f"stopped by {signal.Signals(signum).name} {where}; saved {folder.path / 'last.pth'}. Continue "
               f"with: {resume_command(folder.path / 'last.pth', args)}")
    return Result(128 + signum)


def resume_command(checkpoint, args):
    """The command that continues a run from checkpoint, ready to paste: under torchrun as this job
    was, with the flags given that --resume does not keep (it keeps the recipe, not where the data
    is nor how the steps run), so the run goes on as it went."""
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    launcher = (["python"] if world == 1 else ["torchrun", "--standalone", f"--nproc_per_node={local}"]
                if world == local else ["torchrun", "..."])  # several machines: the job's own torchrun flags
    words, parser = [*launcher, "train.py", "--resume", str(checkpoint)], get_args_parser()
    for key in ("data_dir", "device", "amp", "channels_last", "compile", "fused", "eval_batch_size", "log_every"):
        value = getattr(args, key)
        if value != parser.get_default(key):
            words += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return shlex.join(words)


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        sys.exit(main(args, cli.given(get_args_parser(), sys.argv[1:], RECIPE)).code)
    except BrokenPipeError:  # `train.py | head`: finished epochs are saved, as after a kill
        print("stopped: the reader of its output has gone; continue with --resume", file=sys.stderr)
        sys.exit(cli.reader_gone())
    except OSError as e:  # writing a log line on a full disk, say
        sys.exit(f"error: {e}")
    except (data.DataError, device.DeviceError, resnet.CheckpointError, rundir.TrainingError) as e:
        where = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        sys.exit(f"{where}error: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C: what the run saved before it is all there is
        last = run_folder(args) / "last.pth"
        print("\ninterrupted at once; " + (f"continue from its last save with: {resume_command(last, args)}"
                                           if last.is_file() else "nothing of the run was saved yet"), file=sys.stderr)
        sys.exit(130)
