"""How fast this project's pipeline trains, evaluates and loads, next to the tutorials' pipeline.

    python bench.py                                   # ResNet18, best device found, batch 128
    python bench.py --model resnet50 --device cuda --batch-size 512 --compile
    python bench.py --cold-start test/0_3.jpg            # predict.py's start-up against the tutorials'
    make bench MODEL=resnet18 DEVICE=cpu BATCH=128

Both pipelines run the same network on the same random images of CIFAR's shape:
  this project   uint8 data on the device, crops/flips/normalization as batch
                 tensor operations, channels_last and mixed precision as --amp /
                 --channels-last auto choose, and train.py's own training step
                 (train.train_step: label smoothing, Nesterov SGD with weight decay,
                 the lr schedule, the running sums it logs);
  the tutorials  a Dataset of PIL images with RandomCrop/RandomHorizontalFlip/
                 ToTensor/Normalize, a DataLoader with 2 workers, fp32, default
                 layout, SGD with momentum and weight decay.
Each pipeline runs in a process of its own, as the two programs would (the
tutorials' with glibc's allocator as it is, this one with data.keep_freed_memory
as train.py sets it). Warm-up steps are not timed (oneDNN and cuDNN pick their
kernels then); the two take turns over several repeats and the median is reported. The last
line is one machine-readable line. train_mfu is the training FLOP rate over the
matrix-multiply rate measured in the same run in the same precision (2048x2048
on a CPU, 8192x8192 on a GPU or NPU): how close training comes to what this
device's arithmetic can do.
"""
import argparse
import copy
import multiprocessing
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import data
import resnet
import train


def get_args_parser():
    p = argparse.ArgumentParser(description="Benchmark this pipeline against the tutorials'.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.print_usage = lambda file=None: None  # a bad flag gets one line, not the usage block
    p.add_argument("--model", default="resnet18", choices=list(resnet.MODELS), help="network")
    p.add_argument("--device", default="auto", choices=data.DEVICES, help="where to run")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (the tutorials use 128)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per pipeline (median reported)")
    p.add_argument("--cold-start", metavar="PICTURE", default=None,
                   help="instead: time `python predict.py PICTURE` from a cold start against the tutorials' "
                        "predict flow (tests/tutorial_predict.py), each started --repeats x 2 times, alternating")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile this project's networks, as train.py --compile does "
                        "(compilation falls in the warm-up)")
    return p


def timed(fn, device, steps, warmup):
    """Seconds per call of fn, after warm-up, waiting for the device at both ends."""
    for _ in range(warmup):
        fn()
    data.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    data.synchronize(device)
    return (time.perf_counter() - start) / steps


def matmul_gflops(device, dtype, steps, warmup):
    """Matrix-multiply rate in the precision training computes in: 2048x2048 on a CPU,
    8192x8192 on an accelerator (smaller ones do not fill a GPU)."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, device, steps, warmup) / 1e9


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
    normalize = T.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # the tutorials' numbers
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
    import tempfile
    from pathlib import Path
    root = Path(__file__).resolve().parent
    if not Path(picture).is_file():
        raise data.DataError(f"{picture}: no such picture (`make data` writes test/0_3.jpg)")
    with tempfile.TemporaryDirectory() as tmp:
        model = resnet.build_model("resnet18")
        torch.save(model.state_dict(), f"{tmp}/tutorial.pth")  # what the tutorials save: a bare state dict
        torch.save({"arch": "resnet18", "num_classes": 10, "classes": data.CIFAR10_CLASSES,
                    "mean": list(data.CIFAR10_MEAN), "std": list(data.CIFAR10_STD), "image_size": 32,
                    "model": model.state_dict()}, f"{tmp}/ours.pth")
        commands = {"predict_s": [sys.executable, str(root / "predict.py"), picture, "--checkpoint", f"{tmp}/ours.pth"],
                    "tutorial_predict_s": [sys.executable, str(root / "tests" / "tutorial_predict.py"), picture,
                                           f"{tmp}/tutorial.pth"]}
        times = {name: [] for name in commands}
        for repeat in range(2 * repeats):
            for name, command in commands.items():
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
            print(f"start {repeat + 1}: " + " ".join(f"{k}={v[-1]:.2f}" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    line = (f"bench cold_start picture={picture} predict_s={med['predict_s']:.2f} "
            f"tutorial_predict_s={med['tutorial_predict_s']:.2f} "
            f"predict_ratio={med['predict_s'] / med['tutorial_predict_s']:.2f}")
    print(line)
    return line


def pipeline(side, args, device_name, conn):
    """One side of the comparison, in an interpreter of its own as the two programs would run
    (the tutorials' keeps glibc's allocator as it is, this project's sets it as train.py does).
    Builds its network and loaders, says which precision it trains in, then times what the
    parent names until it sends None."""
    torch.manual_seed(0)  # the same random images and the same initial weights on both sides
    device = data.pick_device(device_name)
    n = args.batch_size * (args.steps + args.warmup) * 2
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    model = resnet.build_model(args.model).to(device)
    if side == "ours":  # what train.py and test.py do: their layout, precision, step, optimizer and schedule
        data.keep_freed_memory(device)
        amp, layout = data.resolve_amp("auto", device), data.memory_format("auto", device)
        model = model.to(memory_format=layout)
        inference = resnet.fold_batchnorm(copy.deepcopy(model)).to(memory_format=layout)
        net = torch.compile(model) if args.compile else model
        inference = torch.compile(inference) if args.compile else inference
        loaders = [data.CifarLoader(images, labels, args.batch_size, data.CIFAR10_MEAN, data.CIFAR10_STD,
                                    train=split, device=device, memory_format=layout) for split in (True, False)]
        recipe = train.get_args_parser().parse_args(["--batch-size", str(args.batch_size)])
        optimizer = train.make_optimizer(model, recipe)
        scheduler = train.make_schedule(optimizer, 10 ** 6, recipe.warmup)  # longer than any benchmark
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        totals = torch.zeros(3, device=device)

        def step(x, y):
            train.train_step(net, x, y, optimizer, scheduler, scaler, amp, recipe.label_smoothing,
                             1 / args.batch_size, totals)
    else:  # the tutorials': PIL transforms in DataLoader workers, fp32, plain cross-entropy, their SGD
        amp, inference = None, model
        loaders = [tutorial_loader(images, labels, args.batch_size, split) for split in (True, False)]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

        def step(x, y):
            loss = F.cross_entropy(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
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
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            inference(x.to(device, non_blocking=True))

    def load_step():
        x, y = next(train_batches)
        x.to(device, non_blocking=True)

    steps = {"train": train_step, "eval": eval_step, "loader": load_step}
    conn.send(data.PRECISION_NAMES[amp])
    for name in iter(conn.recv, None):
        if name == "matmul":
            conn.send(matmul_gflops(device, amp or torch.float32, args.steps, args.warmup))
        else:  # loading alone is quick: time more of it
            count = args.steps * (20 if name == "loader" else 1)
            conn.send(args.batch_size / timed(steps[name], device, count, args.warmup))


def main(args):
    if args.cold_start:
        return cold_start(args.cold_start, args.repeats)
    device = data.pick_device(args.device)  # a one-line error here, before any process starts
    context = multiprocessing.get_context("spawn")  # a fresh interpreter, not a copy of this one
    sides, finished = {}, False
    try:
        for side in ("ours", "tutorial"):
            conn, child_conn = context.Pipe()
            process = context.Process(target=pipeline, args=(side, args, device.type, child_conn))
            process.start()
            sides[side] = conn
        precision = sides["ours"].recv()
        sides["tutorial"].recv()
        print(f"{args.model} on {device}, batch {args.batch_size}: {args.repeats} repeats of {args.steps} steps "
              f"after {args.warmup} warm-up steps, the two pipelines in two processes taking turns", flush=True)
        results = {f"{prefix}{kind}_img_s": [] for kind in ("train", "eval", "loader") for prefix in ("", "tutorial_")}
        gflops = []
        for repeat in range(args.repeats):
            sides["ours"].send("matmul")
            gflops.append(sides["ours"].recv())
            for name in results:
                side = "tutorial" if name.startswith("tutorial_") else "ours"
                sides[side].send(name.removeprefix("tutorial_").removesuffix("_img_s"))
                results[name].append(sides[side].recv())
            print(f"repeat {repeat + 1}: " + " ".join(f"{k}={v[-1]:.1f}" for k, v in results.items()), flush=True)
        for conn in sides.values():
            conn.send(None)
        finished = True
    except EOFError:
        raise data.DeviceError("a benchmark process stopped early (its error is printed above)") from None
    finally:  # after an error or Ctrl-C the other side is still waiting: stop it
        for process in multiprocessing.active_children():
            process.join(timeout=60 if finished else 0)
            if process.is_alive():
                process.terminate()

    med = {k: statistics.median(v) for k, v in results.items()}
    flops = training_flops_per_image(resnet.build_model(args.model))
    matmul = statistics.median(gflops)
    line = (f"bench model={args.model} device={device.type} batch={args.batch_size} precision={precision} "
            f"train_img_s={med['train_img_s']:.1f} tutorial_train_img_s={med['tutorial_train_img_s']:.1f} "
            f"train_ratio={med['train_img_s'] / med['tutorial_train_img_s']:.2f} "
            f"eval_img_s={med['eval_img_s']:.1f} tutorial_eval_img_s={med['tutorial_eval_img_s']:.1f} "
            f"eval_ratio={med['eval_img_s'] / med['tutorial_eval_img_s']:.2f} "
            f"loader_img_s={med['loader_img_s']:.0f} tutorial_loader_img_s={med['tutorial_loader_img_s']:.0f} "
            f"matmul_gflops={matmul:.1f} train_gflop_per_img={flops / 1e9:.2f} "
            f"train_mfu={med['train_img_s'] * flops / (matmul * 1e9):.2f}")
    print(line)
    return line


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (data.DeviceError, data.DataError) as e:
        sys.exit(f"error: {e}")
