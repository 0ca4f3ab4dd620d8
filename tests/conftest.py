"""Shared fixtures: a tiny CIFAR-10 built in the official pickle layout, and helpers to run the scripts.

The tiny dataset is easy on purpose: each class has its own colour, so a
network that learns at all separates it quickly, while chance stays at 10%.
"""
import contextlib
import functools
import hashlib
import io
import os
import pickle
import runpy
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# The project is a set of top-level scripts, not a package: import them from there.
sys.path.insert(0, str(ROOT))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# One colour per class (RGB), far apart from each other.
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]])


def make_images(n, seed):
    """n images (uint8, N x 3 x 32 x 32) of balanced classes: class colour plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    noise = rng.integers(-40, 41, size=(n, 3, 32, 32))
    images = np.clip(PALETTE[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_cifar(root, n_train=200, n_test=100, seed=0):
    """root/cifar-10-batches-py/ as in the official archive: five training batches,
    test_batch and batches.meta, pickled dicts of uint8 rows (N, 3072) and label lists."""
    out = Path(root) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    (train_x, train_y), (test_x, test_y) = make_images(n_train, seed), make_images(n_test, seed + 1)
    for i, (bx, by) in enumerate(zip(np.array_split(train_x, 5), np.array_split(train_y, 5)), start=1):
        dump(out / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5",
                                       "data": bx.reshape(len(bx), -1), "labels": by.tolist()})
    dump(out / "test_batch", {"batch_label": "testing batch 1 of 1",
                              "data": test_x.reshape(len(test_x), -1), "labels": test_y.tolist()})
    dump(out / "batches.meta", {"label_names": CLASSES, "num_cases_per_batch": 10000, "num_vis": 3072})
    return Path(root)


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar100(root, n_train=200, n_test=100, seed=0):
    """root/cifar-100-python/ as in the official archive: train, test and meta, pickled
    dicts with fine (100) and coarse (20) labels. The colour gives the fine label's tens."""
    out = Path(root) / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, tens = make_images(n, s)
        fine = tens * 10 + rng.integers(0, 10, size=n)
        dump(out / name, {"batch_label": f"{name}ing batch 1 of 1", "data": images.reshape(n, -1),
                          "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                          "filenames": [f"{i}.png" for i in range(n)]})
    dump(out / "meta", {"fine_label_names": FINE_CLASSES, "coarse_label_names": [f"group{i}" for i in range(20)]})
    return Path(root)


FINE_CLASSES = [f"fine{i:02d}" for i in range(100)]


def write_folder(root, per_class=12, classes=("cat", "dog", "ship"), odd_files=True, seed=0):
    """root/{train,test}/<class>/ of coloured pictures of assorted sizes and formats, and,
    with odd_files, what real folders hold too: a text file, a truncated JPEG, an empty
    PNG, a hidden file and a file outside the class folders."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = int(rng.integers(24, 64)), int(rng.integers(24, 64))
                noise = rng.integers(-30, 31, size=(h, w, 3))
                pixels = np.clip(PALETTE[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    if odd_files:
        train = Path(root) / "train"
        (train / classes[0] / "notes.txt").write_text("not a picture")
        good = (train / classes[1] / "000.jpg").read_bytes()
        (train / classes[1] / "broken.jpg").write_bytes(good[: len(good) // 3])
        (train / classes[2] / "empty.png").write_bytes(b"")
        (train / classes[0] / ".DS_Store").write_bytes(b"\0\1")
        (train / "README.txt").write_text("pictures sorted by class")
    return Path(root)


def make_archive(data_root, path, folder="cifar-10-batches-py"):
    """An archive like the official one (cifar-10-python.tar.gz holding cifar-10-batches-py/), and its MD5."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(Path(data_root) / folder, arcname=folder)
    return path, hashlib.md5(Path(path).read_bytes()).hexdigest()


def run(script, *args, cwd, check=True, timeout=600, env=None):
    """Run one of the project's scripts as a user would, in cwd; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)
    return checked(proc, script, args, check)


def run_here(script, *args, cwd, check=True):
    """Run a script as `python script args` does, its __main__ block included, but in this
    process, where torch is already imported: seconds less a run. Its output and exit code are
    the process's, warnings included (those printed while torch imports excepted: each script
    keeps a test through run() for its first line); kills, signals and injected faults need run()."""
    argv, here, out, err = sys.argv, os.getcwd(), io.StringIO(), io.StringIO()
    sys.argv, code = [str(ROOT / script), *map(str, args)], 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # Python's default filters, not pytest's, and printed to stderr
            for action, category, module in PYTHON_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module, append=True)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: (
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line)))
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit as e:  # what the interpreter does with it
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
    finally:
        sys.argv = argv
        os.chdir(here)
    return checked(subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue()), script, args,
                   check)


# What a Python started without -W or PYTHONWARNINGS shows (the warnings module's documentation).
PYTHON_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                          ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                          ("ignore", ResourceWarning, "")]


def checked(proc, script, args, check):
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def injected(tmp_path, code):
    """An environment whose Python processes first run `code` (as sitecustomize): fault
    injection from outside the project, in the real subprocess."""
    folder = tmp_path / "inject"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(code)
    return {**os.environ, "PYTHONPATH": str(folder)}


def one_line_error(proc):
    """The failure a user sees: non-zero exit, one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def says(line, *words):
    """What a user relies on in a message, not its wording: one line, holding each of words
    (the file it names, the flag to change, the fix). True, for `assert says(...)`."""
    assert "\n" not in line.strip() and all(str(w) in line for w in words), line
    return True


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes (the project's scripts, make, torchrun) or "
                                       "trains whole runs; `make test-fast` (-m 'not slow') leaves these out")


@functools.cache
def font_cache_built():
    """matplotlib's first import on a machine asks fontconfig (`fc-list`, a process) for the fonts and
    keeps them in a cache: let it, before the guard below, or a fresh machine's first test that draws
    fails as one that starts processes."""
    try:
        import matplotlib.font_manager  # noqa: F401
    except ImportError:  # the tests that draw skip themselves
        pass


@pytest.fixture(autouse=True)
def in_process_only(request, monkeypatch):
    """Under `make test-fast`, a test that starts a process but is not marked slow fails at
    once, and so does one that uses a fixture that starts processes: the fast tier stays fast."""
    if "not slow" in (request.config.getoption("-m") or "") and "slow" not in request.keywords:
        font_cache_built()

        def refuse(*args, **kwargs):
            raise AssertionError(f"{request.node.name} starts a process: mark it @pytest.mark.slow")
        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
        assert not PROCESS_FIXTURES & set(request.fixturenames), f"{request.node.name}: mark it @pytest.mark.slow"


# Fixtures that run the project's scripts, shared between tests (they are set up before in_process_only).
PROCESS_FIXTURES = {"trained_run", "reference", "reference_of_four_steps", "project", "folder_run", "exported"}


# Small and fast on a 2-core CPU: a few steps of ResNet18 per epoch.
# --amp pinned too: two runs compared must not rest on a choice the machine makes.
QUICK = ["--device", "cpu", "--batch-size", "8", "--subset", "16", "--eval-batch-size", "100", "--amp", "off"]


@pytest.fixture
def locked_folders(monkeypatch):
    """Folders named `locked` cannot be listed, as another user's (root, who runs CI, reads them all)."""
    scandir = os.scandir

    def refusing(path="."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    return write_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def trained_run(cifar_dir, tmp_path_factory):
    """A finished 2-epoch ResNet18 run on the tiny data, shared by the read-only tests."""
    work = tmp_path_factory.mktemp("trained")
    proc = run_here("train.py", "--data-dir", cifar_dir, "--epochs", "2", "--log-every", "1", *QUICK, cwd=work)
    return work / "runs" / "resnet18", proc


# web.py's tests (tests/test_web.py, tests/test_web_page.py): one server per module, on a free loopback port.
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder, a checkpoint in it, and pictures (and a text file) to send."""
    from web_server import write_checkpoint, write_pictures
    d = tmp_path_factory.mktemp("web")
    return d, write_checkpoint(d / "tiny.pth"), write_pictures(d / "pictures")


@pytest.fixture(scope="module")
def server(work):
    from web_server import Server
    d, checkpoint, _ = work
    s = Server(checkpoint, folder=d)
    yield s
    s.stop()
