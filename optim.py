"""The recipe's optimization: SGD with Nesterov momentum, a warm-up-then-decay schedule, the loss
scaler of fp16, and a moving average of the weights; Training holds them for train.py's step.

    t = optim.make_training(model, args, device, amp, total_steps)   # args: train.py's flags
    train.train_step(t, images, labels, loss_scale, totals)

Imports torch and device.py only. Why each default: docs/training.md.
"""
import copy
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

import device


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
    if args.sync_bn and torch.distributed.is_initialized():
        model = device.convert_sync_bn(model, dev)
    net = torch.compile(model, mode=args.compile) if args.compile else model
    if torch.distributed.is_initialized():
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.index is not None else None)
    optimizer = make_optimizer(model, args)
    return Training(model, net, optimizer, make_schedule(optimizer, total_steps, args.warmup),
                    device.grad_scaler(dev, amp), amp, args.label_smoothing,
                    EMA(model, args.ema) if args.ema else None)
