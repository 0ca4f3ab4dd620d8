"""The Makefile: the targets a user types, run for real on a copy of the project."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, make_archive, write_cifar

TARGETS = ["help", "install", "data", "train", "eval", "predict", "export", "test", "clean"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project (what a clone holds) and a make that uses this Python's environment."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    d = tmp_path_factory.mktemp("project")
    for f in ROOT.iterdir():
        if f.suffix in (".py", ".txt") or f.name == "Makefile":
            shutil.copy(f, d / f.name)
    env = {k: v for k, v in os.environ.items() if k not in ("CONDA_PREFIX", "MAKEFLAGS", "MAKELEVEL")}
    env["VIRTUAL_ENV"] = sys.prefix

    def make(*args, check=True):
        proc = subprocess.run(["make", *args], cwd=d, env=env, capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"make {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    return d, make


def test_make_alone_lists_every_target_with_one_line(project):
    _, make = project
    out = make().stdout
    listed = re.findall(r"^  (\S+) +\S.*$", out, re.M)
    assert set(TARGETS) <= set(listed)
    for var in ("DEVICE=auto", "MODEL=resnet18", "DATASET=cifar10", "EPOCHS=", "BATCH=", "DATA_DIR=data",
                "RUN_DIR=runs/resnet18", "ARGS="):
        assert var in out


def test_data_train_eval_predict_chain_as_a_user_types_them(project, tmp_path):
    d, make = project
    archive, md5 = make_archive(write_cifar(tmp_path / "src", n_train=100, n_test=100),
                                tmp_path / "cifar-10-python.tar.gz")
    make("data", f"ARCHIVE={archive}", f"MD5={md5}", "DATA_DIR=mydata")
    assert (d / "mydata" / "cifar-10-batches-py" / "test_batch").is_file()
    assert (d / "test" / "0_3.jpg").is_file()

    make("train", "DATA_DIR=mydata", "EPOCHS=1", "BATCH=32", "DEVICE=cpu", "ARGS=--subset 64")
    run_dir = d / "runs" / "resnet18"
    assert (run_dir / "net_001.pth").is_file() and (run_dir / "acc.txt").read_text().startswith("EPOCH=001")

    evaluation = make("eval", "DEVICE=cpu").stdout  # the run remembers its data folder
    assert re.search(r"^accuracy \d+\.\d\d% \(\d+/100\)", evaluation, re.M)

    prediction = make("predict", "IMG=test/0_3.jpg").stdout
    assert re.search(r"^test/0_3.jpg: \w+ \(\d+\.\d\d% confidence\)$", prediction, re.M)

    make("clean")
    assert (run_dir / "best.pth").is_file() and (d / "mydata").is_dir()


def test_model_and_run_dir_pass_through_to_train(project, tmp_path):
    d, make = project
    root = write_cifar(tmp_path / "data", n_train=40, n_test=20)
    make("train", f"DATA_DIR={root}", "MODEL=resnet34", "RUN_DIR=runs/r34", "EPOCHS=1", "BATCH=20",
         "DEVICE=cpu", "ARGS=--subset 20")
    import torch
    ckpt = torch.load(d / "runs" / "r34" / "best.pth", map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "resnet34" and ckpt["args"]["batch_size"] == 20 and ckpt["args"]["epochs"] == 1


def test_train_fails_cleanly_without_data_or_network(project):
    _, make = project
    proc = make("train", "DATA_DIR=nowhere", "CIFAR_URL=http://127.0.0.1:9/cifar-10-python.tar.gz", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "ARCHIVE=" in proc.stderr


def test_dataset_and_export_pass_through_to_the_scripts(project):
    _, make = project
    dry = make("-n", "train", "DATASET=folder", "DATA_DIR=photos", "RUN_DIR=runs/photos").stdout
    assert re.search(r"data\.py --dataset folder --data-dir photos", dry)
    assert re.search(r"train\.py .*--dataset folder .*--data-dir photos --out-dir runs/photos", dry)
    assert "--dataset cifar100" in make("-n", "eval", "DATASET=cifar100").stdout
    assert "--dataset" not in make("-n", "eval").stdout  # test.py then takes the run's own dataset
    assert "export.py --checkpoint runs/photos/best.pth" in make("-n", "export", "RUN_DIR=runs/photos").stdout
