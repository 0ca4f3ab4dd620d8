"""device.py: which device, precision and layout a run gets; the processes of a torchrun job;
and torch_npu installed without CANN's environment, the commonest Ascend set-up mistake."""
import os
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


@pytest.mark.parametrize("vendor, flags, bf16", [
    ("GenuineIntel", "fpu avx2 avx512f avx512bw", False),  # no bf16 instructions
    ("AuthenticAMD", "fpu avx2 avx512f avx512_bf16", True),  # Zen 4 and later
    ("GenuineIntel", "fpu avx512_bf16 amx_bf16 amx_tile", True),  # Sapphire Rapids and later
    ("GenuineIntel", "fpu avx512f avx512_bf16 avx512_fp16", False),  # listed, yet bf16 multiplies slower
    ("AuthenticAMD", "fpu avx2", False),
])
def test_a_cpu_gets_bf16_from_its_flags_alone_amx_or_avx512_bf16_on_amd(tmp_path, vendor, flags, bf16):
    cpuinfo = tmp_path / "cpuinfo"
    cpu = f"vendor_id\t: {vendor}\nmodel name\t: a CPU\nflags\t\t: {flags}\n"
    cpuinfo.write_text(f"processor\t: 0\n{cpu}\nprocessor\t: 1\n{cpu}\n")
    assert device.cpu_has_fast_bf16(cpuinfo) is bf16


def test_a_cpu_without_proc_cpuinfo_trains_in_fp32(tmp_path):
    assert device.cpu_has_fast_bf16(tmp_path / "missing") is False  # macOS, Windows


def test_auto_precision_on_a_cpu_times_nothing_so_every_process_decides_alike(monkeypatch):
    answer = device.resolve_amp("auto", CPU)

    def no_timing(*args):
        raise AssertionError("--amp auto multiplied matrices to time them")
    monkeypatch.setattr(torch.Tensor, "__matmul__", no_timing)
    assert all(device.resolve_amp("auto", CPU) == answer for _ in range(3))


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
    said = device.out_of_memory(e.value)
    assert "can't allocate memory" in said and str(2 ** 60) in said


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


def model_and_picture(folder):
    """model.pth and red.png in folder, for predict.py: the quickest script that picks a device."""
    torch.save(resnet.checkpoint(resnet.build_model("resnet18"), "resnet18", resnet.CIFAR10_CLASSES, (0.5,) * 3,
                                 (0.25,) * 3, 32, "cifar10", 1, 10.0, {}), folder / "model.pth")
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "red.png")


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
    model_and_picture(tmp_path)
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
    model_and_picture(tmp_path)
    proc = run("predict.py", "red.png", "--checkpoint", "model.pth", "--device", "cpu", cwd=tmp_path,
               env=torch_npu_without_cann)
    assert proc.stdout.startswith("red.png: ")
    if not torch.cuda.is_available():  # torch imported, and --device cuda got as far as looking for a GPU
        proc = run("predict.py", "red.png", "--checkpoint", "model.pth", "--device", "cuda", cwd=tmp_path,
                   check=False, env=torch_npu_without_cann)
        assert "no CUDA GPU" in one_line_error(proc)


def test_the_cann_hint_names_the_set_env_sh_this_machine_has_or_both(tmp_path, monkeypatch):
    cann9, cann8 = tmp_path / "cann" / "set_env.sh", tmp_path / "ascend-toolkit" / "set_env.sh"
    monkeypatch.setattr(device, "CANN_ENV_SCRIPTS", (str(cann9), str(cann8)))
    assert str(cann9) in device.cann_env() and str(cann8) in device.cann_env()  # neither there: both
    cann8.parent.mkdir()
    cann8.write_text("")
    assert str(cann8) in device.cann_env() and str(cann9) not in device.cann_env()
    error = device._broken_torch_npu(ImportError("libhccl.so: cannot open shared object file"))
    assert str(cann8) in str(error) and str(cann9) not in str(error)


@pytest.fixture
def chips(monkeypatch):
    """A torch_npu that imports, with a chip or not as the test says (in this process)."""
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)

    def seen(available):
        monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: available), raising=False)
    return seen


def test_device_npu_that_sees_no_chip_names_npu_smi_and_the_order_of_visible_devices(chips, monkeypatch):
    chips(False)
    with pytest.raises(device.DeviceError) as e:
        device.pick_device("npu")
    assert "npu-smi info" in str(e.value) and "ASCEND_RT_VISIBLE_DEVICES" in str(e.value)
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "1,0")  # torch_npu then counts no chip at all
    with pytest.raises(device.DeviceError) as e:
        device.pick_device("npu")
    assert "ASCEND_RT_VISIBLE_DEVICES=1,0" in str(e.value) and "ascending" in str(e.value)


def test_device_auto_says_in_one_line_that_torch_npu_sees_no_chip_before_it_goes_on(chips, capsys):
    chips(False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert device.pick_device("auto").type in ("cpu", "mps")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no NPU" in err[0] and "npu-smi info" in err[0]
    device.pick_device("auto", index=1)  # the other processes of a torchrun job on the machine say nothing
    assert capsys.readouterr().err == ""


def test_a_cuda_build_of_torch_beside_torch_npu_is_named_as_the_cause_not_cann():
    error = str(device._broken_torch_npu(RuntimeError(
        "Two accelerators cannot be used at the same time in PyTorch: npu and cuda. You can install the cpu "
        "version of PyTorch to use your npu device, or use the cuda device with 'export "
        "TORCH_DEVICE_BACKEND_AUTOLOAD=0'.\n[ERROR] 2026-01-01-00:00:00 (PID:1, Device:-1, RankID:-1) ERR00007")))
    assert "cuda build of torch" in error and "CPU build" in error and "--device cuda" in error
    assert "set_env.sh" not in error and "\n" not in error


def test_bf16_on_an_npu_without_it_is_refused_and_auto_takes_fp16(monkeypatch):
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_bf16_supported=lambda: False), raising=False)
    with pytest.raises(device.DeviceError) as e:
        device.resolve_amp("bf16", NPU)
    assert "--amp bf16" in str(e.value) and "fp16" in str(e.value)
    assert device.resolve_amp("auto", NPU) == torch.float16 and device.resolve_amp("fp16", NPU) == torch.float16
    monkeypatch.setattr(torch.npu, "is_bf16_supported", lambda: True)
    assert device.resolve_amp("bf16", NPU) == torch.bfloat16


def test_fp16_on_an_npu_scales_the_loss_with_torch_npu_s_own_grad_scaler(monkeypatch):
    class NpuGradScaler:  # torch_npu.npu.amp.GradScaler takes no device argument
        def __init__(self, enabled=True):
            self.enabled = enabled
    stand_in = types.ModuleType("torch_npu")
    stand_in.npu = types.SimpleNamespace(amp=types.SimpleNamespace(GradScaler=NpuGradScaler))
    monkeypatch.setitem(sys.modules, "torch_npu", stand_in)
    assert isinstance(device.grad_scaler(NPU, torch.float16), NpuGradScaler)
    assert device.grad_scaler(NPU, torch.float16).enabled and not device.grad_scaler(NPU, torch.bfloat16).enabled
    cpu = device.grad_scaler(torch.device("cpu"), torch.float16)
    assert type(cpu) is torch.amp.GradScaler and cpu.is_enabled()
    assert not device.grad_scaler(torch.device("cpu"), None).is_enabled()


def stand_in_torch_npu(tmp_path, code):
    """An environment whose Python finds a torch_npu package (tmp_path/site) that runs code when imported."""
    site = tmp_path / "site"
    (site / "torch_npu").mkdir(parents=True)
    (site / "torch_npu" / "__init__.py").write_text(code)
    return {**os.environ, "PYTHONPATH": str(site)}


NO_CHIP = "import torch, types\ntorch.npu = types.SimpleNamespace(is_available=lambda: False)\n"


@pytest.mark.slow
def test_a_torch_npu_that_sees_no_chip_is_noted_by_auto_and_refused_by_npu(tmp_path):
    model_and_picture(tmp_path)
    env = {**stand_in_torch_npu(tmp_path, NO_CHIP), "ASCEND_RT_VISIBLE_DEVICES": "1,0"}
    proc = run("predict.py", "red.png", "--checkpoint", "model.pth", "--device", "auto", cwd=tmp_path, env=env)
    note = proc.stderr.strip().splitlines()
    assert proc.stdout.startswith("red.png: ") and len(note) == 1  # answered, and told once why not on an NPU
    assert "no NPU" in note[0] and "npu-smi info" in note[0] and "ascending" in note[0]
    proc = run("predict.py", "red.png", "--checkpoint", "model.pth", "--device", "npu", cwd=tmp_path, check=False,
               env=env)
    line = one_line_error(proc)
    assert "no NPU" in line and "npu-smi info" in line and "ASCEND_RT_VISIBLE_DEVICES=1,0" in line


@pytest.mark.slow
def test_a_torch_npu_refusing_a_cuda_build_of_torch_is_one_line_naming_the_cpu_build(tmp_path):
    model_and_picture(tmp_path)
    env = stand_in_torch_npu(tmp_path, 'raise RuntimeError("Two accelerators cannot be used at the same time in '
                                       'PyTorch: npu and cuda. You can install the cpu version of PyTorch.\\n'
                                       '[ERROR] ERR00007 PTA feature not supported")\n')
    proc = run("predict.py", "red.png", "--checkpoint", "model.pth", "--device", "npu", cwd=tmp_path, check=False,
               env=env)
    line = one_line_error(proc)
    assert "cuda build of torch" in line and "CPU build" in line and "set_env.sh" not in line


@pytest.mark.slow
def test_train_refuses_bf16_on_an_npu_without_it_in_one_line_and_writes_no_checkpoint(tmp_path, cifar_dir):
    env = stand_in_torch_npu(tmp_path, "import torch, types\n"
                                       "torch.utils.rename_privateuse1_backend('npu')\n"
                                       "torch.npu = types.SimpleNamespace(is_available=lambda: True, "
                                       "set_device=lambda i: None, is_bf16_supported=lambda: False,\n"
                                       "    _is_in_bad_fork=lambda: False, manual_seed_all=lambda seed: None)\n")
    proc = run("train.py", "--device", "npu", "--amp", "bf16", "--data-dir", cifar_dir, "--epochs", "1",
               "--out-dir", "run", cwd=tmp_path, check=False, env=env)
    line = one_line_error(proc)
    assert "--amp bf16" in line and "NPU" in line
    assert not list(tmp_path.glob("run/*.pth"))
