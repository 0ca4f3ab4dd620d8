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
epoch whose other files are missing. On resume, what an interrupted run logged after its
last.pth is cut away, so every epoch and step appears once.
"""
import contextlib
import os
import queue
import re
import shutil
import socket
import sys
import threading
import warnings
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


class TrainingError(Exception):
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
    return f"{len(classes)} classes ({cli.first_few(classes)})"


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
        raise resnet.CheckpointError(f"{checkpoint}: no such checkpoint; train first (make train), "
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
    """What last.pth adds to a checkpoint, from train.py's Training t; RunFolder.restore puts it back."""
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
        self.resumed_from = None  # the checkpoint load() read
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
                                "or choose another --out-dir (RUN_DIR=)") from None
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

    def resume_path(self, resume):
        """The checkpoint --resume names: PATH, or '' for last.pth here."""
        return Path(resume) if resume else self.path / "last.pth"

    def resume(self, args, recipe, parser, given=None):
        """The saved state that --resume (args.resume) continues from, or None to start afresh.
        The run keeps its recipe: args' values of the names in `recipe` become the saved ones, and
        a note names each of those the command line gave (`given`; None: those not at their default)
        that the run does not take. parser: train.py's, for its defaults, and to check the saved
        values as it checks its flags."""
        defaults = parser.parse_args([])
        if args.resume is None:
            if self.holds_a_run():
                raise resnet.CheckpointError(f"{self.path} already holds a run: continue it with --resume, "
                                             "or choose another --out-dir (RUN_DIR=)")
            return None
        path = self.resume_path(args.resume)
        if path.parent.resolve() != self.path.resolve() and self.holds_a_run():
            raise resnet.CheckpointError(f"{self.path} already holds another run; {path} goes on in its own "
                                         "folder: leave out --out-dir, or choose an empty one")
        state = self.load(args.resume)
        if state is None and self.holds_a_run():
            done = max(self.saved_epochs() + self.logged_epochs(), default=0)
            if done > 1:  # last.pth deleted: starting afresh would write over the run's epochs
                fallback = next(self.good_epoch_checkpoints(self.path), None)
                raise resnet.CheckpointError(f"{path} is missing, but {self.path} holds a run: " + (
                    f"resume from its newest good epoch with --resume {fallback}" if fallback else
                    "none of its epochs' checkpoints loads either; start afresh in another --out-dir"))
            # Stopped while epoch 1's files were written, before its last.pth: only that epoch is lost.
            self.say(f"note: {path} was never written, the run stopped while it saved epoch 1; "
                     "starting the run from the beginning")
            return None
        if state is None:
            self.say(f"note: {path} does not exist yet; starting the run from the beginning")
            return None
        later = [e for e in self.saved_epochs() if e > state["epoch"]]
        if later:  # resuming from an earlier net_XXX.pth or best.pth: asked for, but say what it costs
            self.say(f"note: {self.path} holds epochs up to {max(later)}; epochs {state['epoch'] + 1} to "
                     f"{max(later)} are trained again and their files replaced")
        for key in recipe:
            saved = state["args"].get(key, getattr(defaults, key))
            why = cli.refused(parser, key, saved, getattr(defaults, key))
            if why:
                raise resnet.CheckpointError(f"{path}: its recipe's --{key.replace('_', '-')} is not what train.py "
                                             f"takes ({why}): edited by hand, or saved by other code")
            was_given = getattr(args, key) != getattr(defaults, key) if given is None else key in given
            if was_given and getattr(args, key) != saved:
                self.say(f"note: ignoring --{key.replace('_', '-')} {getattr(args, key)}; the run keeps its own "
                         f"({saved})")
            setattr(args, key, saved)
        where = (f"in epoch {state['epoch'] + 1} of {args.epochs}, after its step {state['step']}" if state.get("step")
                 else f"after epoch {state['epoch']} of {args.epochs}")
        self.say(f"resuming {path} {where}"
                 + ("" if "optimizer" in state else " (weights only: the optimizer's momentum starts afresh)"))
        return state

    def saved_epochs(self):
        """The epochs whose checkpoints (net_XXX.pth) this folder holds."""
        return [epoch for epoch, _ in epoch_checkpoints(self.path)]

    def logged_epochs(self):
        """The epochs acc.txt here logs: a run's record, even where its checkpoints were deleted."""
        try:
            lines = (self.path / "acc.txt").read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [int(m.group(1)) for m in (re.fullmatch(ACC_LINE, line) for line in lines) if m]

    def holds_a_run(self):
        return bool(self.saved_epochs() or self.logged_epochs()) or any(
            (self.path / f).exists() for f in ("last.pth", "best.pth"))

    def restore(self, t, state, steps_per_epoch, classes):
        """Put a saved state back into train.py's Training t, whose network was built for
        `classes`, the data's; returns where to start."""
        path = self.resumed_from
        try:
            saved = list(state.get("classes", classes))
            if saved != list(classes):  # a folder dataset whose class folders changed since
                raise resnet.CheckpointError(f"{path}: the run trained on {named(saved)} and the data now has "
                                             f"{named(classes)}: resume with the data it trained on, or start a "
                                             "new run in another --out-dir")
            if state.get("step", 0) >= steps_per_epoch:  # a folder dataset that lost pictures since
                raise resnet.CheckpointError(f"{path}: the run stopped after step {state['step']} of epoch "
                                             f"{state['epoch'] + 1} and an epoch of the data now has {steps_per_epoch} "
                                             "steps: resume with the data it trained on, or start a new run in "
                                             "another --out-dir")
            start = self._restore(t, state, steps_per_epoch)
            # Numbers the run goes on with: one of another type would fail only where an epoch is logged.
            if not (resnet.is_number(start.best[0]) and resnet.is_whole(start.best[1])):
                raise TypeError(f"best_accuracy and best_epoch {start.best!r} are not a number and an epoch")
            if start.totals is not None and not (isinstance(start.totals, (list, tuple)) and len(start.totals) == 3
                                                 and all(map(resnet.is_number, start.totals))):
                raise TypeError(f"totals {start.totals!r} are not the epoch's three running sums")
            return start
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:  # edited, or saved by other code
            detail = " ".join(str(e).split())
            raise resnet.CheckpointError(f"{path}: its training state does not load into this run "
                                         f"({type(e).__name__}: {detail[:200]})") from None

    def _restore(self, t, state, steps_per_epoch):
        t.model.load_state_dict(state.get("training_model", state["model"]))  # "model" holds the EMA, if any
        if t.ema is not None:
            t.ema.model.load_state_dict(state["model"])
            t.ema.updates = state.get("ema_updates", 0)
        epoch = state["epoch"]
        if "optimizer" in state:
            # The saved state would bring back the kernel choice too: this run's --fused decides it.
            kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in t.optimizer.param_groups]
            t.optimizer.load_state_dict(state["optimizer"])
            for group, chosen in zip(t.optimizer.param_groups, kernels):
                group.update(chosen)
            t.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                t.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng_cpu"])
        else:  # weights only (net_XXX.pth): the schedule picks up where that epoch ended
            t.scheduler.last_epoch = epoch * steps_per_epoch - 1
            with warnings.catch_warnings():  # "scheduler stepped before optimizer": on purpose here
                warnings.simplefilter("ignore", UserWarning)
                t.scheduler.step()
        return Start(epoch, state.get("step", 0), state.get("totals"), self.best_until(state))

    def best_until(self, state):
        """(best accuracy, its epoch) up to a saved state. Every checkpoint carries them; for one
        written before they did, best.pth here says it, if it is not from a later epoch."""
        if "best_accuracy" in state:
            return state["best_accuracy"], state["best_epoch"]
        best = (state.get("accuracy") or 0.0, state["epoch"] if state.get("accuracy") is not None else 0)
        try:
            kept = resnet.load_checkpoint(self.path / "best.pth")
        except resnet.CheckpointError:
            return best
        if kept.get("epoch", state["epoch"] + 1) <= state["epoch"] and (kept.get("accuracy") or 0.0) > best[0]:
            return kept["accuracy"], kept["epoch"]
        return best

    def where_data_was(self, data_dir):
        """For an error on resume: the data folder noted beside the checkpoint resumed from, where
        that is not data_dir."""
        noted = remembered_data_dir(self.resumed_from)
        if noted is None or Path(noted) == Path(data_dir).resolve():
            return ""
        return f"; this run trained on the data in {noted}: pass --data-dir {noted} (DATA_DIR= with make)"

    def begin(self, data_dir, start, steps_per_epoch):
        """Make the folder ready to write from `start` on: note the data folder, and cut the
        logs back to what the run had then."""
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            write_text(self.path / "data_dir.txt", str(Path(data_dir).resolve()) + "\n")
            self.repair(start.epoch, start.epoch * steps_per_epoch + start.step, start.best)
            if self.resumed_from is not None:
                self.roll_back_best(start.epoch, start.best)

    def say(self, line):
        if self.is_main:
            print(line, flush=True)

    def load(self, resume):
        """The checkpoint to continue from (None: nothing saved yet, so start afresh)."""
        path = self.resume_path(resume)
        if not resume and not path.exists():
            return None
        try:
            state = resnet.load_checkpoint(path)
        except resnet.CheckpointError as e:
            fallback = next(self.good_epoch_checkpoints(path.parent), None)
            hint = f"; resume from the newest good epoch instead: --resume {fallback}" if fallback else ""
            raise resnet.CheckpointError(f"{e}{hint}") from None
        whole = all(resnet.is_whole(state.get(k, 0)) and state.get(k, 0) >= 0 for k in ("epoch", "step"))
        weights_alone = not {"args", "epoch", "model"} <= set(state)  # the tutorials' files, say
        if weights_alone or not isinstance(state["args"], dict) or not whole:
            why = " (weights alone hold no run to go on with)" if weights_alone else ""
            raise resnet.CheckpointError(f"{path}: not a checkpoint of train.py{why}; --resume needs the last.pth "
                                         "or net_XXX.pth of a run of train.py")
        self.resumed_from = path
        return state

    @staticmethod
    def good_epoch_checkpoints(folder):
        """net_XXX.pth files of a run that load, newest first."""
        for _, path in reversed(epoch_checkpoints(folder)):
            try:
                resnet.load_checkpoint(path)
                yield path
            except resnet.CheckpointError:
                continue

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
