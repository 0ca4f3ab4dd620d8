"""The Makefile: the targets a user types, run for real on a copy of the project."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, make_archive, write_cifar

pytestmark = pytest.mark.slow  # each test runs the scripts

TARGETS = ["help", "install", "data", "train", "eval", "predict", "export", "bench", "speedrun", "web", "bench-web",
           "test", "test-fast", "clean"]
# The Makefile's variables: a `make test ARGS=...` around this suite must not leak into the makes it runs.
VARIABLES = ["DEVICE", "MODEL", "DATASET", "EPOCHS", "BATCH", "DATA_DIR", "RUN_DIR", "IMG", "ARCHIVE", "MD5", "NPROC",
             "RUNS", "ARGS", "CIFAR_URL", "CHECKPOINT", "HOST", "PORT"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project (what a clone holds) and a make that uses this Python's environment."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    d = tmp_path_factory.mktemp("project")
    for f in ROOT.iterdir():
        if f.suffix in (".py", ".txt") or f.name == "Makefile":
            shutil.copy(f, d / f.name)
    env = {k: v for k, v in os.environ.items() if k not in ("CONDA_PREFIX", "MAKEFLAGS", "MAKELEVEL", *VARIABLES)}
    env["VIRTUAL_ENV"] = sys.prefix
    # That environment runs this suite, so it holds requirements.txt: its install stamp (the Makefile's
    # STAMP, named after the environment's path) says so, and make skips a pip run that would change nothing.
    (d / ".make").mkdir()
    (d / ".make" / (os.path.abspath(sys.prefix).replace("/", "_") + ".run")).touch()

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
    for var in ("DEVICE=auto", "MODEL=resnet18", "DATASET=cifar10", "EPOCHS=40", "BATCH=512", "DATA_DIR=data",
                "RUN_DIR=runs/resnet18", "ARGS=", "CIFAR_URL=", "RUNS="):
        assert var in out


def test_the_makefile_s_model_dataset_epochs_and_batch_are_train_py_s_defaults_passed_only_when_given(project):
    import train
    _, make = project
    defaults = train.get_args_parser().parse_args([])
    shown = make().stdout
    for var, value in (("MODEL", defaults.model), ("DATASET", defaults.dataset), ("EPOCHS", defaults.epochs),
                       ("BATCH", defaults.batch_size)):
        assert f"{var}={value}" in shown.split()
    train_line = lambda *given: next(ln for ln in make("-n", "train", *given).stdout.splitlines() if " train.py " in ln)
    dry = train_line()  # a resumed run keeps its recipe: nothing to note for flags never typed
    assert not {"--model", "--dataset", "--epochs", "--batch-size"} & set(dry.split())
    dry = train_line("MODEL=resnet50", "DATASET=cifar100", "EPOCHS=3", "BATCH=64")
    assert "--model resnet50 --dataset cifar100" in dry and "--epochs 3 --batch-size 64" in dry


def test_data_train_eval_predict_chain_as_a_user_types_them(project, tmp_path):
    d, make = project
    archive, md5 = make_archive(write_cifar(tmp_path / "src", n_train=100, n_test=100),
                                tmp_path / "cifar-10-python.tar.gz")
    make("data", "train", f"ARCHIVE={archive}", f"MD5={md5}", "DATA_DIR=mydata", "EPOCHS=1", "BATCH=8", "DEVICE=cpu",
         "ARGS=--subset 16")  # as the README's `make data train DEVICE=npu`: the data step runs once
    assert (d / "mydata" / "cifar-10-batches-py" / "test_batch").is_file()
    assert (d / "test" / "0_3.jpg").is_file()
    run_dir = d / "runs" / "resnet18"
    assert (run_dir / "net_001.pth").is_file() and (run_dir / "acc.txt").read_text().startswith("EPOCH=001")

    evaluation = make("eval", "DEVICE=cpu").stdout  # the run remembers its data folder
    assert re.search(r"^accuracy \d+\.\d\d% \(\d+/100\)", evaluation, re.M)

    prediction = make("predict", "IMG=test/0_3.jpg").stdout
    assert re.search(r"^test/0_3.jpg: \w+ \(\d+\.\d\d% confidence\)$", prediction, re.M)

    make("clean")
    assert (run_dir / "best.pth").is_file() and (d / "mydata").is_dir()


def test_model_run_dir_and_data_dir_pass_through_to_train_and_eval(project):
    _, make = project
    dry = make("-n", "train", "DATA_DIR=/abs/data", "MODEL=resnet34", "RUN_DIR=runs/r34", "EPOCHS=1", "BATCH=4",
               "DEVICE=cpu", "ARGS=--subset 4").stdout
    assert "data.py --dataset cifar10 --data-dir /abs/data" in dry
    assert ("train.py --model resnet34 --device cpu --data-dir /abs/data --out-dir runs/r34 "
            "--epochs 1 --batch-size 4 --subset 4") in dry
    evaluation = make("-n", "eval", "RUN_DIR=runs/r34", "DEVICE=cpu").stdout
    assert "test.py --checkpoint runs/r34/best.pth --device cpu --confusion-png runs/r34/confusion.png" in evaluation
    assert "--data-dir" not in evaluation  # test.py then takes the folder the run remembers (data_dir.txt)
    assert "--data-dir /abs/data" in make("-n", "eval", "DATA_DIR=/abs/data").stdout


def test_predict_runs_on_the_cpu_unless_device_is_given(project):
    _, make = project
    assert "--device" not in make("-n", "predict").stdout
    assert "predict.py test/0_3.jpg --device cuda" in " ".join(make("-n", "predict", "DEVICE=cuda").stdout.split())


def test_nproc_starts_torchrun_and_anything_but_a_count_stops_make_in_one_line(project):
    _, make = project
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 train.py --device auto" in make(
        "-n", "train", "NPROC=2").stdout
    for bad in ("0", "-1", "abc", "auto"):  # torchrun's own answer to 0 is a traceback
        proc = make("-n", "train", f"NPROC={bad}", check=False)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.strip().endswith(f"*** NPROC={bad}: the number of processes to start, "
                                            "a whole number from 1.  Stop.")


def test_a_mistyped_device_nproc_epochs_or_batch_stops_make_before_the_data_step_fetches_anything(project):
    import device
    d, make = project
    for goals, var in ((["data", "train"], "DEVICE=gpu"), (["data", "train"], "NPROC=two"), (["eval"], "DEVICE=GPU"),
                       (["speedrun"], "DEVICE=npu0"), (["train"], "DEVICE="), (["bench"], "DEVICE=cuda cpu"),
                       (["predict"], "DEVICE=gpu"), (["data", "train"], "EPOCHS=0"), (["data", "train"], "BATCH=1k"),
                       (["bench"], "BATCH=-8"), (["speedrun"], "RUNS=0"), (["data", "speedrun"], "RUNS=three")):
        proc = make(*goals, var, "DATA_DIR=fetched", "CIFAR_URL=http://127.0.0.1:9/cifar-10-python.tar.gz",
                    check=False)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"*** {var}: " in proc.stderr and not (d / "fetched").exists()
    listed = make("train", "DEVICE=gpu", check=False).stderr.split("one of ")[1].removesuffix(".  Stop.\n")
    assert listed.split() == device.DEVICES  # the Makefile's list is the scripts' own


def test_a_name_with_a_space_or_the_shell_s_syntax_stops_make_in_one_line_before_anything_runs(project):
    d, make = project
    for goals, var in ((["data", "train"], "DATA_DIR=my data"), (["train"], "RUN_DIR=first try"),
                       (["predict"], "IMG=my photo.jpg"), (["data"], "ARCHIVE=cifar copy.tar.gz")):
        proc = make(*goals, var, check=False)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.strip().endswith(f"*** {var}: make passes a name with spaces as two; choose one "
                                            "without, or run the script with the name in quotes.  Stop.")
    assert not any((d / name).exists() for name in ("my", "my data", "first", "first try"))
    for goals, var, chars in ((["predict"], "IMG=it's.jpg", "'"), (["eval"], "RUN_DIR=runs/a(1)", "( )"),
                              (["train"], "RUN_DIR=a;b", ";")):
        proc = make(*goals, var, check=False)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.strip().endswith(f"*** {var}: the shell would read {chars} in the name as its own "
                                            "syntax; choose a name without, or run the script with the name in "
                                            "quotes.  Stop.")


def test_speedrun_trains_runs_times_and_ends_with_the_summary_line(project, tmp_path):
    _, make = project
    root = write_cifar(tmp_path / "data", n_train=64, n_test=20)
    out = make("speedrun", f"DATA_DIR={root}", "DEVICE=cpu", "RUNS=2",
               "ARGS=--epochs 1 --subset 16 --batch-size 8 --eval-batch-size 100 --tta flip").stdout
    lines = out.strip().splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("speedrun run=")] == ["run=1", "run=2"]
    assert re.fullmatch(r"speedrun model=resnet18 device=cpu runs=2 epochs=1 batch=8 mean_acc=\d+\.\d\d "
                        r"min_acc=\d+\.\d\d mean_train_s=\d+\.\d\d max_train_s=\d+\.\d\d img_s=\d+ "
                        r"warmup_s=\d+\.\d\d", lines[-1])


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
