"""Datasets on the device: fetch, verify, load, shuffle, augment and batch them.

    python data.py --data-dir data                      # CIFAR-10: download (MD5-checked) and extract
    python data.py --data-dir data --archive cifar-10-python.tar.gz   # offline, from a local copy
    python data.py --dataset cifar100 --data-dir data   # CIFAR-100 (its 100 fine labels)
    python data.py --dataset folder --data-dir photos   # photos/train/<class>/*, photos/test/<class>/*

A dataset of this size (CIFAR: 184 MB of uint8, both splits) is loaded once into one tensor
and kept on the training device. Shuffling, random crops and flips are done on
whole batches there: no DataLoader workers, no per-image Python work. Picture
folders are decoded once and cached as arrays beside the pictures.
"""
import argparse
import contextlib
import hashlib
import http.client
import os
import pickle
import re
import shutil
import socket
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # torch_npu loads in device.py, which explains failures

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cli  # noqa: E402

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# The true per-channel statistics of the training sets. The tutorials' CIFAR-10
# std (0.2023, 0.1994, 0.2010) is a long-copied mistake (kuangliu/pytorch-cifar#19).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class Cifar(NamedTuple):
    """Where an official CIFAR archive comes from and how it is laid out."""
    title: str
    url: str
    md5: str
    archive: str
    folder: str
    train_files: list
    test_files: list
    meta_file: str
    label_key: str
    names_key: str
    mean: tuple
    std: tuple


CIFAR = {
    "cifar10": Cifar("CIFAR-10", CIFAR10_URL, CIFAR10_MD5, "cifar-10-python.tar.gz", "cifar-10-batches-py",
                     [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                     "labels", "label_names", CIFAR10_MEAN, CIFAR10_STD),
    # The fine labels (100 classes), not the 20 coarse superclasses.
    "cifar100": Cifar("CIFAR-100", CIFAR100_URL, CIFAR100_MD5, "cifar-100-python.tar.gz", "cifar-100-python",
                      ["train"], ["test"], "meta", "fine_labels", "fine_label_names", CIFAR100_MEAN, CIFAR100_STD),
}
DATASETS = [*CIFAR, "folder"]


class DataError(cli.UserError):
    """Data that cannot be used; the message is one line for the user."""


class BadBatchFile(DataError):
    """A CIFAR batch file that does not read as one: its path, what is wrong with it, and what to do
    (an extracted archive's file is named within the archive, and the archive is what to replace)."""

    def __init__(self, path, problem, advice=""):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}{f'; {advice}' if advice else ''}")


# ---------------------------------------------------------------------------
# Fetch, verify, extract

def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest, archive_name="cifar-10-python.tar.gz"):
    """Stream url to dest through a temporary file, so a cut-off download never looks finished."""
    from tqdm import tqdm
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                      disable=not sys.stderr.isatty()) as bar:
                for chunk in iter(lambda: r.read(1 << 16), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        if total is not None and tmp.stat().st_size != total:
            raise DataError(f"download of {url} stopped at {tmp.stat().st_size} of {total} bytes; run it again")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download {url} ({reason}); offline? pass ARCHIVE=path/to/"
                        f"{archive_name}, or CIFAR_URL=a mirror") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


def is_prepared(data_dir, dataset="cifar10"):
    if dataset == "folder":
        return (Path(data_dir) / "train").is_dir() and (Path(data_dir) / "test").is_dir()
    return not missing_files(Path(data_dir) / CIFAR[dataset].folder, CIFAR[dataset])


def missing_files(folder, spec):
    """The files of the dataset folder that are not there."""
    return [name for name in spec.train_files + spec.test_files + [spec.meta_file] if not (folder / name).is_file()]


def prepare(data_dir, archive=None, url=None, md5=None, dataset="cifar10"):
    """Make DATA_DIR/<the dataset's folder> exist and be complete; do nothing if it already is.

    md5: None checks the official sum, "" checks nothing. The archive is
    extracted into a temporary folder and checked before it is renamed into
    place, so an interrupted run never leaves a half dataset behind.
    """
    data_dir = Path(data_dir)
    if dataset == "folder":  # the user's own pictures: nothing to fetch, only to check
        folder_classes(data_dir)
        return data_dir
    spec = CIFAR[dataset]
    md5 = (spec.md5 if md5 is None else md5).lower()  # PowerShell's Get-FileHash writes capitals
    if is_prepared(data_dir, dataset):
        if archive:
            print(f"note: {data_dir / spec.folder} is complete already; {archive} is not read")
        return data_dir / spec.folder
    made = not data_dir.exists()
    cli.make_folder(data_dir, DataError)
    try:
        return _fetch(data_dir, dataset, archive, url, md5)
    except BaseException:
        if made and not any(data_dir.iterdir()):  # a failed first try leaves no empty data folder behind
            data_dir.rmdir()
        raise


def _fetch(data_dir, dataset, archive, url, md5):
    """prepare()'s work once DATA_DIR exists: download or take the archive, check it, extract it."""
    spec = CIFAR[dataset]
    found = downloaded = False  # the archive was in DATA_DIR already / this call fetched it
    if archive is None:
        archive = data_dir / spec.archive
        found = archive.is_file()
        if not found:
            url = url or os.environ.get("CIFAR_URL") or spec.url
            print(f"downloading {url}")
            download(url, archive, spec.archive)
            downloaded = True
    archive = Path(archive)
    if archive.is_dir():
        raise DataError(f"{archive} is a folder; --archive (ARCHIVE=) names the {spec.archive} file")
    if not archive.is_file():
        raise DataError(f"{archive}: no such archive")
    sum_found = md5sum(archive) if md5 else None
    if md5 and sum_found != md5:
        if downloaded:  # a bad download must not block the next try; a copy put here by hand is kept
            archive.unlink()
        trust = "" if downloaded else (f"; a copy you trust (repacked, say) passes with MD5={sum_found} (data.py: "
                                       f"--md5){', or delete it to download the official one' if found else ''}")
        raise DataError(f"{archive}: MD5 is {sum_found}, expected {md5}; "
                        f"the file is corrupt or not the official {spec.title} archive{trust}")
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=data_dir))
    try:
        try:
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers()
                           if m.isfile() and m.name.startswith(spec.folder + "/") and ".." not in m.name]
                tar.extractall(tmp, members=members)
        except (tarfile.TarError, OSError, EOFError) as e:
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(":")  # tarfile's may run to lines
            raise DataError(f"{archive}: cannot extract ({detail})") from None
        if not is_prepared(tmp, dataset):
            raise DataError(f"{archive}: does not hold {spec.folder}/ with the {spec.title} batch files")
        try:  # fail now, not at the first epoch
            classes = read_classes(tmp / spec.folder, spec)
            for name in spec.train_files + spec.test_files:
                read_batch(tmp / spec.folder / name, len(classes), spec.label_key)
        except BadBatchFile as e:  # named within the archive: the temporary folder is about to go
            raise DataError(f"{archive}: {e.path.relative_to(tmp).as_posix()}: {e.problem}; the archive is damaged, "
                            f"or not the official {spec.title} one") from None
        dest = data_dir / spec.folder
        missing = missing_files(dest, spec)
        if not missing:  # another process has just put a whole copy in place
            return dest
        if os.path.lexists(dest):  # a copy with files deleted, say: the archive's takes its place
            print(f"note: {dest} lacks {cli.first_few(missing)}; the archive's copy replaces it")
            os.replace(dest, tmp / "incomplete")
        os.replace(tmp / spec.folder, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data_dir / spec.folder


# ---------------------------------------------------------------------------
# Load

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch files but refuses anything except plain data and
    numpy arrays: a doctored batch file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               # Python 3 writes bytes into protocol-2 pickles through this harmless call.
               ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise BadBatchFile(path, "missing", "run python data.py again") from None
    except Exception as e:  # truncated or corrupt file
        raise BadBatchFile(path, f"unreadable ({type(e).__name__}: {e})",
                           f"delete {Path(path).parent} and run python data.py again") from None
    if not isinstance(obj, dict):
        raise BadBatchFile(path, f"not a CIFAR batch (holds a {type(obj).__name__})")
    return obj


def read_classes(batches_dir, spec=CIFAR["cifar10"]):
    meta = _unpickle(Path(batches_dir) / spec.meta_file)
    names = meta.get(spec.names_key)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise BadBatchFile(Path(batches_dir) / spec.meta_file, f"no list of {spec.names_key}")
    return names


def read_batch(path, num_classes, label_key="labels"):
    """One batch file as (uint8 tensor N x 3 x 32 x 32, int64 labels), checked."""
    import numpy as np
    batch = _unpickle(path)
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise BadBatchFile(path, f"'data' should be uint8 of shape (N, 3072), found {what}")
    labels = np.asarray(labels)
    if labels.size == 0:  # an empty list reads as floats
        labels = labels.astype(np.int64)
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise BadBatchFile(path, f"'{label_key}' should be {data.shape[0]} integers, "
                                 f"found {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise BadBatchFile(path, f"labels outside 0..{num_classes - 1}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def load_split(data_dir, train, subset=None, dataset="cifar10", image_size=32):
    """(images uint8 N x 3 x size x size, labels int64 N, class names) of one split."""
    if dataset == "folder":
        images, labels, classes = load_folder(data_dir, train, image_size)
        return images[:subset], labels[:subset], classes  # [:None] is everything
    spec = CIFAR[dataset]
    batches_dir = Path(data_dir) / spec.folder
    if not batches_dir.is_dir():
        flag = "" if dataset == "cifar10" else f" --dataset {dataset}"
        raise DataError(f"no {spec.title} in {data_dir}: run python data.py{flag}, or pass --data-dir")
    classes = read_classes(batches_dir, spec)
    images, labels, n = [], [], 0
    for name in spec.train_files if train else spec.test_files:
        if subset is not None and n >= subset:
            break
        x, y = read_batch(batches_dir / name, len(classes), spec.label_key)
        images.append(x)
        labels.append(y)
        n += len(y)
    images, labels = torch.cat(images), torch.cat(labels)
    if not len(labels):  # nothing to train on, or an accuracy of 0 of 0 pictures
        raise DataError(f"{batches_dir}: its {'training' if train else 'test'} batches hold no images; "
                        "delete the folder and run python data.py again")
    if subset is not None:
        images, labels = images[:subset], labels[:subset]
    return images, labels, classes


def run_test_split(ckpt, data_dir=None, dataset=None, subset=None, remembered=None):
    """The test split to score a checkpoint on: its run's dataset at its picture size, from
    data_dir, else from `remembered` (the folder the run's folder noted down), else from the
    folder the checkpoint names (kept only when it was a relative path inside the working
    directory). Returns (images, labels, classes, data_dir, dataset)."""
    dataset = dataset or ckpt.get("dataset", "cifar10")
    if dataset not in DATASETS:
        raise DataError(f"the checkpoint's dataset {dataset!r} is none of {', '.join(DATASETS)}: pass --dataset")
    given = data_dir is not None
    data_dir = data_dir or remembered or ckpt.get("args", {}).get("data_dir") or "data"
    # A CIFAR folder with files gone is the run's all the same: loading it names what is missing.
    there = is_prepared(data_dir, dataset) or dataset in CIFAR and (Path(data_dir) / CIFAR[dataset].folder).is_dir()
    if not given and not there:
        raise DataError(f"no {dataset} data in {data_dir!r}, the run's data folder as far as it is known: "
                        "pass --data-dir")
    images, labels, classes = load_split(data_dir, train=False, subset=subset, dataset=dataset,
                                         image_size=ckpt.get("image_size", 32))
    return images, labels, classes, data_dir, dataset


def normalization(dataset, train_images):
    """Per-channel (mean, std) for the dataset: the official figures for CIFAR,
    computed from the training pictures for a folder."""
    if dataset in CIFAR:
        return CIFAR[dataset].mean, CIFAR[dataset].std
    total, squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for chunk in train_images.split(4096):  # in float64, a chunk at a time: no copy of the whole set
        x = chunk.double().div_(255)
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    count = train_images.numel() // 3
    mean = total / count
    std = (squares / count - mean.square()).clamp(min=0).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


# ---------------------------------------------------------------------------
# Pictures: any file Pillow reads, as the network sees it (train, test, predict)

class PictureError(cli.UserError):
    """A picture that cannot be used; the message is one line for the user."""


def to_rgb(im):
    """Any Pillow mode as 8-bit RGB; transparency is laid on white."""
    import numpy as np
    from PIL import Image
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16/32-bit grayscale
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # no number: black
        # 16-bit if any value says so; a float picture (a TIFF from science or a renderer) is often 0..1
        top = 65535.0 if arr.max() > 255 else 1.0 if im.mode == "F" and arr.max() <= 1 else 255.0
        im = Image.fromarray((arr * 255.0 / top).clip(0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return im.convert("RGB")


def open_picture(path, draft=None):
    """A picture file (a path, or a binary stream such as sys.stdin.buffer) as an upright 8-bit RGB
    Pillow image, or PictureError.

    draft: (w, h) a JPEG may be decoded at instead of full size (big photos load
    many times faster; the result is at least that large). Pillow's pixel limit is
    applied to what is decoded: a phone's 200-megapixel JPEG passes at a fraction of
    its size, a PNG that large does not."""
    from PIL import Image, ImageOps
    name = getattr(path, "name", "<stream>") if hasattr(path, "read") else path  # sys.stdin.buffer: '<stdin>'
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's later checks (GIF frames)
            Image.MAX_IMAGE_PIXELS = None  # Image.open's check comes before draft() could shrink the picture
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
            with im:
                if draft:
                    im.draft("RGB", draft)
                if limit and im.size[0] * im.size[1] > limit:  # Pillow warns up to 2x the limit: refused here
                    raise Image.DecompressionBombError(f"{im.size[0]} x {im.size[1]} pixels")
                return to_rgb(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise PictureError(f"{name}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PictureError(f"{name}: too many pixels to decode safely (a decompression bomb?)") from None
    except Image.UnidentifiedImageError:  # its message names the file again, a stream by its repr
        raise PictureError(f"{name}: cannot read picture (cannot identify image file)") from None
    except Exception as e:  # truncated, unsupported; or the system's refusal (a name too long, ...)
        detail = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
        raise PictureError(f"{name}: cannot read picture ({detail})") from None


def load_picture(path, size):
    """A picture file as the model sees it: uint8 tensor (3, size, size), center square, or PictureError."""
    import numpy as np
    from PIL import Image
    im = open_picture(path, draft=(size * 2, size * 2))
    w, h = im.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    im = im.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def visible_files(folder):
    """Files under folder, sorted, skipping hidden ones (.DS_Store, .cache/ and the like). Its
    sub-folders may be links (class folders linked in from elsewhere, as datasets are often put
    together); links further down are not followed, so a link loop cannot trap the walk. A
    folder that cannot be read raises OSError: skipped, its pictures would be missed unnoticed."""
    def unreadable(error):
        raise error

    found = []
    for entry in Path(folder).iterdir():
        if entry.name.startswith("."):
            continue
        if os.path.isdir(entry):
            for root, folders, files in os.walk(entry, onerror=unreadable):
                folders[:] = [name for name in folders if not name.startswith(".")]
                found += [Path(root, name) for name in files
                          if not name.startswith(".") and os.path.isfile(os.path.join(root, name))]
        elif os.path.isfile(entry):
            found.append(entry)
    return sorted(found)


def folder_classes(data_dir):
    """The class names of a folder dataset: the sub-folders of DIR/train, sorted."""
    train_dir = Path(data_dir) / "train"
    if not train_dir.is_dir() or not (Path(data_dir) / "test").is_dir():
        raise DataError(f"{data_dir}: a folder dataset needs {data_dir}/train/<class>/ and "
                        f"{data_dir}/test/<class>/ holding pictures")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{train_dir}: no class folders (expected {train_dir}/<class>/<picture>)")
    if len(classes) == 1:
        raise DataError(f"{train_dir}: one class folder ({classes[0]}); telling pictures apart takes two or more")
    return classes


def cache_copy(cache, writer="*"):
    """The temporary copy of cache that writer (host-pid) fills before renaming it into place; "*": any."""
    return cache.with_name(f"{cache.name}.{writer}.tmp.npz")


def remove_abandoned(cache, minutes=10):
    """Delete the temporary copies of cache that a killed process left (kill -9 while writing it):
    untouched for some minutes, where a writer still at work touches its copy all the while."""
    for tmp in cache.parent.glob(cache_copy(cache).name):
        with contextlib.suppress(OSError):  # gone already: another process removed it
            if time.time() - tmp.stat().st_mtime > minutes * 60:
                tmp.unlink()


def load_folder(data_dir, train, image_size=32):
    """One split of DIR/{train,test}/<class>/* as (uint8 N x 3 x size x size, labels, classes).

    Every picture is decoded once (Pillow, upright, RGB, center square, resized)
    and the arrays are cached in DIR/.cache/; the cache is used while the split's
    files (names, sizes, times) and the size stay the same, and rebuilt
    otherwise. Files that are not readable pictures are listed and skipped.
    The order is shuffled once, with a fixed seed, so --subset takes a sample of
    every class rather than the first classes.
    """
    import numpy as np
    classes = folder_classes(data_dir)
    split = "train" if train else "test"
    split_dir = Path(data_dir) / split
    try:
        files = visible_files(split_dir)
    except OSError as e:  # a folder of another user's, say: its pictures would be missing from the split
        raise DataError(f"{split_dir}: cannot read {e.filename or split_dir} ({e.strerror or e})") from None
    fingerprint = folder_fingerprint(files, split_dir, image_size, classes)
    cache = Path(data_dir) / ".cache" / f"{split}-{image_size}px.npz"
    remove_abandoned(cache)
    cached = read_cache(cache, fingerprint)
    if cached is not None:
        return *cached, classes
    images, labels = decode_pictures(files, split_dir, classes, image_size)
    empty = sorted(set(classes) - {classes[i] for i in set(labels)})
    named = cli.first_few(empty)
    if train and empty:  # a class the network could never learn
        raise DataError(f"{split_dir}: no readable pictures in the class folders {named}; add some, or remove "
                        "those folders")
    if empty:
        print(f"note: {split_dir} has no pictures of {named}: the test accuracy leaves "
              f"{'that class' if len(empty) == 1 else 'those classes'} out", file=sys.stderr)
    order = np.random.RandomState(0).permutation(len(images))
    images, labels = np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order]
    write_cache(cache, fingerprint, images, labels)
    return torch.from_numpy(images), torch.from_numpy(labels), classes


def folder_fingerprint(files, split_dir, image_size, classes):
    """What the cache of a split is valid for: its files' names, sizes and times, the size and the classes."""
    h = hashlib.sha256(f"v1 {image_size} {classes}".encode())
    for f in files:
        st = f.stat()
        # the name's bytes as the file system holds them, UTF-8 or not (a GBK name from a Windows zip, say)
        h.update(os.fsencode(f.relative_to(split_dir)) + f" {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def read_cache(cache, fingerprint):
    """(images, labels) from the cache file if it was made for fingerprint, else None."""
    import numpy as np
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            if str(z["fingerprint"]) == fingerprint:
                return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])
    except Exception:  # a damaged cache is rebuilt like a stale one
        pass
    return None


def write_cache(cache, fingerprint, images, labels):
    """Save the decoded split; where that fails, everything still works, only slower next time."""
    import numpy as np
    # A name of its own for each torchrun process, on any of the machines that share the folder.
    tmp = cache_copy(cache, f"{socket.gethostname()}-{os.getpid()}")
    try:
        cache.parent.mkdir(exist_ok=True)
        np.savez(tmp, images=images, labels=labels, fingerprint=np.array(fingerprint))
        os.replace(tmp, cache)
    except BaseException as e:  # a read-only folder or a full disk
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # no half-written copy left behind, nor after Ctrl-C
        if not isinstance(e, OSError):
            raise
        print(f"note: cannot cache the decoded pictures in {cache.parent} ({e.strerror or e})", file=sys.stderr)


def decode_pictures(files, split_dir, classes, image_size):
    """The pictures of a split's class folders, decoded, as (list of uint8 arrays, list of labels).
    Files that are no readable pictures, outside a class folder or in a folder of a class the
    network does not know are skipped, and listed on stderr."""
    data_dir = split_dir.parent
    images, labels, skipped, unknown = [], [], [], {}
    for f in files:
        parts = f.relative_to(split_dir).parts
        if len(parts) >= 2 and parts[0] not in classes:  # test/<a class train/ does not have>/
            unknown[parts[0]] = unknown.get(parts[0], 0) + 1
            continue
        if len(parts) < 2:
            skipped.append(f"{f} (not inside a class folder)")
            continue
        try:
            images.append(load_picture(f, image_size).numpy())
            labels.append(classes.index(parts[0]))
        except PictureError as e:
            skipped.append(str(e))
    # A folder of a class the network does not know is one line; the rest file by file (the first
    # 20), so the user can fix or remove them.
    lines = [f"{split_dir / name}/: {cli.plural(n, 'file')}, a class {data_dir / 'train'} does not have"
             for name, n in unknown.items()] + skipped
    if lines:
        print(f"skipped {len(skipped) + sum(unknown.values())} of {len(files)} files in {split_dir}:", file=sys.stderr)
        for line in lines[:20]:
            print(f"  {line}", file=sys.stderr)
        if len(lines) > 20:
            print(f"  and {len(lines) - 20} more", file=sys.stderr)
    if not images:
        raise DataError(f"{split_dir}: no readable pictures in its class folders")
    return images, labels


# ---------------------------------------------------------------------------
# Augment and batch, on the device

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
        raise DataError(f"{dataset} pictures are 32x32; --image-size is for folder datasets")
    split = dict(subset=subset, dataset=dataset, image_size=image_size)
    train_x, train_y, classes = load_split(data_dir, train=True, **split)
    test_x, test_y, _ = load_split(data_dir, train=False, **split)
    norm = norm or normalization(dataset, train_x)
    train_loader = CifarLoader(train_x, train_y, batch_size, *norm, train=True, seed=seed, flip=flip,
                               pad=image_size // 8, **shard)  # the crops' shift: CIFAR's 4 pixels at 32
    test_loader = CifarLoader(test_x, test_y, eval_batch_size, *norm, train=False, **shard)
    return (train_loader, test_loader), classes, norm


# ---------------------------------------------------------------------------
# Sample pictures for predict.py

def write_samples(images, labels, out_dir, per_class=10):
    """test/<label>_<k>.jpg: the first per_class test images of each class."""
    from PIL import Image
    out_dir = Path(out_dir)
    cli.make_folder(out_dir, DataError)
    for label in range(int(labels.max()) + 1):
        picks = (labels == label).nonzero().flatten()[:per_class]
        for k, i in enumerate(picks.tolist()):
            path = out_dir / f"{label}_{k}.jpg"
            if not path.exists():
                Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(path, quality=95, subsampling=0)
    return out_dir


def md5_flag(text):
    """--md5: 32 hexadecimal digits in either case, or '' to check nothing."""
    if text and not re.fullmatch(r"[0-9a-fA-F]{32}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an MD5 sum (32 hexadecimal digits)")
    return text


def get_args_parser():
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="cifar10, cifar100 (fine labels), or folder: DATA_DIR/{train,test}/<class>/<picture>")
    p.add_argument("--data-dir", default="data", help="where the dataset's folder goes (folder: the pictures' root)")
    p.add_argument("--archive", default=None, help="use this local copy of the official archive instead of downloading")
    p.add_argument("--url", default=os.environ.get("CIFAR_URL"),
                   help="download from here instead of the official address (environment: CIFAR_URL)")
    p.add_argument("--md5", type=md5_flag, default=None,
                   help="expected MD5 of the archive ('' for no check; default: the official one)")
    p.add_argument("--image-size", type=cli.integer(min=8, max=1024), default=32,
                   help="folder datasets: pictures are resized to this")
    p.add_argument("--samples", default="test",
                   help="write sample test pictures here ('' for none): CIFAR-10 as <label>_<k>.jpg, "
                        "CIFAR-100 in a sub-folder cifar100/ (a folder dataset has pictures already)")
    return p


def main(args):
    out = prepare(args.data_dir, archive=args.archive, url=args.url, md5=args.md5, dataset=args.dataset)
    if args.dataset == "folder":  # decode and cache both splits now, so training starts at once
        for train in (True, False):
            images, _, classes = load_split(args.data_dir, train=train, dataset="folder", image_size=args.image_size)
            print(f"{args.data_dir}/{'train' if train else 'test'}: {len(images)} pictures of {len(classes)} classes")
        return
    print(f"{CIFAR[args.dataset].title} ready in {out}")
    if args.samples:
        images, labels, _ = load_split(args.data_dir, train=False, dataset=args.dataset)
        folder = Path(args.samples) if args.dataset == "cifar10" else Path(args.samples) / args.dataset
        written = write_samples(images, labels, folder, per_class=10 if labels.max() < 10 else 1)
        example = written / ("0_3.jpg" if args.dataset == "cifar10" else "0_0.jpg")
        print(f"sample pictures in {written}/ (<label>_<k>.jpg, e.g. {example})")


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.main(lambda: main(args))
