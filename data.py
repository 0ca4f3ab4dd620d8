"""Datasets: fetch and verify CIFAR, and load a split of any dataset as uint8 tensors.

    python data.py --data-dir data                      # CIFAR-10: download (MD5-checked) and extract
    python data.py --data-dir data --archive cifar-10-python.tar.gz   # offline, from a local copy
    python data.py --dataset cifar100 --data-dir data   # CIFAR-100 (its 100 fine labels)
    python data.py --dataset folder --data-dir photos   # photos/train/<class>/*, photos/test/<class>/*

A dataset of this size (CIFAR: 184 MB of uint8, both splits) is loaded once into one tensor,
to be kept on the training device and batched there (batching.py). Picture folders are decoded
once and cached as arrays beside the pictures (pictures.py).
"""
import argparse
import hashlib
import http.client
import os
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # torch_npu loads in device.py, which explains failures

import torch  # noqa: E402

import cli  # noqa: E402
import pictures  # noqa: E402
from pictures import DataError  # noqa: E402  the error of any data that cannot be used: data.DataError

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
        raise DataError(f"cannot download {url} ({reason}); offline? pass --archive path/to/{archive_name}, "
                        "or --url a mirror") from None
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
        pictures.folder_classes(data_dir)
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
        raise DataError(f"{archive} is a folder; --archive names the {spec.archive} file")
    if not archive.is_file():
        raise DataError(f"{archive}: no such archive")
    sum_found = md5sum(archive) if md5 else None
    if md5 and sum_found != md5:
        if downloaded:  # a bad download must not block the next try; a copy put here by hand is kept
            archive.unlink()
        trust = "" if downloaded else (f"; a copy you trust (repacked, say) passes with --md5 {sum_found}"
                                       f"{', or delete it to download the official one' if found else ''}")
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
        images, labels, classes = pictures.load_folder(data_dir, train, image_size)
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
