"""gpu_check.py: the GPU check's steps, run end to end on the CPU at tiny sizes, so its first run on a GPU works."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, write_cifar

pytestmark = pytest.mark.slow  # it runs make and the scripts


@pytest.fixture
def project(tmp_path):
    """A copy of the project, as a clone holds it, and tiny CIFAR-10 pickles where the check looks for its data."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    d = tmp_path / "project"
    d.mkdir()
    for f in ROOT.iterdir():
        if f.suffix in (".py", ".txt") or f.name == "Makefile":
            shutil.copy(f, d / f.name)
    return d, write_cifar(tmp_path / "data", n_train=64, n_test=20)


def check(d, data, out, *flags):
    return subprocess.run([sys.executable, "gpu_check.py", str(out), "--data", str(data), "--device", "cpu", *flags],
                          cwd=d, capture_output=True, text=True, timeout=900)


def test_every_step_runs_on_the_cpu_and_writes_its_lines_as_it_ends_even_after_one_times_out(project, tmp_path):
    d, data = project
    proc = check(d, data, tmp_path / "out", "--batches", "8", "--bench-args", "--steps 1 --warmup 1 --repeats 1",
                 "--timeout", "compile=5",  # compiling on a CPU takes minutes: this step times out
                 "--runs", "2", "--speedrun-args", "--epochs 1 --subset 16 --batch-size 8 --eval-batch-size 100",
                 "--train-args", "--epochs 1 --subset 16 --batch-size 8", "--resnet50-batch", "4")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a step timed out
    lines = (tmp_path / "out" / "results.txt").read_text().splitlines()
    assert lines == proc.stdout.splitlines()
    ends = [ln.split()[1] for ln in lines if ln.startswith("step ")]
    assert ends == ["env", "bench-resnet18-8", "bench-resnet18-8-reduce-overhead", "data", "speedrun",
                    "train-resnet18", "bench-resnet50-4", "airbench94"]
    step = {ln.split()[1]: ln for ln in lines if ln.startswith("step ")}
    assert "timed out" in step["bench-resnet18-8-reduce-overhead"]
    assert all("exit code 0" in step[s] for s in ("env", "bench-resnet18-8", "speedrun", "train-resnet18"))
    assert "skipped" in step["airbench94"] and "CUDA" in step["airbench94"]  # no failure: it needs CUDA
    assert lines[0].startswith("env gpu=none torch=")
    assert any(ln.startswith("bench model=resnet18 device=cpu batch=8 ") and " compile=off " in ln for ln in lines)
    assert any(ln.startswith("bench model=resnet50 device=cpu batch=4 ") for ln in lines)
    assert any(ln.startswith("speedrun model=resnet18 device=cpu runs=2 ") and "mean_acc=" in ln for ln in lines)
    train = next(ln for ln in lines if ln.startswith("train model=resnet18 "))
    assert {"best_acc", "train_s", "eval_s", "total_s", "wall_s"} <= {kv.split("=")[0] for kv in train.split()[2:]}
    assert lines[-1].startswith("done: 1 of the steps") and "bench-resnet18-8-reduce-overhead" in lines[-1]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "$ make --no-print-directory bench MODEL=resnet18 BATCH=8" in log and "best accuracy" in log


def test_a_step_whose_timeout_would_overrun_the_budget_is_skipped_with_a_line(project, tmp_path):
    d, data = project
    proc = check(d, data, tmp_path / "out", "--budget", "5")
    assert proc.returncode == 1
    lines = (tmp_path / "out" / "results.txt").read_text().splitlines()
    skipped = [ln.split()[1] for ln in lines if ln.startswith("step ") and "would overrun the budget" in ln]
    assert skipped == ["env", "bench-resnet18-512", "bench-resnet18-1024", "bench-resnet18-2048",
                       "bench-resnet18-512-reduce-overhead", "bench-resnet18-1024-reduce-overhead",
                       "bench-resnet18-2048-reduce-overhead", "speedrun", "train-resnet18", "bench-resnet50-512"]
    assert "$ " not in (tmp_path / "out" / "log.txt").read_text()  # nothing was started


def test_without_make_each_step_runs_the_command_the_makefile_runs(project):
    import gpu_check
    d, _ = project
    env = {**os.environ, "VIRTUAL_ENV": sys.prefix}
    env = {k: v for k, v in env.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "ARGS", "MODEL", "BATCH", "RUNS")}
    for goal, v in (("bench", {"MODEL": "resnet50", "BATCH": "8", "ARGS": "--steps 1 --compile reduce-overhead"}),
                    ("speedrun", {"RUNS": "3", "DATA_DIR": "/data/x y", "ARGS": "--epochs 1 --subset 16"}),
                    ("train", {"DATA_DIR": "/data/x y", "RUN_DIR": "/tmp/r 1", "ARGS": "--epochs 1"})):
        v["DEVICE"] = "cpu"
        dry = subprocess.run(["make", "-n", goal, *(f"{k}={x}" for k, x in v.items())], cwd=d, env=env,
                             capture_output=True, text=True, check=True).stdout
        script = gpu_check.WITHOUT_MAKE[goal](v)[0]
        words = shlex.split(next(ln for ln in dry.splitlines() if f" {script} " in ln))
        assert words[words.index(script):] == gpu_check.WITHOUT_MAKE[goal](v) + shlex.split(v["ARGS"])
