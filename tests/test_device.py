"""device.py: which device, precision and layout a run gets; the processes of a torchrun job;
and torch_npu installed without CANN's environment, the commonest Ascend set-up mistake."""
import platform
import re
import signal
import statistics
import subprocess
import sys
import types

import pytest
import torch

import device
import resnet
from conftest import ROOT, one_line_error, run, write_cifar

# stand-ins: torch.device("npu") exists only where torch_npu is installed
CPU, CUDA, NPU, MPS = (types.SimpleNamespace(type=t) for t in ("cpu", "cuda", "npu", "mps"))


def test_auto_precision_is_bf16_where_the_chip_has_it_fp16_where_not_and_fp32_on_other_cpus(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert device.resolve_amp("auto", CPU) is None and device.resolve_amp("auto", MPS) is None
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert device.resolve_amp("auto", CPU) == torch.bfloat16 and device.resolve_amp("auto", MPS) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.resolve_amp("auto", CUDA) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device.resolve_amp("auto", CUDA) == torch.float16
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_bf16_supported=lambda: True), raising=False)
    assert device.resolve_amp("auto", NPU) == torch.bfloat16
    assert device.resolve_amp("off", CUDA) is None
    assert device.resolve_amp("fp16", CPU) == torch.float16 and device.resolve_amp("bf16", CPU) == torch.bfloat16


def test_channels_last_is_used_on_cuda_and_cpu_but_not_forced_on_npu_or_mps():
    assert device.use_channels_last("auto", CPU) and device.use_channels_last("auto", CUDA)
    assert not device.use_channels_last("auto", NPU) and not device.use_channels_last("auto", MPS)
    assert not device.use_channels_last("off", CUDA) and device.use_channels_last("on", MPS)


def test_a_cpu_gets_bf16_where_it_has_the_instructions_and_they_multiply_clearly_faster_than_fp32(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    timed = []

    def speedup(ratio):
        return lambda: timed.append(ratio) or ratio
    for flags, ratio, fast in [("fpu avx2 avx512f avx512bw", 3.0, False),  # no bf16 instructions: not timed
                               ("fpu avx2 avx512f avx512_bf16", 2.3, True),
                               ("fpu amx_bf16 amx_tile", 1.25, True),
                               ("fpu avx512f avx512_bf16 avx512_fp16", 0.6, False),  # listed, yet slower
                               ("fpu avx512_bf16", 1.1, False)]:  # a gain autocast's casts would eat
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert device.cpu_has_fast_bf16(cpuinfo, speedup(ratio)) is fast, flags
    assert timed == [2.3, 1.25, 0.6, 1.1]
    assert device.cpu_has_fast_bf16(tmp_path / "missing") is False  # no /proc (macOS, Windows): fp32


def test_the_bf16_speedup_is_timed_once_per_process_and_leaves_the_seeds_and_threads_as_they_were():
    torch.manual_seed(0)
    first_draw, threads = torch.rand(4), torch.get_num_threads()
    device.cpu_bf16_speedup.cache_clear()
    torch.manual_seed(0)
    ratio = device.cpu_bf16_speedup()
    assert torch.equal(torch.rand(4), first_draw)  # --amp auto leaves the seeded weights as they would be
    assert torch.get_num_threads() == threads  # timed on one thread; training gets them all back
    assert 0 < ratio < float("inf")
    assert device.cpu_bf16_speedup() == ratio  # the same answer for every later caller in the process


def test_a_stop_request_notes_the_first_signal_stops_at_a_second_ctrl_c_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with device.StopRequest() as stop:
        signal.raise_signal(signal.SIGTERM)  # a scheduler's stop, even repeated: noted, nothing raised
        signal.raise_signal(signal.SIGTERM)
        assert stop.agreed(torch.device("cpu")) == signal.SIGTERM
    with device.StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)  # Ctrl-C: the run stops at its next step
        assert stop.agreed(torch.device("cpu")) == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # a second one: at once
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_auto_device_falls_back_to_the_cpu_without_accelerators():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert device.pick_device("auto").type in ("cpu", "mps")


def test_a_torchrun_process_reads_its_place_from_the_environment_once(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert device.job() == device.Job(0, 1, 0) and device.job().is_main
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device.job() == device.Job(5, 8, 1) and not device.job().is_main


def test_a_single_process_needs_no_process_group_and_its_reductions_are_identities():
    with device.process_group(device.Job(), torch.device("cpu")):
        t = torch.tensor([1.0, 2.0])
        assert device.all_reduce(t) is t and t.tolist() == [1.0, 2.0]
        assert not torch.distributed.is_initialized()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a setting of glibc's allocator")
@pytest.mark.slow
def test_on_a_cpu_freed_memory_serves_the_next_big_tensor_instead_of_fresh_pages_from_the_kernel():
    script = """if True:
        import resource, sys, torch, device
        if sys.argv[1] == "keep":
            device.keep_freed_memory(torch.device("cpu"))
        for _ in range(20):  # 40 MB each: over the 32 MB up to which glibc reuses freed blocks
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.ones(10_000_000)
            print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"""
    faults = {mode: statistics.median(map(int, subprocess.run(
                  [sys.executable, "-c", script, mode], cwd=ROOT, check=True, capture_output=True, text=True
              ).stdout.split())) for mode in ("as-is", "keep")}
    assert faults["as-is"] > 9000  # each 40 MB tensor mapped and zeroed afresh, 4 KB page by page
    assert faults["keep"] < faults["as-is"] / 20  # (the heap grows a few times first: hence the median)
    device.keep_freed_memory(CUDA)  # elsewhere it does nothing (and does not fail)


@pytest.mark.parametrize("error, said", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"),
     "CUDA out of memory"),
    (RuntimeError("NPU out of memory. Tried to allocate 1.50 GiB (NPU 0; 60.97 GiB total capacity)"),
     "NPU out of memory"),
    (RuntimeError("MPS backend out of memory (MPS allocated: 17 GB, max allowed: 18.1 GB). Tried to allocate 2 GB"),
     "MPS backend out of memory (MPS allocated: 17 GB, max allowed: 18.1 GB)"),
    (torch.OutOfMemoryError(""), "out of memory"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x512 and 256x10)"), None),
])
def test_running_out_of_memory_is_told_apart_from_other_errors_by_the_sentence_that_says_so(error, said):
    assert device.out_of_memory(error) == said


def test_the_cpu_allocator_s_own_error_names_the_bytes_it_could_not_allocate():
    with pytest.raises(RuntimeError) as e:
        torch.empty(2 ** 60, dtype=torch.uint8)  # an exabyte, beyond any address space: refused at once
    assert device.out_of_memory(e.value) == ("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                             f"{2 ** 60} bytes")


# ---------------------------------------------------------------------------
# torch_npu

def without_torch_npu():
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return
    pytest.skip("torch_npu is installed here")


@pytest.mark.slow
def test_device_npu_without_torch_npu_is_a_one_line_error(tmp_path, cifar_dir):
    without_torch_npu()
    proc = run("train.py", "--device", "npu", "--data-dir", cifar_dir, cwd=tmp_path, check=False)
    assert "torch_npu" in one_line_error(proc)


@pytest.fixture
def torch_npu_without_cann(tmp_path):
    """An installed torch_npu whose import fails as it does where CANN's set_env.sh was not sourced,
    registered, as the real wheel is, as a device backend that `import torch` loads by itself."""
    site = tmp_path / "site"
    (site / "torch_npu").mkdir(parents=True)
    (site / "torch_npu" / "__init__.py").write_text(
        'raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")\n')
    info = site / "torch_npu-2.14.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch-npu\nVersion: 2.14.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    import os
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    return {**env, "PYTHONPATH": str(site)}


@pytest.mark.slow
def test_the_stand_in_breaks_import_torch_as_the_real_wheel_does(torch_npu_without_cann):
    proc = subprocess.run([sys.executable, "-c", "import torch"], env=torch_npu_without_cann,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Failed to load the backend extension: torch_npu" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["npu", "auto"])
def test_torch_npu_without_cann_names_the_missing_library_and_set_env_sh(tmp_path, torch_npu_without_cann, name):
    torch.save(resnet.checkpoint(resnet.build_model("resnet18"), "resnet18", resnet.CIFAR10_CLASSES, (0.5,) * 3,
                                 (0.25,) * 3, 32, "cifar10", 1, 10.0, {}), tmp_path / "model.pth")
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    proc = run("predict.py", "red.png", "--checkpoint", "model.pth", "--device", name, cwd=tmp_path, check=False,
               env=torch_npu_without_cann)
    line = one_line_error(proc)
    assert "torch_npu is installed" in line and "CANN library" in line and "libhccl.so" in line
    assert "set_env.sh" in line


def test_every_script_turns_torch_s_backend_autoloading_off_before_anything_imports_torch():
    # or a torch_npu without CANN breaks `import torch` in that script, with a traceback
    loads_torch = re.compile(r"import (torch|data|device|resnet|rundir|train|predict)\b")
    for script in sorted(p for p in ROOT.glob("*.py") if 'if __name__ == "__main__"' in p.read_text()):
        lines = script.read_text().splitlines()
        first = next((i for i, line in enumerate(lines) if loads_torch.match(line)), None)
        if first is not None:  # plot.py loads no torch
            off = [i for i, line in enumerate(lines) if 'setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")' in line]
            assert off and off[0] < first, script.name


@pytest.mark.slow
def test_make_data_s_script_runs_where_torch_npu_cannot_load(tmp_path, torch_npu_without_cann):
    write_cifar(tmp_path / "data", n_train=10, n_test=10)
    proc = run("data.py", "--data-dir", "data", "--samples", "", cwd=tmp_path, env=torch_npu_without_cann)
    assert proc.stdout.startswith("CIFAR-10 ready in data")


@pytest.mark.slow
def test_torch_npu_without_cann_leaves_cpu_and_cuda_working(tmp_path, torch_npu_without_cann):
    torch.save(resnet.checkpoint(resnet.build_model("resnet18"), "resnet18", resnet.CIFAR10_CLASSES, (0.5,) * 3,
                                 (0.25,) * 3, 32, "cifar10", 1, 10.0, {}), tmp_path / "model.pth")
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    proc = run("predict.py", "red.png", "--checkpoint", "model.pth", "--device", "cpu", cwd=tmp_path,
               env=torch_npu_without_cann)
    assert proc.stdout.startswith("red.png: ")
    if not torch.cuda.is_available():  # torch imported, and --device cuda got as far as looking for a GPU
        proc = run("predict.py", "red.png", "--checkpoint", "model.pth", "--device", "cuda", cwd=tmp_path,
                   check=False, env=torch_npu_without_cann)
        assert "no CUDA GPU" in one_line_error(proc)
