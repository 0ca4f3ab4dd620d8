"""The Makefile: the targets a user types, run for real on a copy of the project."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, make_archive, write_cifar

pytestmark = pytest.mark.slow  # each test runs the scripts

TARGETS = ["help", "install", "data", "train", "eval", "predict", "export", "bench", "speedrun", "web", "bench-web",
           "gpu-check", "test", "test-fast", "clean"]
# The Makefile's variables: a `make test ARGS=...` around this suite must not leak into the makes it runs.
VARIABLES = ["DEVICE", "MODEL", "DATASET", "EPOCHS", "BATCH", "DATA_DIR", "RUN_DIR", "IMG", "ARCHIVE", "MD5", "NPROC",
             "RUNS", "ARGS", "CIFAR_URL", "OUT", "CHECKPOINT", "HOST", "PORT"]


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


def script_args(make_output, script):
    """The arguments `script` gets in a `make -n` line, as the shell splits them."""
    lines = make_output.replace("\\\n", " ").splitlines()  # a recipe line continued with a backslash is one command
    line = next(ln for ln in lines if f" {script} " in f"{ln} ")
    words = shlex.split(line)
    return words[words.index(script) + 1:]


def test_make_alone_lists_every_target_with_one_line(project):
    import device
    _, make = project
    out = make().stdout
    listed = re.findall(r"^  (\S+) +\S.*$", out, re.M)
    assert set(TARGETS) <= set(listed)
    for var in ("DEVICE=auto", "MODEL=resnet18", "DATASET=cifar10", "EPOCHS=40", "BATCH=512", "DATA_DIR=data",
                "RUN_DIR=runs/resnet18", "ARGS=", "CIFAR_URL=", "RUNS=", "NPROC=", "IMG=", "ARCHIVE=", "MD5="):
        assert var in out
    assert re.search(r"DEVICE=auto \(([a-z|]+)\)", out)[1].split("|") == device.DEVICES  # the scripts' own list


def test_the_makefile_s_model_dataset_epochs_and_batch_are_train_py_s_defaults_passed_only_when_given(project):
    import train
    _, make = project
    defaults = train.get_args_parser().parse_args([])
    shown = make().stdout
    for var, value in (("MODEL", defaults.model), ("DATASET", defaults.dataset), ("EPOCHS", defaults.epochs),
                       ("BATCH", defaults.batch_size)):
        assert f"{var}={value}" in shown.split()
    args = script_args(make("-n", "train").stdout, "train.py")  # a resumed run keeps its recipe: nothing to note
    assert not {"--model", "--dataset", "--epochs", "--batch-size"} & set(args)
    args = script_args(make("-n", "train", "MODEL=resnet50", "DATASET=cifar100", "EPOCHS=3", "BATCH=64").stdout,
                       "train.py")
    assert " ".join(args).startswith("--model resnet50 --dataset cifar100 ")
    assert " ".join(args).endswith(" --epochs 3 --batch-size 64")


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
    assert script_args(dry, "data.py") == ["--dataset", "cifar10", "--data-dir", "/abs/data"]
    assert script_args(dry, "train.py") == ["--model", "resnet34", "--device", "cpu", "--data-dir", "/abs/data",
                                            "--out-dir", "runs/r34", "--epochs", "1", "--batch-size", "4",
                                            "--subset", "4"]
    evaluation = script_args(make("-n", "eval", "RUN_DIR=runs/r34", "DEVICE=cpu").stdout, "test.py")
    assert evaluation == ["--checkpoint", "runs/r34/best.pth", "--device", "cpu", "--confusion-png",
                          "runs/r34/confusion.png"]  # no --data-dir: test.py takes the run's own (data_dir.txt)
    assert "/abs/data" in script_args(make("-n", "eval", "DATA_DIR=/abs/data").stdout, "test.py")


def test_gpu_check_runs_on_python3_where_no_environment_is_active_or_made(project):
    d, make = project
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "MAKEFLAGS", "MAKELEVEL")}
    dry = subprocess.run(["make", "-n", "gpu-check", "OUT=r"], cwd=d, env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert dry.split()[:3] == ["python3", "gpu_check.py", "'r'"] and not (d / ".venv").exists()
    assert make("-n", "gpu-check").stdout.split()[0] == f"{sys.prefix}/bin/python"  # an environment's, where one is


def test_predict_runs_on_the_cpu_unless_device_is_given(project):
    _, make = project
    assert "--device" not in script_args(make("-n", "predict").stdout, "predict.py")
    assert script_args(make("-n", "predict", "DEVICE=cuda").stdout, "predict.py") == ["test/0_3.jpg", "--device",
                                                                                      "cuda"]


def test_nproc_starts_torchrun_and_anything_but_a_count_stops_make_in_one_line(project):
    _, make = project
    dry = make("-n", "train", "NPROC=2").stdout
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 train.py --device auto" in dry
    for bad in ("0", "-1", "abc", "auto", "08"):  # torchrun's own answer to 0 is a traceback
        proc = make("-n", "train", f"NPROC={bad}", check=False)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"NPROC={bad}" in proc.stderr and "whole number" in proc.stderr


def test_a_mistyped_value_is_refused_by_its_script_in_one_line_before_anything_is_trained(project, tmp_path):
    d, make = project
    root = write_cifar(tmp_path / "data", n_train=16, n_test=8)
    for goal, var, flag in (("train", "DEVICE=gpu", "--device"), ("train", "EPOCHS=0", "--epochs"),
                            ("train", "BATCH=1k", "--batch-size"), ("bench", "BATCH=-8", "--batch-size"),
                            ("speedrun", "RUNS=0", "--speedrun"), ("eval", "DEVICE=GPU", "--device"),
                            ("predict", "DEVICE=gpu", "--device")):
        proc = make(goal, var, f"DATA_DIR={root}", "RUN_DIR=runs/typo", check=False)
        errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("make: ")]
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr
        assert flag in errors[0] and var.split("=")[1] in errors[0]
    assert not (d / "runs" / "typo").exists()


def test_a_name_with_spaces_brackets_or_a_semicolon_reaches_the_script_whole(project):
    d, make = project
    assert script_args(make("-n", "train", "RUN_DIR=first try", "DATA_DIR=my data").stdout, "train.py")[2:6] == [
        "--data-dir", "my data", "--out-dir", "first try"]
    assert script_args(make("-n", "predict", "IMG=my photo (1).jpg").stdout, "predict.py")[0] == "my photo (1).jpg"
    for name in ("runs/a (1)", "a;b"):  # the script's own error names it whole, and the shell runs nothing else
        proc = make("eval", f"RUN_DIR={name}", "DEVICE=cpu", check=False)
        errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("make: ")]
        assert proc.returncode != 0 and len(errors) == 1 and f"{name}/best.pth" in errors[0], proc.stderr
    assert not any((d / name).exists() for name in ("first", "first try", "my", "a", "b"))


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
    assert "ARCHIVE=" in proc.stderr or "--archive" in proc.stderr  # how to train without the network


def test_dataset_and_export_pass_through_to_the_scripts(project):
    _, make = project
    dry = make("-n", "train", "DATASET=folder", "DATA_DIR=photos", "RUN_DIR=runs/photos").stdout
    assert script_args(dry, "data.py")[:4] == ["--dataset", "folder", "--data-dir", "photos"]
    assert " --dataset folder " in " ".join(["", *script_args(dry, "train.py")])
    assert " --data-dir photos --out-dir runs/photos" in " ".join(script_args(dry, "train.py"))
    assert " --dataset cifar100" in " ".join(script_args(make("-n", "eval", "DATASET=cifar100").stdout, "test.py"))
    assert "--dataset" not in script_args(make("-n", "eval").stdout, "test.py")  # test.py takes the run's own
    assert script_args(make("-n", "export", "RUN_DIR=runs/photos").stdout, "export.py")[:2] == [
        "--checkpoint", "runs/photos/best.pth"]
