"""Faults injected for real: processes killed at any moment, signals, damaged files,
hostile checkpoints and pictures. Nothing finished is lost; nothing ends in a traceback."""
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import batching
import data
import pictures
import resnet
from conftest import injected, QUICK, ROOT, make_archive, one_line_error, run, run_here, write_cifar, says

EPOCHS = 4
# 16 images in steps of 8: two steps an epoch, a log line each
ARGS = ["--epochs", str(EPOCHS), "--log-every", "1", *QUICK]


def start(args, cwd, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def assert_every_checkpoint_loads(run_dir):
    for path in run_dir.glob("*.pth"):
        resnet.load_checkpoint(path)  # raises on a half-written file


def assert_each_epoch_logged_once(run_dir, epochs=EPOCHS, steps=2):
    acc = [ln.split(",")[0] for ln in (run_dir / "acc.txt").read_text().splitlines()]
    assert acc == [f"EPOCH={e:03d}" for e in range(1, epochs + 1)]
    log = [ln[:9] for ln in (run_dir / "log.txt").read_text().splitlines()]
    assert log == [f"{(i - 1) // steps + 1:03d} {i:05d}" for i in range(1, epochs * steps + 1)]


@pytest.fixture(scope="module")
def reference(cifar_dir, tmp_path_factory):
    """An uninterrupted run to compare every interrupted one with."""
    work = tmp_path_factory.mktemp("reference")
    start_time = time.monotonic()
    run_here("train.py", "--data-dir", cifar_dir, *ARGS, "--out-dir", "run", cwd=work)
    # a whole run on this machine, now, torch already imported: what a started run has left after its first line
    (work / "seconds").write_text(str(time.monotonic() - start_time))
    return work / "run"


def run_and_maybe_kill(args, cwd, delay):
    """Start train.py; `delay` seconds after it has started working (its first line
    of output, once torch is imported and the data loaded), kill -9 it unless it has
    finished (delay None: let it finish). Timing from that line keeps the kills inside
    the run on any machine."""
    proc = start(args, cwd)
    lines, started = [], threading.Event()

    def drain():
        for line in proc.stdout:
            lines.append(line)
            started.set()
        started.set()

    reader = threading.Thread(target=drain)
    reader.start()
    started.wait(timeout=120)
    killed = False
    try:
        proc.wait(timeout=600 if delay is None else delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        killed = True
    proc.wait()
    reader.join()
    assert not (killed and delay is None), "the run hung"
    return proc.returncode, "".join(lines), killed


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_loses_nothing(tmp_path, cifar_dir, reference):
    """Runs are killed at random moments (fixed seed) and resumed until they finish;
    rounds repeat until at least six kills have landed inside a run. Once they have,
    the round in progress is resumed without kills to its end."""
    rng, wanted = random.Random(1234), 6
    reference_seconds = float((reference.parent / "seconds").read_text())  # kill windows scale with the machine
    kills, rounds = 0, 0
    while kills < wanted:
        rounds += 1
        run_dir = tmp_path / f"run{rounds}"
        for attempt in range(60):
            done_before = len((run_dir / "acc.txt").read_text().splitlines()) if (run_dir / "acc.txt").exists() else 0
            delay = rng.uniform(0.0, 0.6 * reference_seconds) if kills < wanted else None
            code, out, killed = run_and_maybe_kill(["--data-dir", cifar_dir, *ARGS, "--out-dir", run_dir, "--resume"],
                                                   tmp_path, delay)
            kills += killed
            assert "Traceback" not in out, out
            if "resuming" in out:  # at most the epoch in progress is redone
                assert int(out.split("after epoch ")[1].split()[0]) >= done_before - 1
            if run_dir.exists():
                assert_every_checkpoint_loads(run_dir)
            if code == 0:
                break
        assert code == 0, "the run never finished"
        assert_each_epoch_logged_once(run_dir)
        assert_same_weights(run_dir / "last.pth", reference / "last.pth")
        assert (run_dir / "best_acc.txt").read_text() == (reference / "best_acc.txt").read_text()


@pytest.mark.slow
def test_kill_9_in_the_middle_of_writing_a_checkpoint(tmp_path, cifar_dir, reference):
    # Process-level injection: the third torch.save writes half its bytes, then the process dies.
    env = injected(tmp_path,
        "import io, os, signal, torch\n"
        "save, calls = torch.save, []\n"
        "def dying_save(obj, f, *a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) < 3:\n"
        "        return save(obj, f, *a, **k)\n"
        "    buffer = io.BytesIO()\n"
        "    save(obj, buffer)\n"
        "    with open(f, 'wb') as out:\n"
        "        out.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = dying_save\n")
    proc = run("train.py", "--data-dir", cifar_dir, *ARGS, "--out-dir", "run", cwd=tmp_path, check=False,
               env=env)
    assert proc.returncode == -signal.SIGKILL
    assert_every_checkpoint_loads(tmp_path / "run")  # the half-written one is a .tmp, never read
    assert not (tmp_path / "run" / "last.pth").exists()  # it died writing epoch 1's last.pth, the first one
    proc = run_here("train.py", "--data-dir", cifar_dir, *ARGS, "--out-dir", "run", "--resume", cwd=tmp_path)
    assert "the run stopped while it saved epoch 1; starting the run afresh" in proc.stdout
    assert_each_epoch_logged_once(tmp_path / "run")
    assert_same_weights(tmp_path / "run" / "last.pth", reference / "last.pth")


@pytest.mark.slow
def test_kill_9_during_evaluation(tmp_path, cifar_dir, reference):
    proc = start(["--data-dir", cifar_dir, *ARGS, "--out-dir", "run"], tmp_path)
    for line in proc.stdout:  # the last training step of epoch 2 is logged, evaluation follows
        if line.startswith("epoch 2/4 step 2/2"):
            time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate()
    run_here("train.py", "--data-dir", cifar_dir, *ARGS, "--out-dir", "run", "--resume", cwd=tmp_path)
    assert_each_epoch_logged_once(tmp_path / "run")
    assert_same_weights(tmp_path / "run" / "last.pth", reference / "last.pth")


# With an EMA of the weights, whose state a stop mid-epoch must save too.
SIGNAL_ARGS = ["--epochs", "2", "--log-every", "1", "--device", "cpu", "--batch-size", "4", "--subset", "16",
               "--eval-batch-size", "100", "--ema", "0.9"]


@pytest.fixture(scope="module")
def reference_of_four_steps(cifar_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("reference4")
    run_here("train.py", "--data-dir", cifar_dir, *SIGNAL_ARGS, "--out-dir", "whole", cwd=work)
    return work / "whole"


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_sigint_stops_after_the_step_saves_and_says_how_to_resume(tmp_path, cifar_dir, signum, code,
                                                                           reference_of_four_steps):
    args = ["--data-dir", cifar_dir, *SIGNAL_ARGS]
    proc = start([*args, "--out-dir", "parts"], tmp_path)
    for line in proc.stdout:
        if line.startswith("epoch 1/2 step 1/4"):
            proc.send_signal(signum)
            break
    out = proc.communicate()[0]
    assert proc.returncode == code, out
    assert "--resume" in out and "Traceback" not in out
    state = torch.load(tmp_path / "parts" / "last.pth", weights_only=True)
    assert state["epoch"] == 0 and 1 <= state["step"] < 4
    run_here("train.py", *args, "--out-dir", "parts", "--resume", cwd=tmp_path)
    assert_same_weights(tmp_path / "parts" / "last.pth", reference_of_four_steps / "last.pth")
    for name in ("log.txt", "acc.txt"):
        assert (tmp_path / "parts" / name).read_text() == (reference_of_four_steps / name).read_text()
    # the resumed epoch's speed counts the pictures trained after the resume, in the time they took
    fields = dict(zip(*[ln.split(",") for ln in (tmp_path / "parts" / "metrics.csv").read_text().splitlines()[:2]]))
    trained = float(fields["img_s"]) * float(fields["epoch_seconds"])
    assert trained == pytest.approx((4 - state["step"]) * 4, abs=1.5)


def read_one_line_then_close(command, cwd):
    """What `command | head -1` does: read a line, then go away while the command is still writing."""
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=600)
    return proc.returncode, first, err


@pytest.mark.slow
def test_train_py_whose_reader_goes_away_stops_in_one_line(tmp_path, cifar_dir):
    # what it saved is safe as after any stop: the kill tests above resume from every moment
    args = [sys.executable, ROOT / "train.py", "--data-dir", cifar_dir, *ARGS, "--out-dir", "run"]
    code, first, err = read_one_line_then_close(args, tmp_path)
    assert first.startswith("resnet18 on cpu") and code == 141  # what a Unix tool stopped by SIGPIPE gives
    assert err.startswith("stopped: the reader of its output has gone") and err.count("\n") == 1


@pytest.mark.slow
def test_predict_py_whose_reader_goes_away_stops_quietly(tmp_path, reference, battery):
    d, _, _ = battery
    many = [d / "good.jpg"] * 120  # about 100 KB of JSON: more than a pipe holds (64 KiB), so predict.py must wait
    code, first, err = read_one_line_then_close(
        [sys.executable, ROOT / "predict.py", *many, "--topk", "10", "--json", "--checkpoint", reference / "best.pth"],
        tmp_path)
    assert first == "{\n" and code == 141 and err == ""


@pytest.mark.slow
@pytest.mark.parametrize("script", ["test.py", "predict.py", "plot.py"])
def test_output_that_cannot_be_written_is_one_line(tmp_path, reference, cifar_dir, battery, script):
    d, _, _ = battery
    args = {"test.py": ["--checkpoint", reference / "best.pth", "--data-dir", cifar_dir],
            "predict.py": [d / "good.jpg", "--checkpoint", reference / "best.pth"],
            "plot.py": [reference, "--out", tmp_path / "curves.png"]}[script]
    for unbuffered in ("1", ""):  # the write fails at once, or at the flush on the way out
        env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
        with open(os.devnull if not os.path.exists("/dev/full") else "/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, ROOT / script, *args], cwd=tmp_path, stdout=full,
                                  stderr=subprocess.PIPE, text=True, env=env)
        assert (proc.returncode, proc.stderr) == (1, "error: cannot write the output: No space left on device\n")
    closed = subprocess.run([sys.executable, ROOT / script, *args], cwd=tmp_path, preexec_fn=lambda: os.close(1),
                            stderr=subprocess.PIPE, text=True)  # `>&-`: nothing to write to is no error
    assert (closed.returncode, closed.stderr) == (0, "")


@pytest.mark.slow
def test_train_py_with_stdout_closed_trains_and_saves_as_ever(tmp_path, cifar_dir, reference):
    proc = subprocess.run([sys.executable, ROOT / "train.py", "--data-dir", cifar_dir, *ARGS, "--out-dir", "run"],
                          cwd=tmp_path, preexec_fn=lambda: os.close(1), stderr=subprocess.PIPE, text=True)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert_each_epoch_logged_once(tmp_path / "run")
    assert_same_weights(tmp_path / "run" / "last.pth", reference / "last.pth")


@pytest.mark.slow
def test_a_truncated_last_pth_names_the_file_and_an_earlier_epoch_to_resume_from(tmp_path, reference, cifar_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for f in reference.iterdir():
        (run_dir / f.name).write_bytes(f.read_bytes())
    (run_dir / "last.pth").write_bytes((run_dir / "last.pth").read_bytes()[:5000])
    (run_dir / "net_004.pth").write_bytes(b"\0" * 100)  # corrupt too: the hint skips it
    line = one_line_error(run_here("train.py", "--resume", "--out-dir", "run", "--data-dir", cifar_dir,
                                   cwd=tmp_path, check=False))
    assert "last.pth" in line and "net_003.pth" in line
    proc = run_here("train.py", "--resume", run_dir / "net_003.pth", "--data-dir", cifar_dir, "--device", "cpu",
                    "--log-every", "1", cwd=tmp_path)
    assert "weights only" in proc.stdout
    assert_each_epoch_logged_once(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["test.py", "predict.py"])
def test_a_truncated_checkpoint_is_a_one_line_error_naming_it(tmp_path, reference, cifar_dir, script):
    (tmp_path / "best.pth").write_bytes((reference / "best.pth").read_bytes()[:3000])
    args = ["--data-dir", cifar_dir] if script == "test.py" else ["picture.png"]
    line = one_line_error(run_here(script, *args, "--checkpoint", tmp_path / "best.pth", cwd=tmp_path, check=False))
    assert "best.pth" in line


class Evil:
    """Unpickled, it runs a shell command: what a hostile .pth holds."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["test.py", "predict.py", "train.py"])
def test_a_pth_that_would_run_code_is_refused_without_running_it(tmp_path, cifar_dir, script):
    marker = tmp_path / "pwned"
    torch.save({"arch": "resnet18", "model": {}, "args": {}, "epoch": 1, "x": Evil(marker)}, tmp_path / "evil.pth")
    if script == "train.py":
        args = ["--resume", tmp_path / "evil.pth", "--data-dir", cifar_dir]
    elif script == "test.py":
        args = ["--checkpoint", tmp_path / "evil.pth", "--data-dir", cifar_dir]
    else:
        args = ["--checkpoint", tmp_path / "evil.pth", "picture.png"]
    line = one_line_error(run(script, *args, cwd=tmp_path, check=False))
    assert "evil.pth" in line
    assert not marker.exists()


@pytest.mark.slow
def test_a_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, cifar_dir):
    # The third training step (epoch 2, step 1) produces a NaN loss.
    env = injected(tmp_path,
        "import torch.nn.functional as F\n"
        "ce, calls = F.cross_entropy, []\n"
        "def nan_ce(input, *a, **k):\n"
        "    loss = ce(input, *a, **k)\n"
        "    if input.requires_grad:\n"
        "        calls.append(1)\n"
        "        if len(calls) == 3:\n"
        "            return loss * float('nan')\n"
        "    return loss\n"
        "F.cross_entropy = nan_ce\n")
    proc = run("train.py", "--data-dir", cifar_dir, *ARGS, "--out-dir", "run", cwd=tmp_path, check=False, env=env)
    line = one_line_error(proc)
    assert "NaN" in line and "epoch 2, step 1" in line
    assert "nothing of epoch 2 was saved (last.pth still holds epoch 1)" in line
    state = resnet.load_checkpoint(tmp_path / "run" / "last.pth")
    weights = torch.cat([v.flatten().float() for v in state["model"].values()])
    assert state["epoch"] == 1 and torch.isfinite(weights).all()
    assert (tmp_path / "run" / "acc.txt").read_text().startswith("EPOCH=001")


def fail_at_call(monkeypatch, owner, name, call, error):
    """owner.name raises error at its call-th call, and otherwise does what it did."""
    calls, real = [], getattr(owner, name)

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.slow
@pytest.mark.parametrize("where, error, line", [
    ((torch.optim.SGD, "step", 3), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 ..."),
     "error: out of memory: CUDA out of memory; run again with a smaller --batch-size"),
    ((resnet, "evaluate", 2), RuntimeError("NPU out of memory. Tried to allocate 1.50 GiB (NPU 0; 60 GiB total)"),
     "error: out of memory in evaluation: NPU out of memory; run again --resume with a smaller --eval-batch-size"),
])
def test_out_of_memory_in_epoch_2_is_one_line_naming_the_batch_to_lower_and_keeps_epoch_1(tmp_path, cifar_dir,
                                                                                          monkeypatch, where, error,
                                                                                          line):
    fail_at_call(monkeypatch, *where, error)  # two optimizer steps and one evaluation an epoch
    proc = run_here("train.py", "--data-dir", cifar_dir, *ARGS, "--out-dir", "run", cwd=tmp_path, check=False)
    assert one_line_error(proc) == line
    assert resnet.load_checkpoint(tmp_path / "run" / "last.pth")["epoch"] == 1
    assert (tmp_path / "run" / "acc.txt").read_text().startswith("EPOCH=001")


@pytest.mark.slow
def test_out_of_memory_in_the_evaluation_of_an_epoch_resumed_mid_way_says_to_resume(tmp_path, cifar_dir, monkeypatch):
    step = torch.optim.SGD.step

    def step_then_sigterm(*args, **kwargs):  # a job scheduler's stop during epoch 1's first step
        step(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(torch.optim.SGD, "step", step_then_sigterm)
    proc = run_here("train.py", "--data-dir", cifar_dir, *ARGS, "--out-dir", "run", cwd=tmp_path, check=False)
    assert proc.returncode == 143 and resnet.load_checkpoint(tmp_path / "run" / "last.pth")["step"] == 1
    monkeypatch.undo()
    fail_at_call(monkeypatch, resnet, "evaluate", 1, torch.OutOfMemoryError("CUDA out of memory. Tried to ..."))
    proc = run_here("train.py", "--data-dir", cifar_dir, "--resume", "run/last.pth", cwd=tmp_path, check=False)
    assert says(one_line_error(proc), "out of memory in evaluation", "--resume", "--eval-batch-size")


@pytest.mark.slow
@pytest.mark.parametrize("where, line", [
    ((batching, "training_loaders", 1), "interrupted at once; nothing of the run was saved yet"),
    ((resnet, "evaluate", 2), "interrupted at once; continue from its last save with: python train.py --resume "
                              "run/last.pth --data-dir {data} --device cpu --eval-batch-size 100 --log-every 1")])
def test_a_second_ctrl_c_stops_at_once_and_says_what_was_saved(tmp_path, cifar_dir, monkeypatch, where, line):
    # while the data loads; in epoch 2's evaluation, epoch 1 saved (the first Ctrl-C only asks for a stop at
    # the next step: test_device.py's StopRequest test)
    fail_at_call(monkeypatch, *where, KeyboardInterrupt())
    proc = run_here("train.py", "--data-dir", cifar_dir, *ARGS, "--out-dir", "run", cwd=tmp_path, check=False)
    assert proc.returncode == 130 and one_line_error(proc) == line.format(data=cifar_dir)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["test.py", "predict.py"])
def test_out_of_memory_in_test_py_or_predict_py_is_one_line_naming_the_batch_to_lower(tmp_path, reference, cifar_dir,
                                                                                      battery, monkeypatch, script):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total ...")

    monkeypatch.setattr(resnet, "evaluate", out_of_memory)  # test.py's batches
    monkeypatch.setattr(batching, "normalize", out_of_memory)  # predict.py's
    what = ["--data-dir", cifar_dir] if script == "test.py" else [battery[0] / "good.jpg"]
    proc = run_here(script, *what, "--checkpoint", reference / "best.pth", cwd=tmp_path, check=False)
    assert one_line_error(proc) == "error: out of memory: CUDA out of memory; run again with a smaller --batch-size"


def test_an_extraction_that_fails_part_way_leaves_no_dataset(tmp_path):
    src = write_cifar(tmp_path / "src", n_train=50, n_test=20)
    path, _ = make_archive(src, tmp_path / "cifar-10-python.tar.gz")
    path.write_bytes(path.read_bytes()[:-4000])  # the gzip stream ends early
    import hashlib
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    with pytest.raises(data.DataError, match="cannot extract"):
        data.prepare(tmp_path / "d", archive=path, md5=md5)
    assert not (tmp_path / "d").exists()


def test_a_file_that_is_no_archive_at_all_is_one_line_however_many_formats_tarfile_tried(tmp_path):
    (tmp_path / "notes.tar.gz").write_text("not an archive\n")
    with pytest.raises(data.DataError) as e:
        data.prepare(tmp_path / "d", archive=tmp_path / "notes.tar.gz", md5="")
    assert says(str(e.value), tmp_path / "notes.tar.gz", "cannot extract")


def test_a_downloaded_archive_with_the_wrong_md5_is_removed_so_the_next_try_downloads_again(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "download", lambda url, dest, name: Path(dest).write_bytes(b"a proxy's error page"))
    (tmp_path / "d").mkdir()
    with pytest.raises(data.DataError, match="MD5") as e:
        data.prepare(tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == [] and "trust" not in str(e.value)  # it is gone: nothing to pass


def test_an_archive_put_in_the_data_folder_by_hand_is_kept_whatever_its_md5(tmp_path):
    (tmp_path / "d").mkdir()
    archive = tmp_path / "d" / "cifar-10-python.tar.gz"
    archive.write_bytes(b"a repacked copy")  # where torchvision users put theirs
    with pytest.raises(data.DataError) as e:
        data.prepare(tmp_path / "d")
    assert archive.read_bytes() == b"a repacked copy"
    assert says(str(e.value), f"--md5 {data.md5sum(archive)}", "delete it")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["test.py", "predict.py"])
def test_a_checkpoint_of_another_architecture_or_a_non_checkpoint_is_one_line(tmp_path, reference, cifar_dir,
                                                                             script):
    ckpt = torch.load(reference / "best.pth", weights_only=True)
    torch.save({**ckpt, "arch": "resnet50"}, tmp_path / "wrong_arch.pth")
    torch.save([1, 2, 3], tmp_path / "a_list.pth")
    (tmp_path / "text.pth").write_text("hello")
    args = ["--data-dir", cifar_dir] if script == "test.py" else ["picture.png"]
    for name in ("wrong_arch.pth", "a_list.pth", "text.pth"):
        line = one_line_error(run_here(script, *args, "--checkpoint", tmp_path / name, cwd=tmp_path, check=False))
        assert name in line


@pytest.mark.slow
def test_test_py_refuses_a_checkpoint_whose_class_count_differs_from_the_data(tmp_path, reference, cifar_dir):
    model = resnet.build_model("resnet18", num_classes=100)
    ckpt = torch.load(reference / "best.pth", weights_only=True)
    torch.save({**ckpt, "num_classes": 100, "classes": [str(i) for i in range(100)], "model": model.state_dict()},
               tmp_path / "c100.pth")
    line = one_line_error(run_here("test.py", "--checkpoint", tmp_path / "c100.pth", "--data-dir", cifar_dir,
                                   cwd=tmp_path, check=False))
    assert "100 classes" in line


def bomb_png(path, side=30000):
    """A small PNG whose header claims side x side pixels (Pillow refuses it before decoding)."""
    Image.new("L", (8, 8)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", side, side)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("side", [10000, 30000])  # Pillow's limit is 89.5 million pixels: 1.1x and 10x of it
def test_a_picture_over_pillow_s_pixel_limit_is_refused_before_decoding(tmp_path, side):
    bomb_png(tmp_path / "bomb.png", side)
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(pictures.PictureError, match="bomb.png: too many pixels to decode safely"):
        pictures.open_picture(tmp_path / "bomb.png", draft=(64, 64))
    assert Image.MAX_IMAGE_PIXELS == limit  # lifted for Image.open alone


def test_a_jpeg_over_the_pixel_limit_is_read_where_its_draft_decodes_within_it(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # a 1.2-megapixel photo as a 120-megapixel one
    Image.new("RGB", (1200, 1000), (200, 30, 30)).save(tmp_path / "photo.jpg")
    assert pictures.open_picture(tmp_path / "photo.jpg", draft=(64, 64)).size == (150, 125)  # an eighth of each side
    assert pictures.load_picture(tmp_path / "photo.jpg", 32).shape == (3, 32, 32)
    with pytest.raises(pictures.PictureError, match="photo.jpg: too many pixels to decode safely"):
        pictures.open_picture(tmp_path / "photo.jpg")  # at full size
    Image.new("RGB", (1200, 1000)).save(tmp_path / "photo.png")
    with pytest.raises(pictures.PictureError, match="photo.png: too many pixels to decode safely"):
        pictures.open_picture(tmp_path / "photo.png", draft=(64, 64))  # no draft decoding for a PNG
    assert Image.MAX_IMAGE_PIXELS == 1_000_000


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    """Broken and odd pictures, each with what predict.py must do with it."""
    d = tmp_path_factory.mktemp("battery")
    base = Image.new("RGB", (64, 48), (200, 30, 30))
    base.save(d / "good.jpg")
    (d / "truncated.jpg").write_bytes((d / "good.jpg").read_bytes()[:300])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("not a picture")
    frames = [Image.new("P", (40, 40), i * 40) for i in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("I;16", (40, 40), 40000).save(d / "sixteen.png")
    base.convert("CMYK").save(d / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    base.save(d / "rotated.jpg", exif=exif)
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(d / "palette.png", transparency=0)
    bomb_png(d / "bomb.png")
    ok = ["good.jpg", "animated.gif", "sixteen.png", "cmyk.jpg", "rotated.jpg", "palette.png"]
    bad = ["truncated.jpg", "empty.jpg", "text.jpg", "bomb.png"]
    return d, ok, bad


@pytest.mark.slow
def test_every_odd_picture_is_predicted_and_every_broken_one_gets_its_own_line(tmp_path, reference, battery):
    d, ok, bad = battery
    proc = run_here("predict.py", d, d / "missing.jpg", "--checkpoint", reference / "best.pth", cwd=tmp_path,
                    check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    predicted = {os.path.basename(ln.split(":")[0]) for ln in proc.stdout.splitlines()}
    assert predicted == set(ok)
    errors = proc.stderr.strip().splitlines()
    assert sorted(os.path.basename(e.split(": ")[1]) for e in errors) == sorted(bad + ["missing.jpg"])
    assert any("too many pixels" in e for e in errors)


def test_exif_rotation_is_applied():
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as t:
        im = Image.new("RGB", (40, 20), (255, 0, 0))
        im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue, right half red
        exif = Image.Exif()
        exif[0x0112] = 6  # viewer rotates 90 degrees clockwise: blue ends up on top
        im.save(Path(t) / "r.jpg", exif=exif, quality=95)
        x = pictures.load_picture(Path(t) / "r.jpg", 32)
    top, bottom = x[:, :8].float().mean((1, 2)), x[:, -8:].float().mean((1, 2))
    assert top[2] > 200 and top[0] < 60 and bottom[0] > 200 and bottom[2] < 60


@pytest.mark.slow
def test_a_folder_without_pictures_and_a_missing_path_are_one_line_each(tmp_path, reference):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("no pictures here")
    proc = run_here("predict.py", tmp_path / "nothing", tmp_path / "gone.png", "--checkpoint", reference / "best.pth",
                    cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 2 and "holds no pictures" in errors[0] and "no such file" in errors[1]


@pytest.mark.slow
def test_checkpoints_and_logs_hold_no_absolute_paths_or_environment(tmp_path, cifar_dir, monkeypatch):
    monkeypatch.setenv("API_TOKEN", "s3cr3t-t0k3n-value")
    out = tmp_path / "abs-run"
    run_here("train.py", "--data-dir", cifar_dir.resolve(), "--out-dir", out.resolve(), "--epochs", "1", *QUICK,
             cwd=tmp_path)
    for f in out.iterdir():
        content = f.read_bytes()
        assert b"s3cr3t" not in content, f.name
        if f.name != "data_dir.txt":  # the one local note, for test.py and export.py; never in a checkpoint
            assert str(tmp_path).encode() not in content and str(cifar_dir.resolve()).encode() not in content, f.name
    args = resnet.load_checkpoint(out / "best.pth")["args"]
    assert args["data_dir"] == cifar_dir.name and args["batch_size"] == 8


@pytest.mark.slow
def test_half_written_log_lines_from_a_kill_are_cleaned_up_on_resume(tmp_path, reference, cifar_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for f in reference.iterdir():
        (run_dir / f.name).write_bytes(f.read_bytes())
    for name, half in (("log.txt", "005 0"), ("acc.txt", "EPOCH="), ("metrics.csv", "5,1.2")):
        with open(run_dir / name, "a") as f:
            f.write(half)
    proc = run_here("train.py", "--data-dir", cifar_dir, *ARGS, "--out-dir", run_dir, "--resume", cwd=tmp_path)
    assert "nothing to do" in proc.stdout
    for name in ("log.txt", "acc.txt", "metrics.csv"):
        assert (run_dir / name).read_text() == (reference / name).read_text()


def test_torch_save_s_own_error_on_a_full_disk_names_the_file_and_the_likely_cause(tmp_path, monkeypatch):
    from rundir import TrainingError, save_checkpoint

    def full(obj, f, *args, **kwargs):  # what the zip writer says when a write comes up short
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 60599616 vs 60599504")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(TrainingError) as e:
        save_checkpoint({}, tmp_path / "net_002.pth")
    assert says(str(e.value), f"cannot write {tmp_path / 'net_002.pth'}", "disk full", "intact")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, cifar_dir):
    # The fourth torch.save (net_002.pth) fails the way a full disk does, after writing part of the file.
    env = injected(tmp_path,
        "import errno, torch\n"
        "save, calls = torch.save, []\n"
        "def full_disk(obj, f, *a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 4:\n"
        "        open(f, 'wb').write(b'partial')\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return save(obj, f, *a, **k)\n"
        "torch.save = full_disk\n")
    proc = run("train.py", "--data-dir", cifar_dir, *ARGS, "--out-dir", "run", cwd=tmp_path, check=False, env=env)
    line = one_line_error(proc)
    assert "No space left on device" in line and "net_002.pth" in line
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert resnet.load_checkpoint(tmp_path / "run" / "last.pth")["epoch"] == 1
