"""The run folder: everything a training run writes, and how it picks up again after a stop or a kill.

Into RUN_DIR (train.py's --out-dir, default runs/<model>):
    log.txt       every --log-every steps: `001 00100 | Loss: 1.234 | Acc: 56.789%`
    acc.txt       every epoch: `EPOCH=001, Accuracy= 85.123%`
    best_acc.txt  when the best improves: `EPOCH=12, best_acc=93.210%`
    metrics.csv   every epoch: epoch, train/test loss and accuracy, lr, seconds, img/s
    net_001.pth   every epoch, in resnet.checkpoint's format; best.pth, the best of them
    last.pth      every epoch, plus the training state: where --resume starts from
    data_dir.txt  where this machine keeps the run's data, for test.py and export.py
                  (the checkpoints, which may be shared, keep no absolute paths)
    .lock         held while a train.py writes here: a second one on the folder stops at once

Every file is replaced atomically (written aside, flushed, renamed), so a kill at any moment
leaves the old file or the new one. Checkpoints are written by a thread of their own while
training goes on, each epoch's files in order and last.pth last: last.pth never names an
epoch whose other files are missing. On resume (resume.py decides from where), what an
interrupted run logged after its last.pth is cut away, so every epoch and step appears once.
"""
import contextlib
import os
import queue
import re
import shutil
import socket
import threading
from pathlib import Path
from typing import NamedTuple, Optional

import torch

import cli
import resnet

METRICS = "epoch,train_loss,train_acc,test_loss,test_acc,lr,epoch_seconds,img_s"
# Each log's lines, with the number (epoch or step) that says which part of the run wrote them.
LOG_LINE = r"\d{3,} (\d{5,}) \| Loss: \S+ \| Acc: \S+%"
ACC_LINE = r"EPOCH=(\d+), Accuracy= *\S+%"
METRICS_LINE = r"(\d+)(,[^,]+){7}"


class TrainingError(cli.UserError):
    """Training that cannot go on; the message is one line for the user."""


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary path beside `path`; once the block has written it without an
    error, it is flushed to disk and renamed to `path`. Otherwise it is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _sync_folder(folder):
    """Flush a folder's entries to disk, so a rename in it survives a power cut. POSIX only
    (Windows has no such call), and best effort: some network file systems refuse it."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def named(classes):
    """'3 classes (cat, dog, ship)', the first five named."""
    return f"{len(classes)} classes ({cli.first_few(list(classes))})"


def save_checkpoint(ckpt, path):
    try:
        with atomic_write(path) as tmp:
            torch.save(ckpt, tmp)
    except OSError as e:  # a full disk, a quota, a vanished mount
        raise TrainingError(f"cannot write {path} ({e.strerror or e}); the previous "
                            f"{Path(path).name}, if any, is intact") from None
    except RuntimeError as e:  # torch.save's zip writer says a full disk as "unexpected pos ..."
        raise TrainingError(f"cannot write {path} ({' '.join(str(e).split())}: is the disk full?); the previous "
                            f"{Path(path).name}, if any, is intact") from None


def write_text(path, text):
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def append_line(path, line):
    with open(path, "a") as f:
        f.write(line + "\n")


def on_cpu(obj):
    """A copy of a (nested) state dict with every tensor on the CPU: what a checkpoint
    holds, taken now, so that training can change the originals meanwhile."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def shareable_args(args):
    """The arguments, with paths that would reveal this machine's layout (absolute, or
    outside the working directory) cut to their last part. The environment, which may
    hold secrets, is never stored."""
    out = dict(vars(args))
    for key in ("data_dir", "out_dir", "resume"):
        value = out.get(key)
        if value and (os.path.isabs(value) or os.path.relpath(value).startswith("..")):
            out[key] = os.path.basename(os.path.normpath(value))
    return out


def trained(checkpoint):
    """checkpoint, if a file or folder is there; else a CheckpointError that says how to make one."""
    if not os.path.exists(checkpoint):
        raise resnet.CheckpointError(f"{checkpoint}: no such checkpoint; train first (python train.py), "
                                     "or pass --checkpoint")
    return checkpoint


def epoch_checkpoints(folder):
    """(epoch, path) of each net_XXX.pth in folder, oldest first: net_1000.pth after net_999.pth."""
    return sorted((int(p.stem[4:]), p) for p in Path(folder).glob("net_*.pth") if p.stem[4:].isdigit())


def remembered_data_dir(checkpoint):
    """The data folder noted in the run folder a checkpoint sits in, or None."""
    note = Path(checkpoint).parent / "data_dir.txt"
    try:
        return note.read_text().strip() or None
    except OSError:
        return None


class Start(NamedTuple):
    """Where training starts: after `epoch` and `step` of the next one, with that epoch's
    running sums so far, and the best (accuracy, epoch) up to there."""
    epoch: int = 0
    step: int = 0
    totals: Optional[list] = None
    best: tuple = (0.0, 0)


def training_state(t):
    """What last.pth adds to a checkpoint, from train.py's Training t; resume.restore puts it back."""
    state = {"optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
             "scaler": t.scaler.state_dict(), "rng_cpu": torch.get_rng_state()}
    if t.ema is not None:  # the checkpoint's "model" holds the average; training goes on from these
        state.update(training_model=resnet.clean_state_dict(t.model.state_dict()), ema_updates=t.ema.updates)
    return state


class Writer:
    """Writes files on a thread of its own, in the order they are handed over. A failure
    stops the writing and is raised in the training thread at its next call."""

    def __init__(self, pending=2):
        self.jobs = queue.Queue(maxsize=pending)  # a bound, so snapshots never pile up in memory
        self.error = None
        self.thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def put(self, work):
        self._raise()
        self.jobs.put(work)

    def close(self, raise_error=True):
        """Wait until everything handed over is written."""
        self.jobs.put(None)
        self.thread.join()
        if raise_error:
            self._raise()

    def _raise(self):
        if self.error is not None:
            raise self.error

    def _work(self):
        for work in iter(self.jobs.get, None):
            if self.error is None:
                try:
                    work()
                except Exception as e:  # noqa: BLE001  handed to the training thread
                    self.error = e if isinstance(e, TrainingError) else TrainingError(f"writing the run: {e}")


class RunFolder:
    """One run's folder. Only the main process of a torchrun job writes (is_main). Inside
    `with`, the folder is held for this run alone."""

    def __init__(self, path, is_main=True):
        self.path, self.is_main = Path(path), is_main
        if self.path.exists() and not self.path.is_dir():  # found now, not after the data has loaded
            raise TrainingError(f"{self.path} is a file; --out-dir names the run's folder")
        self.writer = Writer() if is_main else None
        self.lock, self.made = None, []

    def __enter__(self):
        if self.is_main:
            self._hold()
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.writer is not None:  # a finished epoch is written even when the next one fails
                self.writer.close(raise_error=exc_type is None)
        finally:
            self._release()

    def _hold(self):
        """Lock the folder (.lock in it), so that a second train.py on it, from a second terminal
        or a job sent twice, stops at once instead of writing into the same logs and checkpoints.
        POSIX; where the file system has no locks, the run goes on without one."""
        try:
            import fcntl
        except ImportError:  # Windows
            return
        self.made = [p for p in (self.path, *self.path.parents) if not p.exists()]
        cli.make_folder(self.path, TrainingError)  # a read-only disk, a file where a folder should be on the way
        try:
            lock = open(self.path / ".lock", "a+", encoding="utf-8")
        except OSError as e:
            raise TrainingError(f"{self.path}: cannot write in the run's folder ({e.strerror or e})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            self.made = []
            raise TrainingError(f"{self.path} is in use by {holder}: let it finish (or stop it), "
                                "or choose another --out-dir") from None
        except OSError:
            lock.close()
            return
        lock.seek(0)
        lock.truncate()
        lock.write(f"train.py, process {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        self.lock = lock

    def _release(self):
        """Unlock; a folder this run made and wrote nothing into (its data failed to load, say)
        is removed again."""
        if self.made and {p.name for p in self.path.iterdir()} <= {".lock"}:
            (self.path / ".lock").unlink(missing_ok=True)
            for folder in self.made:
                with contextlib.suppress(OSError):  # not empty: something else lives there now
                    folder.rmdir()
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def begin(self, data_dir, start, steps_per_epoch):
        """Make the folder ready to write from `start` on: note the data folder, and cut the
        logs back to what the run had then."""
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            write_text(self.path / "data_dir.txt", str(Path(data_dir).resolve()) + "\n")
            self.repair(start.epoch, start.epoch * steps_per_epoch + start.step, start.best)
            self.roll_back_best(start.epoch, start.best)

    def say(self, line):
        """Print line (None: nothing) in the main process."""
        if self.is_main and line is not None:
            print(line, flush=True)

    def repair(self, epoch, iteration, best):
        """Cut the logs back to what a run had when it saved epoch `epoch` (and step
        `iteration` of the whole run): lines written after it, and half a line from a
        kill mid-write, go. best: (accuracy, epoch) so far, for best_acc.txt."""
        self._keep(self.path / "log.txt", LOG_LINE, iteration)
        self._keep(self.path / "acc.txt", ACC_LINE, epoch)
        self._keep(self.path / "metrics.csv", METRICS_LINE, epoch, header=METRICS)
        if best[1]:
            self.write_best(*best)

    def roll_back_best(self, epoch, best):
        """best.pth of an epoch after `epoch`, which is trained again (a resume from an earlier
        checkpoint, or a kill between best.pth and last.pth), goes back to the best epoch up to
        `epoch`, best: (accuracy, epoch), whose net_XXX.pth holds the same; best_acc.txt says it."""
        path = self.path / "best.pth"
        try:
            kept = resnet.load_checkpoint(path).get("epoch", 0)
        except resnet.CheckpointError:  # none: the next epoch writes it
            return
        source = self.path / f"net_{best[1]:03d}.pth"
        if isinstance(kept, int) and kept > epoch and best[1] and source.is_file():
            with atomic_write(path) as tmp:
                shutil.copyfile(source, tmp)
            self.say(f"note: best.pth held epoch {kept}, which is trained again; it holds epoch {best[1]} again, the "
                     f"best up to epoch {epoch}")

    @staticmethod
    def _keep(path, pattern, last, header=None):
        def keep(line):
            match = re.fullmatch(pattern, line)
            return line == header or (match is not None and int(match.group(1)) <= last)

        if path.exists():
            lines = path.read_text().splitlines()
            kept = [ln for ln in lines if keep(ln)]
            if kept != lines:
                write_text(path, "".join(ln + "\n" for ln in kept))

    def write_best(self, accuracy, epoch):
        write_text(self.path / "best_acc.txt", f"EPOCH={epoch}, best_acc={accuracy:.3f}%\n")

    def log_step(self, epoch, iteration, loss, acc):
        if self.is_main:
            append_line(self.path / "log.txt", f"{epoch:03d} {iteration:05d} | Loss: {loss:.3f} | Acc: {acc:.3f}%")

    def save_epoch(self, checkpoint, t, is_best, metrics):
        """Hand a finished epoch to the writer: net_XXX.pth, best.pth and best_acc.txt if it
        is the best, acc.txt, metrics.csv, then last.pth (the checkpoint plus the training
        state of train.py's Training t), the commit point of --resume. checkpoint() builds the
        epoch's checkpoint; it and the training state are built and their tensors copied now,
        in the process that saves and only there, and the files written meanwhile."""
        if not self.is_main:
            return
        ckpt, state = on_cpu(checkpoint()), on_cpu(training_state(t))
        epoch, acc = ckpt["epoch"], ckpt["accuracy"]

        def write():
            save_checkpoint(ckpt, self.path / f"net_{epoch:03d}.pth")
            if is_best:
                save_checkpoint(ckpt, self.path / "best.pth")
                self.write_best(acc, epoch)
            append_line(self.path / "acc.txt", f"EPOCH={epoch:03d}, Accuracy= {acc:.3f}%")
            with open(self.path / "metrics.csv", "a") as f:
                f.write(("" if f.tell() else METRICS + "\n") + ",".join(metrics) + "\n")
            save_checkpoint({**ckpt, **state}, self.path / "last.pth")

        self.writer.put(write)

    def save_stopped(self, checkpoint, t, step, totals):
        """last.pth of a run stopped mid-epoch after `step` steps, with that epoch's running sums."""
        if self.is_main:
            state = on_cpu({**checkpoint(), **training_state(t), "step": step, "totals": totals})
            self.writer.put(lambda: save_checkpoint(state, self.path / "last.pth"))


def metrics_row(epoch, r, test_loss, acc, lr):
    """metrics.csv's row of an epoch (METRICS names its columns)."""
    return [str(epoch), f"{r.loss:.4f}", f"{r.acc:.3f}", f"{test_loss:.4f}", f"{acc:.3f}", f"{lr:.6g}",
            f"{r.seconds:.2f}", f"{r.images / r.seconds:.1f}"]


