"""Where the work runs: the device (Ascend NPU, CUDA GPU, Apple GPU or CPU), its precision
and memory layout, and the processes of a torchrun job.

Imports only torch and the standard library: copy it beside resnet.py into another project.

    import device
    dev = device.pick_device("auto")          # npu if torch_npu sees a chip, else cuda, else mps, else cpu
    amp = device.resolve_amp("auto", dev)     # the autocast dtype, or None for fp32
    with device.autocast(dev, amp):
        logits = model(images)

Under torchrun, `job()` reads the process's place in the job (rank, world size, local
rank) once, and `all_reduce` sums over the processes (an identity in a single process).
"""
import contextlib
import datetime
import os
import re
import signal
import sys
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

DEVICES = ["auto", "npu", "cuda", "mps", "cpu"]
AMP_CHOICES = ["auto", "bf16", "fp16", "off"]
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # resolve_amp's answers
# CANN's environment scripts at their default install paths: CANN 9's, then CANN 8's.
CANN_ENV_SCRIPTS = ("/usr/local/Ascend/cann/set_env.sh", "/usr/local/Ascend/ascend-toolkit/set_env.sh")
# A collective that waits longer than this means a peer process is gone: fail instead of
# hanging. Generous, because process 0 may be writing a checkpoint meanwhile.
DIST_TIMEOUT = datetime.timedelta(minutes=10)


class DeviceError(Exception):
    """A device that cannot be used; the message is one line for the user."""


# ---------------------------------------------------------------------------
# The device

def _torch_npu_ready(required, index=0):
    """Import torch_npu, which registers the 'npu' device, and check that it sees a chip.

    The scripts set TORCH_DEVICE_BACKEND_AUTOLOAD=0 before importing torch, so a torch_npu
    that cannot load breaks only this import, where it can be explained, and not `import
    torch` itself (and with it --device cpu)."""
    try:
        import torch_npu  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "torch_npu":  # installed, but something it imports is missing
            raise _broken_torch_npu(e) from None
        if required:
            raise DeviceError("--device npu needs torch_npu: install the build that matches this machine's "
                              "CANN and torch (docs/devices.md)") from None
        return False
    except Exception as e:  # installed, but CANN's libraries are not found or do not match
        raise _broken_torch_npu(e) from None
    if not torch.npu.is_available():
        if required:
            raise DeviceError(f"--device npu: {_no_npu_seen()}")
        if index == 0:  # once per machine, not once per process of a torchrun job
            print(f"note: {_no_npu_seen()}; --device auto goes on without it", file=sys.stderr)
        return False
    return True


def _no_npu_seen():
    """Why an installed torch_npu sees no chip, as far as this process can tell."""
    visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    ids = [int(i) for i in re.findall(r"\d+", visible or "")]
    if ids and ids != sorted(set(ids)):  # torch_npu counts no chip at all then
        order = f"ASCEND_RT_VISIBLE_DEVICES={visible} must list the chips in ascending order"
    else:
        order = "that ASCEND_RT_VISIBLE_DEVICES, if set, lists them in ascending order"
    return f"torch_npu is installed but sees no NPU: check that `npu-smi info` lists the chips, and {order}"


def cann_env():
    """The command that loads CANN's environment on this machine (both defaults when neither is there)."""
    found = [script for script in CANN_ENV_SCRIPTS if os.path.exists(script)]
    if found:
        return f"`source {found[0]}`"
    return f"`source {CANN_ENV_SCRIPTS[0]}` (CANN 9) or `source {CANN_ENV_SCRIPTS[1]}` (CANN 8)"


def _broken_torch_npu(error):
    """The DeviceError for a torch_npu whose import failed with error."""
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    other = re.search(r"Two accelerators cannot be used at the same time in PyTorch: npu and (\w+)", detail)
    if other:  # torch_npu refuses a torch built for another accelerator that sees its devices
        return DeviceError(f"torch_npu is installed beside a {other[1]} build of torch, and torch_npu refuses "
                           f"two accelerators in one torch: for the NPU install the CPU build of torch that "
                           f"torch_npu pairs with (docs/devices.md); for the {other[1]} device pass "
                           f"--device {other[1]}")
    if ".so" in detail or "shared object" in detail:
        cause = f"a CANN library was not found ({detail})"
    else:
        cause = f"its import failed ({detail})"
    # auto as well as npu: torch_npu installed means this machine is meant to train on an NPU.
    return DeviceError(f"torch_npu is installed but cannot load: {cause}; load CANN's environment first "
                       f"({cann_env()}), or pass --device cpu")


def pick_device(name="auto", index=0):
    """auto: npu if torch_npu and a chip are there, else cuda, else mps, else cpu.
    index: the chip of this process (torchrun's LOCAL_RANK)."""
    if name in ("auto", "npu") and _torch_npu_ready(name == "npu", index):
        torch.npu.set_device(index)
        return torch.device("npu", index)
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda: no CUDA GPU visible to this torch build")
        torch.cuda.set_device(index)
        # Shapes repeat every step: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", index)
    mps = getattr(torch.backends, "mps", None)
    if name == "mps" or (name == "auto" and mps is not None and mps.is_available()):
        if mps is None or not mps.is_available():
            raise DeviceError("--device mps: Apple's Metal backend is not available here")
        return torch.device("mps")
    if name in ("auto", "cpu"):
        return torch.device("cpu")
    raise DeviceError(f"unknown device {name!r}; choose auto, npu, cuda, mps or cpu")


def keep_freed_memory(device):
    """On a CPU under glibc (Linux), let freed memory serve the next allocation.

    glibc gives every block over 32 MB its own mmap and returns it to the kernel on free,
    so each training step the kernel maps and zeroes the large activations afresh. Never
    mapping and never trimming does what PyTorch's CPU tuning guide gets from preloading
    jemalloc, with nothing to install; the process keeps its peak memory until it exits.
    Elsewhere (GPU/NPU, macOS, musl) this does nothing."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    import ctypes
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)


def synchronize(device):
    """Wait until the device has run all the work queued so far (for timing)."""
    if device.type in ("cuda", "npu", "mps"):
        getattr(torch, device.type).synchronize()


def eval_batch_size(device):
    """Images per evaluation step: large on accelerators; small on a CPU, where they stay in cache."""
    return 128 if device.type == "cpu" else 1000


def out_of_memory(error):
    """If error says the device ran out of memory, the sentence that says so ("CUDA out of memory");
    else None. CUDA raises OutOfMemoryError; the NPU, MPS and the CPU's allocator a RuntimeError."""
    sentences = [s.strip() for s in (str(error).strip().splitlines() or [""])[0].split(". ")]
    said = [s for s in sentences if "out of memory" in s or "can't allocate memory" in s]
    if said:
        return said[0]
    return (sentences[0] or "out of memory") if isinstance(error, torch.OutOfMemoryError) else None


# ---------------------------------------------------------------------------
# Precision and layout

def cpu_has_fast_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether bf16 autocast trains faster than fp32 on this CPU, read from its flags alone, so that
    every process and every run on the machine decides alike however busy it is: AMX-BF16 (Intel
    Sapphire Rapids and later), or AVX512_BF16 on an AMD CPU (Zen 4 and later). An Intel CPU with
    AVX512_BF16 but no AMX gets fp32: one such was measured multiplying bf16 slower than fp32
    (docs/results.md). Linux only: other systems have no /proc/cpuinfo, and train in fp32."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first CPU's: all list the same
    except OSError:
        return False
    flags, vendor = fields.get("flags", "").split(), fields.get("vendor_id", "")
    return "amx_bf16" in flags or ("avx512_bf16" in flags and vendor == "AuthenticAMD")


def resolve_amp(choice, device):
    """The autocast dtype for --amp on this device, or None for full fp32."""
    if choice == "off":
        return None
    if choice == "fp16":
        return torch.float16
    if choice == "bf16":
        # Upstream autocast would warn and run in fp32 while the run says bf16: refuse instead.
        if device.type == "npu" and not torch.npu.is_bf16_supported():
            raise DeviceError("--amp bf16: this NPU has no bf16 (torch.npu.is_bf16_supported() is False); "
                              "pass --amp fp16, or --amp auto, which takes fp16 here")
        return torch.bfloat16
    # auto on a GPU or NPU: bf16 needs no loss scaling; chips without it get fp16 plus a GradScaler.
    if device.type in ("cuda", "npu"):
        return torch.bfloat16 if getattr(torch, device.type).is_bf16_supported() else torch.float16
    # auto on a CPU: bf16 only where its flags say it multiplies faster than fp32; MPS stays in fp32.
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


def grad_scaler(device, dtype):
    """The loss scaler for training in dtype on device, active only for fp16. On an NPU it is
    torch_npu's own, which clears the chip's overflow flag every step and has the processes of a
    job agree on skipping one; torch.amp's does neither there."""
    if device.type == "npu":
        import torch_npu
        return torch_npu.npu.amp.GradScaler(enabled=dtype == torch.float16)
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def autocast(device, dtype):
    """Mixed precision in dtype on this device; dtype None runs in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def use_channels_last(choice, device):
    # torch_npu keeps its own internal layouts and MPS gains nothing: NHWC only where it pays.
    return choice == "on" or (choice == "auto" and device.type in ("cuda", "cpu"))


def memory_format(choice, device):
    """The torch memory format for --channels-last on this device."""
    return torch.channels_last if use_channels_last(choice, device) else torch.contiguous_format


# ---------------------------------------------------------------------------
# The processes of a torchrun job

class Job(NamedTuple):
    """This process's place in a torchrun job; a plain `python train.py` is process 0 of 1."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        """Process 0 alone prints and writes files."""
        return self.rank == 0


def job():
    """The process's place, as torchrun sets it in the environment."""
    return Job(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
               int(os.environ.get("LOCAL_RANK", 0)))


@contextlib.contextmanager
def process_group(job, device):
    """Join the job's process group for the duration (nothing in a single process); the group
    is destroyed on every way out, errors included."""
    if job.world_size > 1:
        backend = {"npu": "hccl", "cuda": "nccl"}.get(device.type, "gloo")
        dist.init_process_group(backend, rank=job.rank, world_size=job.world_size, timeout=DIST_TIMEOUT)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_latest_collective = []  # see all_reduce


def all_reduce(tensor, op="sum"):
    """Sum (or "max", "min") over all processes, in place; an identity in a single process.

    The handle of the latest reduction is kept until the next one. Gloo's worker thread lets
    go of a collective's tensors a moment after the result is in, and that needs the GIL; were
    the interpreter already shutting down, the thread could not have it and the process would
    abort ("terminate called without an active exception"). Held here, Python frees them."""
    if dist.is_initialized():
        work = dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()), async_op=True)
        work.wait()
        _latest_collective[:] = [work]
    return tensor


def broadcast_buffers(model):
    """Every process takes process 0's BatchNorm statistics (DDP averages gradients, not buffers)."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop) asks the run to stop at the next safe
    point and save; a second Ctrl-C stops at once. Use it as a context manager: the previous
    handlers come back on the way out."""

    def __init__(self):
        self.signum = 0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, device):
        """The signal any process of the job received (0: none); all processes call this together."""
        if not dist.is_initialized():
            return self.signum
        return int(all_reduce(torch.tensor([self.signum], device=device), "max").item())


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all processes.

    nn.SyncBatchNorm does the same on GPUs and NPUs but refuses CPU tensors; this one works
    with any backend (gloo included). Same parameters and buffers as BatchNorm2d, so
    checkpoints do not change."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # sums, and sums gradients back
        c, given = x.shape[1], x
        x = x.float()  # statistics in fp32 under bf16 or fp16 autocast, as BatchNorm keeps them
        count = torch.full((1,), x.numel() / c, device=x.device)
        sums = all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
        n = sums[-1]
        mean = sums[:c] / n
        # Two passes (mean first, then squared deviations) as BatchNorm itself does:
        # E[x^2] - E[x]^2 loses digits in fp32 and drifts away from a single process.
        var = all_reduce((x - mean.view(1, c, 1, 1)).square().sum((0, 2, 3))) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (x * scale.view(1, c, 1, 1) + (self.bias - mean * scale).view(1, c, 1, 1)).to(given.dtype)


def convert_sync_bn(module, device):
    """BatchNorm layers made to normalize over the global batch of a multi-process run."""
    if device.type in ("cuda", "npu"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    # Deprecated in favour of a private successor, yet still the public autograd-aware all_reduce.
    warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_reduce", FutureWarning)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_sync_bn(child, device)
    return module
