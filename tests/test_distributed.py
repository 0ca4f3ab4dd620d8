"""train.py under torchrun: several processes (gloo on the CPU here) train as one."""
import pytest
import subprocess
import sys
import time

import torch

from conftest import injected, ROOT, run_here, write_cifar

pytestmark = pytest.mark.slow  # each test runs the scripts

# Every flag the comparisons rely on, pinned: --amp off, as --amp auto on a CPU may differ between machines.
COMMON = ["--device", "cpu", "--batch-size", "8", "--lr", "0.01", "--subset", "32", "--epochs", "2",
          "--eval-batch-size", "100", "--log-every", "2", "--amp", "off"]


def torchrun(*args, cwd, nproc=2, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(ROOT / "train.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def flat_weights(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return torch.cat([v.flatten() for k, v in state.items() if v.is_floating_point() and "running" not in k])


def in_a_one_process_group(code):
    """Runs code in a fresh Python that has joined a process group of one (gloo), with torch, dist
    (torch.distributed) and device imported; it must succeed."""
    code = ("import torch, torch.distributed as dist, device\n"
            "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
            f"{code}dist.destroy_process_group()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def losses(path):
    return [float(line.split("Loss: ")[1].split()[0]) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """An uninterrupted two-process run, and its data."""
    work = tmp_path_factory.mktemp("ddp")
    root = write_cifar(work / "data", n_train=64, n_test=50)
    proc = torchrun("--data-dir", root, *COMMON, "--out-dir", "run", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "run", root, proc


def test_two_processes_train_and_write_exactly_one_set_of_files(two_process_run):
    run, _, proc = two_process_run
    assert {p.name for p in run.iterdir()} == {"log.txt", "acc.txt", "best_acc.txt", "metrics.csv", "net_001.pth",
                                               "net_002.pth", "best.pth", "last.pth", "data_dir.txt", ".lock"}
    assert [ln[:9] for ln in (run / "log.txt").read_text().splitlines()] == ["001 00002", "001 00004",
                                                                            "002 00006", "002 00008"]
    assert len((run / "acc.txt").read_text().splitlines()) == 2
    assert proc.stdout.count("best accuracy") == 1  # one process speaks
    assert "x 2 processes" in proc.stdout
    # the checkpoint is the plain network: it loads in a single process
    import resnet
    model, ckpt = resnet.load_model(run / "best.pth")
    assert ckpt["arch"] == "resnet18"


def test_with_sync_bn_two_processes_match_one_at_the_same_global_batch(tmp_path):
    root = write_cifar(tmp_path / "data", n_train=64, n_test=50)
    # in fp32, where the comparison is tight (bf16 would round away what is measured)
    # and with batches of 16: BatchNorm over halves of 4 images magnifies rounding past these bounds
    args = [*COMMON, "--amp", "off", "--batch-size", "16", "--subset", "32", "--epochs", "1", "--log-every", "1"]
    run_here("train.py", "--data-dir", root, *args, "--out-dir", "one", cwd=tmp_path)
    two = torchrun("--data-dir", root, *args, "--sync-bn", "--out-dir", "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    for a, b in zip(losses(tmp_path / "one" / "log.txt"), losses(tmp_path / "two" / "log.txt")):
        assert abs(a - b) < 0.02
    w1, w2 = flat_weights(tmp_path / "one" / "last.pth"), flat_weights(tmp_path / "two" / "last.pth")
    # fp32 rounding differs between one 16-image batch and two 8-image halves, and
    # grows a little with each step; without --sync-bn the gap is several times larger.
    assert ((w1 - w2).norm() / w1.norm()).item() < 4e-3


def test_global_batchnorm_keeps_its_statistics_in_fp32_under_bf16_autocast_as_batchnorm_does():
    # --sync-bn on the CPU, where --amp auto may train in bf16
    in_a_one_process_group(
        "import torch.nn as nn\n"
        "torch.manual_seed(0); x = torch.randn(8, 4, 6, 6) * 3 + 1\n"
        "plain = nn.BatchNorm2d(4); synced = device.convert_sync_bn(nn.Sequential(nn.BatchNorm2d(4)), x.device)[0]\n"
        "for bn in (plain, synced):\n"
        "    with torch.autocast('cpu', torch.bfloat16):\n"
        "        y = bn(x.bfloat16())\n"
        "    assert y.dtype == torch.bfloat16, y.dtype\n"
        "    assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32\n"
        "assert type(synced).__name__ == 'GlobalBatchNorm2d'\n"
        "torch.testing.assert_close(synced.running_mean, plain.running_mean)\n"
        "torch.testing.assert_close(synced.running_var, plain.running_var)\n")


def test_a_two_process_run_stopped_mid_epoch_and_after_an_epoch_resumes_to_the_same_logs_and_weights(
        tmp_path, two_process_run):
    whole, root, _ = two_process_run
    # SIGTERM to process 0 in its first step: the processes agree to stop at the next log point, step 2 of 4
    env = injected(tmp_path,
        "import os\n"
        "if os.environ.get('RANK') == '0':\n"
        "    import signal, torch\n"
        "    step, calls = torch.optim.SGD.step, []\n"
        "    def stopping(self, *a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 1:\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "        return step(self, *a, **k)\n"
        "    torch.optim.SGD.step = stopping\n")
    first = torchrun("--data-dir", root, *COMMON, "--out-dir", "parts", cwd=tmp_path, env=env)
    assert "stopped by SIGTERM at epoch 1, step 2 of 4" in first.stdout, first.stdout + first.stderr
    resume = ["--resume", "--out-dir", "parts", "--data-dir", root, "--device", "cpu", "--log-every", "2",
              "--eval-batch-size", "100"]  # the flags --resume does not keep, as the first part had them
    second = torchrun(*resume, "--stop-after", "1", cwd=tmp_path)
    assert second.returncode == 0 and "stopped after epoch 1 of 2" in second.stdout, second.stderr
    rest = torchrun(*resume, cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert (tmp_path / "parts" / "acc.txt").read_text() == (whole / "acc.txt").read_text()
    assert (tmp_path / "parts" / "log.txt").read_text() == (whole / "log.txt").read_text()
    torch.testing.assert_close(flat_weights(tmp_path / "parts" / "last.pth"), flat_weights(whole / "last.pth"))


def test_amp_auto_is_decided_by_process_0_for_every_process_and_saved_as_the_answer(tmp_path):
    root = write_cifar(tmp_path / "data", n_train=64, n_test=50)
    # Process 1 would decide fp32 where process 0 decides bf16 (were they to decide apart); each notes the
    # precisions it trains in.
    env = injected(tmp_path,
        "import os, sys\n"
        "if os.environ.get('RANK') is not None:\n"
        "    os.environ.setdefault('TORCH_DEVICE_BACKEND_AUTOLOAD', '0')\n"
        f"    sys.path.insert(0, {str(ROOT)!r})\n"
        "    import torch, device\n"
        "    rank, real, autocast = os.environ['RANK'], device.resolve_amp, torch.autocast\n"
        "    def resolve(choice, dev):\n"
        "        return (torch.bfloat16 if rank == '0' else None) if choice == 'auto' else real(choice, dev)\n"
        "    def noting(device_type, dtype=None, enabled=True, **kw):\n"
        f"        open(os.path.join({str(tmp_path)!r}, f'{{rank}} {{dtype if enabled else None}}'), 'w').close()\n"
        "        return autocast(device_type, dtype=dtype, enabled=enabled, **kw)\n"
        "    device.resolve_amp, torch.autocast = resolve, noting\n")
    proc = torchrun("--data-dir", root, *COMMON, "--amp", "auto", "--epochs", "1", "--out-dir", "run", cwd=tmp_path,
                    env=env)
    assert proc.returncode == 0, proc.stderr
    assert "x 2 processes, bf16" in proc.stdout.splitlines()[0]
    assert {p.name for p in tmp_path.glob("[01] *")} == {"0 torch.bfloat16", "1 torch.bfloat16"}
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["args"]["amp"] == "bf16"


def test_a_failing_process_ends_the_whole_job_promptly_with_an_error(tmp_path):
    root = write_cifar(tmp_path / "data", n_train=64, n_test=50)
    # Fault injection from outside the project: process 1 crashes in its second
    # optimizer step, while process 0 carries on into the next collective.
    env = injected(tmp_path,
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch\n"
        "    step, calls = torch.optim.SGD.step, []\n"
        "    def failing(self, *a, **k):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 2:\n"
        "            raise RuntimeError('injected failure')\n"
        "        return step(self, *a, **k)\n"
        "    torch.optim.SGD.step = failing\n")
    start = time.monotonic()
    proc = torchrun("--data-dir", root, *COMMON, "--out-dir", "run", cwd=tmp_path, env=env, timeout=240)
    assert proc.returncode != 0
    assert time.monotonic() - start < 120
    assert "injected failure" in proc.stderr


def test_the_latest_reduction_is_held_by_python_so_no_collective_thread_frees_it_at_exit():
    # Gloo's worker thread needs the GIL to free a tensor Python still knows; if
    # that came after the interpreter began shutting down, the process aborted.
    in_a_one_process_group(
        "import weakref\n"
        "t = torch.tensor([1.0, 5.0]); ref = weakref.ref(t)\n"
        "assert device.all_reduce(t, 'max') is t and t.tolist() == [1.0, 5.0]\n"
        "del t\n"
        "assert ref() is not None, 'the reduction let go of its tensor'\n"
        "device.all_reduce(torch.zeros(1))\n"
        "assert ref() is None, 'the next reduction did not release the previous one'\n")
