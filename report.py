"""What a training run prints: its first line, a line per epoch, notes, and the progress of an
epoch (a tqdm bar on a terminal, plain lines in a log file). rundir.py writes the files.

    print(report.epoch_line(args, epoch, r, test_loss, acc, lr, is_best, left, first))
    epoch   3/40 | train loss 1.234 acc  56.78% | test loss 1.111 acc  60.12% | lr 0.3000 | 9.1s 5490 img/s | best
"""
import contextlib
import math
import sys
import time

import torch

import cli


class Clock:
    """Where a run's time goes, training (its first step apart) and evaluation, and the images trained."""

    def __init__(self):
        self.start, self.train, self.eval, self.first_step, self.images = time.perf_counter(), 0.0, 0.0, 0.0, 0

    def trained(self, epoch):
        """Adds train.py's Epoch and returns it."""
        self.train, self.images = self.train + epoch.seconds, self.images + epoch.images
        self.first_step = self.first_step or epoch.first_step
        return epoch

    @contextlib.contextmanager
    def evaluating(self):
        tick = time.perf_counter()
        yield
        self.eval += time.perf_counter() - tick

    def seconds_left(self, done, to_do):
        return seconds_left(time.perf_counter() - self.start, self.first_step, done, to_do)


def seconds_left(elapsed, first_step, done, to_do):
    """The epochs to do at the pace of those done, evaluation and saving included; the run's first
    step does not set the pace (it holds torch.compile's compilation and cuDNN's kernel choice)."""
    return max(elapsed - first_step, 0) / done * to_do


def first_line(args, dev, world_size, precision, loaders, load_seconds, path):
    """What trains where, in what precision and layout, on how many pictures."""
    n, steps, layout = len(loaders[0].labels), len(loaders[0]), loaders[0].memory_format
    return (f"{args.model} on {dev}{f' x {world_size} processes' if world_size > 1 else ''}, {precision}"
            f"{', channels_last' if layout == torch.channels_last else ''}{', compiled' if args.compile else ''}: "
            f"{n} training / {len(loaders[1].labels)} test images, {cli.plural(steps, 'step')} of "
            f"{min(args.batch_size, n)} per epoch, data loaded in {load_seconds:.1f}s; writing to {path}")


def epoch_line(args, epoch, r, test_loss, acc, lr, is_best, left, first):
    """The epoch's line; r: train.py's Epoch; left: the seconds the run has to go (None: the last epoch);
    first: the run's first epoch, whose first step holds a compilation."""
    return (f"epoch {epoch:3d}/{args.epochs} | train loss {loss_text(r.loss)} acc {r.acc:6.2f}% | test loss "
            f"{loss_text(test_loss)} acc {acc:6.2f}% | lr {lr:.4f} | {r.seconds:.1f}s {speed(r, args, first)}"
            f"{' | best' if is_best else ''}{f' | {duration(left)} left' if left is not None else ''}")


def speed(r, args, first):
    """Images a second of an epoch; that of the first step apart, where it compiled."""
    if not (args.compile and first) or r.images <= args.batch_size:
        return f"{r.images / r.seconds:.0f} img/s"
    rate = (r.images - min(args.batch_size, r.images)) / max(r.seconds - r.first_step, 1e-9)
    return f"{rate:.0f} img/s after a {r.first_step:.1f}s first step (compilation)"


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
    return (f"note: {cli.plural(steps, 'step')} per epoch, {steps * epochs} in all: too few to learn much. "
            f"--batch-size {batch} makes {n // batch} per epoch, {n // batch * epochs} in all")


def loss_text(loss):
    """'1.234', or '2.42e+07' for a loss thrown off course (a few steps at a steep lr): its size at a glance."""
    return f"{loss:.3f}" if abs(loss) < 1000 else f"{loss:.3g}"


def duration(seconds):
    """'45s', '12 min' or '3.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


class StepLog:
    """What the terminal shows during an epoch: a tqdm bar, or without a terminal (CI, a log
    file) a plain line at each log point. Silent in every process of a torchrun job but the first."""

    def __init__(self, total, desc, enabled=True, initial=0):
        from tqdm import tqdm
        self.tty, self.enabled = sys.stdout is not None and sys.stdout.isatty(), enabled  # None: `>&-`
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
