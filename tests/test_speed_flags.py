"""--amp, --channels-last and --compile: accepted, checked, and harmless to the numbers when off;
the CPU allocator setting; a training step and an evaluation that never make the host wait;
bench.py."""
import platform
import statistics
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bench
import data
import resnet
import train
from conftest import QUICK, ROOT, one_line_error, run


def test_auto_precision_is_bf16_where_the_chip_has_it_fp16_where_not_and_fp32_on_other_cpus(monkeypatch):
    # stand-ins: torch.device("npu") exists only where torch_npu is installed
    cpu, cuda, npu, mps = (types.SimpleNamespace(type=t) for t in ("cpu", "cuda", "npu", "mps"))
    monkeypatch.setattr(data, "cpu_has_fast_bf16", lambda: False)
    assert data.resolve_amp("auto", cpu) is None and data.resolve_amp("auto", mps) is None
    monkeypatch.setattr(data, "cpu_has_fast_bf16", lambda: True)
    assert data.resolve_amp("auto", cpu) == torch.bfloat16 and data.resolve_amp("auto", mps) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert data.resolve_amp("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert data.resolve_amp("auto", cuda) == torch.float16
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_bf16_supported=lambda: True), raising=False)
    assert data.resolve_amp("auto", npu) == torch.bfloat16
    assert data.resolve_amp("off", cuda) is None
    assert data.resolve_amp("fp16", cpu) == torch.float16 and data.resolve_amp("bf16", cpu) == torch.bfloat16


def test_channels_last_is_used_on_cuda_and_cpu_but_not_forced_on_npu_or_mps():
    cpu, cuda, npu, mps = (types.SimpleNamespace(type=t) for t in ("cpu", "cuda", "npu", "mps"))
    assert data.use_channels_last("auto", cpu) and data.use_channels_last("auto", cuda)
    assert not data.use_channels_last("auto", npu) and not data.use_channels_last("auto", mps)
    assert not data.use_channels_last("off", cuda) and data.use_channels_last("on", mps)


@pytest.mark.parametrize("flag", [["--amp", "fp8"], ["--channels-last", "maybe"], ["--compile", "yes"]])
def test_a_bad_value_is_a_one_line_error(tmp_path, flag):
    line = one_line_error(run("train.py", *flag, cwd=tmp_path, check=False))
    assert line.startswith("train.py: error:")


def test_channels_last_changes_the_layout_not_the_numbers():
    # In float64 the two layouts agree to rounding; in float32 the gradients of a
    # fresh network (BatchNorm over a small batch) amplify rounding to ~1%.
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (16,))
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(1)
        model = resnet.ResNet18().to(dtype=torch.float64, memory_format=fmt)
        loss = F.cross_entropy(model(x.contiguous(memory_format=fmt)), y)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=1e-11)


def test_the_cpu_flags_decide_whether_it_has_bf16_instructions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    for flags, fast in [("fpu avx2 avx512f avx512bw", False), ("fpu avx2 avx512f avx512_bf16", True),
                        ("fpu amx_bf16 amx_tile", True)]:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        assert data.cpu_has_fast_bf16(cpuinfo) is fast, flags
    assert data.cpu_has_fast_bf16(tmp_path / "missing") is False  # no /proc (macOS, Windows): fp32


def test_amp_off_is_exactly_what_auto_does_on_a_cpu_without_bf16(tmp_path, cifar_dir, monkeypatch, capsys):
    monkeypatch.setattr(data, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.chdir(tmp_path)
    for amp in ("off", "auto"):
        args = ["--data-dir", str(cifar_dir), "--epochs", "1", "--amp", amp, "--out-dir", amp, *QUICK]
        assert train.main(train.get_args_parser().parse_args(args)) == 0
    assert capsys.readouterr().out.count(", fp32,") == 2
    a = torch.load(tmp_path / "off" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "auto" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_trains_and_still_saves_fp32_weights(tmp_path, cifar_dir):
    proc = run("train.py", "--data-dir", cifar_dir, "--epochs", "1", "--amp", "bf16", "--device", "cpu",
               "--batch-size", "16", "--subset", "16", "--eval-batch-size", "100", cwd=tmp_path)
    assert ", bf16," in proc.stdout
    state = torch.load(tmp_path / "runs" / "resnet18" / "best.pth", weights_only=True)["model"]
    assert state["conv1.weight"].dtype == torch.float32


def test_compile_wraps_the_training_model_and_reports_the_first_step_apart(tmp_path, cifar_dir, monkeypatch, capsys):
    compiled = []

    def fake_compile(model):  # the real one takes minutes on a 2-core CPU; the wiring is what is tested
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.chdir(tmp_path)
    args = train.get_args_parser().parse_args(["--data-dir", str(cifar_dir), "--epochs", "1", "--compile", *QUICK])
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert len(compiled) == 1 and isinstance(compiled[0], resnet.ResNet)
    assert ", compiled" in out and "first step (compilation)" in out
    assert not any(k.startswith("_orig_mod.") for k in
                   torch.load(tmp_path / "runs" / "resnet18" / "best.pth", weights_only=True)["model"])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a setting of glibc's allocator")
def test_on_a_cpu_freed_memory_serves_the_next_big_tensor_instead_of_fresh_pages_from_the_kernel():
    script = """if True:
        import resource, sys, torch, data
        if sys.argv[1] == "keep":
            data.keep_freed_memory(torch.device("cpu"))
        for _ in range(20):  # 40 MB each: over the 32 MB up to which glibc reuses freed blocks
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.ones(10_000_000)
            print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"""
    faults = {mode: statistics.median(map(int, subprocess.run(
                  [sys.executable, "-c", script, mode], cwd=ROOT, check=True, capture_output=True, text=True
              ).stdout.split())) for mode in ("as-is", "keep")}
    assert faults["as-is"] > 9000  # each 40 MB tensor mapped and zeroed afresh, 4 KB page by page
    assert faults["keep"] < faults["as-is"] / 20  # (the heap grows a few times first: hence the median)
    data.keep_freed_memory(types.SimpleNamespace(type="cuda"))  # elsewhere it does nothing (and does not fail)


class DeviceOps(TorchDispatchMode):
    """Records, for every tensor operation, its name and whether it makes the host wait for
    a GPU or NPU: a value read back (.item(), float(), `if tensor:`), an output whose size
    depends on the data (bincount, nonzero, a boolean mask), or a tensor built from Python
    numbers (torch.tensor: a copy that first waits for the queued work). Moving a tensor
    to the CPU (.cpu(), .tolist()) waits as well but is no operation on a CPU tensor, so
    those two methods are counted by spies."""
    WAITING = {"_local_scalar_dense", "lift_fresh", "bincount", "nonzero", "masked_select"}

    def __init__(self):
        super().__init__()
        self.waits, self.float64 = 0, []

    def __enter__(self):
        self.methods = {name: getattr(torch.Tensor, name) for name in ("cpu", "tolist")}
        for name, method in self.methods.items():
            setattr(torch.Tensor, name, lambda t, *a, _method=method, **k: self.wait() or _method(t, *a, **k))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self.methods.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def wait(self):
        self.waits += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.waits += func.overloadpacket.__name__ in self.WAITING
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in (out if isinstance(out, tuple) else [out])):
            self.float64.append(func.overloadpacket.__name__)
        return out


def device_ops_of_training_and_evaluation(batches, tmp_path):
    """One epoch of `batches` steps (logged only at its end) and one evaluation of `batches`
    batches, as train.py runs them, recorded."""
    torch.manual_seed(0)
    images, labels = torch.randint(0, 256, (4 * batches, 3, 32, 32), dtype=torch.uint8), torch.arange(4 * batches) % 10
    loaders = [data.CifarLoader(images, labels, 4, data.CIFAR10_MEAN, data.CIFAR10_STD, train=split,
                                device=torch.device("cpu")) for split in (True, False)]
    model = resnet.build_model("resnet18")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    scheduler = train.make_schedule(optimizer, batches, 0.15)
    args = types.SimpleNamespace(batch_size=4, epochs=1, label_smoothing=0.1, log_every=1000)
    stop = types.SimpleNamespace(signum=0)
    with DeviceOps() as training:
        train.train_one_epoch(model, loaders[0], optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                              None, 1, args, tmp_path / "log.txt", False, stop)
    with DeviceOps() as evaluation:
        train.evaluate(model, loaders[1], 10, None, False, torch.contiguous_format)
    return training, evaluation


def test_training_steps_and_evaluation_batches_never_make_the_host_wait_for_the_device(tmp_path):
    # A wait lets the GPU or NPU idle while the host prepares the next step. Allowed:
    # a fixed number at the end of an epoch or evaluation (and at each log point), where
    # the sums are read; none per step or per batch.
    short = device_ops_of_training_and_evaluation(2, tmp_path)
    long = device_ops_of_training_and_evaluation(5, tmp_path)
    assert long[0].waits == short[0].waits, "a training step waits for the device"
    assert long[1].waits == short[1].waits, "an evaluation batch waits for the device"


def test_training_and_evaluation_need_no_float64_which_apples_gpus_lack(tmp_path):
    training, evaluation = device_ops_of_training_and_evaluation(2, tmp_path)
    assert training.float64 == [] and evaluation.float64 == []


def test_bench_times_both_pipelines_and_ends_with_one_machine_readable_line(tmp_path):
    proc = run("bench.py", "--device", "cpu", "--batch-size", "8", "--steps", "1", "--warmup", "1", "--repeats", "1",
               cwd=tmp_path)
    last = proc.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert last.startswith("bench model=resnet18 device=cpu batch=8 ")
    for key in ("train_img_s", "tutorial_train_img_s", "train_ratio", "eval_img_s", "tutorial_eval_img_s", "eval_ratio",
                "loader_img_s", "tutorial_loader_img_s", "matmul_gflops", "train_mfu"):
        assert float(fields[key]) > 0, key
    ratio = float(fields["train_img_s"]) / float(fields["tutorial_train_img_s"])
    assert abs(ratio / float(fields["train_ratio"]) - 1) < 0.1  # the printed rates are rounded
    # ResNet18: 0.56 GMAC forward per 32x32 image, so about 3.3 GFLOP to train on it
    assert abs(float(fields["train_gflop_per_img"]) - 3.34) < 0.05


def test_bench_times_the_training_step_train_py_runs(monkeypatch):
    # The benchmark's side of this project, driven in this process as the parent would drive it.
    steps, real_step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: steps.append(a[0]) or real_step(*a, **k))
    monkeypatch.setattr(data, "keep_freed_memory", lambda device: None)  # leave this process's allocator as it is
    args = bench.get_args_parser().parse_args(["--device", "cpu", "--batch-size", "4", "--steps", "2", "--warmup", "1"])
    requests, replies = iter(["train", None]), []
    bench.pipeline("ours", args, "cpu", types.SimpleNamespace(send=replies.append, recv=lambda: next(requests)))
    assert len(steps) == 3 and all(isinstance(net, resnet.ResNet) for net in steps)  # warm-up + 2 timed
    assert replies[0] in ("fp32", "bf16") and replies[1] > 0  # the precision, then the img/s


def test_bench_cold_start_times_predict_py_against_the_tutorials_predict_flow(tmp_path):
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.jpg")
    proc = run("bench.py", "--cold-start", "red.jpg", "--repeats", "1", cwd=tmp_path)
    last = proc.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[2:])
    assert last.startswith("bench cold_start picture=red.jpg ")
    assert float(fields["predict_s"]) > 0 and float(fields["tutorial_predict_s"]) > 0
    ratio = float(fields["predict_s"]) / float(fields["tutorial_predict_s"])
    assert abs(ratio / float(fields["predict_ratio"]) - 1) < 0.05  # the printed times are rounded
    proc = run("bench.py", "--cold-start", "missing.jpg", cwd=tmp_path, check=False)
    assert "missing.jpg" in one_line_error(proc)
