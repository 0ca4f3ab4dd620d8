"""--resume as a plan: what a run goes on from, decided in one place before anything is built.

    plan = resume.plan(folder, args, train.RECIPE, train.get_args_parser(), given)
    print("\\n".join(plan.notes))                       # what it does, and the flags it will not take
    args = argparse.Namespace(**{**vars(args), **plan.recipe})
    start = resume.restore(t, plan, steps_per_epoch, classes, folder)   # once the model is built

A run keeps its recipe (train.RECIPE: the schedule, the model, the data, how each epoch is
scored, the precision), whatever the command line says; where the data is and how the steps
run (--data-dir, --device, --compile, ...) are taken from the command line. The checkpoint is
last.pth, a net_XXX.pth or best.pth of the run's folder (rundir.py says what each holds).
"""
import os
import re
import shlex
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

import cli
import resnet
import rundir


class Plan(NamedTuple):
    """What --resume does: the checkpoint to load (None: start afresh) and its contents, the
    recipe the run keeps, and a line for each thing a user should know (a flag not taken, say)."""
    checkpoint: Optional[Path] = None
    state: Optional[dict] = None
    recipe: dict = {}
    notes: tuple = ()

    @property
    def epoch(self):
        """The epochs done; the run goes on after `step` steps of the next."""
        return self.state["epoch"] if self.state else 0

    @property
    def step(self):
        return self.state.get("step", 0) if self.state else 0


def plan(folder, args, recipe, parser, given=None):
    """The plan for args.resume (None: a new run) in the run folder `folder` (a Path). recipe: the
    settings a run keeps; given: those the command line gave (None: those not at their default);
    parser: train.py's, for its defaults, and to check the saved values as it checks its flags."""
    defaults, given_recipe = vars(parser.parse_args([])), {key: getattr(args, key) for key in recipe}
    if args.resume is None:
        if holds_a_run(folder):
            raise resnet.CheckpointError(f"{folder} already holds a run: continue it with --resume, "
                                         "or choose another --out-dir")
        return Plan(recipe=given_recipe)
    path = Path(args.resume) if args.resume else folder / "last.pth"
    if path.parent.resolve() != folder.resolve() and holds_a_run(folder):
        raise resnet.CheckpointError(f"{folder} already holds another run; {path} goes on in its own "
                                     "folder: leave out --out-dir, or choose an empty one")
    state = load(path) if args.resume or path.exists() else None
    if state is None:  # nothing saved yet
        return Plan(recipe=given_recipe, notes=(afresh(folder, path),))
    later = [e for e in saved_epochs(folder) if e > state["epoch"]]
    notes = [f"note: {folder} holds epochs up to {max(later)}; epochs {state['epoch'] + 1} to {max(later)} "
             "are trained again and their files replaced"] if later else []
    kept = {}
    for key in recipe:
        saved, flag = state["args"].get(key, defaults[key]), "--" + key.replace("_", "-")
        why = cli.refused(parser, key, saved, defaults[key])
        if why:
            raise resnet.CheckpointError(f"{path}: its recipe's {flag} is not what train.py takes ({why}): "
                                         "edited by hand, or saved by other code")
        if (key in given if given is not None else getattr(args, key) != defaults[key]) and getattr(args, key) != saved:
            notes.append(f"note: ignoring {flag} {getattr(args, key)}; the run keeps its own ({saved})")
        kept[key] = saved
    where = (f"in epoch {state['epoch'] + 1} of {kept['epochs']}, after its step {state['step']}" if state.get("step")
             else f"after epoch {state['epoch']} of {kept['epochs']}")
    notes.append(f"resuming {path} {where}"
                 + ("" if "optimizer" in state else " (weights only: the optimizer's momentum starts afresh)"))
    return Plan(path, state, kept, tuple(notes))


def run_folder(args):
    """Where the run lives: --out-dir; or --resume PATH's folder, which the run goes on in; or runs/<model>."""
    return Path(args.out_dir or (Path(args.resume).parent if args.resume else f"runs/{args.model}"))


def command(checkpoint, args, parser):
    """The command that continues a run from checkpoint, ready to paste: under torchrun as this job
    was, with the flags given that --resume does not keep (it keeps the recipe, not where the data
    is nor how the steps run), so the run goes on as it went. parser: train.py's, for its defaults."""
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    launcher = (["python"] if world == 1 else ["torchrun", "--standalone", f"--nproc_per_node={local}"]
                if world == local else ["torchrun", "..."])  # several machines: the job's own torchrun flags
    words = [*launcher, "train.py", "--resume", str(checkpoint)]
    for key in ("data_dir", "device", "channels_last", "compile", "fused", "eval_batch_size", "log_every"):
        value = getattr(args, key)
        if value != parser.get_default(key):
            words += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return shlex.join(words)


def after_a_stop(last, args, parser):
    """After Ctrl-C or a reader gone: what the run saved before it is all there is."""
    if not Path(last).is_file():
        return "nothing of the run was saved yet"
    return f"continue from its last save with: {command(last, args, parser)}"


def afresh(folder, path):
    """The note for a --resume with nothing to go on from; a CheckpointError where starting afresh
    would write over a run's epochs (its last.pth deleted)."""
    if not holds_a_run(folder):
        return f"note: {path} does not exist yet; starting the run from the beginning"
    if max(saved_epochs(folder) + logged_epochs(folder), default=0) > 1:
        fallback = next(good_epoch_checkpoints(folder), None)
        raise resnet.CheckpointError(f"{path} is missing, but {folder} holds a run: " + (
            f"resume from its newest good epoch with --resume {fallback}" if fallback else
            "none of its epochs' checkpoints loads either; start afresh in another --out-dir"))
    # Stopped while epoch 1's files were written, before its last.pth: only that epoch is lost.
    return f"note: {path} was never written, the run stopped while it saved epoch 1; starting the run afresh"


def restore(t, plan, steps_per_epoch, classes, folder):
    """Put the plan's saved state back into train.py's Training t, whose network was built for
    `classes`, the data's; returns where to start (a rundir.Start)."""
    state, path = plan.state, plan.checkpoint
    try:
        if list(state.get("classes", classes)) != list(classes):  # a folder dataset whose class folders changed
            raise resnet.CheckpointError(f"{path}: the run trained on {rundir.named(state['classes'])} and the data "
                                         f"now has {rundir.named(classes)}: resume with the data it trained on, or "
                                         "start a new run in another --out-dir")
        if plan.step >= steps_per_epoch:  # a folder dataset that lost pictures since
            raise resnet.CheckpointError(f"{path}: the run stopped after step {plan.step} of epoch {plan.epoch + 1} "
                                         f"and an epoch of the data now has {steps_per_epoch} steps: resume with the "
                                         "data it trained on, or start a new run in another --out-dir")
        t.model.load_state_dict(state.get("training_model", state["model"]))  # "model" holds the EMA, if any
        if t.ema is not None:
            t.ema.model.load_state_dict(state["model"])
            t.ema.updates = state.get("ema_updates", 0)
        if "optimizer" in state:
            restore_optimizer(t, state)
        else:  # weights only (net_XXX.pth): the schedule picks up where that epoch ended
            t.scheduler.last_epoch = plan.epoch * steps_per_epoch - 1
            with warnings.catch_warnings():  # "scheduler stepped before optimizer": on purpose here
                warnings.simplefilter("ignore", UserWarning)
                t.scheduler.step()
        return checked(rundir.Start(plan.epoch, plan.step, state.get("totals"), best_until(state, folder)))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:  # edited, or saved by other code
        raise resnet.CheckpointError(f"{path}: its training state does not load into this run "
                                     f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def restore_optimizer(t, state):
    # The saved state would bring back the kernel choice too: this run's --fused decides it.
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in t.optimizer.param_groups]
    t.optimizer.load_state_dict(state["optimizer"])
    for group, chosen in zip(t.optimizer.param_groups, kernels):
        group.update(chosen)
    t.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])


def checked(start):
    """start, whose numbers the run goes on with: one of another type would fail only where an epoch is logged."""
    if not (resnet.is_number(start.best[0]) and resnet.is_whole(start.best[1])):
        raise TypeError(f"best_accuracy and best_epoch {start.best!r} are not a number and an epoch")
    if start.totals is not None and not (isinstance(start.totals, (list, tuple)) and len(start.totals) == 3
                                         and all(map(resnet.is_number, start.totals))):
        raise TypeError(f"totals {start.totals!r} are not the epoch's three running sums")
    return start


def best_until(state, folder):
    """(best accuracy, its epoch) up to a saved state. Every checkpoint carries them; for one
    written before they did, best.pth in folder says it, if it is not from a later epoch."""
    if "best_accuracy" in state:
        return state["best_accuracy"], state["best_epoch"]
    best = (state.get("accuracy") or 0.0, state["epoch"] if state.get("accuracy") is not None else 0)
    try:
        kept = resnet.load_checkpoint(Path(folder) / "best.pth")
    except resnet.CheckpointError:
        return best
    if kept.get("epoch", state["epoch"] + 1) <= state["epoch"] and (kept.get("accuracy") or 0.0) > best[0]:
        return kept["accuracy"], kept["epoch"]
    return best


def load(path):
    """The checkpoint of a run of train.py at path, checked to be one."""
    path = Path(path)
    try:
        state = resnet.load_checkpoint(path)
    except resnet.CheckpointError as e:
        fallback = next(good_epoch_checkpoints(path.parent), None)
        hint = f"; resume from the newest good epoch instead: --resume {fallback}" if fallback else ""
        raise resnet.CheckpointError(f"{e}{hint}") from None
    whole = all(resnet.is_whole(state.get(k, 0)) and state.get(k, 0) >= 0 for k in ("epoch", "step"))
    weights_alone = not {"args", "epoch", "model"} <= set(state)  # the tutorials' files, say
    if weights_alone or not isinstance(state["args"], dict) or not whole:
        why = " (weights alone hold no run to go on with)" if weights_alone else ""
        raise resnet.CheckpointError(f"{path}: not a checkpoint of train.py{why}; --resume needs the last.pth "
                                     "or net_XXX.pth of a run of train.py")
    return state


def good_epoch_checkpoints(folder):
    """net_XXX.pth files of a run that load, newest first."""
    for _, path in reversed(rundir.epoch_checkpoints(folder)):
        try:
            resnet.load_checkpoint(path)
            yield path
        except resnet.CheckpointError:
            continue


def saved_epochs(folder):
    """The epochs whose checkpoints (net_XXX.pth) folder holds."""
    return [epoch for epoch, _ in rundir.epoch_checkpoints(folder)]


def logged_epochs(folder):
    """The epochs acc.txt in folder logs: a run's record, even where its checkpoints were deleted."""
    try:
        lines = (Path(folder) / "acc.txt").read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [int(m.group(1)) for m in (re.fullmatch(rundir.ACC_LINE, line) for line in lines) if m]


def holds_a_run(folder):
    return bool(saved_epochs(folder) or logged_epochs(folder)) or any(
        (Path(folder) / f).exists() for f in ("last.pth", "best.pth"))


def where_data_was(plan, data_dir):
    """For an error on resume: the data folder noted beside the checkpoint resumed from, where
    that is not data_dir."""
    noted = rundir.remembered_data_dir(plan.checkpoint) if plan.checkpoint else None
    if noted is None or Path(noted) == Path(data_dir).resolve():
        return ""
    return f"; this run trained on the data in {noted}: pass --data-dir {noted}"
