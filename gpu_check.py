"""The GPU check: the project's speed and accuracy on one CUDA GPU, next to airbench94, in one run.

    # beforehand, where the shared files are: the JPEG CIFAR-10 and the yardstick, into the checkout
    mkdir -p .gpu-data && cp ../shared/datasets/{cifar10-jpeg.tar.gz,cifar10_jpeg_to_batches.py} \\
        ../shared/yardsticks/{airbench94.py,cifar_batches_to_pt.py} .gpu-data/
    make gpu-check OUT=results                # on the GPU machine: about 9 minutes at most
    python3 gpu_check.py results --device cpu --batches 8 ...   # the same steps, tiny (tests/test_gpu_check.py)

In this order, each step as a user types it (make, with VIRTUAL_ENV set to this Python's
prefix, so nothing is installed; without make, the command the Makefile runs): the
environment (GPU, torch, CUDA); `make bench` for ResNet18 at each of --batches, eager,
then compiled in --compile's mode (reduce-overhead captures CUDA graphs; bench.py reports
the compilation apart, as train_warmup_s and eval_warmup_s); the data (the JPEG CIFAR-10
in --data rebuilt in the official layout, unless it is there already); `make speedrun`;
the default `make train` with its wall, training and evaluation seconds; ResNet50's `make
bench`; airbench94 run --airbench-runs times in one process on the same data (CUDA only;
elsewhere its line says it is skipped).

Every line a step prints goes to OUT/log.txt as it comes; OUT/results.txt gets the
machine-readable lines (bench ..., speedrun ..., train ..., airbench94 ...) as each step
ends, then one `step` line saying how it ended. Each step runs under its own timeout, and
all of them under --budget: a step whose timeout would overrun what is left of the budget
runs under what is left, or is skipped when that is under a third of its timeout, so a
step that hangs costs only its own results. Exit code 0 when every step ran and succeeded
(airbench94 skipped off CUDA aside), 1 otherwise.
"""
import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cli

HERE = Path(__file__).resolve().parent
# Each kind of step's timeout in seconds, with room for an H100 or H200 at the default sizes; --timeout sets one.
TIMEOUTS = {"env": 60, "bench": 90, "compile": 150, "data": 120, "speedrun": 180, "train": 150, "airbench": 120}
RESULT = re.compile(r"^(bench |speedrun |best accuracy |airbench94 |env )")
# train.py's last line; wall_s beside it is make's whole run (the data step, start-up, writing the checkpoints)
FINISHED = (r"^best accuracy (?P<acc>[\d.]+)% at epoch (?P<epoch>\d+), total time (?P<total>[\d.]+)s "
            r"\(training (?P<train>[\d.]+)s, evaluation (?P<eval>[\d.]+)s\)")
ENV_CODE = """import platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"env gpu={gpu.replace(' ', '_')} torch={torch.__version__} cuda={torch.version.cuda} "
      f"cudnn={torch.backends.cudnn.version()} python={platform.python_version()} threads={torch.get_num_threads()}")
"""


def timeout_flag(text):
    kind, _, seconds = text.partition("=")
    if kind not in TIMEOUTS:
        raise argparse.ArgumentTypeError(f"{text!r}: KIND is one of {', '.join(TIMEOUTS)}")
    return kind, cli.integer(min=1)(seconds)


def get_args_parser():
    p = cli.parser("Measure the project on one GPU, step by step, each result written as it comes.")
    p.add_argument("out", nargs="?", default=".gpu-data/results", help="folder for results.txt and log.txt")
    p.add_argument("--data", default=".gpu-data",
                   help="folder with cifar-10-batches-py/, or cifar10-jpeg.tar.gz and cifar10_jpeg_to_batches.py "
                        "to make it; airbench94.py and cifar_batches_to_pt.py for the yardstick")
    p.add_argument("--device", default="cuda", help="DEVICE for every make step")
    p.add_argument("--budget", type=cli.integer(min=1), default=540, help="seconds for all the steps together")
    p.add_argument("--timeout", type=timeout_flag, action="append", default=None, metavar="KIND=SECONDS",
                   help=f"one kind of step's timeout ({', '.join(f'{k}={v}' for k, v in TIMEOUTS.items())})")
    p.add_argument("--batches", type=cli.integer(min=1), nargs="+", default=[512, 1024, 2048],
                   help="ResNet18's bench batch sizes")
    p.add_argument("--compile", default="reduce-overhead", help="bench.py --compile mode for the second round")
    p.add_argument("--bench-args", default="--steps 3 --warmup 2 --repeats 2", help="bench.py flags for every bench")
    p.add_argument("--runs", type=cli.integer(min=1), default=3, help="make speedrun RUNS=")
    p.add_argument("--speedrun-args", default="", help="train.py flags for the speedrun (make's ARGS)")
    p.add_argument("--train-args", default="", help="train.py flags for the default make train (make's ARGS)")
    p.add_argument("--resnet50-batch", type=cli.integer(min=1), default=512, help="ResNet50's bench batch size")
    p.add_argument("--airbench-runs", type=cli.integer(min=1), default=3, help="airbench94's runs, one process")
    return p


class Check:
    """Runs the steps one after another, under one budget, writing as it goes."""

    def __init__(self, args):
        self.args, self.timeouts = args, {**TIMEOUTS, **dict(args.timeout or [])}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results, self.log = open(self.out / "results.txt", "w"), open(self.out / "log.txt", "w")
        self.end, self.failed = time.monotonic() + args.budget, []
        # make installs nothing: the environment is this Python's, and its install stamp says it is complete
        self.env = {k: v for k, v in os.environ.items() if k not in ("CONDA_PREFIX", "MAKEFLAGS", "MAKELEVEL")}
        self.env.update(VIRTUAL_ENV=sys.prefix, PYTHONUNBUFFERED="1")
        (HERE / ".make").mkdir(exist_ok=True)
        (HERE / ".make" / (os.path.abspath(sys.prefix).replace("/", "_") + ".run")).touch()

    def write(self, line):
        print(line, flush=True)
        self.results.write(line + "\n")
        self.results.flush()

    def step(self, name, kind, command, cwd=HERE):
        """Run command under its timeout; its result lines go to results.txt, all its output to log.txt."""
        left, timeout = self.end - time.monotonic(), self.timeouts[kind]
        if left < timeout / 3:
            self.failed.append(name)
            return self.write(f"step {name} skipped: its timeout {timeout}s would overrun the budget "
                              f"({max(left, 0):.0f}s left)")
        timeout = min(timeout, left)
        self.log.write(f"\n$ {' '.join(command)}\n")
        self.log.flush()
        start = time.monotonic()
        with tempfile.TemporaryFile("w+") as output:
            proc = subprocess.Popen(command, cwd=cwd, env=self.env, stdout=output, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, text=True, start_new_session=True)
            try:
                how = f"exit code {proc.wait(timeout=timeout)}"
            except subprocess.TimeoutExpired:
                how = f"timed out after {timeout:.0f}s"
                stop(proc)
            except BaseException:  # Ctrl-C: the step's processes are in a session of their own
                stop(proc)
                raise
            output.seek(0)
            text = output.read()
        self.log.write(text)
        self.log.flush()
        lines = [ln for ln in text.splitlines() if RESULT.match(ln)]
        for line in lines:
            self.write(line)
        if how != "exit code 0":
            self.failed.append(name)
            said = [ln for ln in text.strip().splitlines() if ln.strip()][-1:]  # its last line says why, often
            how += f": {said[0].strip()}" if said and said[0] not in lines else ""
        self.write(f"step {name} {how}, {time.monotonic() - start:.1f}s")
        return text if how == "exit code 0" else None

    def make(self, name, kind, goal, **variables):
        """`make GOAL VAR=value ...`; where make is missing, the command the Makefile runs for it."""
        v = {**{k: str(x) for k, x in variables.items()}, "DEVICE": self.args.device}
        if shutil.which("make", path=self.env.get("PATH")):
            command = ["make", "--no-print-directory", goal, *(f"{k}={x}" for k, x in v.items())]
        else:
            command = [sys.executable, *WITHOUT_MAKE[goal](v), *shlex.split(v.get("ARGS", ""))]
        return self.step(name, kind, command)


# What the Makefile runs for each goal, for a machine without make (a bare image, say).
WITHOUT_MAKE = {
    "bench": lambda v: ["bench.py", "--model", v["MODEL"], "--device", v["DEVICE"], "--batch-size", v["BATCH"]],
    "speedrun": lambda v: ["bench.py", "--speedrun", v["RUNS"], "--model", "resnet18", "--device", v["DEVICE"],
                           "--data-dir", v["DATA_DIR"], "--"],
    "train": lambda v: ["train.py", "--device", v["DEVICE"], "--data-dir", v["DATA_DIR"], "--out-dir", v["RUN_DIR"]],
}


def stop(proc):
    """End the step's whole process group (make, and the scripts under it)."""
    for signum, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, signum)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def airbench(check, data):
    """airbench94 as its README runs it: its data files from the pickles, its 25 runs cut to --airbench-runs."""
    args = check.args
    if args.device != "cuda":  # not a failure: it is written for CUDA alone
        return check.write(f"step airbench94 skipped: it runs on CUDA only, not on {args.device}")
    folder = data / "airbench"
    if check.step("airbench-data", "data", [sys.executable, str(data / "cifar_batches_to_pt.py"), str(data),
                                            str(folder)]) is None:
        return
    code = (data / "airbench94.py").read_text()
    if "range(25)" not in code:
        check.failed.append("airbench94")
        return check.write("step airbench94 failed: its loop over runs, range(25), is not in airbench94.py")
    (folder / "ab94.py").write_text(code.replace("range(25)", f"range({args.airbench_runs})"))
    text = check.step("airbench94", "airbench", [sys.executable, "ab94.py"], cwd=folder) or ""
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines() if "|  eval  |" in ln]
    for run, row in enumerate(rows, start=1):  # columns: run, epoch, train_loss, train_acc, val_acc, tta_val_acc, time
        check.write(f"airbench94 run={run} val_acc={row[4]} tta_val_acc={row[5]} total_time_s={row[6]}")
    mean = re.search(r"^Mean: (\S+) +Std: (\S+)", text, re.M)
    if mean:
        check.write(f"airbench94 runs={len(rows)} mean_tta_acc={mean[1]} std={mean[2]}")


def main(args):
    check, data = Check(args), Path(args.data).resolve()
    bench = args.bench_args
    check.step("env", "env", [sys.executable, "-c", ENV_CODE])
    for batch in args.batches:
        check.make(f"bench-resnet18-{batch}", "bench", "bench", MODEL="resnet18", BATCH=batch, ARGS=bench)
    for batch in args.batches:
        check.make(f"bench-resnet18-{batch}-{args.compile}", "compile", "bench", MODEL="resnet18", BATCH=batch,
                   ARGS=f"{bench} --compile {args.compile}")
    if (data / "cifar-10-batches-py" / "test_batch").is_file():
        check.write(f"step data ready in {data}")
    else:  # the JPEG copy, rebuilt in the official layout in place
        check.step("data", "data", [sys.executable, str(data / "cifar10_jpeg_to_batches.py"), str(data)])
    check.make("speedrun", "speedrun", "speedrun", RUNS=args.runs, DATA_DIR=data, ARGS=args.speedrun_args)
    with tempfile.TemporaryDirectory() as runs:
        start = time.monotonic()
        text = check.make("train-resnet18", "train", "train", DATA_DIR=data, RUN_DIR=f"{runs}/resnet18",
                          ARGS=args.train_args)
        wall = time.monotonic() - start
    end = re.search(FINISHED, text or "", re.M)
    if end:
        check.write(f"train model=resnet18 best_acc={end['acc']} best_epoch={end['epoch']} train_s={end['train']} "
                    f"eval_s={end['eval']} total_s={end['total']} wall_s={wall:.1f}")
    check.make(f"bench-resnet50-{args.resnet50_batch}", "bench", "bench", MODEL="resnet50",
               BATCH=args.resnet50_batch, ARGS=bench)
    airbench(check, data)
    check.write(f"done: {len(check.failed)} of the steps failed, timed out or were skipped"
                f"{': ' + ', '.join(check.failed) if check.failed else ''}")
    return 1 if check.failed else 0


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.main(lambda: main(args))
