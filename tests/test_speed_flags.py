"""--amp, --channels-last and --compile: accepted, checked, and harmless to the numbers when off;
a training step and an evaluation that never make the host wait; bench.py, --speedrun included."""
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import batching
import bench
import data
import device
import failures
import optim
import resnet
import rundir
import train
from conftest import QUICK, injected, one_line_error, run, run_here, says


@pytest.mark.slow
@pytest.mark.parametrize("flag", [["--amp", "fp8"], ["--channels-last", "maybe"], ["--compile", "yes"]])
def test_a_bad_value_is_a_one_line_error(tmp_path, flag):
    line = one_line_error(run_here("train.py", *flag, cwd=tmp_path, check=False))
    assert line.startswith("train.py: error:")


def test_channels_last_changes_the_layout_not_the_numbers():
    # In float64 the two layouts agree to rounding; in float32 the gradients of a
    # fresh network (BatchNorm over a small batch) amplify rounding to ~1%.
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(1)
        model = resnet.ResNet18().to(dtype=torch.float64, memory_format=fmt)
        loss = F.cross_entropy(model(x.contiguous(memory_format=fmt)), y)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_amp_off_is_exactly_what_auto_does_on_a_cpu_without_bf16(tmp_path, cifar_dir, monkeypatch, capsys):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.chdir(tmp_path)
    for amp in ("off", "auto"):
        args = ["--data-dir", str(cifar_dir), "--epochs", "1", "--amp", amp, "--out-dir", amp, *QUICK]
        assert train.main(train.get_args_parser().parse_args(args)).code == 0
    assert capsys.readouterr().out.count(", fp32,") == 2
    a = torch.load(tmp_path / "off" / "last.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "auto" / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_bf16_autocast_trains_and_still_saves_fp32_weights(tmp_path, cifar_dir):
    proc = run_here("train.py", "--data-dir", cifar_dir, "--epochs", "1", "--amp", "bf16", "--device", "cpu",
                    "--batch-size", "8", "--subset", "8", "--eval-batch-size", "100", cwd=tmp_path)
    assert ", bf16," in proc.stdout
    state = torch.load(tmp_path / "runs" / "resnet18" / "best.pth", weights_only=True)["model"]
    assert state["conv1.weight"].dtype == torch.float32


def test_compile_wraps_the_training_model_and_reports_the_first_step_apart(tmp_path, cifar_dir, monkeypatch, capsys):
    compiled = []

    class Compiled(torch.nn.Module):  # names the weights _orig_mod.*, as torch.compile's wrapper does
        def __init__(self, model):
            super().__init__()
            self._orig_mod = model

        def forward(self, x):
            return self._orig_mod(x)

    def fake_compile(model, mode=None):  # the real one compiles C++ at length on a CPU; the wiring is tested
        compiled.append((model, mode))
        return Compiled(model)

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.chdir(tmp_path)
    args = train.get_args_parser().parse_args(["--data-dir", str(cifar_dir), "--epochs", "1", "--compile", *QUICK])
    assert train.main(args).code == 0
    out = capsys.readouterr().out
    assert len(compiled) == 1 and isinstance(compiled[0][0], resnet.ResNet) and compiled[0][1] == "default"
    assert train.get_args_parser().parse_args(["--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert ", compiled" in out and "first step (compilation)" in out
    assert not any(k.startswith("_orig_mod.") for k in
                   torch.load(tmp_path / "runs" / "resnet18" / "best.pth", weights_only=True)["model"])


@pytest.mark.slow
def test_a_compile_that_fails_is_one_line_and_keeps_the_finished_epochs(tmp_path, cifar_dir, monkeypatch):
    # What inductor raises where it cannot build for the device (here: no C++ compiler), at the first step
    # or at a later one (a recompilation); 2 steps an epoch, so call 3 is the first step of epoch 2.
    why = "No working C++ compiler found in torch._inductor.config.cpp.cxx: (None, 'g++')"
    calls, fails_at = [], []

    class Compiled(torch.nn.Module):
        def __init__(self, model, mode=None):
            super().__init__()
            self.model = model
            calls.clear()

        def forward(self, x):
            calls.append(1)
            if len(calls) == fails_at[-1]:
                raise torch._inductor.exc.InductorError(RuntimeError(f"{why}\n(the compiler's output)"), None)
            return self.model(x)

    monkeypatch.setattr(torch, "compile", Compiled)
    train_py = ["train.py", "--data-dir", cifar_dir, "--epochs", "2", *QUICK]
    for call, again in ((1, "without --compile"), (3, "--resume without --compile")):
        fails_at.append(call)  # the first failure leaves no run behind: the second command starts afresh
        proc = run_here(*train_py, "--compile", cwd=tmp_path, check=False)
        assert says(one_line_error(proc), "torch.compile failed", why, f"run again {again}")
    monkeypatch.undo()
    run_here(*train_py, "--resume", cwd=tmp_path)  # epoch 1, saved before the failure, is not trained again
    assert [ln.split(",")[0] for ln in (tmp_path / "runs" / "resnet18" / "acc.txt").read_text().splitlines()] == [
        "EPOCH=001", "EPOCH=002"]


# What a device whose torch has no fused SGD kernel raises at the first step (torch_npu does not document one).
NO_FUSED_KERNEL = ("Could not run 'aten::_fused_sgd_' with arguments from the 'PrivateUse1' backend. This could be "
                   "because the operator doesn't exist for this backend.\n\nCPU: registered at ...")


@pytest.mark.slow
def test_fused_where_the_device_has_no_fused_sgd_kernel_is_one_line(tmp_path, cifar_dir, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError(NO_FUSED_KERNEL)

    monkeypatch.setattr(torch, "_fused_sgd_", no_kernel)
    proc = run_here("train.py", "--data-dir", cifar_dir, "--epochs", "1", *QUICK, "--fused", cwd=tmp_path, check=False)
    assert says(one_line_error(proc), "fused kernel failed", "aten::_fused_sgd_", "without --fused")


@pytest.mark.slow
def test_a_resumed_run_uses_the_fused_kernel_as_its_own_command_says_not_as_the_saved_run_did(tmp_path, cifar_dir,
                                                                                               monkeypatch):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError(NO_FUSED_KERNEL)

    fused_sgd, calls = torch._fused_sgd_, []

    def counted(*args, **kwargs):
        calls.append(1)
        return fused_sgd(*args, **kwargs)

    train_py = ["train.py", "--data-dir", cifar_dir, "--epochs", "3", *QUICK]
    run_here(*train_py, "--fused", "--stop-after", "1", cwd=tmp_path)
    monkeypatch.setattr(torch, "_fused_sgd_", no_kernel)  # "run again --resume without --fused" must then work
    run_here(*train_py, "--resume", "--stop-after", "2", cwd=tmp_path)
    monkeypatch.setattr(torch, "_fused_sgd_", counted)
    run_here(*train_py, "--resume", "--fused", cwd=tmp_path)
    assert len(calls) == 2  # epoch 3's two steps
    assert len((tmp_path / "runs" / "resnet18" / "acc.txt").read_text().splitlines()) == 3


def test_a_step_s_error_the_command_line_can_mend_is_one_line_the_others_keep_their_traceback():
    line = failures.explain(NotImplementedError(NO_FUSED_KERNEL), fused=True, saved=True)
    assert "\n" not in line and line.endswith("run again --resume without --fused")
    line = failures.explain(torch._dynamo.exc.TorchDynamoException("no backend"))
    assert "torch.compile" in line and "no backend" in line and line.endswith("run again without --compile")
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes. Error ...")
    line = failures.explain(cpu)
    assert "8589934592 bytes" in line and "Error ..." not in line and line.endswith("a smaller --batch-size")
    assert failures.explain(NotImplementedError(NO_FUSED_KERNEL), fused=False) is None  # not asked for: a bug
    assert failures.explain(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), fused=True) is None
    assert failures.explain(KeyError("out of memory")) is None


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
        outs = out if isinstance(out, tuple) else [out]
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in outs):
            self.float64.append(func.overloadpacket.__name__)
        return out


def device_ops_of_training_and_evaluation(batches, tmp_path, recipe=()):
    """One epoch of `batches` steps (logged only at its end) and one evaluation of `batches`
    batches, as train.py runs them, recorded."""
    torch.manual_seed(0)
    images, labels = torch.randint(0, 256, (4 * batches, 3, 32, 32), dtype=torch.uint8), torch.arange(4 * batches) % 10
    loaders = [batching.CifarLoader(images, labels, 4, data.CIFAR10_MEAN, data.CIFAR10_STD, train=split,
                                device=torch.device("cpu")) for split in (True, False)]
    args = train.get_args_parser().parse_args(["--batch-size", "4", "--epochs", "1", "--log-every", "1000", *recipe])
    t = optim.make_training(resnet.build_model("resnet18"), args, torch.device("cpu"), None, batches)
    stop = types.SimpleNamespace(signum=0)
    with DeviceOps() as training:
        train.train_one_epoch(t, loaders[0], 1, args, rundir.RunFolder(tmp_path, is_main=False), stop)
    with DeviceOps() as evaluation:
        train.evaluate(t.model, loaders[1], 10, None, args.tta, torch.contiguous_format)
    return training, evaluation


@pytest.mark.parametrize("recipe", [[], ["--ema", "0.9", "--flip", "alternate", "--tta", "flip-shift"]])
def test_training_steps_and_evaluation_batches_never_make_the_host_wait_for_the_device(tmp_path, recipe):
    # A wait lets the GPU or NPU idle while the host prepares the next step. Allowed:
    # a fixed number at the end of an epoch or evaluation (and at each log point), where
    # the sums are read; none per step or per batch.
    short = device_ops_of_training_and_evaluation(2, tmp_path, recipe)
    long = device_ops_of_training_and_evaluation(4, tmp_path, recipe)
    assert long[0].waits == short[0].waits, "a training step waits for the device"
    assert long[1].waits == short[1].waits, "an evaluation batch waits for the device"


def test_training_and_evaluation_need_no_float64_which_apples_gpus_lack(tmp_path):
    training, evaluation = device_ops_of_training_and_evaluation(2, tmp_path)
    assert training.float64 == [] and evaluation.float64 == []


@pytest.mark.slow
def test_bench_times_both_pipelines_and_ends_with_one_machine_readable_line(tmp_path):
    # the two pipelines run in processes of their own, started by the benchmark
    proc = run_here("bench.py", "--device", "cpu", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                    "--repeats", "1", cwd=tmp_path)
    last = proc.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[1:])
    assert last.startswith("bench model=resnet18 device=cpu batch=2 ")
    assert fields["layout"] in ("channels_last", "contiguous") and fields["precision"] in ("fp32", "bf16")
    assert (fields["compile"], fields["fused"], fields["ema"], fields["flip"]) == ("off", "off", "0", "random")
    for key in ("train_img_s", "tutorial_train_img_s", "train_ratio", "eval_img_s", "tutorial_eval_img_s", "eval_ratio",
                "loader_img_s", "tutorial_loader_img_s", "matmul_gflops", "train_mfu", "train_warmup_s",
                "eval_warmup_s"):
        assert float(fields[key]) > 0, key
    ratio = float(fields["train_img_s"]) / float(fields["tutorial_train_img_s"])
    assert abs(ratio / float(fields["train_ratio"]) - 1) < 0.1  # the printed rates are rounded
    # ResNet18: 0.56 GMAC forward per 32x32 image, so about 3.3 GFLOP to train on it
    assert abs(float(fields["train_gflop_per_img"]) - 3.34) < 0.05


@pytest.mark.slow
def test_bench_refuses_to_time_compilation_as_training(tmp_path):
    proc = run_here("bench.py", "--compile", "--warmup", "0", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--compile needs --warmup 1 or more" in one_line_error(proc)


def test_bench_times_the_training_step_train_py_runs(monkeypatch):
    # The benchmark's side of this project, driven in this process as the parent would drive it.
    steps, real_step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: steps.append(a[0]) or real_step(*a, **k))
    monkeypatch.setattr(device, "keep_freed_memory", lambda dev: None)  # leave this process's allocator as it is
    args = bench.get_args_parser().parse_args(["--device", "cpu", "--batch-size", "4", "--steps", "2", "--warmup", "1"])
    requests, replies = iter(["train", None]), []
    bench.pipeline("ours", args, "cpu", types.SimpleNamespace(send=replies.append, recv=lambda: next(requests)))
    assert len(steps) == 3 and all(isinstance(t.model, resnet.ResNet) for t in steps)  # warm-up + 2 timed
    assert steps[0].label_smoothing == train.get_args_parser().parse_args([]).label_smoothing
    img_s, warmup_s = replies[1]
    assert replies[0][0] in ("fp32", "bf16") and img_s > 0 and warmup_s > 0  # precision and layout, then the timing


def test_train_py_flags_after_dashes_change_the_step_the_benchmark_times(monkeypatch):
    steps, loaders, real_step, real_loader = [], [], train.train_step, batching.CifarLoader
    monkeypatch.setattr(train, "train_step", lambda *a, **k: steps.append(a[0]) or real_step(*a, **k))
    monkeypatch.setattr(batching, "CifarLoader", lambda *a, **k: loaders.append(real_loader(*a, **k)) or loaders[-1])
    monkeypatch.setattr(device, "keep_freed_memory", lambda dev: None)
    args = bench.get_args_parser().parse_args(["--device", "cpu", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                                               "--", "--fused", "--ema", "0.99", "--flip", "alternate", "--amp", "off",
                                               "--channels-last", "on", "--label-smoothing", "0.2"])
    requests, replies = iter(["train", None]), []
    bench.pipeline("ours", args, "cpu", types.SimpleNamespace(send=replies.append, recv=lambda: next(requests)))
    t = steps[0]
    assert t.optimizer.defaults["fused"] and t.ema is not None and t.ema.decay == 0.99 and t.label_smoothing == 0.2
    assert [loader.flip for loader in loaders] == ["alternate", "alternate"]
    assert loaders[0].memory_format == torch.channels_last
    assert replies[0] == ("fp32", "channels_last")  # what the summary line then names


def test_bench_py_s_compile_mode_reaches_the_network_and_the_speedrun(monkeypatch):
    compiled, runs = [], []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compiled.append(mode) or model)
    monkeypatch.setattr(device, "keep_freed_memory", lambda dev: None)
    args = bench.get_args_parser().parse_args(["--device", "cpu", "--batch-size", "4", "--steps", "1",
                                               "--compile", "reduce-overhead"])
    requests = iter(["eval", None])
    bench.pipeline("ours", args, "cpu", types.SimpleNamespace(send=lambda reply: None, recv=lambda: next(requests)))
    assert compiled == ["reduce-overhead", "reduce-overhead"]  # evaluation's network, then training's
    monkeypatch.setattr(bench, "run_quietly", lambda a: runs.append(a) or train.Result(0, acc=50.0, train_seconds=1.0,
                                                                                      images=8))
    bench.speedrun(bench.get_args_parser().parse_args(["--speedrun", "1", "--compile", "reduce-overhead"]))
    assert [r.compile for r in runs] == ["reduce-overhead", "reduce-overhead"]  # the warm-up run, then the run


@pytest.mark.parametrize("subset, warmup_subset", [(None, 48), (20, 20), (5000, 48)])
def test_the_speedrun_s_warm_up_trains_three_batches_or_the_subset_the_runs_train_on(monkeypatch, subset,
                                                                                     warmup_subset):
    runs = []
    monkeypatch.setattr(bench, "run_quietly", lambda a: runs.append(a) or train.Result(0, acc=50.0, train_seconds=1.0,
                                                                                      images=8))
    flags = ["--batch-size", "16"] + (["--subset", str(subset)] if subset else [])
    bench.speedrun(bench.get_args_parser().parse_args(["--speedrun", "1", "--", *flags]))
    warmup, run = runs
    assert (warmup.subset, warmup.epochs, warmup.batch_size) == (warmup_subset, 1, 16)
    assert (run.subset, run.epochs, run.batch_size) == (subset, 16, 16)


@pytest.mark.parametrize("subset, batch", [(None, 1024), (64, 64)])
def test_the_speedrun_line_names_the_batch_its_runs_trained_at(monkeypatch, subset, batch):
    def trained(args):  # an epoch: whole batches of the training set, or one step of a --subset smaller than one
        n = args.subset or 50000
        per_epoch = n // args.batch_size * args.batch_size if n >= args.batch_size else n
        return train.Result(0, acc=50.0, train_seconds=1.0, images=args.epochs * per_epoch)

    monkeypatch.setattr(bench, "run_quietly", trained)
    flags = ["--subset", str(subset)] if subset else []
    line = bench.speedrun(bench.get_args_parser().parse_args(["--speedrun", "1", "--", *flags]))
    assert f" epochs=16 batch={batch} " in line


@pytest.mark.parametrize("flags, refused", [(["--", "--epochs", "3"], "bench.py: error: --epochs: not a flag of the "
                                                                      "training step the benchmark times"),
                                            (["--", "--compile"], "bench.py: error: --compile: not a flag of"),
                                            (["--", "--model", "resnet50", "--data-dir", "x"],
                                             "bench.py: error: --model, --data-dir: not a flag of"),
                                            (["--cold-start", "a.jpg", "--", "--fused"],
                                             "bench.py: error: train.py flags (--fused) do not go with --cold-start")])
def test_train_py_flags_that_are_not_the_step_s_are_refused_in_one_line(tmp_path, flags, refused):
    proc = run_here("bench.py", *flags, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and one_line_error(proc).startswith(refused)


def test_a_compile_that_fails_ends_the_benchmark_s_process_with_train_py_s_line(monkeypatch):
    class CompiledWithoutACompiler(torch.nn.Module):  # torch.compile builds at the first call
        def __init__(self, model, mode=None):
            super().__init__()

        def forward(self, x):
            raise torch._inductor.exc.InductorError(RuntimeError("No working C++ compiler found"), None)

    monkeypatch.setattr(torch, "compile", CompiledWithoutACompiler)
    monkeypatch.setattr(device, "keep_freed_memory", lambda dev: None)
    args = bench.get_args_parser().parse_args(["--device", "cpu", "--batch-size", "4", "--steps", "1", "--compile"])
    with pytest.raises(SystemExit) as e:  # the parent then says the process stopped early, its error printed above
        bench.pipeline("ours", args, "cpu", types.SimpleNamespace(send=lambda reply: None, recv=lambda: "eval"))
    assert says(e.value.code, "torch.compile failed", "No working C++ compiler found", "without --compile")


def test_a_fused_kernel_the_device_lacks_ends_the_benchmark_s_process_with_train_py_s_line(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError(NO_FUSED_KERNEL)

    monkeypatch.setattr(torch, "_fused_sgd_", no_kernel)
    monkeypatch.setattr(device, "keep_freed_memory", lambda dev: None)
    args = bench.get_args_parser().parse_args(["--device", "cpu", "--batch-size", "4", "--steps", "1", "--", "--fused"])
    with pytest.raises(SystemExit) as e:
        bench.pipeline("ours", args, "cpu", types.SimpleNamespace(send=lambda reply: None, recv=lambda: "train"))
    assert e.value.code.startswith("error: SGD's fused kernel failed: Could not run 'aten::_fused_sgd_'")


def test_a_fused_kernel_the_device_lacks_ends_a_speedrun_with_train_py_s_line(tmp_path, cifar_dir, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError(NO_FUSED_KERNEL)

    monkeypatch.setattr(torch, "_fused_sgd_", no_kernel)
    proc = run_here("bench.py", "--speedrun", "1", "--device", "cpu", "--data-dir", cifar_dir, "--", "--epochs", "1",
                    *QUICK[2:], "--fused", cwd=tmp_path, check=False)
    assert says(one_line_error(proc), "fused kernel failed", "aten::_fused_sgd_", "without --fused")


def test_a_batch_too_large_for_memory_ends_the_benchmark_s_process_in_one_line(monkeypatch):
    def refused(*args, **kwargs):  # what the CPU allocator raises; the random images are the first to ask
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 26214400000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(torch, "randint", refused)
    args = bench.get_args_parser().parse_args(["--device", "cpu", "--batch-size", "100000"])
    with pytest.raises(SystemExit) as e:
        bench.pipeline("tutorial", args, "cpu", types.SimpleNamespace(send=lambda reply: None, recv=lambda: None))
    said = e.value.code
    assert said.startswith("error: out of memory") and "26214400000 bytes" in said and "\n" not in said
    assert said.endswith("a smaller --batch-size")


def test_bf16_on_an_npu_without_it_is_refused_before_the_benchmark_s_processes_start(monkeypatch):
    def no_process(*args):
        raise AssertionError("a benchmark process was started")

    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_bf16_supported=lambda: False), raising=False)
    monkeypatch.setattr(device, "pick_device", lambda name: types.SimpleNamespace(type="npu"))
    monkeypatch.setattr(bench.multiprocessing, "get_context", no_process)
    args = bench.get_args_parser().parse_args(["--device", "npu", "--", "--amp", "bf16"])
    with pytest.raises(device.DeviceError) as e:
        bench.main(args)
    assert "--amp bf16" in str(e.value) and "fp16" in str(e.value)


@pytest.mark.slow
def test_a_benchmark_process_the_system_kills_is_named_in_one_line(tmp_path):
    # as the out-of-memory killer does: SIGKILL, nothing printed; here at the start of each process
    kill = ("import multiprocessing.spawn, os, signal\n"
            "multiprocessing.spawn.spawn_main = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = run("bench.py", "--device", "cpu", "--batch-size", "2", "--steps", "1", cwd=tmp_path, check=False,
               env=injected(tmp_path, kill))
    assert says(one_line_error(proc), "killed (SIGKILL)", "memory", "a smaller --batch-size")
    assert "make" not in one_line_error(proc)


@pytest.mark.slow
def test_bench_cold_start_times_predict_py_against_the_tutorials_predict_flow(tmp_path):
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.jpg")
    proc = run_here("bench.py", "--cold-start", "red.jpg", "--repeats", "1", cwd=tmp_path)  # it starts the processes
    last = proc.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.split()[2:])
    assert last.startswith("bench cold_start picture=red.jpg ")
    assert float(fields["predict_s"]) > 0 and float(fields["tutorial_predict_s"]) > 0
    ratio = float(fields["predict_s"]) / float(fields["tutorial_predict_s"])
    assert abs(ratio / float(fields["predict_ratio"]) - 1) < 0.05  # the printed times are rounded
    proc = run_here("bench.py", "--cold-start", "missing.jpg", cwd=tmp_path, check=False)
    assert "missing.jpg" in one_line_error(proc)


def test_a_picture_predict_py_refuses_ends_the_cold_start_with_predict_py_s_own_line(tmp_path, monkeypatch):
    import subprocess
    (tmp_path / "notes.jpg").write_text("not a picture")
    said = "error: notes.jpg: cannot read picture (cannot identify image file)\n"
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 1, "", said))
    with pytest.raises(data.DataError) as e:
        bench.cold_start(str(tmp_path / "notes.jpg"), repeats=1)
    assert says(str(e.value), "predict.py failed", "notes.jpg", "cannot read picture")


@pytest.mark.slow
def test_speedrun_trains_the_fast_recipe_with_seeds_0_to_runs_and_sums_up_in_one_line(tmp_path, cifar_dir, capsys):
    recipe = ["--epochs", "1", "--subset", "16", "--batch-size", "8", "--eval-batch-size", "100", "--tta", "flip"]
    args = bench.get_args_parser().parse_args(["--speedrun", "2", "--device", "cpu", "--data-dir", str(cifar_dir),
                                               "--", *recipe])
    line = bench.speedrun(args)
    out = capsys.readouterr().out.strip().splitlines()
    runs = [dict(kv.split("=") for kv in ln.split()[1:]) for ln in out if ln.startswith("speedrun run=")]
    assert [r["seed"] for r in runs] == ["0", "1"]
    assert out[-1] == line
    fields = dict(kv.split("=") for kv in line.split()[1:])
    assert fields["runs"] == "2" and fields["epochs"] == "1" and fields["batch"] == "8" and fields["device"] == "cpu"
    accs = [float(r["acc"]) for r in runs]
    assert float(fields["mean_acc"]) == pytest.approx(sum(accs) / 2, abs=0.01) and float(fields["min_acc"]) == min(accs)
    seconds = [float(r["train_s"]) for r in runs]
    assert float(fields["max_train_s"]) == max(seconds) and float(fields["warmup_s"]) > 0
    # the fast recipe underneath, with the flags after -- on top
    fast = train.get_args_parser().parse_args([*bench.FAST_RECIPE, *recipe])
    assert fast.flip == "alternate" and fast.norm_weight_decay == 0 and fast.tta == "flip"


def test_ctrl_c_in_bench_py_exits_130_with_one_word_and_no_traceback(tmp_path, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(device, "pick_device", ctrl_c)  # the first thing the benchmark does
    proc = run_here("bench.py", "--device", "cpu", cwd=tmp_path, check=False)
    assert proc.returncode == 130 and says(proc.stderr.strip(), "interrupted") and "Traceback" not in proc.stderr


def test_a_speedrun_stopped_by_sigterm_exits_143_without_a_resume_hint_for_its_temporary_folder(monkeypatch, capsys):
    def stopped_run(args):
        print(f"stopped by SIGTERM after step 3; continue with: python train.py --resume {args.out_dir}/last.pth")
        return train.Result(128 + 15)

    monkeypatch.setattr(train, "main", stopped_run)
    args = train.get_args_parser().parse_args(["--out-dir", "/tmp/speedrun-xyz/0"])
    with pytest.raises(SystemExit) as stop:
        bench.run_quietly(args)
    out, err = capsys.readouterr()
    assert stop.value.code == 143 and "--resume" not in out + err
    assert says(err.strip(), "stopped by SIGTERM", "not kept")


@pytest.mark.parametrize("flags, named", [(["--seed", "7"], "--seed"), (["--out-dir=runs/x"], "--out-dir"),
                                          (["--out", "runs/x"], "--out-dir"), (["--resume"], "--resume"),
                                          (["--stop-after", "1", "--seed", "0"], "--seed, --stop-after")])
def test_flags_the_speedrun_sets_itself_are_refused_in_one_line(tmp_path, flags, named):
    proc = run_here("bench.py", "--speedrun", "1", "--", "--epochs", "1", *flags, cwd=tmp_path, check=False)
    line = one_line_error(proc)
    assert proc.returncode == 2 and line.startswith(f"bench.py: error: {named}: the speedrun sets these itself")
