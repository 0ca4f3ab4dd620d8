"""Datasets on the device, shuffled, augmented and batched there: no DataLoader workers, no
per-picture Python work (the way of airbench's CifarLoader), sharded for torchrun.

    (train_loader, test_loader), classes, norm = batching.training_loaders("data", "cifar10", 32, None,
                                                                          512, 1000, 0, "random", device=dev)
    for images, labels in train_loader: ...
"""
import torch
import torch.nn.functional as F

import data


def crop_flip(images, dy, dx, mirror, pad=4):
    """Zero-pad each image by pad, crop it back to its size at offset (dy[i], dx[i]) in
    [0, 2*pad], and mirror it left-right where mirror[i]: torchvision's RandomCrop(size,
    padding=pad) then RandomHorizontalFlip, for the whole batch in one indexing step.

    A mirrored crop is the crop of the mirrored padded image at the mirrored offset, so
    the batch is padded and mirrored once and each picture's window is picked out of a
    sliding-window view of the two: one gather, no separate flip."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    windows = torch.stack([padded, padded.flip(3)]).unfold(3, h, 1).unfold(4, w, 1)  # 2, n, c, dy, dx, h, w
    dx = torch.where(mirror, 2 * pad - dx, dx)
    return windows[mirror.long(), torch.arange(n, device=images.device), :, dy, dx]


def normalize(images, mean, std, memory_format=torch.contiguous_format):
    """uint8 images to float, (x/255 - mean) / std per channel, in the given memory layout:
    the conversion and the layout change are one copy, the arithmetic happens in place."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=memory_format)
    return out.copy_(images).sub_(255 * mean).div_(255 * std)


FLIPS = ["random", "alternate"]  # CifarLoader's flip, train.py's --flip


class CifarLoader:
    """Batches from uint8 tensors held on the device.

    Training: each epoch draws a permutation and the crop/flip choices from a
    generator seeded with (seed, epoch), so an epoch is the same whenever it
    runs (a resumed run sees the data an uninterrupted one would) and every
    process of a multi-process run agrees on it. Each step takes the next
    batch_size indices of the permutation; process `rank` of `world_size` keeps
    its own slice of them, so the processes together see the global batch.
    The last partial batch is dropped, so every step has the same size.
    flip="alternate" mirrors each picture in every other epoch, starting from a
    coin tossed once per run: two epochs in a row show each picture both ways,
    where independent coins repeat the same view in a quarter of the pairs.

    Evaluation: every image once, in order; process `rank` takes its own
    contiguous share.
    """

    def __init__(self, images, labels, batch_size, mean, std, train, device,
                 seed=0, rank=0, world_size=1, pad=4, memory_format=torch.contiguous_format, flip="random"):
        if flip not in FLIPS:
            raise ValueError(f"flip must be one of {FLIPS}, not {flip!r}")
        self.memory_format, self.flip = memory_format, flip
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.train, self.pad = batch_size, train, pad
        # On the device once, not once per batch (a host-to-device copy per batch costs a GPU more than the math).
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        n = len(self.labels)
        if self.train:
            return max(n // self.batch_size, 1)
        share = self._eval_share()
        return -(-(share.stop - share.start) // self.batch_size)

    def _eval_share(self):
        n = len(self.labels)
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def __iter__(self):
        return self.batches()

    def batches(self, start_step=0):
        """The epoch's batches from start_step on (training: to resume a stopped epoch)."""
        if not self.train:
            share = self._eval_share()
            for i in range(share.start, share.stop, self.batch_size):
                j = min(i + self.batch_size, share.stop)
                yield self._finish(self.images[i:j]), self.labels[i:j]
            return
        n = len(self.labels)
        g = torch.Generator().manual_seed((self.seed << 20) + self.epoch)
        # Drawn for the whole epoch on the CPU, so the choices do not depend on the
        # device or on how the batch is split between processes; then moved to the
        # device in one go, so a step does no host work but slicing.
        perm = torch.randperm(n, generator=g)
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        if self.flip == "alternate":  # the coin comes from epoch 0's generator, which no epoch uses
            coin = torch.rand(n, generator=torch.Generator().manual_seed(self.seed << 20)) < 0.5
            mirror = coin ^ (self.epoch % 2 == 0)
        else:
            mirror = torch.rand(n, generator=g) < 0.5
        device = self.images.device
        perm, dy, dx, mirror = (t.to(device) for t in (perm, dy, dx, mirror))
        batch = min(self.batch_size, n)
        for step in range(start_step, len(self)):
            idx = torch.tensor_split(perm[step * batch:(step + 1) * batch], self.world_size)[self.rank]
            x = crop_flip(self.images[idx], dy[idx], dx[idx], mirror[idx], self.pad)
            yield self._finish(x), self.labels[idx]

    def _finish(self, images):
        return normalize(images, self.mean, self.std, self.memory_format)


def training_loaders(data_dir, dataset, image_size, subset, batch_size, eval_batch_size, seed, flip, norm=None,
                     **shard):
    """((training loader, test loader), class names, (mean, std)) of a dataset on the device, as
    train.py trains on it. norm: the normalization to keep (None: the dataset's). shard: device,
    rank, world_size and memory_format, as CifarLoader takes them."""
    if dataset != "folder" and image_size != 32:
        raise data.DataError(f"{dataset} pictures are 32x32; --image-size is for folder datasets")
    split = dict(subset=subset, dataset=dataset, image_size=image_size)
    train_x, train_y, classes = data.load_split(data_dir, train=True, **split)
    test_x, test_y, _ = data.load_split(data_dir, train=False, **split)
    norm = norm or data.normalization(dataset, train_x)
    train_loader = CifarLoader(train_x, train_y, batch_size, *norm, train=True, seed=seed, flip=flip,
                               pad=image_size // 8, **shard)  # the crops' shift: CIFAR's 4 pixels at 32
    test_loader = CifarLoader(test_x, test_y, eval_batch_size, *norm, train=False, **shard)
    return (train_loader, test_loader), classes, norm
