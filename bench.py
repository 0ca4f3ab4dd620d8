"""How fast this project's pipeline trains, evaluates and loads, next to the tutorials' pipeline.

    python bench.py                                   # ResNet18, best device found, batch 128
    python bench.py --model resnet50 --device cuda --batch-size 512 --compile
    python bench.py --device cuda --batch-size 1024 --compile reduce-overhead -- --fused   # train.py's step flags
    python bench.py --cold-start test/0_3.jpg            # predict.py's start-up against the tutorials'
    python bench.py --speedrun 3 --device cuda -- --epochs 12   # time to accuracy of the fast recipe
    make bench MODEL=resnet18 DEVICE=cpu BATCH=128
    make speedrun DEVICE=cuda RUNS=3

Both pipelines run the same network on the same random images of CIFAR's shape:
  this project   uint8 data on the device, crops/flips/normalization as batch
                 tensor operations, channels_last and mixed precision as --amp /
                 --channels-last auto choose, and train.py's own training step
                 (train.train_step: label smoothing, Nesterov SGD with weight decay,
                 the lr schedule, the running sums it logs), all as train.py sets
                 them by default or with the train.py flags given after -- (those
                 of the step: STEP_FLAGS below);
  the tutorials  a Dataset of PIL images with RandomCrop/RandomHorizontalFlip/
                 ToTensor/Normalize, a DataLoader with 2 workers, fp32, default
                 layout, SGD with momentum and weight decay.
Each pipeline runs in a process of its own, as the two programs would (the
tutorials' with glibc's allocator as it is, this one with device.keep_freed_memory
as train.py sets it). Warm-up steps are not timed (oneDNN and cuDNN pick their
kernels then); the two take turns over several repeats and the median is reported. The last
line is one machine-readable line. train_mfu is the training FLOP rate over the
matrix-multiply rate measured in the same run in the same precision (2048x2048
on a CPU, 8192x8192 on a GPU or NPU): how close training comes to what this
device's arithmetic can do.

--speedrun RUNS trains FAST_RECIPE below (flags after `--` change it) RUNS times with
seeds 0, 1, ..., each a whole train.py run in this process, after one short untimed
warm-up run (cuDNN's choices, torch.compile's compilation). It times training as fast
CIFAR trainers do: data already on the device, device-synchronized, evaluation and
checkpoint writing left out; and prints a line per run and a summary line.
"""
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # torch_npu loads in device.py, which explains failures

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import batching  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import device  # noqa: E402
import failures  # noqa: E402
import optim  # noqa: E402
import resnet  # noqa: E402
import train  # noqa: E402

# What `make speedrun` trains: few epochs at a large batch, a mirror image in every other
# epoch, no decay on BatchNorm, smoothed labels, and flip-and-shift test-time augmentation,
# as the fast-CIFAR recipes do. docs/results.md has what it measured.
FAST_RECIPE = ["--epochs", "16", "--batch-size", "1024", "--label-smoothing", "0.2", "--norm-weight-decay", "0",
               "--flip", "alternate", "--tta", "flip-shift", "--log-every", "1000"]


def get_args_parser():
    p = cli.parser("Benchmark this pipeline against the tutorials', or time it to accuracy.")
    p.add_argument("--model", default="resnet18", choices=resnet.MODELS, help="network")
    p.add_argument("--device", default="auto", choices=device.DEVICES, help="where to run")
    p.add_argument("--batch-size", type=cli.integer(min=1, max=2 ** 20), default=128,
                   help="images per step (the tutorials use 128)")
    p.add_argument("--steps", type=cli.integer(min=1), default=4, help="timed steps per repeat")
    p.add_argument("--warmup", type=cli.integer(min=0), default=2, help="untimed steps before each measurement")
    p.add_argument("--repeats", type=cli.integer(min=1), default=3,
                   help="timed repeats per pipeline (median reported)")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE", choices=train.COMPILE_MODES,
                   help=f"torch.compile this project's networks in this mode ({', '.join(train.COMPILE_MODES)}), "
                        "as train.py --compile does "
                        "(compilation falls in the warm-up: train_warmup_s, eval_warmup_s)")
    p.add_argument("--cold-start", metavar="PICTURE", default=None,
                   help="instead: time `python predict.py PICTURE` from a cold start against the tutorials' "
                        "predict flow (tests/tutorial_predict.py), each started --repeats x 2 times, alternating")
    p.add_argument("--speedrun", type=cli.integer(min=1), default=None, metavar="RUNS",
                   help="instead: train the fast recipe RUNS times and time it to accuracy")
    p.add_argument("--data-dir", default="data", help="--speedrun's data folder")
    p.add_argument("train_args", nargs="*", metavar="-- TRAIN_FLAGS",
                   help="train.py flags: with --speedrun, any that change the fast recipe; otherwise those that "
                        "change the training step (--amp, --channels-last, --fused, --ema, --flip, ...)")
    return p


def timed(fn, dev, steps, warmup):
    """Seconds per call of fn after warm-up, and the seconds the warm-up took, waiting for
    the device at both ends."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    device.synchronize(dev)
    warmed = time.perf_counter()
    for _ in range(steps):
        fn()
    device.synchronize(dev)
    return (time.perf_counter() - warmed) / steps, warmed - start


def matmul_gflops(dev, dtype, steps, warmup):
    """Matrix-multiply rate in the precision training computes in: 2048x2048 on a CPU,
    8192x8192 on an accelerator (smaller ones do not fill a GPU)."""
    n = 2048 if dev.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, dev, steps, warmup)[0] / 1e9


def training_flops_per_image(model):
    """Forward FLOPs of one 32x32 image, times 3 (backward costs about twice the forward)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))
    return 3 * counter.get_total_flops()


class TutorialImages(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per image: a PIL image, then the transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels.tolist(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def tutorial_loader(images, labels, batch_size, train_split):
    import torchvision.transforms as T
    normalize = T.Normalize(resnet.TUTORIAL_MEAN, resnet.TUTORIAL_STD)
    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train_split else []
    dataset = TutorialImages(images, labels, T.Compose(steps + [T.ToTensor(), normalize]))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train_split, num_workers=2,
                                       persistent_workers=True, drop_last=train_split)


def forever(loader):
    while True:
        yield from loader


def cold_start(picture, repeats):
    """Median wall time of a fresh `python predict.py PICTURE` and of the tutorials' predict
    flow, on the same ResNet18 weights (random: only the time matters here)."""
    import subprocess
    root = Path(__file__).resolve().parent
    if not Path(picture).is_file():
        raise data.DataError(f"{picture}: no such picture (python data.py writes test/0_3.jpg)")
    sys.path.insert(0, str(root / "tests"))
    from tutorial_resnet import ResNet18 as TutorialResNet18  # the ResNet18 tutorial's own network
    with tempfile.TemporaryDirectory() as tmp:
        tutorial = TutorialResNet18()
        torch.save(tutorial.state_dict(), f"{tmp}/tutorial.pth")  # what the tutorial saves: a bare state dict
        model, _ = resnet.read_checkpoint(tutorial.state_dict())  # the same weights, as this project saves them
        torch.save(resnet.checkpoint(model, "resnet18", resnet.CIFAR10_CLASSES, data.CIFAR10_MEAN, data.CIFAR10_STD,
                                     32, "cifar10", 0, None, {}), f"{tmp}/ours.pth")
        commands = {"predict_s": [sys.executable, str(root / "predict.py"), picture, "--checkpoint", f"{tmp}/ours.pth"],
                    "tutorial_predict_s": [sys.executable, str(root / "tests" / "tutorial_predict.py"), picture,
                                           f"{tmp}/tutorial.pth"]}
        times = {name: [] for name in commands}
        for repeat in range(2 * repeats):
            for name, command in commands.items():
                start = time.perf_counter()
                proc = subprocess.run(command, capture_output=True, text=True)
                times[name].append(time.perf_counter() - start)
                if proc.returncode:  # a picture Pillow cannot read, say: predict.py's own line says why
                    said = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                    raise data.DataError(f"{Path(command[1]).name} failed: {said.removeprefix('error: ')}")
            print(f"start {repeat + 1}: " + " ".join(f"{k}={v[-1]:.2f}" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    line = (f"bench cold_start picture={picture} predict_s={med['predict_s']:.2f} "
            f"tutorial_predict_s={med['tutorial_predict_s']:.2f} "
            f"predict_ratio={med['predict_s'] / med['tutorial_predict_s']:.2f}")
    print(line)
    return line


# Of train.py's flags, those that change the training step the benchmark times; the others
# describe a whole run (epochs, data, folders) and go with --speedrun.
STEP_FLAGS = ["amp", "channels_last", "fused", "ema", "flip", "label_smoothing", "norm_weight_decay", "weight_decay",
              "momentum"]


def train_flags(args):
    """The train.py flags bench.py passes on: its own --compile, then those given after --."""
    return [*(["--compile", args.compile] if args.compile else []), *args.train_args]


def step_recipe(args):
    """train.py's settings for the benchmark's training step: its defaults, bench.py's batch size,
    and train_flags(args)."""
    return train.get_args_parser().parse_args(["--batch-size", str(args.batch_size), *train_flags(args)])


def pipeline(side, args, device_name, conn):
    """One side of the comparison, in an interpreter of its own as the two programs would run (the
    tutorials' keeps glibc's allocator as it is, this project's sets it as train.py does). Out of
    memory, or --compile or --fused unsupported, ends it in one line, as in train.py."""
    try:
        serve(side, args, device_name, conn)
    except (RuntimeError, NotImplementedError) as e:
        why = failures.explain(e, fused=side == "ours" and step_recipe(args).fused)
        if why is None:
            raise
        sys.exit(f"error: {why}")


def serve(side, args, device_name, conn):
    """Says which precision this side trains in, then times what the parent names until it sends None."""
    torch.manual_seed(0)  # the same random images and the same initial weights on both sides
    dev = device.pick_device(device_name)
    n = args.batch_size * min(args.steps + args.warmup, 16) * 2  # the loaders go round it as often as needed
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    model = resnet.build_model(args.model).to(dev)
    if side == "ours":  # what train.py and test.py do: their layout, precision, step, optimizer and schedule
        device.keep_freed_memory(dev)
        recipe = step_recipe(args)
        amp, layout = device.resolve_amp(recipe.amp, dev), device.memory_format(recipe.channels_last, dev)
        model = model.to(memory_format=layout)
        inference = resnet.for_inference(model, memory_format=layout)
        inference = torch.compile(inference, mode=args.compile) if args.compile else inference
        loaders = [batching.CifarLoader(images, labels, args.batch_size, data.CIFAR10_MEAN, data.CIFAR10_STD,
                                        train=split, device=dev, memory_format=layout, flip=recipe.flip)
                   for split in (True, False)]
        t = optim.make_training(model, recipe, dev, amp, 10 ** 6)  # a schedule longer than any benchmark
        totals = torch.zeros(3, device=dev)

        def step(x, y):
            train.train_step(t, x, y, 1 / args.batch_size, totals)
    else:  # the tutorials': PIL transforms in DataLoader workers, fp32, plain cross-entropy, their SGD
        amp, layout, inference = None, torch.contiguous_format, model
        loaders = [tutorial_loader(images, labels, args.batch_size, split) for split in (True, False)]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step(x, y):
            loss = F.cross_entropy(model(x.to(dev, non_blocking=True)), y.to(dev, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    train_batches, eval_batches = (forever(loader) for loader in loaders)

    def train_step():
        model.train()  # the tutorials' side evaluates with this same model
        step(*next(train_batches))

    @torch.no_grad()
    def eval_step():
        x, _ = next(eval_batches)
        inference.eval()
        with device.autocast(dev, amp):
            inference(x.to(dev, non_blocking=True))

    def load_step():
        x, y = next(train_batches)
        x.to(dev, non_blocking=True)

    steps = {"train": train_step, "eval": eval_step, "loader": load_step}
    conn.send((device.PRECISION_NAMES[amp], "channels_last" if layout == torch.channels_last else "contiguous"))
    for name in iter(conn.recv, None):
        if name == "matmul":
            conn.send(matmul_gflops(dev, amp or torch.float32, args.steps, args.warmup))
        else:  # loading alone is quick: time more of it
            repeats = args.steps * (20 if name == "loader" else 1)
            seconds, warmup_seconds = timed(steps[name], dev, repeats, args.warmup)
            conn.send((args.batch_size / seconds, warmup_seconds))


def stopped_early(processes):
    """Why a benchmark process is gone: its own line is printed above, unless a signal killed it."""
    for process in processes:
        process.join(timeout=2)  # the one that stopped is gone at once; the other waits for its next request
    killed = [signal.Signals(-p.exitcode).name for p in processes if p.exitcode is not None and p.exitcode < 0]
    if not killed:
        return "a benchmark process stopped early (its error is printed above)"
    if killed[0] == "SIGKILL":
        return ("a benchmark process was killed (SIGKILL), as the system does when memory runs out: "
                "run again with a smaller --batch-size")
    return f"a benchmark process was killed ({killed[0]})"


def main(args):
    if args.cold_start:
        return cold_start(args.cold_start, args.repeats)
    if args.speedrun:
        return speedrun(args)
    dev = device.pick_device(args.device)  # a one-line error here, before any process starts
    device.resolve_amp(step_recipe(args).amp, dev)  # and for --amp bf16 on a chip without it
    context = multiprocessing.get_context("spawn")  # a fresh interpreter, not a copy of this one
    sides, processes, finished = {}, [], False
    try:
        for side in ("ours", "tutorial"):
            conn, child_conn = context.Pipe()
            process = context.Process(target=pipeline, args=(side, args, dev.type, child_conn))
            process.start()
            processes.append(process)
            sides[side] = conn
        precision, layout = sides["ours"].recv()
        sides["tutorial"].recv()
        flags = " ".join(train_flags(args))
        print(f"{args.model} on {dev}, batch {args.batch_size}{f', train.py {flags}' if flags else ''}: "
              f"{cli.plural(args.repeats, 'repeat')} of {cli.plural(args.steps, 'step')} after "
              f"{cli.plural(args.warmup, 'warm-up step')}, the two pipelines "
              "in two processes taking turns", flush=True)
        results = {f"{prefix}{kind}_img_s": [] for kind in ("train", "eval", "loader") for prefix in ("", "tutorial_")}
        gflops, warmups = [], {}  # the first warm-up of each: compilation (--compile), cuDNN's choices
        for repeat in range(args.repeats):
            sides["ours"].send("matmul")
            gflops.append(sides["ours"].recv())
            for name in results:
                side = "tutorial" if name.startswith("tutorial_") else "ours"
                sides[side].send(name.removeprefix("tutorial_").removesuffix("_img_s"))
                rate, warmup_seconds = sides[side].recv()
                results[name].append(rate)
                warmups.setdefault(name, warmup_seconds)
            print(f"repeat {repeat + 1}: " + " ".join(f"{k}={v[-1]:.1f}" for k, v in results.items()), flush=True)
        for conn in sides.values():
            conn.send(None)
        finished = True
    except EOFError:
        raise device.DeviceError(stopped_early(processes)) from None
    finally:  # after an error or Ctrl-C the other side is still waiting: stop it
        for process in processes:
            process.join(timeout=60 if finished else 0)
            if process.is_alive():
                process.terminate()
    return summary(args, dev, results, gflops, warmups, precision, layout)


def summary(args, dev, results, gflops, warmups, precision, layout):
    """The benchmark's one line: the medians of the repeats, and what the step ran as."""
    med, recipe = {k: statistics.median(v) for k, v in results.items()}, step_recipe(args)
    flops = training_flops_per_image(resnet.build_model(args.model))
    matmul = statistics.median(gflops)
    line = (f"bench model={args.model} device={dev.type} batch={args.batch_size} precision={precision} "
            f"layout={layout} compile={args.compile or 'off'} fused={'on' if recipe.fused else 'off'} "
            f"ema={recipe.ema:g} flip={recipe.flip} "
            f"train_img_s={med['train_img_s']:.1f} tutorial_train_img_s={med['tutorial_train_img_s']:.1f} "
            f"train_ratio={med['train_img_s'] / med['tutorial_train_img_s']:.2f} "
            f"eval_img_s={med['eval_img_s']:.1f} tutorial_eval_img_s={med['tutorial_eval_img_s']:.1f} "
            f"eval_ratio={med['eval_img_s'] / med['tutorial_eval_img_s']:.2f} "
            f"loader_img_s={med['loader_img_s']:.0f} tutorial_loader_img_s={med['tutorial_loader_img_s']:.0f} "
            f"matmul_gflops={matmul:.1f} train_gflop_per_img={flops / 1e9:.2f} "
            f"train_mfu={med['train_img_s'] * flops / (matmul * 1e9):.2f} "
            f"train_warmup_s={warmups['train_img_s']:.2f} eval_warmup_s={warmups['eval_img_s']:.2f}")
    print(line)
    return line


# train.py's settings a speedrun makes itself; their flags are refused after --.
SPEEDRUN_OWNS = ["seed", "out_dir", "resume", "stop_after"]


def given_flags(train_args, keys):
    """The flags among train_args (abbreviated or not) that set any of train.py's settings named in keys."""
    return ["--" + key.replace("_", "-") for key in cli.given(train.get_args_parser(), train_args, keys)]


def speedrun(args):
    """Train the fast recipe args.speedrun times (seeds 0, 1, ...); a line per run, then a summary line."""
    base = [*FAST_RECIPE, "--model", args.model, "--device", args.device, "--data-dir", args.data_dir,
            *train_flags(args)]
    recipe = train.get_args_parser().parse_args(base)  # a bad flag: one line, before any training
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        # A few steps at the recipe's shapes, untimed: three batches, or the --subset the runs train on.
        warmup_images = min(3 * recipe.batch_size, recipe.subset or 3 * recipe.batch_size)
        warmup = train.get_args_parser().parse_args(
            [*base, "--epochs", "1", "--subset", str(warmup_images), "--out-dir", f"{tmp}/warmup"])
        start = time.perf_counter()
        run_quietly(warmup)
        warmup_seconds = time.perf_counter() - start
        for seed in range(args.speedrun):
            r = run_quietly(train.get_args_parser().parse_args([*base, "--seed", str(seed), "--out-dir",
                                                                 f"{tmp}/{seed}"]))
            results.append(r)
            print(f"speedrun run={seed + 1} seed={seed} acc={r.acc:.2f} train_s={r.train_seconds:.2f} "
                  f"first_step_s={r.first_step:.2f} img_s={r.images / r.train_seconds:.0f}", flush=True)
    accs, seconds = [r.acc for r in results], [r.train_seconds for r in results]
    batch = min(recipe.batch_size, results[0].images // recipe.epochs)  # a --subset smaller than a batch: all of it
    line = (f"speedrun model={recipe.model} device={args.device} runs={len(results)} epochs={recipe.epochs} "
            f"batch={batch} mean_acc={statistics.mean(accs):.2f} min_acc={min(accs):.2f} "
            f"mean_train_s={statistics.mean(seconds):.2f} max_train_s={max(seconds):.2f} "
            f"img_s={sum(r.images for r in results) / sum(seconds):.0f} warmup_s={warmup_seconds:.2f}")
    print(line)
    return line


def run_quietly(args):
    """train.main(args) with its printing kept back, unless it fails."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        r = train.main(args)
    if r.code > 128:  # Ctrl-C or SIGTERM: train.py's resume hint would name a folder deleted on the way out
        print(f"speedrun stopped by {signal.Signals(r.code - 128).name}; the run in progress is not kept",
              file=sys.stderr)
        sys.exit(r.code)
    if r.code:
        print(out.getvalue(), end="")
        raise device.DeviceError(f"a speedrun run stopped (exit code {r.code})")
    return r


def check_args(parser, args):
    """Refuse, as argparse refuses a bad flag, what the benchmark cannot do with the flags given."""
    if args.compile and not args.warmup:
        parser.error("--compile needs --warmup 1 or more: the compilation must not be timed")
    if args.cold_start and args.train_args:
        parser.error(f"train.py flags ({' '.join(args.train_args)}) do not go with --cold-start")
    if args.speedrun:
        owned = given_flags(args.train_args, SPEEDRUN_OWNS)
        if owned:
            parser.error(f"{', '.join(owned)}: the speedrun sets these itself (seeds 0 to RUNS-1, a temporary "
                         "folder for each run, every run to its end)")
    else:
        others = given_flags(args.train_args, [k for k in vars(train.get_args_parser().parse_args([]))
                                               if k not in STEP_FLAGS])
        if others:
            parser.error(f"{', '.join(others)}: not a flag of the training step the benchmark times; after -- it "
                         f"takes {', '.join('--' + k.replace('_', '-') for k in STEP_FLAGS)} (--model, --batch-size, "
                         "--device and --compile are bench.py's own; a whole run's flags go with --speedrun)")


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(parser, args)
    cli.main(lambda: main(args), explain=lambda e: failures.explain(e, fused=step_recipe(args).fused))
