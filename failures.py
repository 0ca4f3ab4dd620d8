"""Why a run stopped midway, in one line: the failures a user can mend by a flag.

    cli.main(lambda: train.main(args).code, explain=lambda e: failures.explain(e, args.fused, saved))

A loss that is no longer finite, the device out of memory, torch.compile or SGD's fused kernel
missing on this device: the training loop just raises, and the line that says what to do is
made here, once, for cli.main to print: explain() for train.py and bench.py, out_of_memory()
for test.py and predict.py. Any other error is a bug and keeps its traceback.
"""
import traceback

import torch

import device
import rundir


class LossNotFinite(rundir.TrainingError):
    """The loss became NaN or infinite at a step of an epoch; nothing of that epoch was saved."""

    def __init__(self, nan, epoch, step, steps, start_step):
        kept = (f"last.pth still holds it up to step {start_step}" if start_step else
                f"last.pth still holds epoch {epoch - 1}" if epoch > 1 else "no epoch had finished")
        super().__init__(f"the loss became {'NaN' if nan else 'infinite'} at epoch {epoch}, step {step} of {steps}; "
                         f"nothing of epoch {epoch} {f'after step {start_step} ' if start_step else ''}was saved "
                         f"({kept}). Lower --lr, or try --amp off")


def explain(error, fused=False, saved=False):
    """One line for a failure of training that the command line can mend, or None. fused: --fused
    was given; saved: the run's last.pth is there, so it goes on with --resume. torch.compile's
    own error may run to pages (a C++ compiler's output): its first sentence is enough."""
    if not isinstance(error, (RuntimeError, NotImplementedError)):
        return None
    again, oom = f"run again {'--resume ' if saved else ''}with", device.out_of_memory(error)
    if oom and any(frame.f_code.co_name == "evaluate" for frame, _ in traceback.walk_tb(error.__traceback__)):
        return f"out of memory in evaluation: {oom}; {again} a smaller --eval-batch-size"
    if oom:  # a smaller batch is a new run: --resume keeps the run's batch size
        return out_of_memory(error)
    if isinstance(error, torch._dynamo.exc.TorchDynamoException):
        return f"torch.compile failed: {cause(error)}; {again}out --compile"
    if fused and "fused" in str(error):
        return f"SGD's fused kernel failed: {cause(error)}; {again}out --fused"
    return None


def out_of_memory(error):
    """test.py's and predict.py's: one line for the device out of memory, or None."""
    oom = device.out_of_memory(error) if isinstance(error, RuntimeError) else None
    return oom and f"out of memory: {oom}; run again with a smaller --batch-size"


def cause(error):
    """The first sentence of an error's first line (torch.compile's lines "backend=..." left out)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and not ln.startswith("backend=")]
    return lines[0].split(". ")[0] if lines else type(error).__name__
